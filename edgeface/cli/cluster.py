"""`edgeface cluster`: create, inspect, fill and delete the k3d cluster of a fleet.

    edgeface cluster config --fleet F        print the generated k3d config
    edgeface cluster up --fleet F            create the cluster and install KFP and MLflow
    edgeface cluster status --fleet F        nodes, their caps and the readiness of key pods
    edgeface cluster volumes --fleet F       print the PersistentVolumes and claims of the
                                             node and dataset folders
    edgeface cluster load-data --fleet F --data DIR   copy each node's share to its folder
    edgeface cluster down --fleet F          delete the cluster (node folders are kept)

Run `up` from the repository root, or pass --manifests and --build-context.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from edgeface.cluster import (
    CommandError,
    docker_host_cpus,
    k3d_config_yaml,
    kube_context,
    list_pods,
    load_fleet_data,
    local_images,
    normalize_image,
    read_image_list,
    readiness_report,
    render_k3d_config,
    render_volumes,
    require_tools,
    required_pods,
    run_command,
    volumes_yaml,
    wait_for_pods,
)
from edgeface.errors import ConfigError
from edgeface.fleet import Fleet, load_fleet

logger = logging.getLogger(__name__)

# MLflow server image built from k8s/mlflow: the upstream image plus the PostgreSQL driver.
# k8s/base/mlflow.yaml runs this exact name.
MLFLOW_IMAGE = "edgeface-mlflow:3.17.2"
KFP_NAMESPACE = "kubeflow"
# Seconds each step may take. The readiness wait has its own --timeout.
CREATE_TIMEOUT_S = 600
BUILD_TIMEOUT_S = 3600
IMPORT_TIMEOUT_S = 1800
APPLY_TIMEOUT_S = 600
CRD_WAIT_TIMEOUT_S = 180
POLL_INTERVAL_S = 5.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cluster", help="create and manage the k3d cluster of a fleet",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)

    config = actions.add_parser("config", help="print the k3d config generated from a fleet file")
    _add_fleet(config)
    config.add_argument("--host-cpus", type=int, default=None,
                        help="CPU count of the Docker host, used to reserve each agent down to "
                             "its node's cpu (default: no CPU reservation)")
    config.set_defaults(func=_run_config)

    up = actions.add_parser("up", help="create the cluster, install KFP and MLflow, wait for them")
    _add_fleet(up)
    _add_manifests(up)
    up.add_argument("--timeout", type=float, default=900.0,
                    help="seconds to wait for the KFP and MLflow pods to be ready (default 900)")
    up.add_argument("--skip-build", action="store_true",
                    help="import the local component and MLflow images without building them")
    up.add_argument("--build-context", type=Path, default=Path("."),
                    help="folder with the component Dockerfile (default: current folder)")
    up.add_argument("--config-out", type=Path, default=None,
                    help="where to write the k3d config (default build/k3d-<name>.yaml)")
    up.set_defaults(func=_run_up)

    volumes = actions.add_parser(
        "volumes", help="print the PersistentVolumes and claims of the node and dataset folders")
    _add_fleet(volumes)
    volumes.set_defaults(func=_run_volumes)

    status = actions.add_parser("status", help="show nodes, caps and readiness of key pods")
    _add_fleet(status)
    status.add_argument("--format", choices=["text", "json"], default="text",
                        help="output format (default text)")
    status.set_defaults(func=_run_status)

    down = actions.add_parser("down", help="delete the cluster but keep the node data folders")
    _add_fleet(down)
    down.set_defaults(func=_run_down)

    load = actions.add_parser("load-data", help="partition a dataset and copy each node's share")
    _add_fleet(load)
    load.add_argument("--data", type=Path, required=True,
                      help="dataset folder: LFW (with lfw-deepfunneled/) or <identity>/<image>")
    load.add_argument("--partition", choices=["identity", "iid", "dirichlet"],
                      default="identity", help="partition strategy (default identity)")
    load.add_argument("--seed", type=int, default=0, help="partition seed (default 0)")
    load.add_argument("--replace", action="store_true",
                      help="replace shares that an earlier load-data copied")
    load.add_argument("--max-bad-fraction", type=float, default=None,
                      help="fraction of unreadable images (0 to 1) left out before failing "
                      "(default: max-bad-fraction of the built-in config, as in `edgeface run`)")
    load.add_argument("--no-progress", action="store_true",
                      help="hide the progress bar of the image check")
    load.set_defaults(func=_run_load_data)


def _add_fleet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet", type=Path, required=True,
                        help="fleet file, e.g. pipelines/fleet.example.yaml")


def _add_manifests(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifests", type=Path, default=Path("k8s"),
                        help="the repository's k8s/ folder (default: ./k8s)")


# --------------------------------------------------------------------------- config


def _run_config(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    sys.stdout.write(k3d_config_yaml(render_k3d_config(fleet, host_cpus=args.host_cpus)))
    return 0


def _run_volumes(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    sys.stdout.write(volumes_yaml(render_volumes(fleet)))
    return 0


# --------------------------------------------------------------------------- up


def _run_up(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    manifests = args.manifests
    config_out = args.config_out or Path("build") / f"k3d-{fleet.name}.yaml"
    bring_up(fleet, args.fleet, manifests, args.build_context, config_out, args.timeout,
             args.skip_build)
    print(port_forward_help(fleet))
    return 0


def bring_up(fleet: Fleet, fleet_file: Path, manifests: Path, build_context: Path,
             config_out: Path, timeout: float, skip_build: bool) -> None:
    """Create the fleet's cluster, load images, install KFP and k8s/base, wait for readiness.

    `fleet_file` is the file `fleet` was read from, named in error messages.

    Raises ConfigError for a missing data folder before anything is created, and
    CommandError naming the step that failed, or the pods that are not ready after `timeout`
    seconds with the reason of each.
    """
    require_tools(["docker", "k3d", "kubectl"])
    _check_manifests(manifests)
    _check_data_folders(fleet, fleet_file)
    _ensure_secret_files(manifests / "base" / "secrets")

    config = render_k3d_config(fleet, host_cpus=docker_host_cpus())
    config_out.parent.mkdir(parents=True, exist_ok=True)
    config_out.write_text(k3d_config_yaml(config), encoding="utf-8")
    logger.info("wrote k3d config %s", config_out)
    _create_cluster(fleet, config_out)

    if not skip_build:
        _build_images(fleet, build_context, manifests)
    _import_images(fleet, manifests)
    _install_manifests(fleet, manifests)
    logger.info("waiting up to %.0f s for KFP and MLflow pods", timeout)
    wait_for_pods(kube_context(fleet), required_pods(fleet, KFP_NAMESPACE), timeout,
                  poll_interval=POLL_INTERVAL_S)


def _check_manifests(manifests: Path) -> None:
    needed = ["kfp/cluster-scoped", "kfp/platform-agnostic", "kfp/images.txt", "base", "mlflow"]
    missing = [name for name in needed if not (manifests / name).exists()]
    if missing:
        raise ConfigError(
            f"manifest folder {manifests} lacks {', '.join(missing)}: run from the repository "
            "root or pass --manifests pointing at its k8s/ folder"
        )


def _check_data_folders(fleet: Fleet, fleet_file: Path) -> None:
    """Raise ConfigError listing every data folder that k3d would bind-mount but is unusable.

    Docker would create a missing bind-mount source as an empty root-owned folder, and the
    pipeline would fail only later, on a node or a dataset without images.
    """
    problems = []
    dataset = fleet.dataset_host_path
    if dataset is not None:
        state = _folder_state(dataset)
        if state is None and not any(dataset.iterdir()):
            state = "is empty"
        if state is not None:
            problems.append(f"dataset-host-path {dataset} {state}: copy the dataset there, for "
                            f"example `mkdir -p {dataset} && cp -r /path/to/lfw {dataset}/lfw`")
    for node in fleet.nodes:
        state = _folder_state(node.host_data_path)
        if state is not None:
            problems.append(
                f"host-data-path {node.host_data_path} of node {node.name} {state}: run "
                f"`edgeface cluster load-data --fleet {fleet_file} --data DATASET_DIR`, or for "
                f"simulation mode create it empty with `mkdir -p {node.host_data_path}`"
            )
    if problems:
        header = (f"fleet file {fleet_file}: {len(problems)} data folder(s) not ready, so no "
                  "cluster was created:")
        raise ConfigError("\n".join([header, *(f"  - {problem}" for problem in problems)]))


def _folder_state(path: Path) -> str | None:
    """Return why `path` is not a usable folder ("does not exist", ...), or None if it is one."""
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is not a folder"
    return None


def _ensure_secret_files(folder: Path) -> None:
    """Create the gitignored env files that k8s/base's secretGenerator reads, if missing.

    The PostgreSQL password is random (hex, so it is safe inside the database URL).
    """
    postgres_env = folder / "postgres.env"
    if not postgres_env.exists():
        password = secrets.token_hex(24)
        postgres_env.write_text(f"POSTGRES_USER=mlflow\nPOSTGRES_PASSWORD={password}\n",
                                encoding="utf-8")
        postgres_env.chmod(0o600)
        logger.info("wrote a new random PostgreSQL password to %s", postgres_env)
    mlflow_env = folder / "mlflow.env"
    if not mlflow_env.exists():
        shutil.copyfile(folder / "mlflow.env.example", mlflow_env)
        mlflow_env.chmod(0o600)
        logger.info("wrote %s from its .example (no MLflow credentials set)", mlflow_env)


def _cluster_exists(name: str) -> bool:
    result = run_command(["k3d", "cluster", "list", "-o", "json"], timeout=60)
    try:
        clusters = json.loads(result.stdout or "[]")
    except json.JSONDecodeError:
        raise CommandError(f"`k3d cluster list -o json` returned output that is not JSON: "
                           f"{result.stdout[:200]!r}") from None
    return any(cluster.get("name") == name for cluster in clusters)


def _create_cluster(fleet: Fleet, config_path: Path) -> None:
    if _cluster_exists(fleet.name):
        logger.info("k3d cluster %s exists already, so it is reused with the config it was "
                    "created with: run `edgeface cluster down` first to apply a changed fleet",
                    fleet.name)
        return
    logger.info("creating k3d cluster %s: 1 server, %d agents", fleet.name, len(fleet.nodes))
    run_command(["k3d", "cluster", "create", "--config", str(config_path)],
                timeout=CREATE_TIMEOUT_S)


def _build_images(fleet: Fleet, build_context: Path, manifests: Path) -> None:
    logger.info("building component image %s from %s (minutes on first build)", fleet.image,
                build_context)
    run_command(["docker", "build", "-t", fleet.image, str(build_context)],
                timeout=BUILD_TIMEOUT_S)
    logger.info("building MLflow server image %s", MLFLOW_IMAGE)
    run_command(["docker", "build", "-t", MLFLOW_IMAGE, str(manifests / "mlflow")],
                timeout=BUILD_TIMEOUT_S)


def _import_images(fleet: Fleet, manifests: Path) -> None:
    """Import the edgeface images and the KFP images present in the local Docker engine."""
    present = local_images()
    ours = [fleet.image, MLFLOW_IMAGE]
    missing_ours = [image for image in ours if normalize_image(image) not in present]
    if missing_ours:
        raise CommandError(f"image(s) {', '.join(missing_ours)} not in the local Docker engine: "
                           "run without --skip-build to build them")
    kfp_images = read_image_list(manifests / "kfp" / "images.txt")
    kfp_present = [image for image in kfp_images if normalize_image(image) in present]
    kfp_missing = [image for image in kfp_images if normalize_image(image) not in present]
    if kfp_missing:
        logger.warning(
            "%d KFP image(s) are not in the local Docker engine, so the cluster must pull "
            "them; without registry access `docker pull` (or `docker load`) them first: %s",
            len(kfp_missing), " ".join(kfp_missing))
    logger.info("importing %d image(s) into k3d cluster %s", len(ours) + len(kfp_present),
                fleet.name)
    run_command(["k3d", "image", "import", *ours, *kfp_present, "-c", fleet.name],
                timeout=IMPORT_TIMEOUT_S)


def _install_manifests(fleet: Fleet, manifests: Path) -> None:
    kubectl = ["kubectl", "--context", kube_context(fleet)]
    logger.info("installing KFP cluster-scoped resources")
    run_command([*kubectl, "apply", "-k", str(manifests / "kfp" / "cluster-scoped")],
                timeout=APPLY_TIMEOUT_S)
    run_command([*kubectl, "wait", "--for", "condition=established",
                 f"--timeout={CRD_WAIT_TIMEOUT_S}s", "crd", "--all"],
                timeout=CRD_WAIT_TIMEOUT_S + 30)
    logger.info("installing KFP (platform-agnostic)")
    run_command([*kubectl, "apply", "-k", str(manifests / "kfp" / "platform-agnostic")],
                timeout=APPLY_TIMEOUT_S)
    logger.info("installing MLflow, PostgreSQL and the pipeline runner's RBAC and policies")
    run_command([*kubectl, "apply", "-k", str(manifests / "base")], timeout=APPLY_TIMEOUT_S)
    logger.info("creating the data volumes of %d edge node(s)%s", len(fleet.nodes),
                " and the dataset" if fleet.dataset_host_path is not None else "")
    run_command([*kubectl, "apply", "-f", "-"], timeout=APPLY_TIMEOUT_S,
                input_text=volumes_yaml(render_volumes(fleet)))


def port_forward_help(fleet: Fleet) -> str:
    """Return the commands that make the KFP UI and API and MLflow reachable on localhost."""
    context = kube_context(fleet)
    return "\n".join([
        f"cluster {fleet.name} is ready. Reach its services from this machine with:",
        f"  kubectl --context {context} -n {KFP_NAMESPACE} port-forward svc/ml-pipeline-ui "
        "8080:80     # KFP UI at http://localhost:8080",
        f"  kubectl --context {context} -n {KFP_NAMESPACE} port-forward svc/ml-pipeline "
        "8888:8888   # KFP API for kfp.Client(host='http://localhost:8888')",
        f"  kubectl --context {context} -n {fleet.namespace} port-forward svc/mlflow 5000:5000"
        "       # MLflow at http://localhost:5000",
    ])


# --------------------------------------------------------------------------- status, down


def _run_status(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    require_tools(["kubectl"])
    context = kube_context(fleet)
    try:
        result = run_command(["kubectl", "--context", context, "get", "nodes", "-o", "json"],
                             timeout=60)
    except CommandError as error:
        # kubectl's message when the kubeconfig has no such context, which k3d creates with
        # the cluster and removes with it.
        if "context was not found" not in str(error):
            raise
        raise ConfigError(
            f"cluster {fleet.name} not found (kubectl has no context {context}): create it "
            f"with `edgeface cluster up --fleet {args.fleet}`"
        ) from None
    nodes = [_describe_node(node) for node in json.loads(result.stdout).get("items", [])]
    not_ready = readiness_report(required_pods(fleet, KFP_NAMESPACE), list_pods(context))
    if args.format == "json":
        print(json.dumps({"cluster": fleet.name, "nodes": nodes, "not_ready": not_ready},
                         indent=2))
    else:
        print(_status_text(fleet, nodes, not_ready))
    return 0 if not not_ready else 1


def _describe_node(node: dict[str, Any]) -> dict[str, Any]:
    labels = node.get("metadata", {}).get("labels") or {}
    allocatable = node.get("status", {}).get("allocatable") or {}
    conditions = node.get("status", {}).get("conditions") or []
    return {
        "name": node.get("metadata", {}).get("name"),
        "ready": any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions),
        "labels": {key: value for key, value in labels.items() if key.startswith("edgeface.io/")},
        "taints": [f"{t.get('key')}={t.get('value', '')}:{t.get('effect')}"
                   for t in node.get("spec", {}).get("taints") or []],
        "cpu": allocatable.get("cpu"),
        "memory": allocatable.get("memory"),
    }


def _status_text(fleet: Fleet, nodes: list[dict[str, Any]], not_ready: list[str]) -> str:
    lines = [f"cluster {fleet.name} ({kube_context(fleet)}): {len(nodes)} node(s)"]
    for node in nodes:
        labels = ",".join(f"{k}={v}" for k, v in node["labels"].items()) or "-"
        taints = ",".join(node["taints"]) or "-"
        state = "Ready" if node["ready"] else "NotReady"
        lines.append(f"  {node['name']}  {state}  allocatable cpu={node['cpu']} "
                     f"memory={node['memory']}  labels {labels}  taints {taints}")
    if not_ready:
        lines.append("pods not ready:")
        lines += [f"  {line}" for line in not_ready]
    else:
        lines.append("KFP, PostgreSQL and MLflow pods are ready")
    return "\n".join(lines)


def _run_down(args: argparse.Namespace) -> int:
    fleet = load_fleet(args.fleet)
    require_tools(["k3d"])
    logger.info("deleting k3d cluster %s (node data folders are kept)", fleet.name)
    run_command(["k3d", "cluster", "delete", fleet.name], timeout=CREATE_TIMEOUT_S)
    return 0


# --------------------------------------------------------------------------- load-data


def _run_load_data(args: argparse.Namespace) -> int:
    from edgeface.data.ingest import count_noun

    fleet = load_fleet(args.fleet)
    shares = load_fleet_data(fleet, args.data, args.partition, args.seed, replace=args.replace,
                             max_bad_fraction=args.max_bad_fraction,
                             progress=not args.no_progress)
    for share in shares:
        print(f"{share.node}: {count_noun(share.images, 'image')} of "
              f"{count_noun(share.identities, 'identity', 'identities')} -> {share.folder}")
    return 0
