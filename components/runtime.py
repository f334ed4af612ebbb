"""The code of the data, training, evaluation and export components, against local paths.

Each function here is what one component does: the component in `components.definitions`
only maps its KFP inputs and outputs to these paths. The work itself is done by
`edgeface.steps` and the other library modules, the same calls that the local runner
(`edgeface.runner`) makes: update screening, the quorum error, registration tags and the
worker process with its reply timeout come from the library, and this module only adds the
artifact layout below. The tasks that need no torch are in `components.common`.

Artifact layouts, all written by this module or `components.common`:

    global model        a file: the backbone state dict (torch.save)
    node manifest       a folder: <node>.json as written by Partition.write_manifests
    node report         a file: JSON with image counts, unreadable files and the fingerprint
    node state          a folder: the node's classification head (and local BatchNorm)
    node update         a folder: update.json, plus state.pt when training succeeded, and
                        with spreadout on state.centres.pt: the rows of the node's head
    bundle              a folder: one entry per node, named after the node
    adjusted centres    a folder: centres.json (node, round, adjusted or not), plus
                        centres.pt with the node's own adjusted rows when it was adjusted.
                        `aggregate` writes a bundle of these, one per node of the round
    evaluation set      a folder: images.npy (uint8 N x S x S x 3) and plan.json
    evaluation result   a file: JSON with the metrics, the threshold and the protocol
    ONNX model          a folder: edgeface.onnx and parity.json
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.common import (
    K8S_NODE_TAG,
    WARM_START_TAG,
    check_compiled_shape,
    load_run_config,
    open_tracker,
    read_json,
    tracking_uri,
    write_json,
)
from edgeface import registry, steps
from edgeface.config import RunConfig
from edgeface.data.cache import dataset_fingerprint
from edgeface.data.ingest import ImageRecord, list_images, resolve_images_root
from edgeface.data.partition import NodeShard, Partition, read_manifest
from edgeface.data.protocol import EvaluationPlan, plan_from_dict, plan_to_dict
from edgeface.errors import DataError
from edgeface.machine import describe_machine, machine_tags

logger = logging.getLogger(__name__)

BACKBONE_FILE = registry.BACKBONE_FILE
ONNX_FILE = "edgeface.onnx"
UPDATE_INFO_FILE = "update.json"
UPDATE_STATE_FILE = "state.pt"
CENTRES_INFO_FILE = "centres.json"
CENTRES_FILE = "centres.pt"
# MLflow 3.17.2 accepts tag values up to 8,000 characters; failure reasons are cut well below.
MAX_REASON_CHARS = 2000


# --- environment ----------------------------------------------------------------------------


def cpu_quota_threads(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Return the container's CPU limit rounded up to whole CPUs, or None when it has none.

    Reads the cgroup v2 file `cpu.max` ("QUOTA PERIOD" or "max PERIOD"). The CPU count that
    Python and torch see is the host's, which oversubscribes a pod with a CPU limit.
    """
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def limit_torch_threads(configured: int = 0) -> int:
    """Set torch's thread count to `configured`, else the CPU limit, else leave it; return it."""
    threads = configured or cpu_quota_threads() or torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


# --- evaluation set -------------------------------------------------------------------------


def save_evaluation_set(evaluation: steps.EvaluationSet, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", np.ascontiguousarray(evaluation.images))
    paths = sorted(evaluation.index, key=evaluation.index.__getitem__)
    write_json({"plan": plan_to_dict(evaluation.plan), "paths": paths}, folder / "plan.json")


def load_evaluation_set(folder: str | Path) -> steps.EvaluationSet:
    folder = Path(folder)
    saved = read_json(folder / "plan.json")
    images = np.load(folder / "images.npy", mmap_mode="r")
    return steps.EvaluationSet(plan=plan_from_dict(saved["plan"]), images=images,
                               index={path: i for i, path in enumerate(saved["paths"])})


def evaluation_exclusions(plan: EvaluationPlan) -> dict[str, list[str]]:
    """Return what edge nodes must not train on: evaluated people and images never trained on.

    People are excluded when the protocol evaluates them but never trains on them (LFW test
    people, holdout identities). Images are excluded when the protocol evaluates them and does
    not train on them (pair images, identification probes).
    """
    evaluated = plan.eval_records()
    trained_people = {r.identity for r in plan.train_records}
    trained_paths = {r.path for r in plan.train_records}
    return {
        "identities": sorted({r.identity for r in evaluated} - trained_people),
        "paths": sorted({r.path for r in evaluated} - trained_paths),
    }


def prepare_evaluation_set(config_json: str, dataset_dir: str,
                           shape: tuple[int, int, int, bool, bool], out_dir: str,
                           exclusions_path: str) -> dict[str, Any]:
    """Check the config, choose the protocol on `dataset_dir` and preprocess its evaluation images.

    `shape` is (nodes, rounds, eval-every, BatchNorm calibration on, spreadout on) of the
    compiled pipeline. Returns artifact metadata.
    """
    config = load_run_config(config_json)
    check_compiled_shape(config, *shape)
    images_root, _, plan = steps.plan_step(Path(dataset_dir), config)
    evaluation = steps.prepare_evaluation(images_root, plan, config,
                                          steps.resolve_cache_dir(config))
    save_evaluation_set(evaluation, out_dir)
    exclusions = evaluation_exclusions(plan)
    write_json(exclusions, exclusions_path)
    logger.info("evaluation set: protocol %s, %d images; edge nodes skip %d people and %d images",
                plan.name, len(evaluation.images), len(exclusions["identities"]),
                len(exclusions["paths"]))
    return {"protocol": plan.name, "images": len(evaluation.images)}


# --- data steps -----------------------------------------------------------------------------


def partition_dataset(config_json: str, dataset_dir: str, out_dir: str) -> dict[str, Any]:
    """Simulation mode: split the training images of `dataset_dir` into per-node manifests.

    Writes `partition.json`, `manifests/node-<k>.json` and `fingerprint.json` (the dataset
    fingerprint over all training images, as the local runner computes it) into `out_dir`.
    """
    config = load_run_config(config_json)
    images_root, _, plan = steps.plan_step(Path(dataset_dir), config)
    shards = steps.partition_step(plan.train_records, config, Path(out_dir))
    fingerprint = dataset_fingerprint(images_root, plan.train_records)
    write_json({"dataset_fingerprint": fingerprint}, Path(out_dir) / "fingerprint.json")
    return {"strategy": shards.strategy, "images": len(plan.train_records),
            "dataset_fingerprint": fingerprint}


def node_records(node_name: str, node_index: int, images_root: Path,
                 manifests_dir: str | None, exclusions_path: str | None) -> list[ImageRecord]:
    """Return the training images of one node.

    Simulation mode (`manifests_dir` given): the records of shard `node-<node_index>` of the
    partition. Pre-placed mode: every image in the node's own folder, less the people and
    images of `exclusions_path` (see `evaluation_exclusions`).
    """
    if manifests_dir is not None:
        shard = read_manifest(Path(manifests_dir) / "manifests" / f"node-{node_index}.json")
        return shard.records
    records = list_images(images_root)
    if exclusions_path is None:
        return records
    exclusions = read_json(exclusions_path)
    people, paths = set(exclusions["identities"]), set(exclusions["paths"])
    kept = [r for r in records if r.identity not in people and r.path not in paths]
    logger.info("%s: %d images in %s, %d kept after leaving out evaluation people and images",
                node_name, len(records), images_root, len(kept))
    if not kept:
        raise DataError(f"{node_name}: no training images left in {images_root} after leaving "
                        "out the people and images that the evaluation protocol uses")
    return kept


def validate_and_cache(config_json: str, node_name: str, node_index: int, data_dir: str,
                       manifests_dir: str | None, exclusions_path: str | None,
                       manifest_out: str, report_out: str) -> dict[str, Any]:
    """Validate and cache one node's images and write its manifest and report.

    Runs on the edge node. The report contains counts, unreadable file names and the
    fingerprint of the node's images, never pixels.
    """
    config = load_run_config(config_json)
    limit_torch_threads(config.train.threads_per_worker)
    images_root = resolve_images_root(Path(data_dir))
    records = node_records(node_name, node_index, images_root, manifests_dir, exclusions_path)
    shard = NodeShard(name=node_name, records=records)
    Partition(strategy=config.partition.strategy, seed=config.seed,
              nodes=[shard]).write_manifests(Path(manifest_out))
    data = steps.prepare_node(images_root, shard, config, steps.resolve_cache_dir(config))
    report = {"node": node_name, "checked": data.checked, "bad": [list(b) for b in data.bad],
              "num_samples": int(len(data.labels)), "identities": len(data.identities),
              "cache_hit": data.cache_hit, "k8s_node": os.environ.get("NODE_NAME", "unknown"),
              "dataset_fingerprint": dataset_fingerprint(images_root, records)}
    write_json(report, report_out)
    logger.info("%s ready on %s: %d images of %d people (%d unreadable skipped, cache %s)",
                node_name, report["k8s_node"], report["num_samples"], report["identities"],
                len(data.bad), "hit" if data.cache_hit else "built")
    return {key: report[key] for key in ("num_samples", "identities", "checked", "k8s_node")}


# --- warm start -----------------------------------------------------------------------------


def resolve_initial_state(config: RunConfig, alias: str, workdir: Path) -> tuple[dict, str]:
    """Return the starting backbone state and where it came from.

    See `edgeface.registry.warm_start_state`; the fallback is the seeded initial state of
    `edgeface.steps.initial_state`.

    Raises:
        TrackingError: the tracking server is unreachable.
    """
    seeded = steps.initial_state(config)
    if not alias:
        return seeded, "seeded initial state (warm start off)"
    return registry.warm_start_state(tracking_uri(config), config.tracking.model_name, alias,
                                     seeded, workdir)


def resolve_initial_model(config_json: str, alias: str, parent_run_id: str,
                          out_path: str) -> str:
    """Write the starting global model to `out_path`, tag the parent run, return the source."""
    config = load_run_config(config_json)
    with tempfile.TemporaryDirectory(prefix="edgeface-warm-start-") as workdir:
        state, source = resolve_initial_state(config, alias, Path(workdir))
    steps.save_atomic(state, Path(out_path))
    open_tracker(config).set_tags(parent_run_id, {WARM_START_TAG: source})
    return source


# --- edge training --------------------------------------------------------------------------


def copy_node_state(previous: str | None, out_dir: str) -> Path:
    """Start this round's node state folder from the previous round's, if there was one."""
    out = Path(out_dir)
    if previous is not None:
        shutil.copytree(previous, out, dirs_exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _train_request(node_name: str, round_index: int, global_path: str, update_path: Path,
                   centres_path: Path | None) -> dict[str, Any]:
    from edgeface.runner import parse_faults

    request = {"op": "train", "round": round_index, "global_state_path": global_path,
               "update_path": str(update_path), "notify_start": True}
    if centres_path is not None:
        request["centres_path"] = str(centres_path)
    fault = parse_faults(os.environ.get("EDGEFACE_FAULTS")).get((node_name, round_index))
    if fault:
        request["fail"] = fault
    return request


def run_node_worker(config: RunConfig, node_name: str, images_root: Path, manifest_path: Path,
                    node_state_dir: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Train in a separate worker process, as the local runner does, and return its reply.

    A crash (including the out-of-memory killer), an exception or a round timeout in the
    worker becomes a failed reply. So the node is reported as failed instead of failing the
    task, and aggregation decides whether the round still has its quorum.
    """
    from edgeface.workers import WorkerProcess, wait_for_reply

    threads = config.train.threads_per_worker or cpu_quota_threads() or torch.get_num_threads()
    worker = WorkerProcess(f"worker-{node_name}", {node_name: (manifest_path, node_state_dir)},
                           images_root, config.model_dump(mode="json"),
                           steps.resolve_cache_dir(config), threads)
    try:
        worker.send({**request, "node": node_name})
        return wait_for_reply(worker, config.federation.round_timeout)
    finally:
        worker.stop()


def adjusted_centres(centres_dir: str, node_name: str, round_index: int) -> Path | None:
    """Return the file of adjusted class centres that `node_name` starts `round_index` from.

    `centres_dir` is the node's entry of the previous round's adjusted centres bundle. Returns
    None when the node's previous update was not aggregated, so the server adjusted nothing
    and the node continues from its own head, as in the local runner.

    Raises:
        DataError: the entry belongs to another node or another round.
    """
    folder = Path(centres_dir)
    info = read_json(folder / CENTRES_INFO_FILE)
    if info["node"] != node_name or info["round"] != round_index - 1:
        raise DataError(
            f"{node_name} round {round_index + 1} received the adjusted class centres of "
            f"{info['node']} from round {info['round'] + 1}, not its own from round "
            f"{round_index}: the pipeline routes centres to the wrong task. Compile it again "
            "with `edgeface pipeline compile`"
        )
    if not info["adjusted"]:
        logger.info("%s: no adjusted class centres from round %d, because its update was not "
                    "aggregated, so it continues from its own head", node_name, round_index)
        return None
    return folder / CENTRES_FILE


def train_edge_node(config_json: str, node_name: str, round_index: int, data_dir: str,
                    manifest_dir: str, global_model_path: str, node_state_in: str | None,
                    node_state_out: str, update_out: str,
                    centres_in: str | None = None) -> dict[str, Any]:
    """Train one node for one round and write its update, including the Kubernetes node.

    With spreadout on, `centres_in` is this node's entry of the previous round's adjusted
    centres (see `adjusted_centres`), and the update also gets the head's rows after training.
    The edge task does not call MLflow: `aggregate` logs each node's round to its child run,
    as the local runner's coordinator does. Returns artifact metadata: status, sample count
    and the Kubernetes node it ran on.
    """
    config = load_run_config(config_json)
    images_root = resolve_images_root(Path(data_dir))
    centres_path = (adjusted_centres(centres_in, node_name, round_index)
                    if centres_in is not None else None)
    state_dir = copy_node_state(node_state_in, node_state_out)
    update_dir = Path(update_out)
    update_dir.mkdir(parents=True, exist_ok=True)
    request = _train_request(node_name, round_index, global_model_path,
                             update_dir / UPDATE_STATE_FILE, centres_path)
    reply = run_node_worker(config, node_name, images_root,
                            Path(manifest_dir) / f"{node_name}.json", state_dir, request)
    info = {"node": node_name, "round": round_index, "ok": bool(reply.get("ok")),
            "num_samples": int(reply.get("num_samples", 0)), "metrics": reply.get("metrics", {}),
            "error": reply.get("error"), "k8s_node": os.environ.get("NODE_NAME", "unknown"),
            "machine": describe_machine()}
    write_json(info, update_dir / UPDATE_INFO_FILE)
    if info["ok"]:
        logger.info("%s round %d done on %s: %d samples, %s", node_name, round_index + 1,
                    info["k8s_node"], info["num_samples"], info["metrics"])
    else:
        logger.warning("%s failed round %d on %s: %s", node_name, round_index + 1,
                       info["k8s_node"], info["error"])
    return {key: info[key] for key in ("ok", "num_samples", "k8s_node")}


def calibrate_batchnorm(config_json: str, node_name: str, round_index: int, data_dir: str,
                        manifest_dir: str, fused_model_path: str, stats_out: str) -> dict[str, Any]:
    """Recompute the fused model's BatchNorm statistics on one node's images, on that node.

    Runs `edgeface.steps.calibrate_batchnorm` in a worker process, as the local runner does, so
    a failure is reported in `stats.json` (and the node skipped by `merge_batchnorm`) instead
    of failing the task. Only per-channel means and variances leave the node.
    """
    config = load_run_config(config_json)
    images_root = resolve_images_root(Path(data_dir))
    out = Path(stats_out)
    out.mkdir(parents=True, exist_ok=True)
    request = {"op": "calibrate", "round": round_index, "global_state_path": fused_model_path,
               "stats_path": str(out / UPDATE_STATE_FILE)}
    with tempfile.TemporaryDirectory(prefix="edgeface-node-state-") as state_dir:
        reply = run_node_worker(config, node_name, images_root,
                                Path(manifest_dir) / f"{node_name}.json", Path(state_dir),
                                request)
    info = {"node": node_name, "ok": bool(reply.get("ok")),
            "num_samples": int(reply.get("num_samples", 0)), "error": reply.get("error")}
    write_json(info, out / UPDATE_INFO_FILE)
    if not info["ok"]:
        logger.warning("%s could not recompute BatchNorm statistics in round %d: %s",
                       node_name, round_index + 1, info["error"])
    return {key: info[key] for key in ("ok", "num_samples")}


def merge_batchnorm(config_json: str, round_index: int, fused_model_path: str,
                    stats_dir: str, merged_out: str) -> dict[str, Any]:
    """Replace the fused model's averaged BatchNorm statistics with the nodes' pooled ones.

    Nodes that failed to calibrate are skipped; with none left, the averaged statistics stay,
    as in the local runner.
    """
    config = load_run_config(config_json)
    fused = torch.load(fused_model_path, weights_only=True)
    stats = {}
    for folder in sorted(Path(stats_dir).iterdir()):
        info = read_json(folder / UPDATE_INFO_FILE)
        if info["ok"]:
            stats[info["node"]] = (folder / UPDATE_STATE_FILE, info["num_samples"])
    if stats:
        logger.info("round %d/%d: recomputed BatchNorm statistics on %d images from %d nodes",
                    round_index + 1, config.train.rounds,
                    sum(count for _, count in stats.values()), len(stats))
        fused = steps.merge_batchnorm_stats(fused, stats)
    else:
        logger.warning("round %d: no node recomputed BatchNorm statistics; keeping the averaged "
                       "ones", round_index + 1)
    steps.save_atomic(fused, Path(merged_out))
    return {"nodes": len(stats), "images": sum(count for _, count in stats.values())}


# --- aggregation and evaluation -------------------------------------------------------------


def read_updates(updates_dir: str, global_state: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Return the update.json of every node in a bundle, with `state_path`, `reason` and
    `state` (the update read from `state_path`, None for a dropped node) added.

    `reason` is None for a usable update. Otherwise it is why the node is dropped: its
    training failed, or its update cannot be aggregated (`validate_update`: NaN or infinity,
    other keys, shapes or dtypes, an unreadable file), as the local runner screens replies.
    """
    infos = []
    for folder in sorted(Path(updates_dir).iterdir()):
        info = read_json(folder / UPDATE_INFO_FILE)
        info["state_path"] = folder / UPDATE_STATE_FILE
        info["reason"] = None if info["ok"] else (info["error"] or "unknown error")
        info["state"] = None
        if info["ok"]:
            state, problem = steps.load_update(info["node"], info["state_path"],
                                               info["num_samples"], global_state)
            info["reason"] = f"update rejected: {problem}" if problem else None
            info["state"] = state
        infos.append(info)
    return infos


def log_node_rounds(tracker, parent_run_id: str, round_index: int,
                    infos: list[dict[str, Any]]) -> None:
    """Log each node's round to its child run, as the local runner does.

    Metrics are the node's training metrics and `failed` (1 when dropped, else 0). A dropped
    node's reason becomes the tag `edgeface.failure.round-NNNN`. Every child run is tagged
    with the Kubernetes node its training task ran on, and with that machine's processor and
    torch version (`edgeface.machine.*`).
    """
    for info in infos:
        child = tracker.start_child(info["node"], parent_run_id=parent_run_id)
        tags = {K8S_NODE_TAG: info["k8s_node"]}
        if "machine" in info:  # absent from updates written by older edgeface images
            tags.update(machine_tags(info["machine"]))
        if info["reason"] is not None:
            tags[f"edgeface.failure.round-{round_index:04d}"] = info["reason"][:MAX_REASON_CHARS]
        tracker.set_tags(child, tags)
        metrics = dict(info["metrics"]) if info["ok"] else {}
        metrics["failed"] = 0.0 if info["reason"] is None else 1.0
        tracker.log_metrics(child, metrics, step=round_index)


def check_quorum(round_index: int, rounds: int, updates: dict, dropped: dict[str, str],
                 min_nodes: int) -> None:
    """Raise QuorumError, naming every dropped node and why, below `min_nodes` usable updates."""
    if len(updates) >= min_nodes:
        return
    raise steps.quorum_error(
        round_index, rounds, len(updates), len(updates) + len(dropped), dropped, min_nodes,
        "Fix the nodes and run the pipeline again, or lower min-nodes or min-fraction in the "
        "config_json parameter")


def spread_out_centres(config: RunConfig, round_index: int, infos: list[dict[str, Any]],
                       accepted: list[str], out_dir: str) -> dict[str, float]:
    """Spread apart the aggregated nodes' class centres and write the adjusted centres bundle.

    Every node of the round gets an entry `<node>/` in `out_dir` with centres.json, and
    centres.pt with its own adjusted rows when its update was aggregated. Returns the metrics
    of `edgeface.steps.spreadout_step`.
    """
    update_files = {info["node"]: info["state_path"] for info in infos}
    with tempfile.TemporaryDirectory(prefix="edgeface-centres-") as staging:
        written, metrics = steps.spreadout_round(steps.make_spreadout(config), update_files,
                                                 accepted, Path(staging))
        for node in sorted(update_files):
            entry = Path(out_dir) / node
            entry.mkdir(parents=True, exist_ok=True)
            if node in written:
                shutil.move(written[node], entry / CENTRES_FILE)
            write_json({"node": node, "round": round_index, "adjusted": node in written},
                       entry / CENTRES_INFO_FILE)
    return metrics


def aggregate(config_json: str, round_index: int, parent_run_id: str, global_in: str,
              updates_dir: str, server_state_in: str | None, global_out: str,
              server_state_out: str, centres_out: str) -> dict[str, float]:
    """Log the nodes' round, check the quorum and fuse the updates into the next global model.

    With spreadout on, it also runs the spread-out step on the aggregated nodes' class centres
    and writes the adjusted centres bundle to `centres_out` (see `spread_out_centres`). With
    spreadout off that folder stays empty. Returns the round metrics that are also logged to
    the parent run.

    Raises:
        QuorumError: fewer nodes returned a usable update than the config's quorum.
    """
    config = load_run_config(config_json)
    limit_torch_threads()
    global_state = torch.load(global_in, weights_only=True)
    infos = read_updates(updates_dir, global_state)
    tracker = open_tracker(config)
    log_node_rounds(tracker, parent_run_id, round_index, infos)
    updates = {i["node"]: (i["state"], i["num_samples"], i["metrics"])
               for i in infos if i["reason"] is None}
    dropped = {i["node"]: i["reason"] for i in infos if i["reason"] is not None}
    strategy = steps.make_strategy(config, len(infos))
    if server_state_in is not None:
        strategy.load_state_dict(torch.load(server_state_in, weights_only=True))
    check_quorum(round_index, config.train.rounds, updates, dropped, strategy.min_nodes)
    aggregated = steps.aggregate_step(strategy, global_state, updates)
    steps.save_atomic(aggregated.state, Path(global_out))
    steps.save_atomic(strategy.state_dict(), Path(server_state_out))
    Path(centres_out).mkdir(parents=True, exist_ok=True)
    spread_metrics: dict[str, float] = {}
    if config.federation.spreadout:
        spread_metrics = spread_out_centres(config, round_index, infos, aggregated.accepted,
                                            centres_out)
    failed = sum(1 for i in infos if not i["ok"])
    metrics = {**aggregated.metrics, **spread_metrics, "failed_nodes": float(failed),
               "rejected_nodes": float(len(dropped) - failed + len(aggregated.rejected))}
    tracker.log_metrics(parent_run_id, metrics, step=round_index)
    logger.info("round %d/%d: %d of %d nodes reported (%s), fused %d%s", round_index + 1,
                config.train.rounds, len(updates), len(infos), ", ".join(sorted(updates)),
                len(aggregated.accepted),
                f"; dropped {', '.join(sorted(dropped))}" if dropped else "")
    return {key: float(value) for key, value in metrics.items()}


def evaluate(config_json: str, round_index: int, parent_run_id: str, global_path: str,
             evaluation_dir: str, result_out: str) -> dict[str, float]:
    """Score the global model on the evaluation set, log the metrics and write the result."""
    config = load_run_config(config_json)
    limit_torch_threads()
    evaluation = load_evaluation_set(evaluation_dir)
    state = torch.load(global_path, weights_only=True)
    result, _ = steps.evaluate_step(state, evaluation, config)
    metrics = result.metrics()
    open_tracker(config).log_metrics(parent_run_id, metrics, step=round_index)
    write_json({"round": round_index, "protocol": result.plan, "metrics": metrics,
                "threshold": float(result.verification.threshold)}, result_out)
    logger.info("round %d/%d: fused model verification accuracy %.4f +- %.4f", round_index + 1,
                config.train.rounds, result.verification.accuracy_mean,
                result.verification.accuracy_std)
    return {key: float(value) for key, value in metrics.items()}


# --- export and registration ----------------------------------------------------------------


def load_backbone(config: RunConfig, state_path: str | Path) -> torch.nn.Module:
    from edgeface.model import build_backbone

    backbone = build_backbone(steps.model_spec(config))
    backbone.load_state_dict(torch.load(state_path, weights_only=True))
    return backbone.eval()


def export_onnx(config_json: str, global_path: str, evaluation_dir: str, result_path: str,
                out_dir: str) -> dict[str, Any]:
    """Export the final backbone to ONNX and check onnxruntime against PyTorch on real faces.

    Raises:
        ExportError: the export failed or the parity check did not pass.
    """
    from edgeface import export

    config = load_run_config(config_json)
    limit_torch_threads()
    backbone = load_backbone(config, global_path)
    onnx_path = Path(out_dir) / ONNX_FILE
    export.export_onnx(backbone, config.data.image_size, onnx_path, opset=config.export.opset,
                       exporter=config.export.exporter)
    images, pairs = steps.parity_sample(load_evaluation_set(evaluation_dir))
    parity = export.check_parity(backbone, onnx_path, images, rtol=config.export.rtol,
                                 atol=config.export.atol, pairs=pairs,
                                 threshold=read_json(result_path)["threshold"])
    write_json(asdict(parity), Path(out_dir) / "parity.json")
    logger.info("ONNX parity on %d real faces: max abs diff %.2e, %s", len(images),
                parity.max_abs_diff, "ok" if parity.ok else "FAILED")
    export.require_parity(parity)
    return {"max_abs_diff": parity.max_abs_diff, "parity_ok": parity.ok,
            "opset": config.export.opset, "exporter": config.export.exporter}


def register(config_json: str, parent_run_id: str, fingerprint: str, onnx_dir: str,
             global_path: str, result_path: str) -> str:
    """Register the ONNX model with the backbone state as an extra file; return its URI.

    Registration goes through `edgeface.registry.register_version`, as in the local runner:
    under the registry lock, and idempotent on the parent run, so a retried task returns the
    version that the first attempt registered.
    """
    config = load_run_config(config_json)
    tracker = open_tracker(config)
    onnx_path = Path(onnx_dir) / ONNX_FILE
    result, parity = read_json(result_path), read_json(Path(onnx_dir) / "parity.json")
    tags = steps.registration_tags(
        config, fingerprint=fingerprint, metrics=result["metrics"],
        threshold=result["threshold"], protocol=result["protocol"], parity_ok=parity["ok"],
        max_abs_diff=parity["max_abs_diff"])
    with tempfile.TemporaryDirectory(prefix="edgeface-register-") as workdir:
        backbone_file = Path(workdir) / BACKBONE_FILE
        shutil.copyfile(global_path, backbone_file)
        version = steps.register_model(tracker, parent_run_id, onnx_path, backbone_file, config,
                                       tags)
    return version.model_uri
