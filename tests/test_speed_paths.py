"""Fast checks of the training speed settings and of the workers' memory release."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgeface.config import ModelConfig, TrainConfig, load_config
from edgeface.errors import ConfigError
from edgeface.model import ModelSpec
from edgeface.training import (
    SGD,
    build_face_model,
    cpu_has_native_bf16,
    resolve_precision,
    train_local,
)

ZEN4_FLAGS = "flags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS_FLAGS = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile amx_int8\n"
ICE_LAKE_FLAGS = "flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"


@pytest.mark.parametrize("cpuinfo, expected", [
    (ZEN4_FLAGS, True),
    (SAPPHIRE_RAPIDS_FLAGS, True),
    (ICE_LAKE_FLAGS, False),
    ("processor\t: 0\nmodel name\t: some CPU\n", False),
    ("", False),
])
def test_native_bf16_from_cpu_flags(cpuinfo: str, expected: bool) -> None:
    assert cpu_has_native_bf16(cpuinfo) is expected


def test_native_bf16_needs_whole_flag() -> None:
    # "avx512_bf16x" is no real flag; only whole words count.
    assert cpu_has_native_bf16("flags\t: avx512_bf16x amx_bf16_extra\n") is False


def test_resolve_precision_auto_follows_cpu() -> None:
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert resolve_precision("auto") == expected
    assert resolve_precision("fp32") == "fp32"
    assert resolve_precision("bf16") == "bf16"


def test_resolve_precision_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="fp16"):
        resolve_precision("fp16")


def test_config_precision_values() -> None:
    assert load_config(None, {"precision": "auto"}).train.precision == "auto"
    with pytest.raises(ConfigError, match="precision"):
        load_config(None, {"precision": "fp16"})


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_train_local_each_precision(precision: str) -> None:
    torch.manual_seed(0)
    model = build_face_model(ModelSpec(image_size=32), ModelConfig(), 4)
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(16) % 4
    before = [p.detach().clone() for p in model.backbone.parameters()]
    config = TrainConfig(batch_size=8, local_epochs=1, precision=precision)
    result = train_local(model, images, labels, config, lr=0.05, seed=0)
    assert result.steps == 2
    assert torch.isfinite(torch.tensor(result.loss))
    changed = [not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters())]
    assert any(changed)
    # Autocast leaves the weights in fp32; only the activations are bf16.
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 5e-4), (0.0, 5e-4), (0.9, 0.0)])
def test_sgd_matches_torch_sgd_bit_for_bit(momentum: float, weight_decay: float) -> None:
    torch.manual_seed(0)
    ours = build_face_model(ModelSpec(image_size=32), ModelConfig(), 4)
    theirs = build_face_model(ModelSpec(image_size=32), ModelConfig(), 4)
    theirs.load_state_dict(ours.state_dict())
    initial = [p.detach().clone() for p in ours.parameters()]

    def groups(model):
        return [{"params": [p for p in model.parameters() if p.ndim > 1],
                 "weight_decay": weight_decay},
                {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]

    optimizers = [SGD(groups(ours), lr=0.05, momentum=momentum),
                  torch.optim.SGD(groups(theirs), lr=0.05, momentum=momentum,
                                  nesterov=momentum > 0)]
    images = torch.randn(8, 3, 32, 32)
    labels = torch.arange(8) % 4
    for _ in range(4):
        for model, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(
                model.head(model.backbone(images), labels), labels)
            loss.backward()
            optimizer.step()
    pairs = list(zip(ours.parameters(), theirs.parameters()))
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not all(torch.equal(a, b) for a, b in zip(initial, ours.parameters()))


def test_local_training_does_not_import_dynamo() -> None:
    # torch.optim's optimizers import torch._dynamo on first use: 1.4 to 1.7 s of CPU each.
    script = (
        "import sys, torch\n"
        "from edgeface.config import ModelConfig, TrainConfig\n"
        "from edgeface.model import ModelSpec\n"
        "from edgeface.training import build_face_model, train_local\n"
        "model = build_face_model(ModelSpec(image_size=32), ModelConfig(), 4)\n"
        "images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)\n"
        "labels = torch.arange(8) % 4\n"
        "train_local(model, images, labels, TrainConfig(batch_size=8), lr=0.1, seed=0)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


# Runs in a fresh interpreter: in a process with a long allocation history (this test
# session) the freed blocks can land among live ones, and how much a trim returns then
# depends on which tests ran before.
_RELEASE_SCRIPT = """
import json
from pathlib import Path

import torch

from edgeface.workers import release_memory


def rss_mib():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


start = rss_mib()
blocks = [torch.ones(16 * 1024) for _ in range(3000)]
peak = rss_mib()
del blocks
before = rss_mib()
trimmed = release_memory()
print(json.dumps({"start": start, "peak": peak, "before": before, "after": rss_mib(),
                  "trimmed": trimmed}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_release_memory_returns_freed_heap() -> None:
    import json
    import os
    import subprocess
    import sys

    try:
        ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        pytest.skip("not a glibc system")
    # 3,000 blocks of 64 KiB come from the malloc heap, not from mmap, so freeing them leaves
    # the pages mapped until malloc_trim returns them: the case of a training step's
    # activations in a worker.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", _RELEASE_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rss = json.loads(result.stdout)
    assert rss["trimmed"] is True
    assert rss["peak"] - rss["start"] > 150, rss
    assert rss["before"] - rss["peak"] > -20, rss  # freeing alone returns almost nothing
    assert rss["before"] - rss["after"] > 150, rss


def test_single_thread_restores_count() -> None:
    from edgeface.aggregation import single_thread

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"):
            with single_thread():
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_fused_state_matches_per_key_oracle() -> None:
    from edgeface.aggregation import NodeUpdate, build_strategy

    torch.manual_seed(0)
    reference = build_face_model(ModelSpec(image_size=32), ModelConfig(), 4).backbone.state_dict()
    counts = [30, 10, 60]
    states = [{key: value + 0.1 * torch.randn_like(value) if value.is_floating_point()
               else value + index for key, value in reference.items()}
              for index in range(len(counts))]
    updates = [NodeUpdate(node=f"node-{i}", state=state, num_samples=count)
               for i, (state, count) in enumerate(zip(states, counts))]
    fused = build_strategy("fedavg").aggregate(reference, updates).state
    weights = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    assert list(fused) == list(reference)
    for key, value in reference.items():
        expected = sum(w * s[key].double() for w, s in zip(weights, states))
        if value.is_floating_point():
            torch.testing.assert_close(fused[key], expected.float(), rtol=0, atol=1e-6)
        else:
            assert torch.equal(fused[key], torch.round(expected).to(value.dtype)), key
        assert fused[key].shape == value.shape
        assert fused[key].dtype == value.dtype


def test_nan_reason_names_first_bad_key() -> None:
    from edgeface.aggregation import NodeUpdate, validate_update

    reference = build_face_model(ModelSpec(image_size=32), ModelConfig(), 4).backbone.state_dict()
    keys = [key for key, value in reference.items() if value.is_floating_point()]
    state = {key: value.clone() for key, value in reference.items()}
    state[keys[5]].view(-1)[0] = float("nan")
    state[keys[9]].view(-1)[0] = float("inf")
    reason = validate_update(NodeUpdate("node-0", state, 10), reference)
    assert reason == f"1 non-finite values (NaN or infinity) in {keys[5]!r}"
    assert validate_update(NodeUpdate("node-0", dict(reference), 10), reference) is None
