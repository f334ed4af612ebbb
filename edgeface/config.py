"""Typed run configuration: YAML file, built-in defaults and command-line overrides.

YAML keys and CLI flags are kebab-case (`local-epochs`, `--local-epochs`); Python attributes
are snake_case. Every leaf key is unique across sections, so each has a flag of the same name
(`--nodes`, `--rounds`). Unknown keys and invalid values are collected and reported at once.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeface.errors import ConfigError


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True
    )


CROP_FORMAT = ("invalid crop: expected 4 numbers left,top,right,bottom as fractions of the "
               "image, for example --crop 0.33,0.31,0.67,0.70 or crop: [0.33, 0.31, 0.67, 0.70] "
               "in YAML")


class DataConfig(Section):
    protocol: Literal["auto", "lfw-view1", "lfw-view2", "holdout"] = Field(
        "auto", description="evaluation protocol; auto picks lfw-view1 when LFW's files are present"
    )
    fold: int = Field(0, ge=0, le=9, description="LFW View 2 test fold (0-9)")
    image_size: int = Field(64, ge=16, le=512, description="side of the square face crop, pixels")
    crop: tuple[float, float, float, float] = Field(
        (0.33, 0.31, 0.67, 0.70),
        description="face box as fractions of the image: left, top, right, bottom",
    )
    max_bad_fraction: float = Field(
        0.01, ge=0.0, le=1.0, description="fail when more than this fraction of images is unreadable"
    )
    cache_dir: str | None = Field(
        None, description="preprocessed-image cache; default $EDGEFACE_CACHE_DIR or ~/.cache/edgeface"
    )
    holdout_identities: float = Field(
        0.25, ge=0.0, lt=1.0, description="holdout protocol: fraction of people never trained on"
    )
    train_images_per_identity: int = Field(
        5, ge=1, description="holdout protocol: training images per person; the rest are probes"
    )

    @field_validator("crop", mode="before")
    @classmethod
    def _parse_crop(cls, value: Any) -> Any:
        """Turn a comma-separated string or a list of 4 numbers into 4 floats.

        Checking the count here gives one error for the whole crop, instead of one per missing
        or malformed item.
        """
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or len(items) != 4:
            raise ValueError(CROP_FORMAT)
        if any(isinstance(item, bool) for item in items):
            raise ValueError(CROP_FORMAT)
        try:
            return tuple(float(item) for item in items)
        except (TypeError, ValueError):
            raise ValueError(CROP_FORMAT) from None

    @field_validator("crop")
    @classmethod
    def _check_crop(cls, crop: tuple[float, float, float, float]) -> tuple[float, ...]:
        left, top, right, bottom = crop
        if not (0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0):
            raise ValueError("expected 0 <= left < right <= 1 and 0 <= top < bottom <= 1")
        return crop


class PartitionConfig(Section):
    strategy: Literal["identity", "iid", "dirichlet"] = Field(
        "identity", description="how images are split across edge nodes"
    )
    nodes: int = Field(4, ge=1, le=256, description="number of edge nodes")
    alpha: float = Field(0.5, gt=0.0, description="dirichlet concentration; smaller is more skewed")


class ModelConfig(Section):
    arch: Literal["mobilefacenet"] = "mobilefacenet"
    embedding_dim: int = Field(128, ge=8, le=2048)
    width: float = Field(1.0, gt=0.0, le=4.0, description="channel width multiplier")
    loss: Literal["arcface", "cosface"] = "arcface"
    margin: float = Field(0.5, ge=0.0, lt=1.5, description="additive margin (radians for arcface)")
    scale: float = Field(16.0, gt=0.0, description="logit scale s of the margin head")


class TrainConfig(Section):
    rounds: int = Field(14, ge=1, le=10_000, description="federated rounds")
    local_epochs: float = Field(1.0, gt=0.0, description="passes over the node's data per round")
    batch_size: int = Field(128, ge=2, le=4096)
    lr: float = Field(0.1, gt=0.0, description="peak client learning rate")
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_rounds: int = Field(1, ge=0, description="rounds of linear learning-rate warm-up")
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    augment: bool = Field(True, description="random flip, shift and brightness on training crops")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="bf16 uses CPU autocast; auto picks bf16 when the CPU has native "
        "bf16 instructions (AVX512_BF16 or AMX-BF16), else fp32"
    )
    channels_last: bool = True
    threads_per_worker: int = Field(0, ge=0, description="torch threads per worker process; 0 = auto")
    max_parallel: int = Field(0, ge=0, description="nodes training at once; 0 = one per core")
    worker_processes: int = Field(
        0, ge=0, description="local worker processes that host the nodes, at least max-parallel; "
        "0 = one per node training at once; the node count gives each node its own process"
    )


class FederationConfig(Section):
    strategy: Literal["fedavg", "fedavgm", "fedadam"] = Field(
        "fedavg", description="server aggregation rule"
    )
    server_lr: float | None = Field(
        None, gt=0.0, description="server learning rate of fedavgm and fedadam (fedavg has "
        "none); default 0.1 for fedavgm, 0.01 for fedadam"
    )
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0,
                                   description="server momentum, used by fedavgm only")
    fedprox_mu: float = Field(0.0, ge=0.0, description="FedProx proximal-term weight; 0 = off")
    fedbn: bool = Field(False, description="keep BatchNorm layers local to each node")
    min_nodes: int = Field(1, ge=1, description="nodes that must report for a round to count")
    min_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="fraction of nodes that must report for a round to count"
    )
    bn_calibration_images: int = Field(
        1024, ge=0, description="images per node used to recompute the fused model's BatchNorm "
        "statistics after each round; 0 = keep the averaged statistics"
    )
    round_timeout: float = Field(
        0.0, ge=0.0, description="seconds a node may train per round, counted once its data is "
        "loaded; 0 = no limit"
    )
    spreadout: bool = Field(
        False, description="spread the nodes' class centres apart on the server after each "
        "round (FedAwS / FedFace); for partitions where nodes share no people"
    )
    spreadout_lr: float = Field(0.1, gt=0.0, description="step size of the spread-out server step")
    spreadout_margin: float = Field(
        1.4142, gt=0.0, le=2.0, description="distance between unit-length class centres of "
        "different nodes below which they repel; 1.4142 = cosine 0"
    )
    spreadout_steps: int = Field(10, ge=1, description="gradient steps of the spread-out server step per round")

    @model_validator(mode="after")
    def _check_server_options(self) -> "FederationConfig":
        """Reject a server option that the chosen strategy would ignore.

        Only values that differ from the default count: a run's saved config.yaml lists every
        key, so `model_fields_set` alone would also flag the defaults it wrote out.
        """
        problems = []
        if self.server_lr is not None and self.strategy == "fedavg":
            problems.append(f"server-lr {self.server_lr:g} has no effect with aggregation fedavg, "
                            "which has no server learning rate: use --aggregation fedavgm or "
                            "fedadam, or remove server-lr")
        default_momentum = type(self).model_fields["server_momentum"].default
        if self.server_momentum != default_momentum and self.strategy != "fedavgm":
            problems.append(f"server-momentum {self.server_momentum:g} has no effect with "
                            f"aggregation {self.strategy}, only fedavgm uses it: use "
                            "--aggregation fedavgm, or remove server-momentum")
        if problems:
            raise ValueError(". ".join(problems))
        return self


class EvaluationConfig(Section):
    eval_batch_size: int = Field(256, ge=1)
    eval_every: int = Field(1, ge=0, description="evaluate the fused model every N rounds; 0 = last only")


# The newest ONNX opset that torch 2.14's TorchScript exporter writes.
TORCHSCRIPT_MAX_OPSET = 20


class ExportConfig(Section):
    opset: int = Field(18, ge=18, le=23, description="ONNX opset; torch 2.14's dynamo exporter "
                       "emits 18 natively, the torchscript one writes up to 20")
    exporter: Literal["dynamo", "torchscript"] = Field(
        "dynamo", description="torch.onnx exporter: dynamo (maintained, ~5 s) or torchscript "
        "(deprecated in torch, ~0.2 s, opset <= 20)"
    )
    rtol: float = Field(1e-3, gt=0.0)
    atol: float = Field(1e-5, gt=0.0)

    @model_validator(mode="after")
    def _check_opset(self) -> "ExportConfig":
        if self.exporter == "torchscript" and self.opset > TORCHSCRIPT_MAX_OPSET:
            raise ValueError(
                f"opset {self.opset} is newer than the torchscript exporter can write (up to "
                f"{TORCHSCRIPT_MAX_OPSET}): lower --opset to {TORCHSCRIPT_MAX_OPSET} or less, "
                "or use --exporter dynamo"
            )
        return self


class TrackingConfig(Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or ./mlflow.db"
    )
    experiment: str = "edgeface"
    model_name: str = "edgeface"
    alias: str = "challenger"


class RunConfig(Section):
    seed: int = Field(0, ge=0)
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _check_min_nodes(self) -> "RunConfig":
        if self.federation.min_nodes > self.partition.nodes:
            raise ValueError(
                f"min-nodes {self.federation.min_nodes} is larger than nodes "
                f"{self.partition.nodes}: lower --min-nodes or raise --nodes"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a kebab-case dict, the same shape as the YAML file."""
        return self.model_dump(mode="json", by_alias=True)

    def config_hash(self) -> str:
        """Return a short hash of everything that affects the trained model."""
        settings = self.to_dict()
        for section, key in UNHASHED_KEYS:
            settings[section].pop(key)
        payload = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


# Keys left out of `config_hash` because they do not change the trained weights: which worker
# process hosts a node does not (tests/test_pool.py), nor which exporter writes the ONNX file.
# Runs made before a key existed keep their hash, so they can still be resumed.
UNHASHED_KEYS = (("train", "worker-processes"), ("export", "exporter"))


SECTIONS = {name: field.annotation for name, field in RunConfig.model_fields.items()
            if name != "seed"}


# Flags whose name differs from their YAML key, because the key alone would be ambiguous.
FLAG_NAMES = {("partition", "strategy"): "partition", ("federation", "strategy"): "aggregation"}


def leaf_keys() -> dict[str, tuple[str | None, str]]:
    """Map each flag name to (section, YAML key); `seed` has section None."""
    keys: dict[str, tuple[str | None, str]] = {"seed": (None, "seed")}
    for section, model in SECTIONS.items():
        for attribute in model.model_fields:
            yaml_key = _kebab(attribute)
            flag = FLAG_NAMES.get((section, attribute), yaml_key)
            if flag in keys:
                raise AssertionError(f"flag {flag!r} is not unique across config sections")
            keys[flag] = (section, yaml_key)
    return keys


def default_config_path() -> Path:
    return Path(str(resources.files("edgeface") / "configs" / "default.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}: pass an existing --config path")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must contain a mapping, got {type(loaded).__name__}")
    return loaded


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}), {error.error_count()} problem(s):"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        got = item.get("input")
        if item["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (got {got!r}); {_unknown_key_hint(item['loc'])}")
            continue
        if isinstance(got, dict):
            # A check across several keys names their values in its message, so the whole
            # section, which would bury that message, is left out.
            lines.append(f"  - {key}: {item['msg']}")
            continue
        lines.append(f"  - {key}: {item['msg']} (got {got!r})")
    return "\n".join(lines)


def _unknown_key_hint(location: tuple[int | str, ...]) -> str:
    """Say where an unknown key belongs, or which keys its section accepts."""
    name = str(location[-1])
    section = str(location[0]) if len(location) > 1 else None
    model = SECTIONS.get(section) if section else None
    known = [_kebab(field) for field in model.model_fields] if model else ["seed", *SECTIONS]
    home = leaf_keys().get(name) or leaf_keys().get(_kebab(name))
    if home is not None and home[0] != section:
        place = f"in section {home[0]!r}" if home[0] else "at the top level"
        return f"it belongs {place} as {home[1]!r}"
    close = difflib.get_close_matches(_kebab(name), known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    where = f"section {section!r}" if model else "the top level"
    return f"{hint}{where} accepts: {', '.join(known)}"


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load the built-in defaults, then `path` on top, then `overrides` (flat kebab-case keys).

    Raises ConfigError listing every problem at once: file, key, what was expected and the value
    that was given.
    """
    merged = _read_yaml(default_config_path())
    source = "built-in defaults"
    if path is not None:
        _deep_update(merged, _read_yaml(Path(path)))
        source = str(path)
    if overrides:
        _apply_overrides(merged, overrides)
        source += " + command-line flags"
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_format_errors(error, source)) from None


def _deep_update(target: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _apply_overrides(merged: dict[str, Any], overrides: dict[str, Any]) -> None:
    keys = leaf_keys()
    for key, value in overrides.items():
        if key not in keys:
            raise ConfigError(f"unknown option {key!r}: known options are {', '.join(sorted(keys))}")
        section, yaml_key = keys[key]
        if section is None:
            merged[yaml_key] = value
        else:
            merged.setdefault(section, {})[yaml_key] = value
