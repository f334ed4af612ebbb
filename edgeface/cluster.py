"""The k3d cluster behind a fleet: config generation, external commands, readiness, data.

`render_k3d_config` turns a `Fleet` into a k3d `Simple` config (one server, one agent per edge
node). Every docker, k3d and kubectl call goes through `run_command`, which applies a timeout
and turns failures into `CommandError` with the command and its output. `wait_for_pods` polls
`kubectl get pods` until the pods that a pipeline run needs are ready, and explains the ones
that are not. `load_fleet_data` partitions a dataset and copies each node's share into that
node's host folder.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgeface.errors import ConfigError, DataError, EdgefaceError
from edgeface.fleet import (
    DATASET_NODE_PATH,
    DATASET_PVC,
    EDGE_ROLE_LABEL,
    EDGE_ROLE_VALUE,
    PIPELINE_NAMESPACE,
    EdgeNode,
    Fleet,
    node_pvc_name,
)

logger = logging.getLogger(__name__)

# The k3s image that k3d v5.9 uses by default. The tests validate k8s/ against the same
# Kubernetes minor version (1.35).
K3S_IMAGE = "rancher/k3s:v1.35.5-k3s1"
# Name of the file that `load_fleet_data` writes into each node folder it fills.
SHARE_MARKER = ".edgeface-share.json"
# Capacity written on the data volumes and claims; hostPath volumes do not enforce it.
VOLUME_SIZE = "50Gi"


class CommandError(EdgefaceError):
    """External command (docker, k3d, kubectl) missing, failed or timed out."""


def kube_context(fleet: Fleet) -> str:
    """Return the kubeconfig context that k3d creates for the fleet's cluster."""
    return f"k3d-{fleet.name}"


# --------------------------------------------------------------------------- k3d config


def render_k3d_config(fleet: Fleet, host_cpus: int | None = None) -> dict[str, Any]:
    """Return the k3d `Simple` config (apiVersion k3d.io/v1alpha5) for `fleet`.

    Agent i hosts `fleet.nodes[i]`: it carries the labels `<node-label-key>=<label>` and
    `edgeface.io/role=edge`, the optional edge taint, and a bind mount of only its own
    `host-data-path` at `data-path`.

    CPU and memory caps: k3d has one memory limit for all agents (`agentsMemory`) and no CPU
    limit. So every agent gets the largest node memory as its container limit and a k3s fake
    /proc/meminfo of that size, and each agent reserves the difference to its own cap with
    `--kubelet-arg=system-reserved`. The kubelet then reports the node's cap as allocatable,
    and, because it enforces allocatable on the pods cgroup, pods on that agent cannot use
    more memory than the cap together. CPU is reserved the same way against `host_cpus`, the
    CPU count of the Docker host (`docker info`). The pods cgroup gets a CPU weight, not a
    quota, though. So the scheduler uses the node's CPU cap, but at run time only each pod's
    own CPU limit caps it. With `host_cpus` None the CPU reservation is left out.

    Raises:
        ConfigError: a node asks for more CPUs than `host_cpus`.
    """
    agents_memory_mib = max(_mebibytes_ceil(node.memory_bytes) for node in fleet.nodes)
    config: dict[str, Any] = {
        "apiVersion": "k3d.io/v1alpha5",
        "kind": "Simple",
        "metadata": {"name": fleet.name},
        "servers": 1,
        "agents": len(fleet.nodes),
        "image": K3S_IMAGE,
        "volumes": [],
        "options": {
            "k3d": {"wait": True},
            "k3s": {
                # Traefik is not used: the services are reached with kubectl port-forward.
                "extraArgs": [{"arg": "--disable=traefik", "nodeFilters": ["server:*"]}],
                "nodeLabels": [],
            },
            "kubeconfig": {"updateDefaultKubeconfig": True, "switchCurrentContext": True},
            "runtime": {"agentsMemory": f"{agents_memory_mib}Mi"},
        },
    }
    if host_cpus is None:
        logger.warning("Docker host CPU count unknown: agents get no CPU reservation, so the "
                       "scheduler sees every host CPU on each agent")
    if fleet.dataset_host_path is not None:
        # Every node, the server included: the central data tasks run off the edge agents.
        config["volumes"].append({"volume": f"{fleet.dataset_host_path}:{DATASET_NODE_PATH}",
                                  "nodeFilters": ["server:*", "agent:*"]})
    for index, node in enumerate(fleet.nodes):
        _add_agent(config, fleet, index, node, agents_memory_mib, host_cpus)
    return config


# --------------------------------------------------------------------------- volumes


def render_volumes(fleet: Fleet, size: str = VOLUME_SIZE) -> list[dict[str, Any]]:
    """Return the PersistentVolumes and claims that the pipeline's tasks mount.

    Per edge node, a hostPath PersistentVolume over the node's `data-path`, with a required
    node affinity to that node's label, pre-bound to the claim `edgeface-data-<node name>` in
    the pipeline namespace (pre-placed mode mounts it in that node's edge tasks). With
    `dataset-host-path` set, also the claim `edgeface-dataset` on a hostPath volume that every
    k3d node mounts (the central data tasks, and simulation mode's edge tasks).

    The volumes use no storage class, so k3s's local-path provisioner leaves them alone, and
    the reclaim policy Retain, so deleting a claim never deletes a node's images. Kubernetes
    does not enforce `size` on hostPath volumes: it only has to match between volume and claim.
    """
    documents: list[dict[str, Any]] = []
    if fleet.dataset_host_path is not None:
        documents += _volume_and_claim(DATASET_PVC, DATASET_NODE_PATH, "ReadOnlyMany", size,
                                       node_affinity=None)
    for node in fleet.nodes:
        affinity = {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": fleet.node_label_key, "operator": "In", "values": [node.label]}]}]}}
        documents += _volume_and_claim(node_pvc_name(node.name), node.data_path,
                                       "ReadWriteOnce", size, node_affinity=affinity)
    return documents


def _volume_and_claim(claim: str, host_path: str, access_mode: str, size: str,
                      node_affinity: dict[str, Any] | None) -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/part-of": "edgeface"}
    volume: dict[str, Any] = {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": claim, "labels": labels},
        "spec": {
            "capacity": {"storage": size},
            "accessModes": [access_mode],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "hostPath": {"path": host_path, "type": "Directory"},
            "claimRef": {"namespace": PIPELINE_NAMESPACE, "name": claim},
        },
    }
    if node_affinity is not None:
        volume["spec"]["nodeAffinity"] = node_affinity
    claim_document = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": claim, "namespace": PIPELINE_NAMESPACE, "labels": labels},
        "spec": {
            "accessModes": [access_mode],
            "storageClassName": "",
            "volumeName": claim,
            "resources": {"requests": {"storage": size}},
        },
    }
    return [volume, claim_document]


def volumes_yaml(documents: list[dict[str, Any]]) -> str:
    """Return `documents` as one multi-document YAML stream for `kubectl apply -f -`."""
    return yaml.safe_dump_all(documents, sort_keys=False)


def _add_agent(config: dict[str, Any], fleet: Fleet, index: int, node: EdgeNode,
               agents_memory_mib: int, host_cpus: int | None) -> None:
    # A fresh list per entry: a shared one would be dumped as YAML anchors and aliases.
    def only_this_agent() -> list[str]:
        return [f"agent:{index}"]

    k3s = config["options"]["k3s"]
    config["volumes"].append(
        {"volume": f"{node.host_data_path}:{node.data_path}", "nodeFilters": only_this_agent()}
    )
    k3s["nodeLabels"].append(
        {"label": f"{fleet.node_label_key}={node.label}", "nodeFilters": only_this_agent()}
    )
    k3s["nodeLabels"].append(
        {"label": f"{EDGE_ROLE_LABEL}={EDGE_ROLE_VALUE}", "nodeFilters": only_this_agent()}
    )
    if fleet.edge_taint is not None:
        k3s["extraArgs"].append(
            {"arg": f"--node-taint={fleet.edge_taint.k3s_arg()}", "nodeFilters": only_this_agent()}
        )
    reserved = _system_reserved(node, agents_memory_mib, host_cpus)
    if reserved:
        k3s["extraArgs"].append(
            {"arg": f"--kubelet-arg=system-reserved={reserved}", "nodeFilters": only_this_agent()}
        )


def _system_reserved(node: EdgeNode, agents_memory_mib: int, host_cpus: int | None) -> str:
    """Return the kubelet `system-reserved` value that shrinks an agent to the node's cap."""
    parts = []
    if host_cpus is not None:
        spare_millicores = host_cpus * 1000 - node.cpu_millicores
        if spare_millicores < 0:
            raise ConfigError(
                f"edge node {node.name!r} asks for cpu {node.cpu}, but the Docker host has only "
                f"{host_cpus} CPUs: lower that node's cpu in the fleet file"
            )
        if spare_millicores:
            parts.append(f"cpu={spare_millicores}m")
    spare_mib = agents_memory_mib - _mebibytes_ceil(node.memory_bytes)
    if spare_mib:
        parts.append(f"memory={spare_mib}Mi")
    return ",".join(parts)


def _mebibytes_ceil(size_bytes: int) -> int:
    return -(-size_bytes // 2**20)


def k3d_config_yaml(config: dict[str, Any]) -> str:
    """Return a k3d config as YAML text, keys in the order `render_k3d_config` built them."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- commands

INSTALL_HINTS = {
    "docker": "install Docker Engine (Debian/Ubuntu: `apt-get install docker.io`) and start it",
    "k3d": "install k3d v5.9 or later from https://k3d.io (a single binary on PATH)",
    "kubectl": "install kubectl (Debian/Ubuntu: `apt-get install kubernetes-client`)",
}


@dataclass(frozen=True)
class CommandResult:
    """Exit status and captured output of one external command."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def require_tools(names: Iterable[str]) -> None:
    """Raise CommandError naming every tool in `names` that is not on PATH, with install hints."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        hints = "; ".join(f"{name}: {INSTALL_HINTS.get(name, 'install it')}" for name in missing)
        raise CommandError(f"required command(s) not found on PATH: {', '.join(missing)}. {hints}")


def run_command(args: Sequence[str], *, timeout: float, check: bool = True,
                cwd: Path | None = None, input_text: str | None = None) -> CommandResult:
    """Run one external command with a timeout in seconds and capture its output.

    `input_text`, when given, is written to the command's standard input.

    Raises:
        CommandError: the program is not on PATH, it ran past `timeout`, or (with `check`) it
            exited non-zero. The message contains the command line and the end of its stderr.
    """
    command = shlex.join(args)
    logger.debug("running %s", command)
    try:
        completed = subprocess.run(
            list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
            input=input_text,
        )
    except FileNotFoundError:
        hint = INSTALL_HINTS.get(args[0], "install it or fix PATH")
        raise CommandError(f"{args[0]} not found: {hint}") from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"`{command}` timed out after {timeout:g} s") from None
    result = CommandResult(tuple(args), completed.returncode, completed.stdout, completed.stderr)
    if check and result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())[-2000:]
        raise CommandError(
            f"`{command}` failed with exit code {result.returncode}: {output or '(no output)'}"
        )
    return result


def docker_host_cpus(timeout: float = 60) -> int:
    """Return the CPU count of the Docker host, which is what k3d's containers share."""
    result = run_command(["docker", "info", "--format", "{{.NCPU}}"], timeout=timeout)
    text = result.stdout.strip()
    if not text.isdigit() or int(text) < 1:
        raise CommandError(f"`docker info` returned {text!r} as the CPU count: check that the "
                           "Docker daemon is running")
    return int(text)


def read_image_list(path: Path) -> list[str]:
    """Return the image references in `path`, one a line. '#' starts a comment."""
    if not path.is_file():
        raise ConfigError(f"image list not found: {path}: pass --manifests pointing at the "
                          "repository's k8s/ folder")
    images = []
    for line in path.read_text(encoding="utf-8").splitlines():
        reference = line.split("#", 1)[0].strip()
        if reference:
            images.append(reference)
    return images


def normalize_image(reference: str) -> str:
    """Return `reference` as `docker images` prints it: no docker.io/ or library/ prefix."""
    for prefix in ("docker.io/library/", "docker.io/", "library/"):
        if reference.startswith(prefix):
            return reference[len(prefix):]
    return reference


def local_images(timeout: float = 60) -> set[str]:
    """Return the repository:tag names of the images in the local Docker engine, normalized."""
    result = run_command(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
                         timeout=timeout)
    return {normalize_image(line.strip()) for line in result.stdout.splitlines() if line.strip()}


# --------------------------------------------------------------------------- readiness


@dataclass(frozen=True)
class PodRequirement:
    """Pods that must be ready: a namespace, equality labels and a description for messages."""

    namespace: str
    labels: dict[str, str]
    description: str

    def selector(self) -> str:
        return ",".join(f"{key}={value}" for key, value in self.labels.items())

    def matches(self, pod: dict[str, Any]) -> bool:
        metadata = pod.get("metadata", {})
        pod_labels = metadata.get("labels") or {}
        return metadata.get("namespace") == self.namespace and all(
            pod_labels.get(key) == value for key, value in self.labels.items()
        )


def required_pods(fleet: Fleet, kfp_namespace: str = "kubeflow") -> list[PodRequirement]:
    """Return the pods without which a pipeline run cannot start or track its results."""
    return [
        PodRequirement(kfp_namespace, {"app": "mysql"}, "KFP MySQL"),
        PodRequirement(kfp_namespace, {"component": "metadata-grpc-server"},
                       "KFP metadata gRPC server"),
        PodRequirement(kfp_namespace, {"app": "ml-pipeline"}, "KFP API server"),
        PodRequirement(kfp_namespace, {"app": "workflow-controller"}, "Argo workflow controller"),
        PodRequirement(kfp_namespace, {"app": "seaweedfs"}, "KFP artifact store (SeaweedFS)"),
        PodRequirement(fleet.namespace, {"app.kubernetes.io/name": "postgres"},
                       "PostgreSQL for MLflow"),
        PodRequirement(fleet.namespace, {"app.kubernetes.io/name": "mlflow"},
                       "MLflow tracking server"),
    ]


def pod_is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_problem(pod: dict[str, Any]) -> str:
    """Return why a pod is not ready: waiting reasons, last termination, or scheduling."""
    status = pod.get("status", {})
    reasons = []
    container_statuses = (status.get("initContainerStatuses") or []) + (
        status.get("containerStatuses") or [])
    for container in container_statuses:
        waiting = (container.get("state") or {}).get("waiting")
        if waiting:
            message = f": {waiting['message']}" if waiting.get("message") else ""
            reasons.append(f"container {container.get('name')} {waiting.get('reason')}{message}")
        terminated = (container.get("lastState") or {}).get("terminated")
        if terminated and terminated.get("reason"):
            reasons.append(f"container {container.get('name')} last exited "
                           f"{terminated['reason']} (exit code {terminated.get('exitCode')})")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            reasons.append(f"not scheduled, {condition.get('reason')}: {condition.get('message')}")
    if not reasons:
        reasons.append(f"phase {status.get('phase', 'unknown')}, not ready yet")
    return "; ".join(reasons)


_REASON_HINTS = {
    "ImagePullBackOff": "the image is neither in the cluster nor pullable: import it with "
                        "`k3d image import IMAGE -c CLUSTER`",
    "ErrImagePull": "the image is neither in the cluster nor pullable: import it with "
                    "`k3d image import IMAGE -c CLUSTER`",
    "CrashLoopBackOff": "read the crash with `kubectl logs -n NAMESPACE POD --previous`",
    "CreateContainerConfigError": "a referenced Secret or ConfigMap key is missing: "
                                  "`kubectl describe pod -n NAMESPACE POD`",
    "Unschedulable": "no node fits the pod: check `kubectl describe nodes` for capacity and taints",
    "OOMKilled": "the container ran out of memory: raise its memory limit",
}


def readiness_report(requirements: Sequence[PodRequirement],
                     pods: Sequence[dict[str, Any]]) -> list[str]:
    """Return one line per requirement that has no ready pod, naming each pod and its reason."""
    lines = []
    for requirement in requirements:
        matching = [pod for pod in pods if requirement.matches(pod)]
        if any(pod_is_ready(pod) for pod in matching):
            continue
        where = f"{requirement.description} ({requirement.namespace}, {requirement.selector()})"
        if not matching:
            lines.append(f"{where}: no pod exists yet")
            continue
        for pod in matching:
            problem = pod_problem(pod)
            hints = [hint for reason, hint in _REASON_HINTS.items() if reason in problem]
            hint = f" -> {hints[0]}" if hints else ""
            lines.append(f"{where}: pod {pod['metadata'].get('name')}: {problem}{hint}")
    return lines


def list_pods(context: str, timeout: float = 60) -> list[dict[str, Any]]:
    """Return every pod of the cluster as parsed from `kubectl get pods -o json`."""
    result = run_command(
        ["kubectl", "--context", context, "get", "pods", "--all-namespaces", "-o", "json"],
        timeout=timeout,
    )
    try:
        return list(json.loads(result.stdout).get("items", []))
    except (json.JSONDecodeError, AttributeError):
        raise CommandError(f"`kubectl get pods` returned output that is not a pod list: "
                           f"{result.stdout[:200]!r}") from None


def wait_for_pods(context: str, requirements: Sequence[PodRequirement], timeout: float,
                  poll_interval: float = 5.0,
                  sleep: Callable[[float], None] = time.sleep) -> None:
    """Poll until every requirement has a ready pod, for at most `timeout` seconds.

    Logs each change of the set of unready pods, and retries when `kubectl get pods` fails.
    Raises CommandError on timeout, listing every pod that is not ready with its waiting
    reason (CrashLoopBackOff, ImagePullBackOff, Unschedulable, ...) and what to do about it.
    """
    deadline = time.monotonic() + timeout
    last_report: list[str] | None = None
    while True:
        try:
            report = readiness_report(requirements, list_pods(context))
        except CommandError as error:
            # The API server can refuse connections for a while after the installs.
            logger.warning("listing pods failed, retrying until the timeout: %s", error)
            report = [f"pods could not be listed: {error}"]
        if not report:
            logger.info("all %d required pod groups are ready", len(requirements))
            return
        if report != last_report:
            logger.info("waiting for %d pod group(s):\n  %s", len(report), "\n  ".join(report))
            last_report = report
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CommandError(
                f"pods not ready after {timeout:g} s (raise --timeout if they are only slow):"
                "\n  " + "\n  ".join(report)
            )
        sleep(min(poll_interval, remaining))


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class NodeShare:
    """Summary of the images that `load_fleet_data` copied into one node's folder."""

    node: str
    folder: Path
    images: int
    identities: int


def load_fleet_data(fleet: Fleet, data_dir: Path, strategy: str = "identity", seed: int = 0,
                    replace: bool = False, max_bad_fraction: float | None = None,
                    progress: bool = False) -> list[NodeShare]:
    """Partition the dataset in `data_dir` over the fleet and copy each share to its node.

    Node i of the partition goes to `fleet.nodes[i].host_data_path`, in the same
    `<identity>/<image>` layout as the source, with a `.edgeface-share.json` marker. Every image
    is decoded first, and only readable image files are partitioned and copied: files without
    an image extension and unreadable images are left out and logged. `max_bad_fraction`
    (default: the built-in config's `max-bad-fraction`) limits the unreadable share. A tqdm
    progress bar of the decoding goes to stderr when `progress` is true.

    Raises:
        DataError: no images in `data_dir`, more than `max_bad_fraction` of them unreadable, or
            a node folder is not empty: it contains files that this function did not write, or
            a share while `replace` is False.
        ConfigError: `max_bad_fraction` is outside 0..1.
        PartitionError: the partition cannot be made (e.g. more nodes than identities).
    """
    from edgeface.config import load_config
    from edgeface.data.ingest import (
        check_bad_fraction,
        count_noun,
        resolve_images_root,
        scan_images,
        validate_images,
    )
    from edgeface.data.partition import partition

    if max_bad_fraction is None:
        max_bad_fraction = load_config().data.max_bad_fraction
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ConfigError(f"invalid max-bad-fraction {max_bad_fraction!r}: use a fraction from 0 "
                          "to 1, for example 0.01 for 1%")
    images_root = resolve_images_root(Path(data_dir))
    for node in fleet.nodes:
        _check_destination(node.host_data_path, replace)
    listing = scan_images(images_root)
    report = validate_images(images_root, listing.records, progress=progress, desc="load-data")
    check_bad_fraction(report, max_bad_fraction, str(images_root),
                       allow_more="allow more with `edgeface cluster load-data --max-bad-fraction`")
    unreadable = {path for path, _ in report.bad}
    records = [record for record in listing.records if record.path not in unreadable]
    if unreadable or listing.skipped:
        logger.warning("load-data: left out %s and %s without an image extension in %s; "
                       "`edgeface data inspect %s` lists them",
                       count_noun(len(unreadable), "unreadable image"),
                       count_noun(len(listing.skipped), "file"), images_root, data_dir)
    result = partition(records, len(fleet.nodes), strategy, seed=seed)
    shares = []
    for node, shard in zip(fleet.nodes, result.nodes):
        _clear_share(node.host_data_path)
        for record in shard.records:
            target = node.host_data_path / record.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(images_root / record.path, target)
        identities = len({record.identity for record in shard.records})
        marker = {"fleet": fleet.name, "node": node.name, "strategy": strategy, "seed": seed,
                  "images": len(shard.records), "identities": identities,
                  "source": str(images_root)}
        (node.host_data_path / SHARE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        logger.info("%s: copied %s of %s to %s", node.name,
                    count_noun(len(shard.records), "image"),
                    count_noun(identities, "identity", "identities"), node.host_data_path)
        shares.append(NodeShare(node.name, node.host_data_path, len(shard.records), identities))
    return shares


def _check_destination(folder: Path, replace: bool) -> None:
    if not folder.exists() or not any(folder.iterdir()):
        return
    if not (folder / SHARE_MARKER).is_file():
        raise DataError(
            f"node folder {folder} is not empty and was not filled by `edgeface cluster "
            "load-data`: empty it or point that node's host-data-path at another folder"
        )
    if not replace:
        raise DataError(f"node folder {folder} already contains a share: pass --replace to "
                        "delete it and copy a new one")


def _clear_share(folder: Path) -> None:
    # _check_destination has made sure that a non-empty folder contains a share marker.
    if folder.exists() and any(folder.iterdir()):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
