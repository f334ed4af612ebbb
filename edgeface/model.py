"""Face-embedding networks and margin-based classification heads.

A node's model is a `FaceModel`: a shared embedding `backbone` and a node-local `head`. Only the
backbone is averaged across nodes, because with identity partitions the nodes' heads classify
different people (see `edgeface.aggregation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeface.batchnorm_prelu import batchnorm_prelu, batchnorm_prelu_applies
from edgeface.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Architecture settings that must match between training, aggregation and export."""

    arch: str = "mobilefacenet"
    embedding_dim: int = 128
    width: float = 1.0
    image_size: int = 64


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.PReLU(cout))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In training, BatchNorm and PReLU run as one autograd function that saves one
        # activation tensor instead of two. Eval mode and ONNX export use the listed modules.
        if len(self) == 3 and batchnorm_prelu_applies(self[1], self[2], x):
            conv, bn, act = self
            return batchnorm_prelu(conv(x), bn, act)
        return super().forward(x)


class Bottleneck(nn.Module):
    """Inverted residual block (expand 1x1, depthwise 3x3, project 1x1) as in MobileFaceNet."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            ConvBNAct(cin, hidden, 1),
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden),
            ConvBNAct(hidden, cout, 1, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileFaceNet(nn.Module):
    """Compact face-embedding CNN after Chen et al., "MobileFaceNets" (CCBR 2018).

    Input: float tensor (N, 3, S, S) scaled to [-1, 1], S a multiple of 16. Output: (N, D)
    embeddings, not normalized. The global depthwise convolution (GDC) replaces global average
    pooling, as in the paper, so the embedding keeps spatial weighting of the face.
    """

    # (expansion, output channels, repeats, first stride) per stage.
    STAGES = ((2, 64, 2, 2), (4, 96, 2, 2), (2, 128, 2, 1))

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        if spec.image_size % 16:
            raise ConfigError(
                f"invalid image-size {spec.image_size}: mobilefacenet needs a multiple of 16"
            )

        def ch(c: int) -> int:
            return max(8, int(round(c * spec.width / 8)) * 8)

        layers: list[nn.Module] = [
            ConvBNAct(3, ch(32), 3, 2),
            ConvBNAct(ch(32), ch(32), 3, 1, groups=ch(32)),
        ]
        cin = ch(32)
        for expansion, cout, repeats, stride in self.STAGES:
            for index in range(repeats):
                layers.append(Bottleneck(cin, ch(cout), stride if index == 0 else 1, expansion))
                cin = ch(cout)
        layers.append(ConvBNAct(cin, ch(256), 1))
        self.features = nn.Sequential(*layers)
        spatial = spec.image_size // 8
        self.gdc = ConvBNAct(ch(256), ch(256), spatial, 1, groups=ch(256), act=False)
        # The GDC kernel covers the whole map, so use no padding there.
        self.gdc[0].padding = (0, 0)
        self.embedding = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.0),
            nn.Linear(ch(256), spec.embedding_dim, bias=False),
            nn.BatchNorm1d(spec.embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.gdc(self.features(x)))


BACKBONES = {"mobilefacenet": MobileFaceNet}


def build_backbone(spec: ModelSpec) -> nn.Module:
    """Build the embedding network named by `spec.arch`."""
    try:
        factory = BACKBONES[spec.arch]
    except KeyError:
        raise ConfigError(
            f"unknown model arch {spec.arch!r}: choose one of {sorted(BACKBONES)}"
        ) from None
    return factory(spec)


class MarginHead(nn.Module):
    """Additive margin softmax head: ArcFace (angular margin) or CosFace (cosine margin).

    ArcFace: Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
    CVPR 2019, logit s*cos(theta + m) for the target class. CosFace: Wang et al., CVPR 2018,
    logit s*(cos(theta) - m). Returns logits to feed `F.cross_entropy`.
    """

    def __init__(self, embedding_dim: int, num_classes: int, loss: str = "arcface",
                 scale: float = 16.0, margin: float = 0.5) -> None:
        super().__init__()
        if loss not in ("arcface", "cosface"):
            raise ConfigError(f"unknown loss {loss!r}: choose 'arcface' or 'cosface'")
        self.loss, self.scale, self.margin = loss, scale, margin
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=0.01)

    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(embeddings), F.normalize(self.weight))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = self.cosine(embeddings.float())
        target = cosine.gather(1, labels[:, None])
        if self.loss == "cosface":
            adjusted = target - self.margin
        else:
            sine = torch.sqrt((1.0 - target * target).clamp_min(1e-7))
            with_margin = target * math.cos(self.margin) - sine * math.sin(self.margin)
            # Past theta = pi - m, cos(theta + m) stops decreasing; use the CosFace-style
            # fallback there so the logit stays monotonic (as in the reference implementation).
            threshold = math.cos(math.pi - self.margin)
            fallback = target - math.sin(math.pi - self.margin) * self.margin
            adjusted = torch.where(target > threshold, with_margin, fallback)
        logits = cosine.scatter(1, labels[:, None], adjusted)
        return logits * self.scale


class FaceModel(nn.Module):
    """Backbone plus head, as trained on one node. State dict keys: `backbone.*`, `head.*`."""

    def __init__(self, backbone: nn.Module, head: MarginHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head


class InferenceModel(nn.Module):
    """Deployable embedding model: uint8 images (N, S, S, 3) RGB in, unit-norm (N, D) out.

    Normalization lives inside the graph so that an ONNX consumer needs no preprocessing beyond
    the crop and resize of `edgeface.data.cache.preprocess`.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return F.normalize(self.backbone(x), dim=1)


def to_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """Convert a uint8 (N, S, S, 3) batch to the backbone's float (N, 3, S, S) input in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def backbone_state(model: FaceModel) -> dict[str, torch.Tensor]:
    """Return the backbone's state dict with keys relative to the backbone."""
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
