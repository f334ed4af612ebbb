"""The fleet file: which edge nodes exist, where their data lives and how they are capped.

One YAML file describes the k3d cluster (`edgeface cluster`) and the Kubeflow pipeline that
trains on it, so both read the same node names, labels and paths from here. Keys are
kebab-case, unknown keys are rejected, and every problem in a file is reported in one
ConfigError.

    name: edgeface-demo                # k3d cluster name, a DNS-1123 label
    namespace: edgeface                # namespace of MLflow and PostgreSQL
    image: edgeface:0.1.0              # component image, imported into k3d (explicit tag)
    node-label-key: edgeface.io/node
    edge-taint: {key: edgeface.io/edge, value: "true", effect: NoSchedule}   # optional
    mlflow: {secret: edgeface-mlflow, config-map: edgeface-mlflow}
    dataset-host-path: ./fleet-data/dataset   # optional, relative like host-data-path
    nodes:
      - name: edge-0                   # unique DNS-1123 label
        label: edge-0                  # value of node-label-key on the k3d agent
        host-data-path: ./fleet-data/edge-0   # relative to the fleet file's folder
        data-path: /data/edge          # where the agent and its pods see that folder
        cpu: "1"                       # Kubernetes CPU quantity
        memory: 2Gi                    # Kubernetes memory quantity

Pipeline pods run in the namespace of the Kubeflow Pipelines install (`PIPELINE_NAMESPACE`),
not in `namespace`. The manifests in k8s/base create MLflow in the namespace `edgeface` and
the Secret and ConfigMap under their default names, so a fleet that changes `namespace` or
`mlflow` needs the same change there. The constants below are the names that k8s/ and the
pipeline share.
This module must not import kfp.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from edgeface.errors import ConfigError

# Label on every k3d agent that hosts an edge node (the value is EDGE_ROLE_VALUE).
EDGE_ROLE_LABEL = "edgeface.io/role"
EDGE_ROLE_VALUE = "edge"
# Label that the pipeline puts on edge training pods. The NetworkPolicy in k8s/ selects pods
# by it, so the two must match.
TRAINING_POD_LABEL = "edgeface.io/component"
TRAINING_POD_VALUE = "edge-training"
# Namespace where the standalone Kubeflow Pipelines install runs pipeline pods.
PIPELINE_NAMESPACE = "kubeflow"
# ServiceAccount in PIPELINE_NAMESPACE that pipeline runs use, defined in k8s/base.
RUNNER_SERVICE_ACCOUNT = "edgeface-pipeline-runner"
# PersistentVolumeClaim in PIPELINE_NAMESPACE with the dataset, mounted by the central data
# tasks and, in simulation mode, by the edge tasks. DATASET_NODE_PATH is the folder where every
# k3d node mounts the fleet's `dataset-host-path`.
DATASET_PVC = "edgeface-dataset"
DATASET_NODE_PATH = "/srv/edgeface/dataset"


def node_pvc_name(node_name: str) -> str:
    """Return the PVC with a pre-placed node's images: `edgeface-data-<node name>`."""
    return f"edgeface-data-{node_name}"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([A-Za-z]*)$")
_MEMORY_SUFFIXES = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}
# k3d names node containers k3d-<name>-agent-<i> and k3d-<name>-serverlb and uses them as
# hostnames, which are at most 63 characters, so the cluster name gets 63 - 13 of them.
MAX_CLUSTER_NAME = 50


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    model_config = ConfigDict(
        alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True
    )


def parse_cpu_millicores(value: str) -> int:
    """Return a Kubernetes CPU quantity ("1", "1.5", "500m") in millicores.

    Raises ValueError for anything else, including zero and values finer than 1m.
    """
    match = _QUANTITY.match(value)
    if not match or match.group(2) not in ("", "m"):
        raise ValueError("expected a CPU quantity such as 1, 1.5 or 500m")
    amount = Decimal(match.group(1))
    millicores = amount if match.group(2) == "m" else amount * 1000
    if millicores != millicores.to_integral_value() or millicores < 1:
        raise ValueError("expected at least 1m CPU, in whole millicores")
    return int(millicores)


def parse_memory_bytes(value: str) -> int:
    """Return a Kubernetes memory quantity ("2Gi", "512Mi", "1G", "1e9") in bytes.

    Suffixes are case-sensitive as in Kubernetes. Raises ValueError for anything else and for
    values below 1 MiB.
    """
    try:
        if re.fullmatch(r"[0-9.]+[eE][0-9]+", value):
            total = Decimal(value)
        else:
            match = _QUANTITY.match(value)
            if not match or match.group(2) not in _MEMORY_SUFFIXES:
                raise ValueError
            total = Decimal(match.group(1)) * _MEMORY_SUFFIXES[match.group(2)]
    except (ValueError, InvalidOperation):
        raise ValueError("expected a memory quantity such as 2Gi, 512Mi or 1G") from None
    if total < 2**20:
        raise ValueError("expected at least 1Mi of memory")
    return int(total)


def _check_label_key(key: str) -> str:
    prefix, _, name = key.rpartition("/")
    prefix_ok = not prefix or (len(prefix) <= 253 and _DNS_SUBDOMAIN.match(prefix))
    if not (prefix_ok and len(name) <= 63 and _LABEL_NAME.match(name)):
        raise ValueError("expected a Kubernetes label key such as edgeface.io/node")
    return key


def _check_label_value(value: str) -> str:
    if len(value) > 63 or not _LABEL_VALUE.match(value):
        raise ValueError(
            "expected a Kubernetes label value: at most 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    return value


def _check_dns_label(value: str, max_length: int = 63) -> str:
    if len(value) > max_length or not _DNS_LABEL.match(value):
        raise ValueError(
            f"expected a DNS-1123 label: at most {max_length} lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return value


def _quantity_text(value: Any) -> Any:
    # YAML reads `cpu: 1` as an int, but quantities are strings in Kubernetes.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value


DnsLabel = Annotated[str, AfterValidator(_check_dns_label)]
LabelKey = Annotated[str, AfterValidator(_check_label_key)]
LabelValue = Annotated[str, AfterValidator(_check_label_value)]


class EdgeTaint(_Section):
    """Taint put on every edge agent so that only pods tolerating it are scheduled there."""

    key: LabelKey
    value: LabelValue = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"

    def k3s_arg(self) -> str:
        """Return the taint in the `key=value:effect` form that `--node-taint` takes."""
        return f"{self.key}={self.value}:{self.effect}"


class MlflowRefs(_Section):
    """Names of the Secret and ConfigMap whose keys pipeline components get as environment."""

    secret: DnsLabel = "edgeface-mlflow"
    config_map: DnsLabel = "edgeface-mlflow"


class EdgeNode(_Section):
    """One edge node: a k3d agent with its own data folder and CPU and memory cap."""

    name: DnsLabel
    label: LabelValue
    host_data_path: Path = Field(description="folder on the Docker host with this node's images")
    data_path: str = Field(description="absolute path of that folder inside the agent and pods")
    cpu: str = Field(description="Kubernetes CPU quantity: agent cap and training pod limit")
    memory: str = Field(description="Kubernetes memory quantity: agent cap and pod limit")

    @field_validator("host_data_path")
    @classmethod
    def _check_host_path(cls, path: Path) -> Path:
        # ':' and ',' separate fields of Docker's and k3d's volume specs.
        if not str(path) or any(char in str(path) for char in ":,"):
            raise ValueError("expected a folder path without ':' or ','")
        return path

    @field_validator("data_path")
    @classmethod
    def _check_data_path(cls, path: str) -> str:
        pure = PurePosixPath(path)
        if not pure.is_absolute() or pure == PurePosixPath("/") or any(c in path for c in ":,"):
            raise ValueError("expected an absolute POSIX path below / without ':' or ','")
        return str(pure)

    @field_validator("cpu", mode="before")
    @classmethod
    def _check_cpu(cls, value: Any) -> Any:
        value = _quantity_text(value)
        if isinstance(value, str):
            parse_cpu_millicores(value)
        return value

    @field_validator("memory", mode="before")
    @classmethod
    def _check_memory(cls, value: Any) -> Any:
        value = _quantity_text(value)
        if isinstance(value, str):
            parse_memory_bytes(value)
        return value

    @property
    def cpu_millicores(self) -> int:
        return parse_cpu_millicores(self.cpu)

    @property
    def memory_bytes(self) -> int:
        return parse_memory_bytes(self.memory)


class Fleet(_Section):
    """The whole fleet: cluster name, shared settings and the edge nodes in order."""

    name: str
    namespace: DnsLabel = "edgeface"
    image: str
    node_label_key: LabelKey = "edgeface.io/node"
    edge_taint: EdgeTaint | None = None
    mlflow: MlflowRefs = MlflowRefs()
    dataset_host_path: Path | None = Field(
        None, description="folder on the Docker host with the whole dataset, mounted on every "
                          "k3d node for the PVC edgeface-dataset; optional")
    nodes: list[EdgeNode] = Field(min_length=1)

    @field_validator("dataset_host_path")
    @classmethod
    def _check_dataset_path(cls, path: Path | None) -> Path | None:
        if path is not None and (not str(path) or any(char in str(path) for char in ":,")):
            raise ValueError("expected a folder path without ':' or ','")
        return path

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        return _check_dns_label(name, MAX_CLUSTER_NAME)

    @field_validator("image")
    @classmethod
    def _check_image(cls, image: str) -> str:
        last = image.rsplit("/", 1)[-1]
        if not image or any(char.isspace() for char in image) or ":" not in last:
            raise ValueError(
                "expected an image reference with an explicit tag, e.g. edgeface:0.1.0")
        if last.endswith(":latest"):
            raise ValueError(
                "expected a tag other than latest: Kubernetes pulls :latest images on every "
                "pod start, which fails for images imported into k3d"
            )
        return image

    def node(self, name: str) -> EdgeNode:
        """Return the node called `name`, or raise ConfigError listing the known names."""
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(node.name for node in self.nodes)
        raise ConfigError(
            f"edge node {name!r} is not in fleet {self.name!r}: known nodes are {known}")


def load_fleet(path: Path | str) -> Fleet:
    """Read and validate a fleet file.

    A relative `host-data-path` or `dataset-host-path` is resolved against the folder that contains the file, and `~`
    is expanded, so the returned paths are absolute.

    Raises:
        ConfigError: file missing or not YAML, or any invalid key. The message lists every
            problem with the file, the key, what was expected and the value given.
    """
    path = Path(path)
    raw = _read_mapping(path)
    base = path.resolve().parent
    problems = _duplicate_problems(raw, base)
    try:
        fleet = Fleet.model_validate(raw)
    except ValidationError as error:
        problems = _pydantic_problems(error) + problems
        fleet = None
    if problems or fleet is None:
        lines = [f"invalid fleet file {path}, {len(problems)} problem(s):"]
        lines += [f"  - {problem}" for problem in problems]
        raise ConfigError("\n".join(lines))
    nodes = [
        node.model_copy(
            update={"host_data_path": (base / node.host_data_path.expanduser()).resolve()})
        for node in fleet.nodes
    ]
    update: dict[str, Any] = {"nodes": nodes}
    if fleet.dataset_host_path is not None:
        update["dataset_host_path"] = (base / fleet.dataset_host_path.expanduser()).resolve()
    return fleet.model_copy(update=update)


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"fleet file not found: {path}: pass an existing --fleet path, "
                          "e.g. pipelines/fleet.example.yaml")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"fleet file {path} is not valid YAML: {error}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"fleet file {path} must contain a mapping, got {type(loaded).__name__}")
    return loaded


def _pydantic_problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        key = _format_location(item["loc"])
        if item["type"] == "extra_forbidden":
            known = ", ".join(_known_keys(item["loc"][:-1]))
            problems.append(f"{key}: unknown key; known keys here are {known}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        problems.append(f"{key}: {message} (got {item.get('input')!r})")
    return problems


def _known_keys(location: tuple[int | str, ...]) -> list[str]:
    """Return the YAML keys that the model at `location` (list indexes skipped) accepts."""
    model: type[BaseModel] = Fleet
    for part in location:
        if isinstance(part, int):
            continue
        field = next(f for n, f in model.model_fields.items() if part in (n, f.alias))
        annotation = field.annotation
        inner = getattr(annotation, "__args__", (annotation,))
        model = next(t for t in inner if isinstance(t, type) and issubclass(t, BaseModel))
    return [field.alias or name for name, field in model.model_fields.items()]


def _format_location(location: tuple[int | str, ...]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif text:
            text += f".{part}"
        else:
            text = str(part)
    return text or "(top level)"


def _duplicate_problems(raw: dict[str, Any], base: Path) -> list[str]:
    """Return a problem for each node name, label or host folder that two nodes share.

    Host folders are compared after resolving them against `base`, so `a` and `./a` clash.
    """
    nodes = raw.get("nodes")
    if not isinstance(nodes, list):
        return []
    problems = []
    for key in ("name", "label", "host-data-path"):
        seen: dict[Any, int] = {}
        for index, node in enumerate(nodes):
            value = node.get(key) if isinstance(node, dict) else None
            if not isinstance(value, str) or not value:
                continue
            compared = value
            if key == "host-data-path":
                compared = (base / Path(value).expanduser()).resolve()
            if compared in seen:
                problems.append(
                    f"nodes[{index}].{key}: expected a value unique across nodes, but "
                    f"nodes[{seen[compared]}] has it too (got {value!r})"
                )
            else:
                seen[compared] = index
    return problems
