"""Helpers that every component uses, and the tasks that need neither torch nor the data.

This module imports no torch, so the bookkeeping tasks start in about a second instead of
paying for torch's import. Those tasks bundle artifacts and start and finish the MLflow parent
run. The tasks that train, evaluate and export are in `components.runtime`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from edgeface import __version__
from edgeface.config import RunConfig
from edgeface.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Tags on the MLflow parent run and the node child runs that only pipeline runs set.
KFP_RUN_TAG = "edgeface.kfp_run_id"
K8S_NODE_TAG = "edgeface.k8s_node"
WARM_START_TAG = "edgeface.warm_start"
# A pipeline run id goes into an MLflow search filter, which has no escaping for quotes.
_SAFE_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --- configuration and environment ----------------------------------------------------------


def configure_logging() -> None:
    """Quieten libraries that log every step at INFO; telemetry off unless set otherwise.

    The KFP executor has already configured the root logger at INFO on stdout.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def load_run_config(config_json: str) -> RunConfig:
    """Parse the `config_json` pipeline parameter (kebab-case keys, as in the YAML file).

    Raises:
        ConfigError: the text is not JSON, or a key or value is invalid.
    """
    from pydantic import ValidationError

    try:
        raw = json.loads(config_json)
    except json.JSONDecodeError as error:
        raise ConfigError(f"pipeline parameter config_json is not valid JSON: {error}. Pass the "
                          "JSON form of a config file, as `edgeface pipeline compile` writes it")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"invalid pipeline parameter config_json: {problems}") from None
    return config


def check_compiled_shape(config: RunConfig, nodes: int, rounds: int, eval_every: int,
                         calibration: bool, spreadout: bool) -> None:
    """Reject a config whose node count, rounds or schedule differ from the compiled DAG's.

    The pipeline has one training task per node and round, one evaluation task per evaluated
    round, BatchNorm calibration tasks when `bn-calibration-images` is above 0, and the class
    centre artifacts between rounds when `spreadout` is on. All are fixed when it is compiled,
    so these values cannot change per run.

    Raises:
        ConfigError: naming each value that differs.
    """
    compiled = {"nodes": nodes, "rounds": rounds, "eval-every": eval_every,
                "bn-calibration on": calibration, "spreadout": spreadout}
    given = {"nodes": config.partition.nodes, "rounds": config.train.rounds,
             "eval-every": config.evaluation.eval_every,
             "bn-calibration on": config.federation.bn_calibration_images > 0,
             "spreadout": config.federation.spreadout}
    changed = [f"{key} {given[key]} (compiled with {value})"
               for key, value in compiled.items() if given[key] != value]
    if changed:
        raise ConfigError(
            f"config_json does not match the compiled pipeline: {', '.join(changed)}. Compile "
            "a new pipeline from this config with `edgeface pipeline compile --config FILE "
            "--rounds R`, or pass a config_json with the compiled values"
        )


def tracking_uri(config: RunConfig) -> str:
    """Return the MLflow tracking URI: the config's, else MLFLOW_TRACKING_URI.

    Raises:
        ConfigError: neither is set. In a cluster the ConfigMap named by the fleet's
            `mlflow.config-map` key provides MLFLOW_TRACKING_URI.
    """
    from edgeface import tracking

    if config.tracking.tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(
            "MLFLOW_TRACKING_URI is not set in this container: create the ConfigMap named by "
            "the fleet file's mlflow.config-map key (k8s/base does), or set tracking-uri"
        )
    return tracking.resolve_tracking_uri(config.tracking.tracking_uri, Path.cwd())


def open_tracker(config: RunConfig):
    """Return an `edgeface.tracking.Tracker` for the config's experiment."""
    from edgeface import tracking

    return tracking.Tracker(tracking_uri(config), config.tracking.experiment)


def write_json(payload: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --- fan-in ---------------------------------------------------------------------------------


def bundle(items: list[tuple[str, str]], merge: bool, out_dir: str) -> list[str]:
    """Copy artifacts into one folder and return the entry names, sorted.

    With `merge` False each (name, path) is copied to `out_dir/name`. With `merge` True each
    path is a bundle itself and its entries are copied into `out_dir`.

    Raises:
        DataError: two entries have the same name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, path in items:
        sources = sorted(Path(path).iterdir()) if merge else [Path(path)]
        for source in sources:
            target = out / (source.name if merge else name)
            if target.exists():
                raise DataError(f"two artifacts named {target.name!r} in one bundle")
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copyfile(source, target)
    return sorted(entry.name for entry in out.iterdir())


def split_bundle(bundle_dir: str, names: list[str], out_paths: list[str]) -> None:
    """Copy entry `names[i]` of a bundle to `out_paths[i]`, the reverse of `bundle`.

    Raises:
        DataError: the bundle has no entry of a name, or `names` and `out_paths` differ in
            length.
    """
    if len(names) != len(out_paths):
        raise DataError(f"cannot split a bundle into {len(out_paths)} artifacts by "
                        f"{len(names)} names: {names}")
    source_dir = Path(bundle_dir)
    for name, out_path in zip(names, out_paths):
        source = source_dir / name
        if not source.exists():
            present = sorted(entry.name for entry in source_dir.iterdir())
            raise DataError(f"bundle {source_dir} has no entry {name!r} (it has {present}): "
                            "check the logs of the task that wrote it")
        if source.is_dir():
            shutil.copytree(source, out_path, dirs_exist_ok=True)
        else:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, out_path)


# --- the MLflow parent run ------------------------------------------------------------------


def find_parent_run(tracker, kfp_run_id: str) -> str | None:
    """Return the MLflow parent run that pipeline run `kfp_run_id` started, if any.

    Raises:
        ConfigError: the run id has characters that an MLflow filter cannot hold.
    """
    if not _SAFE_RUN_ID.match(kfp_run_id):
        raise ConfigError(f"invalid pipeline run id {kfp_run_id!r}: expected letters, digits, "
                          "'.', '_' and '-'")
    return tracker.find_run_by_tag(KFP_RUN_TAG, kfp_run_id)


def read_node_reports(reports_dir: str) -> dict[str, dict[str, Any]]:
    return {path.name: read_json(path) for path in sorted(Path(reports_dir).iterdir())}


def check_node_reports(reports: dict[str, dict[str, Any]], max_bad_fraction: float) -> None:
    """Fail when more than `max_bad_fraction` of all nodes' images were unreadable.

    This is `edgeface.steps.check_validation` on the reports' counts; it is called here
    directly, because importing `edgeface.steps` imports torch.

    Raises:
        DataError: too many unreadable images, with the files named.
    """
    from edgeface.data.ingest import ValidationReport, check_bad_fraction

    checked = sum(report["checked"] for report in reports.values())
    bad = [tuple(item) for report in reports.values() for item in report["bad"]]
    check_bad_fraction(ValidationReport(checked=checked, bad=bad), max_bad_fraction, "edge nodes")


def combined_fingerprint(reports: dict[str, dict[str, Any]]) -> str:
    """Pre-placed mode: one fingerprint over the nodes' own fingerprints, keyed by node name."""
    digest = hashlib.sha256()
    for node, report in sorted(reports.items()):
        digest.update(json.dumps([node, report["dataset_fingerprint"]]).encode() + b"\n")
    return digest.hexdigest()


def start_run(config_json: str, reports_dir: str, partition_dir: str | None, kfp_run_id: str,
              run_name: str, data_mode: str) -> tuple[str, str]:
    """Check the nodes' validation reports, then start (or find) the MLflow parent run.

    The parent run is tagged with `kfp_run_id`, so a retried task finds the run it started
    before instead of starting a second one. Returns (parent run id, dataset fingerprint).
    """
    config = load_run_config(config_json)
    reports = read_node_reports(reports_dir)
    check_node_reports(reports, config.data.max_bad_fraction)
    if partition_dir is not None:
        fingerprint = read_json(Path(partition_dir) / "fingerprint.json")["dataset_fingerprint"]
    else:
        fingerprint = combined_fingerprint(reports)
    tracker = open_tracker(config)
    tags = {"edgeface.dataset_fingerprint": fingerprint,
            "edgeface.config_hash": config.config_hash(), "edgeface.code_version": __version__,
            "edgeface.data_mode": data_mode, KFP_RUN_TAG: kfp_run_id}
    parent = tracker.start_parent(run_name, config.to_dict(), tags,
                                  resume_run_id=find_parent_run(tracker, kfp_run_id))
    if partition_dir is not None:
        tracker.log_artifact(parent, Path(partition_dir) / "partition.json")
    for node, report in sorted(reports.items()):
        logger.info("%s: %d images of %d people on Kubernetes node %s", node,
                    report["num_samples"], report["identities"], report["k8s_node"])
    return parent, fingerprint


def finish_run(config_json: str, kfp_run_id: str, state: str, error_message: str) -> str:
    """Mark the parent run of `kfp_run_id` and its node runs FINISHED or FAILED.

    FINISHED when the pipeline succeeded, else FAILED with the error as a tag.
    Returns the MLflow status set, or "none" when the pipeline failed before it started one.
    """
    config = load_run_config(config_json)
    tracker = open_tracker(config)
    parent = find_parent_run(tracker, kfp_run_id)
    if parent is None:
        logger.warning("pipeline run %s ended %s before an MLflow run was started: %s",
                       kfp_run_id, state, error_message or "no error message")
        return "none"
    status = "FINISHED" if state == "SUCCEEDED" else "FAILED"
    if status == "FAILED":
        tracker.set_tags(parent, {"edgeface.pipeline_error": error_message or state})
    for child in tracker.find_child_runs(parent).values():
        tracker.end_run(child, status)
    tracker.end_run(parent, status)
    return status
