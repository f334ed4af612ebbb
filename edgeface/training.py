"""Local training of one edge node: E epochs of margin-loss training on the node's own images.

Nothing here reads files: the caller hands over the node's preprocessed uint8 images and integer
labels, and gets back the updated model. Augmentation runs on tensors in the training process.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edgeface.config import ModelConfig, TrainConfig
from edgeface.machine import cpu_flags, read_cpuinfo
from edgeface.model import FaceModel, MarginHead, ModelSpec, build_backbone, to_input

logger = logging.getLogger(__name__)


@dataclass
class LocalResult:
    """Outcome of one node's local training in one round."""

    num_samples: int
    steps: int
    loss: float
    accuracy: float
    seconds: float
    images_per_second: float


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Return whether the CPU flags list AVX512_BF16 or AMX-BF16 (Linux `/proc/cpuinfo`).

    Without either, oneDNN emulates bf16 matrix products with fp32 instructions, so bf16
    autocast seldom pays off. Returns False where /proc/cpuinfo cannot be read.
    """
    text = read_cpuinfo() if cpuinfo is None else cpuinfo
    return bool(cpu_flags(text) & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str) -> str:
    """Return "fp32" or "bf16" for the `precision` setting, resolving "auto" for this CPU."""
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"invalid precision {precision!r}: use fp32, bf16 or auto")
    return precision


def build_face_model(spec: ModelSpec, model_config: ModelConfig, num_classes: int) -> FaceModel:
    head = MarginHead(spec.embedding_dim, num_classes, model_config.loss,
                      model_config.scale, model_config.margin)
    return FaceModel(build_backbone(spec), head)


def round_learning_rate(config: TrainConfig, round_index: int) -> float:
    """Return the client learning rate for round `round_index` (0-based).

    Linear warm-up over `warmup-rounds`, then cosine decay to 1% of the peak at the last round,
    or constant.
    """
    if config.warmup_rounds and round_index < config.warmup_rounds:
        return config.lr * (round_index + 1) / (config.warmup_rounds + 1)
    if config.lr_schedule == "constant":
        return config.lr
    span = max(1, config.rounds - config.warmup_rounds)
    progress = (round_index - config.warmup_rounds) / span
    return config.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def augment(batch: torch.Tensor, generator: torch.Generator, max_shift: int = 4) -> torch.Tensor:
    """Randomly flip, shift (up to `max_shift` pixels, edge padding) and brighten a float batch.

    `batch` is (N, 3, S, S) in [-1, 1]; the result has the same shape.
    """
    n, _, size, _ = batch.shape
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
    if max_shift:
        padded = F.pad(batch, (max_shift,) * 4, mode="replicate")
        dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=generator).tolist()
        batch = padded[:, :, dy:dy + size, dx:dx + size]
    gain = 1.0 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    bias = 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    return (batch * gain + bias).clamp_(-1.0, 1.0)


class SGD:
    """SGD with momentum (Nesterov when momentum > 0) and per-group weight decay.

    The arithmetic of `torch.optim.SGD(..., nesterov=True)` on CPU (its single-tensor path),
    operation for operation, so the weights are the same to the bit (tests/test_speed_paths.py).
    It exists because any `torch.optim.Optimizer` imports `torch._dynamo` when it is first
    built: 1.4 to 1.7 s of CPU per process on this project's 2-core machine, paid by every
    worker in its first round, while a node's round on ORL trains for about 0.3 s.

    `groups` are dicts with "params" and "weight_decay", as torch's optimizers take them.
    """

    def __init__(self, groups: list[dict], *, lr: float, momentum: float) -> None:
        self.groups = [{"params": list(group["params"]),
                        "weight_decay": float(group["weight_decay"])} for group in groups]
        self.lr = lr
        self.momentum = momentum
        self.buffers: dict[torch.Tensor, torch.Tensor] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.groups:
            for param in group["params"]:
                if set_to_none:
                    param.grad = None
                elif param.grad is not None:
                    param.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        momentum = self.momentum
        for group in self.groups:
            weight_decay = group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if weight_decay != 0:
                    grad = grad.add(param, alpha=weight_decay)
                if momentum != 0:
                    buffer = self.buffers.get(param)
                    if buffer is None:
                        buffer = torch.clone(grad).detach()
                        self.buffers[param] = buffer
                    else:
                        buffer.mul_(momentum).add_(grad, alpha=1.0)
                    grad = grad.add(buffer, alpha=momentum)  # Nesterov
                param.add_(grad, alpha=-self.lr)


def make_optimizer(model: FaceModel, config: TrainConfig, lr: float) -> SGD | torch.optim.Optimizer:
    # No weight decay on BatchNorm and PReLU parameters (1-D tensors), the usual practice.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return SGD(groups, lr=lr, momentum=config.momentum)


def train_local(
    model: FaceModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    *,
    lr: float,
    seed: int,
    fedprox_mu: float = 0.0,
) -> LocalResult:
    """Train `model` in place for `config.local_epochs` passes over (images, labels).

    `images` is uint8 (N, S, S, 3); `labels` int64 (N,) in [0, num_classes). `fedprox_mu` > 0
    adds the FedProx proximal term mu/2 * ||w - w_global||^2 on the backbone (Li et al.,
    "Federated Optimization in Heterogeneous Networks", MLSys 2020), where w_global is the
    backbone as passed in.
    """
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    count = images.shape[0]
    steps = max(1, round(config.local_epochs * count / config.batch_size))
    batch_size = min(config.batch_size, count)
    anchor = [p.detach().clone() for p in model.backbone.parameters()] if fedprox_mu else None
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    use_bf16 = resolve_precision(config.precision) == "bf16"
    model.to(memory_format=memory_format).train()
    optimizer = make_optimizer(model, config, lr)
    total_loss, correct, seen = 0.0, 0, 0
    order = torch.randperm(count, generator=generator)
    cursor = 0
    for _ in range(steps):
        if cursor + batch_size > count:
            order, cursor = torch.randperm(count, generator=generator), 0
        index = order[cursor:cursor + batch_size]
        cursor += batch_size
        batch = to_input(images[index])
        if config.augment:
            batch = augment(batch, generator)
        batch = batch.contiguous(memory_format=memory_format)
        target = labels[index]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            embeddings = model.backbone(batch)
        logits = model.head(embeddings.float(), target)
        loss = F.cross_entropy(logits, target)
        if anchor is not None:
            proximal = sum(((p - a) ** 2).sum() for p, a in zip(model.backbone.parameters(), anchor))
            loss = loss + 0.5 * fedprox_mu * proximal
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(index)
        correct += (logits.argmax(1) == target).sum().item()
        seen += len(index)
    seconds = time.perf_counter() - started
    return LocalResult(
        num_samples=count,
        steps=steps,
        loss=total_loss / seen,
        accuracy=correct / seen,
        seconds=seconds,
        images_per_second=seen / seconds,
    )


@torch.no_grad()
def embed(backbone: torch.nn.Module, images, batch_size: int = 256) -> "torch.Tensor":
    """Return unit-norm float32 embeddings (N, D) of uint8 images (N, S, S, 3), eval mode."""
    backbone.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.array(images[start:start + batch_size]))
        batch = to_input(chunk).contiguous(memory_format=torch.channels_last)
        outputs.append(F.normalize(backbone(batch), dim=1))
    return torch.cat(outputs) if outputs else torch.empty(0)
