"""Aggregation strategies checked against numpy oracles on small and real state dicts."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pytest
import torch
from torch import nn

from edgeface.aggregation import (
    NodeUpdate,
    batchnorm_keys,
    build_strategy,
    fedavg,
    validate_update,
)
from edgeface.errors import ConfigError, QuorumError
from edgeface.model import ModelSpec, build_backbone

BN_KEYS = {
    "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked",
}


def small_state(seed: int) -> dict[str, torch.Tensor]:
    """Return a seeded state dict shaped like conv -> BatchNorm -> linear."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "bn.weight": 1 + 0.1 * torch.randn(4, generator=generator),
        "bn.bias": 0.1 * torch.randn(4, generator=generator),
        "bn.running_mean": torch.randn(4, generator=generator),
        "bn.running_var": 0.5 + torch.rand(4, generator=generator),
        "bn.num_batches_tracked": torch.tensor(10 + 7 * seed, dtype=torch.int64),
        "fc.weight": torch.randn(2, 4, generator=generator),
    }


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    """Return a copy of `state` with small seeded noise on the float tensors, as after training."""
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for key, value in state.items():
        if value.is_floating_point():
            noise = scale * torch.randn(value.shape, generator=generator)
            if key.endswith("running_var"):
                noise = noise.abs()
            result[key] = value + noise
        else:
            result[key] = value + seed
    return result


def numpy_fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, np.ndarray]:
    """Oracle: np.average in float64, cast back. Integers are rounded half to even (np.rint)."""
    result = {}
    for key, template in states[0].items():
        stacked = np.stack([state[key].numpy().astype(np.float64) for state in states])
        mean = np.average(stacked, axis=0, weights=np.asarray(weights, dtype=np.float64))
        dtype = template.numpy().dtype
        result[key] = mean.astype(dtype) if template.is_floating_point() else np.rint(mean).astype(dtype)
    return result


def assert_state_close(actual: dict[str, torch.Tensor], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == torch.from_numpy(np.asarray(value)).dtype, key
        if actual[key].is_floating_point():
            np.testing.assert_allclose(actual[key].numpy(), value, rtol=1e-5, atol=1e-7, err_msg=key)
        else:
            np.testing.assert_array_equal(actual[key].numpy(), value, err_msg=key)


def updates_for(states: list[dict[str, torch.Tensor]], counts: list[int]) -> list[NodeUpdate]:
    return [
        NodeUpdate(f"node-{index}", state, count)
        for index, (state, count) in enumerate(zip(states, counts))
    ]


# fedavg as a pure function


@pytest.mark.parametrize("weights", [[3, 1], [5, 2, 7], [1, 1, 1, 1]])
def test_fedavg_matches_numpy_oracle(weights: list[int]) -> None:
    states = [small_state(seed) for seed in range(len(weights))]

    fused = fedavg(states, weights)

    assert_state_close(fused, numpy_fedavg(states, weights))


def test_fedavg_preserves_dtypes() -> None:
    states = [small_state(0), small_state(1)]
    for state in states:
        state["half"] = torch.ones(3, dtype=torch.float16)

    fused = fedavg(states, [1, 2])

    assert fused["conv.weight"].dtype == torch.float32
    assert fused["bn.running_var"].dtype == torch.float32
    assert fused["half"].dtype == torch.float16
    assert fused["bn.num_batches_tracked"].dtype == torch.int64


def test_fedavg_rounds_integer_buffers_to_nearest() -> None:
    first, second = small_state(0), small_state(1)
    first["bn.num_batches_tracked"] = torch.tensor(10)
    second["bn.num_batches_tracked"] = torch.tensor(13)

    assert int(fedavg([first, second], [3, 1])["bn.num_batches_tracked"]) == 11  # 10.75
    assert int(fedavg([first, second], [1, 1])["bn.num_batches_tracked"]) == 12  # 11.5, to even
    assert int(fedavg([first, second], [1, 3])["bn.num_batches_tracked"]) == 12  # 12.25


def test_fedavg_ignores_zero_weight_state() -> None:
    states = [small_state(0), small_state(1)]
    poisoned = small_state(2)
    poisoned["conv.weight"][0, 0, 0, 0] = float("nan")

    with_zero = fedavg([states[0], poisoned, states[1]], [3, 0, 1])

    for key, value in fedavg(states, [3, 1]).items():
        assert torch.equal(with_zero[key], value), key


def test_fedavg_all_zero_weights_raise() -> None:
    with pytest.raises(QuorumError, match="positive weight"):
        fedavg([small_state(0), small_state(1)], [0, 0])


def test_fedavg_rejects_bad_arguments() -> None:
    states = [small_state(0), small_state(1)]
    with pytest.raises(ValueError, match="2 state dicts but 3 weights"):
        fedavg(states, [1, 1, 1])
    with pytest.raises(ValueError, match="invalid weight -1"):
        fedavg(states, [1, -1])
    del states[1]["fc.weight"]
    with pytest.raises(ValueError, match="'fc.weight'"):
        fedavg(states, [1, 1])


def test_fedavg_restricts_to_given_keys() -> None:
    fused = fedavg([small_state(0), small_state(1)], [1, 1], keys=["fc.weight"])
    assert list(fused) == ["fc.weight"]


# validate_update


def test_validate_update_accepts_matching_state() -> None:
    reference = small_state(0)
    assert validate_update(NodeUpdate("a", perturbed(reference, 1), 10), reference) is None
    assert validate_update(NodeUpdate("a", perturbed(reference, 1), 0), reference) is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("nan", "1 non-finite values (NaN or infinity) in 'conv.weight'"),
        ("inf", "1 non-finite values (NaN or infinity) in 'conv.weight'"),
        ("shape", "shape mismatch for 'fc.weight': got (3, 4), expected (2, 4)"),
        ("dtype", "dtype mismatch for 'fc.weight': got torch.float64, expected torch.float32"),
        ("missing", "1 missing keys ('fc.weight')"),
        ("extra", "1 unexpected keys ('head.weight')"),
        ("negative", "num_samples is negative (-5)"),
        ("float_count", "num_samples must be an integer, got 2.5"),
    ],
)
def test_validate_update_reasons(change: str, expected: str) -> None:
    reference = small_state(0)
    state = perturbed(reference, 1)
    count: object = 10
    if change == "nan":
        state["conv.weight"][1, 2, 0, 0] = float("nan")
    elif change == "inf":
        state["conv.weight"][0, 0, 0, 0] = float("-inf")
    elif change == "shape":
        state["fc.weight"] = torch.zeros(3, 4)
    elif change == "dtype":
        state["fc.weight"] = state["fc.weight"].double()
    elif change == "missing":
        del state["fc.weight"]
    elif change == "extra":
        state["head.weight"] = torch.zeros(5, 2)
    elif change == "negative":
        count = -5
    elif change == "float_count":
        count = 2.5

    reason = validate_update(NodeUpdate("a", state, count), reference)  # type: ignore[arg-type]

    assert reason is not None
    assert expected in reason


# Strategies: screening and quorum


def test_strategy_rejects_non_finite_update(caplog: pytest.LogCaptureFixture) -> None:
    global_state = small_state(0)
    states = [perturbed(global_state, seed) for seed in (1, 2, 3)]
    states[1]["bn.running_mean"][2] = float("nan")
    strategy = build_strategy("fedavg")

    with caplog.at_level(logging.WARNING, logger="edgeface.aggregation"):
        result = strategy.aggregate(global_state, updates_for(states, [30, 20, 10]))

    assert result.accepted == ["node-0", "node-2"]
    assert [node for node, _ in result.rejected] == ["node-1"]
    assert "'bn.running_mean'" in result.rejected[0][1]
    assert "rejected update from node node-1" in caplog.text
    assert_state_close(result.state, numpy_fedavg([states[0], states[2]], [30, 10]))


def test_strategy_rejects_shape_mismatch() -> None:
    global_state = small_state(0)
    states = [perturbed(global_state, seed) for seed in (1, 2)]
    states[0]["conv.weight"] = torch.zeros(8, 3, 3, 3)

    result = build_strategy("fedavg").aggregate(global_state, updates_for(states, [5, 5]))

    assert result.rejected == [
        ("node-0", "shape mismatch for 'conv.weight': got (8, 3, 3, 3), expected (4, 3, 3, 3)")
    ]
    assert_state_close(result.state, numpy_fedavg([states[1]], [5]))


def test_strategy_rejects_zero_samples_and_duplicates() -> None:
    global_state = small_state(0)
    states = [perturbed(global_state, seed) for seed in (1, 2, 3)]
    updates = updates_for(states, [5, 0, 7])
    updates[2].node = "node-0"

    result = build_strategy("fedavg").aggregate(global_state, updates)

    assert result.accepted == ["node-0"]
    reasons = dict(result.rejected)
    assert "num_samples is 0" in reasons["node-1"]
    assert "duplicate update" in reasons["node-0"]


def test_quorum_failure_names_rejected_nodes() -> None:
    global_state = small_state(0)
    states = [perturbed(global_state, seed) for seed in (1, 2, 3)]
    states[0]["fc.weight"][0, 0] = float("inf")
    del states[2]["bn.bias"]
    strategy = build_strategy("fedavgm", min_nodes=2)

    with pytest.raises(QuorumError) as error:
        strategy.aggregate(global_state, updates_for(states, [5, 5, 5]))

    message = str(error.value)
    assert "only 1 of 3 node updates were accepted, but min_nodes is 2" in message
    assert "node-0: 1 non-finite values (NaN or infinity) in 'fc.weight'" in message
    assert "node-2: state dict does not match the global model: 1 missing keys ('bn.bias')" in message
    assert "node-1" not in message
    assert strategy.state_dict()["rounds"] == 0


def test_aggregate_reports_metrics() -> None:
    global_state = small_state(0)
    states = [perturbed(global_state, seed) for seed in (1, 2)]

    result = build_strategy("fedavg").aggregate(global_state, updates_for(states, [3, 1]))

    expected_norm = np.sqrt(sum(
        float(((result.state[key].double() - global_state[key].double()) ** 2).sum())
        for key in global_state if global_state[key].is_floating_point()
    ))
    assert result.metrics["accepted_nodes"] == 2
    assert result.metrics["rejected_nodes"] == 0
    assert result.metrics["total_samples"] == 4
    assert result.metrics["update_norm"] == pytest.approx(expected_norm, rel=1e-5)
    assert result.metrics["aggregate_seconds"] >= 0


# Strategies: server optimizers against numpy references


def float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [key for key, value in state.items() if value.is_floating_point()]


def numpy_round(
    global_state: dict[str, np.ndarray], states: list[dict[str, torch.Tensor]],
    counts: list[int], step,  # step(key, current64, average64) -> new64
) -> dict[str, np.ndarray]:
    """One reference round: FedAvg oracle, server step on float keys, clamp running_var."""
    average = numpy_fedavg(states, counts)
    weights = np.asarray(counts, dtype=np.float64)
    result = {}
    for key, current in global_state.items():
        if current.dtype.kind == "f":
            stacked = np.stack([state[key].numpy().astype(np.float64) for state in states])
            mean64 = np.average(stacked, axis=0, weights=weights)
            new = step(key, current.astype(np.float64), mean64)
            if key.endswith("running_var"):
                new = np.maximum(new, 0.0)
            result[key] = new.astype(current.dtype)
        else:
            result[key] = average[key]
    return result


def two_rounds(name: str, **options) -> tuple[list[dict[str, torch.Tensor]], list[list[dict[str, torch.Tensor]]]]:
    """Run two rounds of a strategy and return the global states and each round's node states."""
    strategy = build_strategy(name, **options)
    global_states = [small_state(0)]
    node_states = []
    for round_index in range(2):
        states = [perturbed(global_states[-1], 10 * round_index + seed) for seed in (1, 2, 3)]
        result = strategy.aggregate(global_states[-1], updates_for(states, [40, 25, 10]))
        node_states.append(states)
        global_states.append(result.state)
    return global_states, node_states


def to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in state.items()}


def test_fedavgm_two_rounds_match_numpy() -> None:
    server_lr, momentum = 0.7, 0.9
    global_states, node_states = two_rounds("fedavgm", server_lr=server_lr, momentum=momentum)

    velocity: dict[str, np.ndarray] = {}

    def step(key: str, current: np.ndarray, average: np.ndarray) -> np.ndarray:
        velocity[key] = momentum * velocity.get(key, 0.0) + (current - average)
        return current - server_lr * velocity[key]

    expected = to_numpy(global_states[0])
    for round_index in range(2):
        expected = numpy_round(expected, node_states[round_index], [40, 25, 10], step)
        assert_state_close(global_states[round_index + 1], expected)


def test_fedadam_two_rounds_match_numpy() -> None:
    server_lr, beta1, beta2, tau = 0.05, 0.8, 0.95, 1e-2
    global_states, node_states = two_rounds(
        "fedadam", server_lr=server_lr, beta1=beta1, beta2=beta2, tau=tau
    )

    first: dict[str, np.ndarray] = {}
    second: dict[str, np.ndarray] = {}

    def step(key: str, current: np.ndarray, average: np.ndarray) -> np.ndarray:
        delta = average - current
        first[key] = beta1 * first.get(key, 0.0) + (1 - beta1) * delta
        second[key] = beta2 * second.get(key, tau**2) + (1 - beta2) * delta**2
        return current + server_lr * first[key] / (np.sqrt(second[key]) + tau)

    expected = to_numpy(global_states[0])
    for round_index in range(2):
        expected = numpy_round(expected, node_states[round_index], [40, 25, 10], step)
        assert_state_close(global_states[round_index + 1], expected)


def test_fedavgm_without_momentum_equals_fedavg() -> None:
    global_state = small_state(0)
    updates = updates_for([perturbed(global_state, seed) for seed in (1, 2)], [3, 1])

    plain = build_strategy("fedavg").aggregate(global_state, updates).state
    momentum = build_strategy("fedavgm", server_lr=1.0, momentum=0.0).aggregate(global_state, updates).state

    for key, value in plain.items():
        np.testing.assert_allclose(momentum[key].numpy(), value.numpy(), rtol=1e-6, atol=1e-7)


def test_server_step_clamps_negative_running_var() -> None:
    global_state = small_state(0)
    global_state["bn.running_var"] = torch.ones(4)
    state = perturbed(global_state, 1)
    state["bn.running_var"] = torch.full((4,), 0.1)
    strategy = build_strategy("fedavgm", server_lr=2.0, momentum=0.0)

    result = strategy.aggregate(global_state, updates_for([state], [5]))

    # 1 - 2 * (1 - 0.1) = -0.8 before clamping.
    assert torch.equal(result.state["bn.running_var"], torch.zeros(4))
    assert result.metrics["clamped_running_var"] == 4


# Local keys and FedBN


def test_fedbn_keeps_batchnorm_keys() -> None:
    global_state = small_state(0)
    states = [perturbed(global_state, seed) for seed in (1, 2)]

    result = build_strategy("fedavg", fedbn=True).aggregate(global_state, updates_for(states, [3, 1]))

    expected = numpy_fedavg(states, [3, 1])
    for key, value in result.state.items():
        if key in BN_KEYS:
            assert torch.equal(value, global_state[key]), key
        else:
            np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("local_keys", [r"^fc\.", lambda key: key.startswith("fc.")])
def test_local_keys_stay_at_global_value(local_keys) -> None:
    global_state = small_state(0)
    states = [perturbed(global_state, seed) for seed in (1, 2)]

    result = build_strategy("fedadam", local_keys=local_keys).aggregate(
        global_state, updates_for(states, [3, 1])
    )

    assert torch.equal(result.state["fc.weight"], global_state["fc.weight"])
    assert not torch.equal(result.state["conv.weight"], global_state["conv.weight"])
    assert result.state["fc.weight"] is not global_state["fc.weight"]


def test_batchnorm_keys_of_small_state() -> None:
    assert batchnorm_keys(small_state(0)) == BN_KEYS


# Server state


@pytest.mark.parametrize(
    ("name", "options"),
    [("fedavgm", {"server_lr": 0.5, "momentum": 0.9}), ("fedadam", {"server_lr": 0.1}), ("fedavg", {})],
)
def test_server_state_round_trips(name: str, options: dict) -> None:
    global_state = small_state(0)
    first_round = updates_for([perturbed(global_state, seed) for seed in (1, 2)], [3, 1])
    original = build_strategy(name, **options)
    after_first = original.aggregate(global_state, first_round).state

    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_strategy(name, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))

    second_round = updates_for([perturbed(after_first, seed) for seed in (3, 4)], [2, 2])
    expected = original.aggregate(after_first, second_round).state
    actual = resumed.aggregate(after_first, second_round).state
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    assert resumed.state_dict()["rounds"] == 2


def test_fresh_server_state_differs() -> None:
    """Without the loaded buffers the second round differs, so the round trip test can fail."""
    global_state = small_state(0)
    strategy = build_strategy("fedavgm", server_lr=0.5, momentum=0.9)
    after_first = strategy.aggregate(
        global_state, updates_for([perturbed(global_state, 1)], [1])
    ).state
    second_round = updates_for([perturbed(after_first, 2)], [1])

    fresh = build_strategy("fedavgm", server_lr=0.5, momentum=0.9).aggregate(after_first, second_round)
    continued = strategy.aggregate(after_first, second_round)

    assert not torch.equal(fresh.state["conv.weight"], continued.state["conv.weight"])


def test_load_state_dict_rejects_mismatch() -> None:
    saved = build_strategy("fedadam").state_dict()
    with pytest.raises(ConfigError, match="saved by 'fedadam'"):
        build_strategy("fedavgm").load_state_dict(saved)
    with pytest.raises(ConfigError, match="malformed server state"):
        build_strategy("fedadam").load_state_dict({"strategy": "fedadam"})


# build_strategy


def test_build_strategy_unknown_name() -> None:
    with pytest.raises(ConfigError, match="unknown aggregation strategy 'fedprox': choose one of fedadam, fedavg, fedavgm"):
        build_strategy("fedprox")


def test_build_strategy_unknown_option() -> None:
    with pytest.raises(ConfigError, match="unknown option\\(s\\) momentum for aggregation strategy 'fedadam'"):
        build_strategy("fedadam", momentum=0.9)


def test_build_strategy_reports_all_invalid_values() -> None:
    with pytest.raises(ConfigError) as error:
        build_strategy("fedadam", beta1=1.0, tau=0, min_nodes=0, local_keys="(")
    message = str(error.value)
    assert "beta1 must be a number in [0, 1), got 1.0" in message
    assert "tau must be a finite number > 0, got 0" in message
    assert "min_nodes must be an integer >= 1, got 0" in message
    assert "local_keys '(' is not a valid regular expression" in message


def test_build_strategy_accepts_kebab_case_options() -> None:
    strategy = build_strategy("fedavgm", **{"server-lr": 0.3, "min-nodes": 2})
    assert strategy.server_lr == 0.3
    assert strategy.min_nodes == 2


# A real MobileFaceNet


def trained_backbone_state(seed: int, steps: int) -> dict[str, torch.Tensor]:
    """Return a seeded MobileFaceNet state after `steps` train-mode forward passes.

    The passes update BatchNorm running statistics and num_batches_tracked, as training does.
    """
    torch.manual_seed(seed)
    backbone = build_backbone(ModelSpec(width=0.5, embedding_dim=32, image_size=32)).train()
    with torch.no_grad():
        for _ in range(steps):
            backbone(torch.randn(4, 3, 32, 32))
    return {key: value.clone() for key, value in backbone.state_dict().items()}


def test_real_mobilefacenet_fedavg_and_fedbn() -> None:
    spec = ModelSpec(width=0.5, embedding_dim=32, image_size=32)
    torch.manual_seed(0)
    global_backbone = build_backbone(spec)
    global_state = global_backbone.state_dict()
    states = [trained_backbone_state(seed, steps) for seed, steps in ((1, 1), (2, 2), (3, 4))]
    counts = [100, 300, 50]

    result = build_strategy("fedavg").aggregate(global_state, updates_for(states, counts))
    assert_state_close(result.state, numpy_fedavg(states, counts))
    assert int(result.state["features.0.1.num_batches_tracked"]) == 2  # (100 * 1 + 300 * 2 + 50 * 4) / 450

    fused = build_backbone(spec).eval()
    fused.load_state_dict(result.state, strict=True)
    with torch.no_grad():
        assert torch.isfinite(fused(torch.randn(2, 3, 32, 32))).all()

    module_bn_keys = {
        f"{name}.{key}"
        for name, module in global_backbone.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for key in module.state_dict()
    }
    assert batchnorm_keys(global_state) == module_bn_keys
    with_fedbn = build_strategy("fedavg", fedbn=True).aggregate(global_state, updates_for(states, counts))
    for key in module_bn_keys:
        assert torch.equal(with_fedbn.state[key], global_state[key]), key
    assert torch.equal(with_fedbn.state["embedding.2.weight"], result.state["embedding.2.weight"])


def test_aggregate_four_million_parameters_fast() -> None:
    """Four 1M-parameter updates: a Python loop over elements would take minutes."""
    generator = torch.Generator().manual_seed(0)
    global_state = {f"layer{i}.weight": torch.randn(250, 1000, generator=generator) for i in range(4)}
    updates = updates_for([perturbed(global_state, seed, 0.01) for seed in range(4)], [1, 2, 3, 4])
    strategy = build_strategy("fedadam")

    started = time.perf_counter()
    strategy.aggregate(global_state, updates)
    seconds = time.perf_counter() - started

    # Measured at 0.4 s on a 2-core machine with a load average of about 6. The bound leaves
    # room for more load.
    assert seconds < 5.0
