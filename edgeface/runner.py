"""Local orchestration of a federated run: the whole job on one machine, no cluster.

The run directory holds everything a run writes and needs to resume:

    config.yaml          effective configuration
    state.json           rounds completed, MLflow parent run id, status
    partition.json       partition report;  manifests/node-k.json  per-node file lists
    nodes/node-k/        node-local state (classification head); never read by the server
    rounds/round-r/      per-round update files, deleted after aggregation
    checkpoints/         fused backbone and server state after each completed round
    model/               ONNX export;  summary.json  final metrics and pointers

Every file is written to a temporary name and renamed, so killing the run at any moment
leaves the last completed round intact; `edgeface run --resume RUN_DIR` continues from it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from edgeface import __version__, steps
from edgeface.config import RunConfig
from edgeface.data.cache import dataset_fingerprint
from edgeface.errors import EdgefaceError, QuorumError
from edgeface.workers import NodeProcess, plan_parallelism

logger = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2


@dataclass
class RoundOutcome:
    """Replies of one round: successful updates and failed nodes with reasons."""

    updates: dict[str, tuple[Path, int, dict[str, float]]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def parse_faults(spec: str | None) -> dict[tuple[str, int], str]:
    """Parse EDGEFACE_FAULTS, e.g. "node-1:crash@2,node-3:hang@0", into {(node, round): kind}.

    A test hook: the named node crashes (SIGKILL), hangs or raises in that round.
    """
    faults: dict[tuple[str, int], str] = {}
    for item in filter(None, (spec or "").split(",")):
        try:
            node, rest = item.split(":")
            kind, round_text = rest.split("@")
            faults[(node.strip(), int(round_text))] = kind.strip()
        except ValueError:
            raise EdgefaceError(
                f"invalid EDGEFACE_FAULTS entry {item!r}: expected NODE:KIND@ROUND, "
                "e.g. node-1:crash@2"
            ) from None
    return faults


class LocalRunner:
    """Runs every step of a federated training job on this machine."""

    def __init__(self, config: RunConfig, data_dir: Path, run_dir: Path, *,
                 resume: bool = False, progress: bool = True) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress = progress
        self.cache_dir = steps.resolve_cache_dir(config)
        self.timings: dict[str, float] = {}
        self.workers: dict[str, NodeProcess] = {}
        self.faults = parse_faults(os.environ.get("EDGEFACE_FAULTS"))
        self.history: list[dict[str, float]] = []

    # --- run state ----------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    def _read_state(self) -> dict[str, Any]:
        import json

        if not self.state_path.exists():
            return {}
        return json.loads(self.state_path.read_text())

    def _write_state(self, **updates: Any) -> None:
        state = self._read_state()
        state.update(updates)
        steps.write_json_atomic(state, self.state_path)

    def _checkpoint_path(self, round_index: int) -> Path:
        return self.run_dir / "checkpoints" / f"round-{round_index:04d}.pt"

    def _save_checkpoint(self, round_index: int, global_state, strategy) -> None:
        payload = {"round": round_index, "global_state": global_state,
                   "strategy_state": strategy.state_dict(), "seed": self.config.seed,
                   "config_hash": self.config.config_hash(), "history": self.history}
        steps.save_atomic(payload, self._checkpoint_path(round_index))
        self._write_state(rounds_completed=round_index + 1, status="running")
        for old in sorted((self.run_dir / "checkpoints").glob("round-*.pt"))[:-CHECKPOINTS_KEPT]:
            old.unlink(missing_ok=True)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        completed = self._read_state().get("rounds_completed", 0)
        if not completed:
            return None
        path = self._checkpoint_path(completed - 1)
        checkpoint = torch.load(path, weights_only=False)
        if checkpoint["config_hash"] != self.config.config_hash():
            raise EdgefaceError(
                f"cannot resume {self.run_dir}: its checkpoint was made with config hash "
                f"{checkpoint['config_hash']}, not {self.config.config_hash()}. Resume without "
                "changing options, or start a new run directory"
            )
        return checkpoint

    # --- the job ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run all steps and return the summary that is also written to summary.json."""
        from edgeface import tracking

        started = time.perf_counter()
        self._prepare_run_dir()
        with steps.timed("plan", self.timings):
            images_root, _, plan = steps.plan_step(self.data_dir, self.config)
            fingerprint = dataset_fingerprint(images_root, plan.train_records)
        with steps.timed("partition", self.timings):
            shards = steps.partition_step(plan.train_records, self.config, self.run_dir)

        tracking_uri = tracking.resolve_tracking_uri(self.config.tracking.tracking_uri, Path.cwd())
        tracker = tracking.Tracker(tracking_uri, self.config.tracking.experiment)
        parent = self._start_parent_run(tracker, fingerprint)
        status = "FAILED"
        try:
            summary = self._run_tracked(tracker, parent, images_root, plan, shards, fingerprint)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            self._write_state(status="interrupted")
            logger.error("interrupted: resume with `edgeface run --resume %s`", self.run_dir)
            raise
        except BaseException:
            self._write_state(status="failed")
            raise
        finally:
            self._stop_workers()
            tracker.end_run(parent, status)
        summary["timings"]["total"] = time.perf_counter() - started
        steps.write_json_atomic(summary, self.run_dir / "summary.json")
        return summary

    def _prepare_run_dir(self) -> None:
        config_path = self.run_dir / "config.yaml"
        if self.resume:
            if not self.state_path.exists():
                raise EdgefaceError(
                    f"cannot resume {self.run_dir}: no state.json there. Pass the folder of an "
                    "earlier `edgeface run --out`, or start a new run without --resume"
                )
            return
        if self.state_path.exists():
            raise EdgefaceError(
                f"run directory {self.run_dir} already holds a run: resume it with "
                f"`edgeface run --resume {self.run_dir}`, or choose a new --out folder"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        self._write_state(rounds_completed=0, status="starting", version=__version__,
                          data_dir=str(self.data_dir.resolve()))

    def _start_parent_run(self, tracker, fingerprint: str) -> str:
        state = self._read_state()
        tags = {"edgeface.dataset_fingerprint": fingerprint,
                "edgeface.config_hash": self.config.config_hash(),
                "edgeface.code_version": __version__,
                "edgeface.run_dir": str(self.run_dir.resolve())}
        parent = tracker.start_parent(self.run_dir.name, self.config.to_dict(), tags,
                                      resume_run_id=state.get("parent_run_id"))
        self._write_state(parent_run_id=parent, tracking_uri=tracker.tracking_uri)
        return parent

    def _run_tracked(self, tracker, parent: str, images_root: Path, plan, shards,
                     fingerprint: str) -> dict[str, Any]:
        tracker.log_artifact(parent, self.run_dir / "partition.json")
        children = {node.name: tracker.start_child(node.name, parent_run_id=parent)
                    for node in shards.nodes}
        node_reports = self._start_workers(images_root, shards)
        with steps.timed("evaluation_cache", self.timings):
            evaluation = steps.prepare_evaluation(images_root, plan, self.config, self.cache_dir,
                                                  progress=self.progress)
        global_state, result, threshold = self._train_rounds(tracker, parent, children,
                                                             evaluation)
        return self._finish(tracker, parent, global_state, evaluation, result, threshold,
                            node_reports, fingerprint)

    # --- workers ------------------------------------------------------------------------

    def _start_workers(self, images_root: Path, shards) -> dict[str, dict[str, Any]]:
        parallel, threads = plan_parallelism(len(shards.nodes), self.config.train.max_parallel,
                                             self.config.train.threads_per_worker)
        self.parallel = parallel
        logger.info("starting %d edge-node workers: %d train at once, %d torch thread(s) each",
                    len(shards.nodes), parallel, threads)
        config_dict = self.config.model_dump(mode="json")
        for shard in shards.nodes:
            node_dir = self.run_dir / "nodes" / shard.name
            node_dir.mkdir(parents=True, exist_ok=True)
            self.workers[shard.name] = NodeProcess(
                shard.name, images_root, self.run_dir / "manifests" / f"{shard.name}.json",
                config_dict, self.cache_dir, node_dir, threads,
            )
        with steps.timed("validate_and_cache", self.timings):
            replies = self._dispatch({name: {"op": "prepare"} for name in self.workers},
                                     timeout=0.0, what="validate and cache")
        failed = {name: reply["error"] for name, reply in replies.items() if not reply.get("ok")}
        if failed:
            details = "; ".join(f"{name}: {error}" for name, error in sorted(failed.items()))
            raise EdgefaceError(f"data preparation failed on {len(failed)} node(s): {details}")
        steps.check_validation({n: (r["checked"], [tuple(b) for b in r["bad"]])
                                for n, r in replies.items()}, self.config.data.max_bad_fraction)
        for name, reply in sorted(replies.items()):
            logger.info("%s ready: %d images of %d people (%d unreadable skipped, cache %s)",
                        name, reply["num_samples"], reply["identities"], len(reply["bad"]),
                        "hit" if reply["cache_hit"] else "built")
        return replies

    def _dispatch(self, requests: dict[str, dict[str, Any]], *, timeout: float,
                  what: str) -> dict[str, dict[str, Any]]:
        """Send requests to nodes, at most `self.parallel` at once, and collect the replies.

        A node that dies, raises or exceeds `timeout` seconds (0 = no limit) gets a reply
        {"ok": False, "error": reason}; a timed-out node's process is killed.
        """
        pending = sorted(requests)
        running: dict[str, float] = {}
        replies: dict[str, dict[str, Any]] = {}
        while pending or running:
            while pending and len(running) < self.parallel:
                name = pending.pop(0)
                self.workers[name].send(requests[name])
                running[name] = time.monotonic()
            self._collect(running, replies, timeout)
        for name, reply in replies.items():
            if not reply.get("ok"):
                logger.warning("%s failed to %s: %s", name, what, reply.get("error"))
        return replies

    def _collect(self, running: dict[str, float], replies: dict[str, dict[str, Any]],
                 timeout: float) -> None:
        handles = {}
        for name in running:
            worker = self.workers[name]
            handles[worker.connection] = name
            handles[worker.process.sentinel] = name
        ready = wait(list(handles), timeout=1.0)
        finished: set[str] = set()
        for handle in ready:
            name = handles[handle]
            if name in finished:
                continue
            worker = self.workers[name]
            try:
                if worker.connection.poll():
                    replies[name] = worker.receive()
                    finished.add(name)
                    continue
            except (EOFError, OSError):
                pass
            if not worker.is_alive():
                code = worker.process.exitcode if worker.process else None
                reason = (f"process killed by signal {-code}" if code is not None and code < 0
                          else f"process exited with code {code}")
                replies[name] = {"ok": False, "error": reason}
                worker.kill()
                finished.add(name)
        now = time.monotonic()
        for name, since in running.items():
            if name not in finished and timeout and now - since > timeout:
                self.workers[name].kill()
                replies[name] = {"ok": False,
                                 "error": f"timed out after {timeout:g} s (round-timeout)"}
                finished.add(name)
        for name in finished:
            running.pop(name, None)

    def _stop_workers(self) -> None:
        for worker in self.workers.values():
            worker.stop()

    # --- rounds -------------------------------------------------------------------------

    def _train_rounds(self, tracker, parent: str, children: dict[str, str], evaluation):
        config = self.config
        strategy = steps.make_strategy(config, len(self.workers))
        checkpoint = self._load_checkpoint() if self.resume else None
        if checkpoint is None:
            first_round, global_state = 0, steps.initial_state(config)
        else:
            first_round, global_state = checkpoint["round"] + 1, checkpoint["global_state"]
            strategy.load_state_dict(checkpoint["strategy_state"])
            self.history = checkpoint["history"]
            logger.info("resuming %s after round %d of %d", self.run_dir, first_round,
                        config.train.rounds)
        result, threshold = None, None
        for round_index in range(first_round, config.train.rounds):
            global_state = self._one_round(round_index, global_state, strategy, tracker,
                                           parent, children)
            last = round_index == config.train.rounds - 1
            every = config.evaluation.eval_every
            if last or (every and (round_index + 1) % every == 0):
                with steps.timed("evaluate", self.timings):
                    result, _ = steps.evaluate_step(global_state, evaluation, config)
                metrics = result.metrics()
                tracker.log_metrics(parent, metrics, step=round_index)
                self.history[-1].update(metrics)
                logger.info("round %d/%d: fused model verification accuracy %.4f +- %.4f",
                            round_index + 1, config.train.rounds,
                            result.verification.accuracy_mean, result.verification.accuracy_std)
            self._save_checkpoint(round_index, global_state, strategy)
        if result is None:  # resumed after the last round: evaluate the final checkpoint
            result, _ = steps.evaluate_step(global_state, evaluation, config)
        threshold = float(result.verification.threshold)
        return global_state, result, threshold

    def _one_round(self, round_index: int, global_state, strategy, tracker, parent: str,
                   children: dict[str, str]):
        config = self.config
        round_dir = self.run_dir / "rounds" / f"round-{round_index:04d}"
        global_path = steps.save_atomic(global_state, round_dir / "global.pt")
        logger.info("round %d/%d: training %d nodes (lr %.4f)", round_index + 1,
                    config.train.rounds, len(self.workers),
                    steps.round_learning_rate(config.train, round_index))
        requests = {}
        for name in self.workers:
            request = {"op": "train", "round": round_index, "global_state_path": str(global_path),
                       "update_path": str(round_dir / "updates" / f"{name}.pt")}
            fault = self.faults.get((name, round_index))
            if fault:
                request["fail"] = fault
            requests[name] = request
        with steps.timed("train", self.timings):
            replies = self._dispatch(requests, timeout=config.federation.round_timeout,
                                     what=f"train round {round_index + 1}")
        outcome = RoundOutcome()
        for name, reply in sorted(replies.items()):
            if reply.get("ok"):
                outcome.updates[name] = (Path(reply["update_path"]), reply["num_samples"],
                                         reply["metrics"])
                tracker.log_metrics(children[name], {**reply["metrics"], "failed": 0.0},
                                    step=round_index)
            else:
                outcome.failures[name] = reply.get("error", "unknown error")
                tracker.log_metrics(children[name], {"failed": 1.0}, step=round_index)
        self._check_quorum(round_index, outcome, strategy)
        with steps.timed("aggregate", self.timings):
            aggregated = steps.aggregate_step(strategy, global_state, outcome.updates)
        round_metrics = {**aggregated.metrics, "failed_nodes": float(len(outcome.failures)),
                         "rejected_nodes": float(len(aggregated.rejected) + len(outcome.failures))}
        tracker.log_metrics(parent, round_metrics, step=round_index)
        for name, reason in aggregated.rejected:
            logger.warning("round %d: rejected the update of %s: %s", round_index + 1, name, reason)
        reported = ", ".join(sorted(outcome.updates))
        logger.info("round %d/%d: %d of %d nodes reported (%s), fused %d", round_index + 1,
                    config.train.rounds, len(outcome.updates), len(self.workers), reported,
                    len(aggregated.accepted))
        self.history.append({"round": float(round_index), **round_metrics})
        shutil.rmtree(round_dir, ignore_errors=True)
        return aggregated.state

    def _check_quorum(self, round_index: int, outcome: RoundOutcome, strategy) -> None:
        if len(outcome.updates) >= strategy.min_nodes:
            return
        reasons = "; ".join(f"{n}: {r}" for n, r in sorted(outcome.failures.items()))
        raise QuorumError(
            f"round {round_index + 1}: only {len(outcome.updates)} of {len(self.workers)} nodes "
            f"reported, fewer than the quorum of {strategy.min_nodes} ({reasons}). Earlier rounds "
            f"are kept: fix the nodes and resume with `edgeface run --resume {self.run_dir}`, "
            "or lower --min-nodes / --min-fraction"
        )

    # --- export, registration, summary --------------------------------------------------

    def _finish(self, tracker, parent: str, global_state, evaluation, result, threshold: float,
                node_reports, fingerprint: str) -> dict[str, Any]:
        from edgeface import export, tracking
        from edgeface.model import build_backbone

        config = self.config
        backbone = build_backbone(steps.model_spec(config))
        backbone.load_state_dict(global_state)
        backbone.eval()
        onnx_path = self.run_dir / "model" / "edgeface.onnx"
        with steps.timed("export", self.timings):
            export.export_onnx(backbone, config.data.image_size, onnx_path, opset=config.export.opset)
            images, pairs = self._parity_sample(evaluation)
            parity = export.check_parity(backbone, onnx_path, images, rtol=config.export.rtol,
                                         atol=config.export.atol, threshold=threshold, pairs=pairs)
        logger.info("ONNX parity on %d real faces: max abs diff %.2e, %s", len(images),
                    parity.max_abs_diff, "ok" if parity.ok else "FAILED")
        export.require_parity(parity)
        metrics = result.metrics()
        tags = {"edgeface.dataset_fingerprint": fingerprint,
                "edgeface.config_hash": config.config_hash(), "edgeface.code_version": __version__,
                "edgeface.partition": config.partition.strategy,
                "edgeface.nodes": config.partition.nodes, "edgeface.rounds": config.train.rounds,
                "edgeface.threshold": threshold, "edgeface.onnx_parity_ok": parity.ok,
                "edgeface.onnx_max_abs_diff": parity.max_abs_diff,
                "edgeface.protocol": evaluation.plan.name,
                **{f"edgeface.metric.{k}": v for k, v in metrics.items()}}
        with steps.timed("register", self.timings):
            tracker.log_artifact(parent, onnx_path)
            version = tracking.register_onnx_model(
                tracker, parent, onnx_path, config.tracking.model_name,
                image_size=config.data.image_size, embedding_dim=config.model.embedding_dim,
                tags=tags, alias=config.tracking.alias,
            )
        logger.info("registered %s version %d with alias %r", version.name, version.version,
                    config.tracking.alias)
        return self._summary(tracker, parent, result, threshold, parity, onnx_path, version,
                             node_reports, fingerprint)

    def _parity_sample(self, evaluation) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Take up to 64 evaluation faces and the test pairs among them, for the ONNX check."""
        count = min(64, len(evaluation.images))
        images = np.ascontiguousarray(evaluation.images[:count])
        pairs = []
        for fold in evaluation.plan.test_folds:
            for pair in fold:
                a, b = evaluation.index[pair.a.path], evaluation.index[pair.b.path]
                if a < count and b < count:
                    pairs.append((a, b))
        if not pairs:
            pairs = [(i, i + 1) for i in range(0, count - 1, 2)]
        return images, pairs

    def _summary(self, tracker, parent, result, threshold, parity, onnx_path, version,
                 node_reports, fingerprint) -> dict[str, Any]:
        verification = result.verification
        summary = {
            "edgeface_version": __version__,
            "protocol": result.plan,
            "metrics": {
                "verification_accuracy": float(verification.accuracy_mean),
                "verification_std": float(verification.accuracy_std),
                "verification_auc": float(verification.auc),
                "threshold": threshold,
            },
            "rounds_completed": self.config.train.rounds,
            "nodes": [{"name": name, "samples": reply["num_samples"],
                       "identities": reply["identities"], "unreadable": len(reply["bad"])}
                      for name, reply in sorted(node_reports.items())],
            "partition": self.config.partition.strategy,
            "dataset_fingerprint": fingerprint,
            "config_hash": self.config.config_hash(),
            "onnx": {"path": str(onnx_path.resolve()), "max_abs_diff": parity.max_abs_diff,
                     "parity_ok": parity.ok, "decisions_match": parity.decisions_match,
                     "opset": self.config.export.opset},
            "mlflow": {"tracking_uri": tracker.tracking_uri, "run_id": parent,
                       "experiment": self.config.tracking.experiment,
                       "model_name": version.name, "model_version": version.version,
                       "alias": self.config.tracking.alias},
            "history": self.history,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }
        if result.identification_top1 is not None:
            summary["metrics"]["identification_top1"] = float(result.identification_top1)
        if not all(math.isfinite(v) for v in summary["metrics"].values()):
            logger.warning("some final metrics are not finite: %s", summary["metrics"])
        self._write_state(status="finished")
        return summary
