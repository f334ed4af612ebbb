"""The fused training path of BatchNorm2d + PReLU against the plain modules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgeface.model
from edgeface import batchnorm_prelu as fused
from edgeface.config import ModelConfig, TrainConfig
from edgeface.model import ConvBNAct, ModelSpec, build_backbone
from edgeface.training import build_face_model, train_local

CHANNELS = 8


def make_layers(case: str, momentum: float | None = 0.1) -> tuple[nn.BatchNorm2d, nn.PReLU]:
    """Return a BatchNorm2d and a PReLU with parameters and statistics set for `case`."""
    generator = torch.Generator().manual_seed(1)
    bn, act = nn.BatchNorm2d(CHANNELS, momentum=momentum), nn.PReLU(CHANNELS)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(CHANNELS, generator=generator))
        bn.bias.copy_(torch.randn(CHANNELS, generator=generator))
        act.weight.copy_(torch.rand(CHANNELS, generator=generator) - 0.3)
        bn.running_mean.copy_(torch.randn(CHANNELS, generator=generator))
        bn.running_var.copy_(torch.rand(CHANNELS, generator=generator) + 0.5)
        if case == "gamma near zero":
            # gamma 0 (y is beta: x_hat cannot be recovered), gamma 0 and beta 0 (y is 0),
            # and gammas tiny against beta (recovery from y loses all precision).
            bn.weight[:4] = torch.tensor([0.0, 0.0, 1e-6, -1e-4])
            bn.bias[:4] = torch.tensor([1.0, 0.0, 2.0, -3.0])
    return bn, act


def make_input(case: str, memory_format: torch.memory_format) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(6, CHANNELS, 5, 7, generator=generator) * 2.0 + 0.5
    if case == "large mean":
        # A mean 1,000 standard deviations off zero: y = x * scale + shift cancels digits.
        x[:, :3] += 1000.0
    return x.contiguous(memory_format=memory_format)


def plain_and_fused(case: str, memory_format: torch.memory_format,
                    momentum: float | None = 0.1) -> dict[str, dict[str, torch.Tensor]]:
    """Run one forward and backward through both paths; return outputs, gradients, buffers."""
    results = {}
    grad_out = torch.randn(6, CHANNELS, 5, 7, generator=torch.Generator().manual_seed(3))
    for path in ("plain", "fused"):
        bn, act = make_layers(case, momentum)
        x = make_input(case, memory_format).requires_grad_()
        if path == "plain":
            out = act(bn(x))
        else:
            assert fused.batchnorm_prelu_applies(bn, act, x)
            out = fused.batchnorm_prelu(x * 1.0, bn, act)  # a fresh tensor the function may overwrite
        out.backward(grad_out)
        results[path] = {
            "out": out.detach(), "grad_x": x.grad, "grad_gamma": bn.weight.grad,
            "grad_beta": bn.bias.grad, "grad_alpha": act.weight.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var,
            "num_batches_tracked": bn.num_batches_tracked,
        }
    return results


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


FORMATS = [torch.contiguous_format, torch.channels_last]
CASES = ["random", "gamma near zero", "large mean"]


@pytest.mark.parametrize("memory_format", FORMATS, ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_statistics_bitwise(case: str, memory_format: torch.memory_format) -> None:
    results = plain_and_fused(case, memory_format)
    plain, fused_result = results["plain"], results["fused"]
    assert torch.equal(fused_result["out"], plain["out"])
    assert fused_result["out"].is_contiguous(memory_format=memory_format)
    assert torch.equal(fused_result["running_mean"], plain["running_mean"])
    assert torch.equal(fused_result["running_var"], plain["running_var"])
    assert torch.equal(fused_result["num_batches_tracked"], plain["num_batches_tracked"])


@pytest.mark.parametrize("memory_format", FORMATS, ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES)
def test_gradients_match_plain_modules(case: str, memory_format: torch.memory_format) -> None:
    results = plain_and_fused(case, memory_format)
    for name in ("grad_x", "grad_gamma", "grad_beta", "grad_alpha"):
        error = relative_error(results["fused"][name], results["plain"][name])
        assert error < 1e-5, f"{name}: relative error {error:.2e}"


def test_cumulative_momentum_matches() -> None:
    # momentum None (used by BatchNorm recalibration) averages over all batches seen.
    results = plain_and_fused("random", torch.channels_last, momentum=None)
    assert torch.equal(results["fused"]["running_mean"], results["plain"]["running_mean"])
    assert torch.equal(results["fused"]["running_var"], results["plain"]["running_var"])


def test_gamma_near_zero_needs_kept_channels(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the channels kept from x, x_hat is recovered from y even where gamma is 0 or
    # tiny, and the gamma gradient comes out wrong: the check above can fail.
    monkeypatch.setattr(fused, "RECOVERY_LIMIT", float("inf"))
    results = plain_and_fused("gamma near zero", torch.channels_last)
    error = relative_error(results["fused"]["grad_gamma"], results["plain"]["grad_gamma"])
    assert not error < 1e-5


def test_second_backward_raises() -> None:
    # The backward pass overwrites the saved y, so a second one must fail, not return garbage.
    bn, act = make_layers("random")
    x = make_input("random", torch.channels_last).requires_grad_()
    out = fused.batchnorm_prelu(x * 1.0, bn, act)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_applies_only_to_training_with_grad() -> None:
    bn, act = make_layers("random")
    x = make_input("random", torch.channels_last)
    assert fused.batchnorm_prelu_applies(bn, act, x)
    with torch.no_grad():
        assert not fused.batchnorm_prelu_applies(bn, act, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused.batchnorm_prelu_applies(bn, act, x)
    assert not fused.batchnorm_prelu_applies(bn, act, x.half())
    assert not fused.batchnorm_prelu_applies(bn, nn.PReLU(1), x)
    bn.eval()
    assert not fused.batchnorm_prelu_applies(bn, act, x)


def test_plain_modules_block_turns_fusion_off() -> None:
    layer = ConvBNAct(16, 16, 3, groups=16).train()
    x = torch.randn(4, 16, 8, 8).requires_grad_()
    activation = x.numel() * x.element_size()
    with fused.plain_modules():
        assert not fused.batchnorm_prelu_applies(layer[1], layer[2], x)
        assert saved_bytes(layer, x) >= 3 * activation
    assert fused.batchnorm_prelu_applies(layer[1], layer[2], x)


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors that autograd saves for the backward pass of `module(x)`."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(storages.values())


def test_conv_bn_act_saves_one_tensor_less() -> None:
    layer = ConvBNAct(16, 16, 3, groups=16).to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    activation = x.numel() * x.element_size()
    # Plain modules: the conv input, the BatchNorm input and the PReLU input.
    assert saved_bytes(nn.Sequential(*layer), x) >= 3 * activation
    # Fused: the conv input and the PReLU input, plus per-channel vectors.
    assert saved_bytes(layer, x) < 2 * activation + 4096
    assert list(layer.state_dict()) == [
        "0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked", "2.weight"]


def test_backbone_matches_plain_path_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(ModelSpec(image_size=32)).double().train()
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(-1.5, 1.5)
                module.bias.uniform_(-1.0, 1.0)
                module.weight[::5] = 0.0
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    target = torch.randn(8, 128, dtype=torch.float64)

    results = {}
    for path in ("fused", "plain"):
        if path == "plain":
            monkeypatch.setattr(edgeface.model, "batchnorm_prelu_applies", lambda *args: False)
        model = copy.deepcopy(backbone)
        embeddings = model(x)
        F.mse_loss(embeddings, target).backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        results[path] = embeddings.detach(), grads, model.state_dict()

    (fused_out, fused_grads, fused_state), (plain_out, plain_grads, plain_state) = (
        results["fused"], results["plain"])
    assert torch.equal(fused_out, plain_out)
    for key in plain_state:
        assert torch.equal(fused_state[key], plain_state[key]), key

    # Some gradients are 0 in exact arithmetic (a BatchNorm bias followed by a 1x1 conv and
    # another BatchNorm) and only rounding noise here, so the tolerance is relative to the
    # largest gradient.
    scale = max(grad.abs().max() for grad in plain_grads.values())
    for name, grad in plain_grads.items():
        difference = (fused_grads[name] - grad).abs().max()
        assert difference <= 1e-10 * scale, f"{name}: difference {difference:.2e}"


def test_training_runs_are_identical() -> None:
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_face_model(ModelSpec(image_size=32), ModelConfig(), 4)
        images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(5))
        labels = torch.arange(16) % 4
        train_local(model, images, labels, TrainConfig(batch_size=8), lr=0.05, seed=0)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
