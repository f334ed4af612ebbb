"""Recomputing the fused model's BatchNorm statistics from per-node statistics."""

from pathlib import Path

import numpy as np
import torch

from edgeface import steps
from edgeface.config import load_config


def write_stats(path: Path, features: np.ndarray) -> Path:
    stats = {"bn.running_mean": torch.tensor(features.mean(0), dtype=torch.float32),
             "bn.running_var": torch.tensor(features.var(0), dtype=torch.float32),
             "bn.num_batches_tracked": torch.tensor(3)}
    torch.save(stats, path)
    return path


def test_merge_pools_mean_and_variance(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    node_a = rng.normal(0.0, 1.0, size=(300, 4))
    node_b = rng.normal(5.0, 2.0, size=(100, 4))
    files = {"node-a": (write_stats(tmp_path / "a.pt", node_a), 300),
             "node-b": (write_stats(tmp_path / "b.pt", node_b), 100)}
    global_state = {"bn.running_mean": torch.zeros(4), "bn.running_var": torch.ones(4),
                    "bn.num_batches_tracked": torch.tensor(7), "conv.weight": torch.ones(2)}

    merged = steps.merge_batchnorm_stats(global_state, files)

    pooled = np.concatenate([node_a, node_b])
    np.testing.assert_allclose(merged["bn.running_mean"].numpy(), pooled.mean(0), rtol=1e-5)
    np.testing.assert_allclose(merged["bn.running_var"].numpy(), pooled.var(0), rtol=1e-4)
    assert merged["bn.running_mean"].dtype == torch.float32
    assert torch.equal(merged["conv.weight"], global_state["conv.weight"])
    assert int(merged["bn.num_batches_tracked"]) == 7


def test_merge_ignores_empty_nodes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    node = rng.normal(2.0, 1.0, size=(50, 3))
    files = {"node-0": (write_stats(tmp_path / "a.pt", node), 50),
             "node-1": (tmp_path / "missing.pt", 0)}
    global_state = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)}
    merged = steps.merge_batchnorm_stats(global_state, files)
    np.testing.assert_allclose(merged["bn.running_mean"].numpy(), node.mean(0), rtol=1e-5)
    assert steps.merge_batchnorm_stats(global_state, {}) is global_state


def test_calibration_replaces_averaged_stats(orl_dir: Path, tmp_path: Path) -> None:
    from edgeface.data.ingest import list_images
    from edgeface.data.partition import NodeShard

    config = load_config(overrides={"image-size": 32, "batch-size": 16})
    records = [r for r in list_images(orl_dir) if r.identity in {"s1", "s2", "s3", "s4"}]
    data = steps.prepare_node(orl_dir, NodeShard("node-0", records), config, tmp_path / "cache")
    state = steps.initial_state(config)
    torch.save(state, tmp_path / "global.pt")

    count = steps.calibrate_batchnorm(data, tmp_path / "global.pt", tmp_path / "stats.pt",
                                      config, round_index=0)

    assert count == len(records)
    stats = torch.load(tmp_path / "stats.pt", weights_only=True)
    assert stats, "no BatchNorm statistics were written"
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in stats)
    first_var = next(k for k in stats if k.endswith("running_var"))
    # A fresh model has running_var 1 everywhere; real faces change it.
    assert not torch.allclose(stats[first_var], state[first_var])
    assert all(torch.isfinite(v.float()).all() for v in stats.values())
