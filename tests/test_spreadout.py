"""Server-side spread-out of class centres across nodes (FedAwS / FedFace)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from edgeface import steps
from edgeface.aggregation import SpreadOut
from edgeface.config import load_config
from edgeface.errors import ConfigError, DataError


def collapsed_centres(nodes: int = 3, per_node: int = 5, dim: int = 16) -> dict[str, torch.Tensor]:
    """Return centres of several nodes that all crowd around one direction."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, dim, generator=generator)
    return {f"node-{i}": base + 0.3 * torch.randn(per_node, dim, generator=generator)
            for i in range(nodes)}


def max_cross_cosine(centres: dict[str, torch.Tensor]) -> float:
    names = sorted(centres)
    best = -1.0
    for a in names:
        for b in names:
            if a < b and len(centres[a]) and len(centres[b]):
                cosine = torch.nn.functional.normalize(centres[a], dim=1) @ \
                    torch.nn.functional.normalize(centres[b], dim=1).T
                best = max(best, float(cosine.max()))
    return best


def regularizer(weights: torch.Tensor, owner: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over unordered pairs of different nodes of max(0, margin - ||w_i - w_j||)^2."""
    total = weights.new_zeros(())
    for i in range(len(weights)):
        for j in range(i + 1, len(weights)):
            if owner[i] != owner[j]:
                total = total + (margin - (weights[i] - weights[j]).norm()).clamp_min(0) ** 2
    return total


def test_spreadout_lowers_cross_node_cosine() -> None:
    centres = collapsed_centres()
    result = SpreadOut(lr=0.1, steps=20).apply(centres)

    assert result.max_cosine_before == pytest.approx(max_cross_cosine(centres), abs=1e-5)
    assert result.max_cosine_after == pytest.approx(max_cross_cosine(result.centres), abs=1e-5)
    assert result.max_cosine_after < result.max_cosine_before - 0.5
    for name, rows in result.centres.items():
        assert rows.shape == centres[name].shape
        assert torch.allclose(rows.norm(dim=1), torch.ones(len(rows)), atol=1e-5)


def test_spreadout_gradient_matches_autograd() -> None:
    centres = collapsed_centres(nodes=2, per_node=3, dim=4)
    weights = torch.nn.functional.normalize(torch.cat(list(centres.values())).double(), dim=1)
    owner = torch.tensor([0, 0, 0, 1, 1, 1])
    spreadout = SpreadOut(margin=1.2)

    leaf = weights.clone().requires_grad_(True)
    regularizer(leaf, owner, 1.2).backward()
    gradient = spreadout._gradient(weights, owner[:, None] != owner[None, :])

    assert torch.allclose(gradient, leaf.grad, atol=1e-9)


def test_spreadout_leaves_silent_node_unchanged() -> None:
    centres = collapsed_centres()
    centres["node-silent"] = torch.empty(0, 16)
    result = SpreadOut().apply(centres)

    assert result.centres["node-silent"].shape == (0, 16)
    assert not torch.equal(result.centres["node-0"],
                           torch.nn.functional.normalize(centres["node-0"], dim=1))


def test_spreadout_single_node_unchanged() -> None:
    centres = {"node-0": collapsed_centres()["node-0"]}
    result = SpreadOut().apply(centres)

    assert torch.equal(result.centres["node-0"], centres["node-0"])
    assert math.isnan(result.max_cosine_before)


def test_spreadout_leaves_distant_centres() -> None:
    # Orthogonal unit rows are sqrt(2) apart: beyond a margin of 1.0, so no pair repels.
    eye = torch.eye(4)
    centres = {"node-0": eye[:2].clone(), "node-1": eye[2:].clone()}
    result = SpreadOut(margin=1.0).apply(centres)

    assert torch.allclose(result.centres["node-0"], eye[:2])
    assert torch.allclose(result.centres["node-1"], eye[2:])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"margin": 2.5}, "margin must be a number in (0, 2], got 2.5"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"steps": 1.5}, "steps must be an integer >= 1, got 1.5"),
    ],
)
def test_spreadout_rejects_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SpreadOut(**options)
    assert message in str(caught.value)
    assert "--spreadout-" in str(caught.value)


def test_spreadout_rejects_bad_centres() -> None:
    centres = collapsed_centres()
    centres["node-1"] = centres["node-1"].clone()
    centres["node-1"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="node-1.*NaN"):
        SpreadOut().apply(centres)

    with pytest.raises(ValueError, match="embedding size"):
        SpreadOut().apply({"a": torch.randn(2, 4), "b": torch.randn(2, 5)})

    with pytest.raises(ValueError, match="2-D floating-point"):
        SpreadOut().apply({"a": torch.randn(4), "b": torch.randn(2, 4)})


def test_config_rejects_bad_spreadout_margin() -> None:
    with pytest.raises(ConfigError, match="spreadout-margin"):
        load_config(overrides={"spreadout-margin": 2.5})


def test_config_builds_spreadout() -> None:
    assert steps.make_spreadout(load_config()) is None
    config = load_config(overrides={"spreadout": True, "spreadout-lr": 0.5,
                                    "spreadout-steps": 3})
    spreadout = steps.make_spreadout(config)
    assert (spreadout.lr, spreadout.steps) == (0.5, 3)


def tiny_node(name: str, classes: int, seed: int) -> steps.NodeData:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (4 * classes, 16, 16, 3), dtype=torch.uint8,
                           generator=generator)
    labels = torch.arange(classes).repeat_interleave(4)
    return steps.NodeData(node=name, images=images, labels=labels,
                          identities=[f"{name}-p{i}" for i in range(classes)], checked=len(labels),
                          bad=[], cache_hit=False)


def test_train_node_sends_and_loads_centres(tmp_path: Path) -> None:
    config = load_config(overrides={"spreadout": True, "image-size": 16, "embedding-dim": 8,
                                    "batch-size": 4, "local-epochs": 0.5, "augment": False,
                                    "rounds": 2})
    global_path = steps.save_atomic(steps.initial_state(config), tmp_path / "global.pt")
    nodes = {name: tiny_node(name, 3, seed) for seed, name in enumerate(["node-0", "node-1"])}

    files = {}
    for name, data in nodes.items():
        update = tmp_path / "round-0" / f"{name}.pt"
        steps.train_node(data, global_path, tmp_path / name, update, config, 0)
        files[name] = steps.centres_file(update)
        assert torch.load(files[name], weights_only=True).shape == (3, 8)

    adjusted, metrics = steps.spreadout_step(steps.make_spreadout(config), files,
                                             tmp_path / "server")
    assert metrics["spreadout_max_cosine_after"] <= metrics["spreadout_max_cosine_before"]

    # Round 1 starts from the adjusted centres: with a learning rate of ~0 the head rows that
    # the node sends back are the adjusted ones.
    frozen = config.model_copy(update={"train": config.train.model_copy(update={"lr": 1e-12})})
    update = tmp_path / "round-1" / "node-0.pt"
    steps.train_node(nodes["node-0"], global_path, tmp_path / "node-0", update, frozen, 1,
                     centres_path=adjusted["node-0"])
    sent = torch.load(steps.centres_file(update), weights_only=True)
    assert torch.allclose(sent, torch.load(adjusted["node-0"], weights_only=True), atol=1e-6)


def test_train_node_rejects_foreign_centres(tmp_path: Path) -> None:
    config = load_config(overrides={"spreadout": True, "image-size": 16, "embedding-dim": 8,
                                    "batch-size": 4, "local-epochs": 0.5})
    global_path = steps.save_atomic(steps.initial_state(config), tmp_path / "global.pt")
    wrong = steps.save_atomic(torch.randn(5, 8), tmp_path / "wrong.pt")
    with pytest.raises(DataError, match=r"shape \(5, 8\).*\(3, 8\)"):
        steps.train_node(tiny_node("node-0", 3, 0), global_path, tmp_path / "node-0",
                         tmp_path / "u.pt", config, 1, centres_path=wrong)


def test_spreadout_files_hold_own_rows(tmp_path: Path) -> None:
    centres = collapsed_centres()
    files = {name: steps.save_atomic(rows, tmp_path / "in" / f"{name}.pt")
             for name, rows in centres.items()}
    adjusted, _ = steps.spreadout_step(SpreadOut(), files, tmp_path / "out")

    for name, path in adjusted.items():
        loaded = torch.load(path, weights_only=True)
        assert loaded.shape == centres[name].shape
        # A saved view would carry the storage of every node's centres.
        assert loaded.untyped_storage().nbytes() == loaded.numel() * loaded.element_size()


def test_spreadout_warns_on_shared_people(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="edgeface.steps"):
        steps.make_spreadout(load_config(overrides={"spreadout": True}))
    assert not caplog.records
    with caplog.at_level("WARNING", logger="edgeface.steps"):
        steps.make_spreadout(load_config(overrides={"spreadout": True, "partition": "iid"}))
    assert "'iid' partition" in caplog.text


def test_spreadout_round_takes_accepted_nodes(tmp_path: Path) -> None:
    updates = {}
    for name, rows in collapsed_centres(nodes=3).items():
        updates[name] = tmp_path / f"{name}.pt"
        steps.save_atomic(rows, steps.centres_file(updates[name]))
    written, metrics = steps.spreadout_round(SpreadOut(), updates, ["node-2", "node-0"],
                                             tmp_path / "two")
    assert sorted(written) == ["node-0", "node-2"]
    assert metrics["spreadout_max_cosine_after"] < metrics["spreadout_max_cosine_before"]

    updates["node-3"] = tmp_path / "node-3.pt"
    with pytest.raises(DataError, match=r"node-3 \(.*node-3\.centres\.pt\).*spreadout off"):
        steps.spreadout_round(SpreadOut(), updates, ["node-0", "node-3"], tmp_path / "out")
