"""Local orchestration of a federated run: the whole job on one machine, no cluster.

The run directory holds everything a run writes and needs to resume:

    config.yaml          effective configuration
    state.json           rounds completed, MLflow parent run id, dataset fingerprint, status
    partition.json       partition report;  manifests/node-k.json  per-node file lists
    nodes/node-k/        node-local state (classification head of each round); never read by
                         the server
    rounds/round-r/      per-round update files, deleted after aggregation
    checkpoints/         fused backbone and server state after each completed round
    model/               ONNX export;  summary.json  final metrics and pointers

The run directory is created only after the dataset and the partition have been checked, so a
run rejected for bad input leaves nothing behind; state.json marks a folder as holding a run.
config.yaml, state.json, the checkpoints and the node files are written to a temporary name and
renamed, and partition.json and the manifests are rewritten on every resume, so killing the run
at any moment leaves the last completed round intact: `edgeface run --resume RUN_DIR`
continues from it. Round numbers in file names, MLflow steps and tags count from 0; log lines
count from 1. docs/fault-tolerance.md describes failed nodes, the quorum, resume and Ctrl-C.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import pickle
import shutil
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
import yaml

from edgeface import __version__, steps
from edgeface.config import RunConfig
from edgeface.data.cache import dataset_fingerprint
from edgeface.machine import MACHINE_CHANGES_TAG, describe_machine, machine_tags
from edgeface.tracking import redact_uri
from edgeface.errors import ConfigError, DataError, EdgefaceError
from edgeface.workers import (
    FAULT_KINDS,
    WorkerProcess,
    plan_parallelism,
    plan_workers,
    stop_workers,
)

if TYPE_CHECKING:
    from edgeface.aggregation import Strategy
    from edgeface.data.partition import Partition
    from edgeface.data.protocol import EvaluationPlan
    from edgeface.evaluation import EvaluationResult
    from edgeface.tracking import Tracker

logger = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2
# MLflow 3.17.2 accepts tag values up to 8,000 characters. Failure reasons are cut well below.
MAX_REASON_TAG_CHARS = 2000


@dataclass
class RoundOutcome:
    """Replies of one round: usable updates, and the dropped nodes with their reasons.

    `failures` are nodes that returned no update (crash, timeout, exception). `rejected` are
    nodes whose update could not be aggregated (non-finite values, wrong keys or shapes).
    """

    # node -> (the update's state, read once here, its sample count, its training metrics)
    updates: dict[str, tuple[dict[str, torch.Tensor], int, dict[str, float]]] = field(
        default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    def dropped(self) -> dict[str, str]:
        """Return node -> reason for every node left out of this round's aggregation."""
        rejected = {name: f"update rejected: {reason}" for name, reason in self.rejected.items()}
        return {**self.failures, **rejected}


@dataclass
class TrainingResult:
    """The federated rounds of a run, before ONNX export and registration.

    `history` has one entry per round: aggregation metrics, failed and rejected node counts,
    and the evaluation metrics of the rounds that were evaluated.
    """

    global_state: dict[str, torch.Tensor]
    evaluation: EvaluationResult
    threshold: float
    history: list[dict[str, float]]
    parent_run_id: str


def parse_faults(spec: str | None) -> dict[tuple[str, int], str]:
    """Parse EDGEFACE_FAULTS, e.g. "node-1:crash@2,node-3:hang@0", into {(node, round): kind}.

    A test hook: in that round (counted from 0) the named node fails as `kind` specifies, one
    of `edgeface.workers.FAULT_KINDS`: crash, hang, error or nan.

    Raises:
        EdgefaceError: an entry is not NODE:KIND@ROUND, or its kind is unknown.
    """
    faults: dict[tuple[str, int], str] = {}
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        try:
            node, rest = item.split(":")
            kind, round_text = rest.split("@")
            round_index = int(round_text)
        except ValueError:
            raise EdgefaceError(
                f"invalid EDGEFACE_FAULTS entry {item!r}: expected NODE:KIND@ROUND, "
                "e.g. node-1:crash@2"
            ) from None
        kind = kind.strip()
        if kind not in FAULT_KINDS:
            raise EdgefaceError(
                f"invalid EDGEFACE_FAULTS entry {item!r}: unknown fault kind {kind!r}, "
                f"expected one of {', '.join(FAULT_KINDS)}"
            )
        faults[(node.strip(), round_index)] = kind
    return faults


def _freeze_loaded_objects() -> None:
    """Leave every object alive now out of later garbage collections, until `gc.unfreeze`.

    Called before the run imports another large library (mlflow, the ONNX exporter). CPython
    runs a full collection whenever the tracked objects grow by a quarter, so each import
    rescanned the objects of the libraries before it. In a 4-node, 3-round ORL run on a
    2-core machine at load average 4, the full collections took 3.4 to 3.6 s, and 1.3 to
    1.8 s with these freezes.
    """
    gc.freeze()


def _write_text_atomic(text: str, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


class LocalRunner:
    """Runs every step of a federated training job on this machine.

    `run()` does the whole job. `train()` stops after the rounds and their evaluation, for
    tests and debugging, and `edgeface run --resume` can complete such a run directory later.
    """

    def __init__(self, config: RunConfig, data_dir: Path, run_dir: Path, *,
                 resume: bool = False, progress: bool = True) -> None:
        self.config = config
        self.data_dir = Path(data_dir)
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.progress = progress
        self.cache_dir = steps.resolve_cache_dir(config)
        self.timings: dict[str, float] = {}
        self.workers: dict[str, WorkerProcess] = {}  # node -> the worker hosting it
        self.pool: list[WorkerProcess] = []
        # Node name -> MLflow child run id, ended with the parent run.
        self.children: dict[str, str] = {}
        self.parallel = 1
        self.faults = parse_faults(os.environ.get("EDGEFACE_FAULTS"))
        self.history: list[dict[str, float]] = []
        self.spreadout = steps.make_spreadout(config)
        self._lock: IO[str] | None = None
        # Seeded runs repeat to the bit only on the same processor and torch version.
        self.machine = describe_machine()
        self.machines: list[dict[str, Any]] = []  # the machine of each stretch of rounds

    # --- run state ----------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    def _read_state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {}
        try:
            return json.loads(self.state_path.read_text())
        except ValueError as error:
            raise EdgefaceError(
                f"run state {self.state_path} is not valid JSON ({error}): it was edited by "
                "hand; restore it or start a new run directory"
            ) from None

    def _write_state(self, **updates: Any) -> None:
        state = self._read_state()
        state.update(updates)
        steps.write_json_atomic(state, self.state_path)

    def _rounds_completed(self) -> int:
        return int(self._read_state().get("rounds_completed", 0))

    def _checkpoint_path(self, round_index: int) -> Path:
        return self.run_dir / "checkpoints" / f"round-{round_index:04d}.pt"

    def _save_checkpoint(self, round_index: int, global_state: dict[str, torch.Tensor],
                         strategy: Strategy) -> None:
        """Write round `round_index`'s checkpoint, then record it in state.json.

        A kill between the two leaves state.json at the previous round, whose checkpoint is
        still there, because only checkpoints older than the last CHECKPOINTS_KEPT go.
        """
        payload = {"round": round_index, "global_state": global_state,
                   "strategy_state": strategy.state_dict(), "seed": self.config.seed,
                   "config_hash": self.config.config_hash(), "history": self.history}
        steps.save_atomic(payload, self._checkpoint_path(round_index))
        self._write_state(rounds_completed=round_index + 1, status="running")
        for old in sorted((self.run_dir / "checkpoints").glob("round-*.pt"))[:-CHECKPOINTS_KEPT]:
            old.unlink(missing_ok=True)

    def _load_checkpoint(self) -> dict[str, Any] | None:
        completed = self._rounds_completed()
        if not completed:
            return None
        path = self._checkpoint_path(completed - 1)
        try:
            checkpoint = torch.load(path, weights_only=False)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise EdgefaceError(
                f"cannot resume {self.run_dir}: state.json records {completed} completed "
                f"round(s), but checkpoint {path} cannot be read ({error}). Restore that file, "
                "or start a new run directory"
            ) from None
        if checkpoint["config_hash"] != self.config.config_hash():
            raise EdgefaceError(
                f"cannot resume {self.run_dir}: its checkpoint was made with config hash "
                f"{checkpoint['config_hash']}, not {self.config.config_hash()}. Resume without "
                "changing options, or start a new run directory"
            )
        return checkpoint

    def _check_run_dir(self) -> None:
        """Reject a new run into a folder that contains a run, and a resume that cannot work."""
        if not self.resume:
            if self.state_path.exists() and self._read_state().get("status") == "finished":
                raise EdgefaceError(
                    f"run directory {self.run_dir} already contains a finished run (see "
                    "summary.json there): choose a new --out folder"
                )
            if self.state_path.exists():
                raise EdgefaceError(
                    f"run directory {self.run_dir} already contains a run: resume it with "
                    f"`edgeface run --resume {self.run_dir}`, or choose a new --out folder"
                )
            return
        if not self.state_path.exists():
            raise EdgefaceError(
                f"cannot resume {self.run_dir}: no state.json there. Pass the folder of an "
                "earlier `edgeface run --out`, or start a new run without --resume"
            )
        state = self._read_state()
        if state.get("status") == "finished":
            raise EdgefaceError(
                f"cannot resume {self.run_dir}: the run has finished (see summary.json there). "
                "Start a new run with another --out folder"
            )
        saved_hash = state.get("config_hash")
        if saved_hash and saved_hash != self.config.config_hash():
            raise EdgefaceError(
                f"cannot resume {self.run_dir}: it was started with config hash {saved_hash}, "
                f"not {self.config.config_hash()}. Resume with the run's own config.yaml and no "
                "config flags, or start a new run directory"
            )

    def _check_tracking_uri(self, tracking_uri: str) -> None:
        """Reject a resume that would track in another MLflow store than the run started in.

        Checked before anything is written, so the other store gets no experiment or run.
        """
        recorded = self._read_state().get("tracking_uri")
        if recorded and recorded != tracking_uri:
            raise ConfigError(
                f"cannot resume {self.run_dir}: it is tracked in {recorded}, but this command "
                f"would track in {tracking_uri}. Set MLFLOW_TRACKING_URI={recorded} (the run's "
                "config.yaml keeps its own tracking-uri, if it has one) and resume again"
            )

    def _check_fingerprint(self, fingerprint: str) -> None:
        saved = self._read_state().get("dataset_fingerprint") if self.resume else None
        if saved and saved != fingerprint:
            raise DataError(
                f"cannot resume {self.run_dir}: the training images under {self.data_dir} "
                f"changed since the run started (dataset fingerprint {saved}, now "
                f"{fingerprint}). Resume with the original images, or start a new run"
            )

    def _lock_run_dir(self) -> None:
        """Hold an exclusive lock on the run directory until the run ends, even if killed."""
        import fcntl

        handle = open(self.run_dir / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise EdgefaceError(
                f"run directory {self.run_dir} is in use by another edgeface process: wait for "
                "it to end or stop it, then retry"
            ) from None
        self._lock = handle

    def _unlock_run_dir(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def _create_run_state(self, fingerprint: str) -> None:
        _write_text_atomic(yaml.safe_dump(self.config.to_dict(), sort_keys=False),
                           self.run_dir / "config.yaml")
        self._write_state(rounds_completed=0, status="starting", version=__version__,
                          data_dir=str(self.data_dir.resolve()),
                          config_hash=self.config.config_hash(),
                          dataset_fingerprint=fingerprint)

    def _remove_leftovers(self) -> None:
        """Delete what an interrupted attempt left: round folders and temporary files."""
        shutil.rmtree(self.run_dir / "rounds", ignore_errors=True)
        for temporary in self.run_dir.rglob(".*.tmp"):
            temporary.unlink(missing_ok=True)

    # --- the job ------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run all steps and return the summary that is also written to summary.json.

        Raises:
            EdgefaceError: bad input (before the run directory is created), a round below
                the quorum, or a failed export or registration. Completed rounds stay in the
                run directory, and `edgeface run --resume` continues from them.
            KeyboardInterrupt: Ctrl-C. The workers are stopped first.
        """
        started = time.perf_counter()
        summary = self._execute(export=True)
        summary["timings"]["total"] = time.perf_counter() - started
        steps.write_json_atomic(summary, self.run_dir / "summary.json")
        return summary

    def train(self) -> TrainingResult:
        """Run the rounds and their evaluation only: no ONNX export, registration or summary.

        Meant for tests and debugging of the federated rounds. The MLflow parent run ends as
        FINISHED, and state.json gets status "trained", so `edgeface run --resume RUN_DIR`
        can still export and register the final checkpoint. Raises as `run` does.
        """
        return self._execute(export=False)

    def _execute(self, *, export: bool) -> Any:
        from edgeface import tracking

        self._check_run_dir()
        self._check_faults()
        tracking_uri = tracking.resolve_tracking_uri(self.config.tracking.tracking_uri,
                                                     Path.cwd())
        if self.resume:
            self._check_tracking_uri(redact_uri(tracking_uri))
        if self.resume:
            self._lock_run_dir()
        try:
            images_root, plan, shards, fingerprint = self._plan_and_partition()
            # Started before MLflow: the workers import torch while this process imports mlflow.
            self._spawn_workers(images_root, shards)
            _freeze_loaded_objects()
            tracker = tracking.Tracker(tracking_uri, self.config.tracking.experiment)
            parent = self._start_parent_run(tracker, fingerprint)
            return self._run_with_parent(tracker, parent, images_root, plan, shards,
                                         fingerprint, export)
        finally:
            self._stop_workers()
            self._unlock_run_dir()
            # Frozen objects that became garbage during the run are collected again. NOTE:
            # this also unfreezes what the calling program froze before the run.
            gc.unfreeze()

    def _plan_and_partition(self) -> tuple[Path, EvaluationPlan, Partition, str]:
        """Check the dataset and the partition, then create or reopen the run directory.

        Nothing is written before the partition succeeds, so `--nodes` too large for the
        dataset or a dataset with no usable images leaves no run directory behind.
        """
        with steps.timed("plan", self.timings):
            images_root, _, plan = steps.plan_step(self.data_dir, self.config)
            fingerprint = dataset_fingerprint(images_root, plan.train_records)
        self._check_fingerprint(fingerprint)
        with steps.timed("partition", self.timings):
            shards = steps.partition_step(plan.train_records, self.config, self.run_dir)
        if self.resume:
            self._remove_leftovers()
        else:
            self._lock_run_dir()
            self._check_run_dir()  # again, now that no other process can create a run here
            self._create_run_state(fingerprint)
        return images_root, plan, shards, fingerprint

    def _check_faults(self) -> None:
        nodes, rounds = self.config.partition.nodes, self.config.train.rounds
        names = {f"node-{k}" for k in range(nodes)}  # the names `partition` gives
        for node, round_index in sorted(self.faults):
            if node not in names or not 0 <= round_index < rounds:
                raise EdgefaceError(
                    f"EDGEFACE_FAULTS names {node} in round {round_index}, but this run has "
                    f"nodes node-0 to node-{nodes - 1} and rounds 0 to {rounds - 1}"
                )

    def _run_with_parent(self, tracker: Tracker, parent: str, images_root: Path,
                         plan: EvaluationPlan, shards: Partition, fingerprint: str,
                         export: bool) -> Any:
        """Run the tracked steps, record how they ended, and always stop the workers."""
        status = "FAILED"
        try:
            outcome = self._run_tracked(tracker, parent, images_root, plan, shards,
                                        fingerprint, export)
            status = "FINISHED"
            return outcome
        except KeyboardInterrupt:
            status = "KILLED"
            self._write_state(status="interrupted")
            logger.error("interrupted after %d of %d rounds: resume with "
                         "`edgeface run --resume %s`", self._rounds_completed(),
                         self.config.train.rounds, self.run_dir)
            raise
        except DataError:
            # Fixing the data changes the dataset fingerprint, which resume rejects.
            self._write_state(status="failed")
            logger.error("run failed after %d of %d rounds on a data problem: fix the data, "
                         "then start a new run with another --out folder",
                         self._rounds_completed(), self.config.train.rounds)
            raise
        except BaseException:
            self._write_state(status="failed")
            logger.error("run failed after %d of %d rounds; the completed rounds are kept: "
                         "fix the cause, then resume with `edgeface run --resume %s`",
                         self._rounds_completed(), self.config.train.rounds, self.run_dir)
            raise
        finally:
            self._stop_workers()
            self._end_parent_run(tracker, parent, status)

    def _end_parent_run(self, tracker: Tracker, parent: str, status: str) -> None:
        """End the node child runs and then the parent run with `status`."""
        try:
            for child in self.children.values():
                tracker.end_run(child, status)
            tracker.end_run(parent, status)
        except Exception as error:
            if status == "FINISHED":
                raise
            # Another error is on its way up; this one must not replace it.
            logger.error("could not mark MLflow run %s and its node runs as %s: %s", parent,
                         status, error)

    def _start_parent_run(self, tracker: Tracker, fingerprint: str) -> str:
        state = self._read_state()
        self.machines = self._machine_segments(state)
        tags = {"edgeface.dataset_fingerprint": fingerprint,
                "edgeface.config_hash": self.config.config_hash(),
                "edgeface.code_version": __version__,
                "edgeface.run_dir": str(self.run_dir.resolve()),
                **machine_tags(self.machines[0])}
        if len(self.machines) > 1:
            tags[MACHINE_CHANGES_TAG] = "; ".join(
                f"from round {segment['first_round'] + 1}: {segment['cpu']}, "
                f"{segment['cores']} cores, torch {segment['torch']}"
                for segment in self.machines[1:])
        parent = tracker.start_parent(self.run_dir.name, self.config.to_dict(), tags,
                                      resume_run_id=state.get("parent_run_id"))
        self._write_state(parent_run_id=parent, tracking_uri=redact_uri(tracker.tracking_uri),
                          machines=self.machines)
        return parent

    def _machine_segments(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the machine of each stretch of rounds, adding this process's if it differs.

        A resumed run keeps the machines of its earlier rounds, so the MLflow tags keep naming
        the machine the run started on. A resume on another processor, core count or torch
        version is logged, because its weights then differ from an uninterrupted run's.
        """
        first_round = int(state.get("rounds_completed", 0)) if self.resume else 0
        current = {"first_round": first_round, **self.machine}
        segments = list(state.get("machines", [])) if self.resume else []
        if not segments:
            return [current]
        last = segments[-1]
        changes = [f"{key} {last.get(key)} -> {self.machine[key]}"
                   for key in ("cpu", "cores", "torch") if last.get(key) != self.machine[key]]
        if not changes:
            return segments
        logger.warning("resuming %s from round %d on another machine (%s): the remaining "
                       "rounds will not give bitwise the weights of an uninterrupted run",
                       self.run_dir, first_round + 1, "; ".join(changes))
        return [*segments, current]

    def _run_tracked(self, tracker: Tracker, parent: str, images_root: Path,
                     plan: EvaluationPlan, shards: Partition, fingerprint: str,
                     export: bool) -> Any:
        tracker.log_artifact(parent, self.run_dir / "partition.json")
        # Evaluation images first: an unreadable one fails the run before the nodes load data.
        with steps.timed("evaluation_cache", self.timings):
            evaluation = steps.prepare_evaluation(images_root, plan, self.config, self.cache_dir,
                                                  progress=self.progress)
        children = {node.name: tracker.start_child(node.name, parent_run_id=parent)
                    for node in shards.nodes}
        self.children = children
        node_reports = self._prepare_nodes()
        global_state, result, threshold = self._train_rounds(tracker, parent, children,
                                                             evaluation)
        # The workers are idle from here on; their memory and cores go to the export.
        self._stop_workers()
        if not export:
            self._write_state(status="trained")
            return TrainingResult(global_state, result, threshold, list(self.history), parent)
        _freeze_loaded_objects()  # the export imports onnx, onnxruntime and torch._dynamo
        return self._finish(tracker, parent, global_state, evaluation, result, threshold,
                            node_reports, fingerprint)

    # --- workers ------------------------------------------------------------------------

    def _spawn_workers(self, images_root: Path, shards: Partition) -> None:
        """Plan the worker pool and start its processes, without waiting for them.

        Each new process spends seconds importing torch, while the caller goes on with its setup.
        """
        parallel, threads = plan_parallelism(len(shards.nodes), self.config.train.max_parallel,
                                             self.config.train.threads_per_worker)
        self.parallel = parallel
        names = [shard.name for shard in shards.nodes]
        pool = plan_workers(names, parallel, self.config.train.worker_processes)
        logger.info("%d edge nodes in %d worker process(es): %d train at once, %d torch "
                    "thread(s) each, on %s with torch %s", len(names), len(pool), parallel,
                    threads, self.machine["cpu"], self.machine["torch"])
        config_dict = self.config.model_dump(mode="json")
        for worker_name, hosted in pool.items():
            nodes = {}
            for node in hosted:
                node_dir = self.run_dir / "nodes" / node
                node_dir.mkdir(parents=True, exist_ok=True)
                nodes[node] = (self.run_dir / "manifests" / f"{node}.json", node_dir)
            worker = WorkerProcess(worker_name, nodes, images_root, config_dict,
                                   self.cache_dir, threads)
            logger.debug("%s hosts %s", worker_name, ", ".join(hosted))
            self.pool.append(worker)
            for node in hosted:
                self.workers[node] = worker
            worker.start()

    def _prepare_nodes(self) -> dict[str, dict[str, Any]]:
        """Have every node validate and cache its images, and return the replies by node.

        Raises:
            DataError: a node failed to prepare its data, or too many images are unreadable.
        """
        with steps.timed("validate_and_cache", self.timings):
            replies = self._dispatch({name: {"op": "prepare"} for name in self.workers},
                                     timeout=0.0, what="validate and cache")
        failed = {name: reply["error"] for name, reply in replies.items() if not reply.get("ok")}
        if failed:
            details = "; ".join(f"{name}: {error}" for name, error in sorted(failed.items()))
            raise DataError(f"data preparation failed on {len(failed)} node(s): {details}")
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
        {"ok": False, "error": reason}, and the worker process of a timed-out node is killed
        (the worker's other nodes get a new process at their next request). A request with
        "notify_start" gets `timeout` twice: once to start up and load its data, once to train.
        """
        pending = sorted(requests)
        running: dict[str, tuple[float, str]] = {}
        replies: dict[str, dict[str, Any]] = {}
        while pending or running:
            # Only pending nodes whose worker is free, because a worker serves one node at a time.
            ready = [name for name in pending if not self.workers[name].busy]
            while ready and len(running) < self.parallel:
                name = ready.pop(0)
                pending.remove(name)
                self.workers[name].send({**requests[name], "node": name})
                running[name] = (time.monotonic(), "while starting up and loading its data")
                ready = [other for other in ready if not self.workers[other].busy]
            if pending and not running:
                raise RuntimeError(f"internal error: nodes {', '.join(pending)} wait, but no "
                                   "worker is free and none is training")
            finished = set(replies)
            self._collect(running, replies, timeout)
            # Failures are logged as they happen, not when the slowest node is done.
            for name in sorted(set(replies) - finished):
                if not replies[name].get("ok"):
                    logger.warning("%s failed to %s: %s", name, what, replies[name].get("error"))
        return replies

    def _collect(self, running: dict[str, tuple[float, str]],
                 replies: dict[str, dict[str, Any]], timeout: float) -> None:
        """Wait up to 1 s for the running nodes, and move each finished one into `replies`."""
        handles: dict[Any, str] = {}
        for name in running:
            worker = self.workers[name]
            handles[worker.connection] = name
            handles[worker.process.sentinel] = name
        ready = {handles[handle] for handle in wait(list(handles), timeout=1.0)}
        now = time.monotonic()
        for name in sorted(ready):
            message = self.workers[name].poll_message()
            if message is None:
                continue
            if "event" in message:  # training started: the round timeout counts from now
                running[name] = (now, "of training")
                continue
            replies[name] = message
            del running[name]
        for name, (since, phase) in list(running.items()):
            if timeout and now - since > timeout:
                self.workers[name].kill()
                replies[name] = {"ok": False, "error": f"timed out after {timeout:g} s "
                                 f"{phase} (round-timeout)"}
                del running[name]

    def _stop_workers(self) -> None:
        stop_workers(self.pool)

    # --- rounds -------------------------------------------------------------------------

    def _train_rounds(self, tracker: Tracker, parent: str, children: dict[str, str],
                      evaluation: steps.EvaluationSet,
                      ) -> tuple[dict[str, torch.Tensor], EvaluationResult, float]:
        config = self.config
        strategy = steps.make_strategy(config, len(self.workers))
        first_round, global_state = self._restore(strategy)
        result = None
        for round_index in range(first_round, config.train.rounds):
            with steps.timed("rounds", self.timings):
                global_state = self._one_round(round_index, global_state, strategy, tracker,
                                               parent, children)
                last = round_index == config.train.rounds - 1
                every = config.evaluation.eval_every
                if last or (every and (round_index + 1) % every == 0):
                    result = self._evaluate_round(round_index, global_state, evaluation,
                                                  tracker, parent)
                self._save_checkpoint(round_index, global_state, strategy)
        if result is None:  # resumed after the last round: evaluate the final checkpoint
            with steps.timed("evaluate", self.timings):
                result, _ = steps.evaluate_step(global_state, evaluation, config)
        return global_state, result, float(result.verification.threshold)

    def _restore(self, strategy: Strategy) -> tuple[int, dict[str, torch.Tensor]]:
        """Return the first round to train and the global state it starts from."""
        checkpoint = self._load_checkpoint() if self.resume else None
        if checkpoint is None:
            self.history = []
            return 0, steps.initial_state(self.config)
        strategy.load_state_dict(checkpoint["strategy_state"])
        self.history = checkpoint["history"]
        first_round = checkpoint["round"] + 1
        logger.info("resuming %s after round %d of %d", self.run_dir, first_round,
                    self.config.train.rounds)
        return first_round, checkpoint["global_state"]

    def _evaluate_round(self, round_index: int, global_state: dict[str, torch.Tensor],
                        evaluation: steps.EvaluationSet, tracker: Tracker,
                        parent: str) -> EvaluationResult:
        with steps.timed("evaluate", self.timings):
            result, _ = steps.evaluate_step(global_state, evaluation, self.config)
        metrics = result.metrics()
        tracker.log_metrics(parent, metrics, step=round_index)
        self.history[-1].update(metrics)
        logger.info("round %d/%d: fused model verification accuracy %.4f +- %.4f",
                    round_index + 1, self.config.train.rounds,
                    result.verification.accuracy_mean, result.verification.accuracy_std)
        return result

    def _one_round(self, round_index: int, global_state: dict[str, torch.Tensor],
                   strategy: Strategy, tracker: Tracker, parent: str,
                   children: dict[str, str]) -> dict[str, torch.Tensor]:
        """Train every node once from `global_state`, drop failed nodes, fuse the rest.

        Raises:
            QuorumError: fewer than the quorum of nodes returned a usable update. The message
                names every dropped node and why.
        """
        config = self.config
        round_dir = self.run_dir / "rounds" / f"round-{round_index:04d}"
        shutil.rmtree(round_dir, ignore_errors=True)
        try:
            global_path = steps.save_atomic(global_state, round_dir / "global.pt")
            logger.info("round %d/%d: training %d nodes (lr %.4f)", round_index + 1,
                        config.train.rounds, len(self.workers),
                        steps.round_learning_rate(config.train, round_index))
            with steps.timed("train", self.timings):
                replies = self._dispatch(self._train_requests(round_index, global_path),
                                         timeout=config.federation.round_timeout,
                                         what=f"train round {round_index + 1}")
            # Seconds the nodes spent inside train_local, summed over nodes: the training
            # compute that the benchmarks subtract from `rounds` to get the round overhead.
            self.timings["node_training"] = self.timings.get("node_training", 0.0) + sum(
                float(reply["metrics"].get("seconds", 0.0))
                for reply in replies.values() if reply.get("ok"))
            outcome = self._screen_replies(round_index, replies, global_state)
            self._log_node_results(tracker, children, round_index, replies, outcome)
            if len(outcome.updates) < strategy.min_nodes:
                # The round fails below: record its node counts before the QuorumError, as a
                # fused round records them after aggregation.
                tracker.log_metrics(parent, {"failed_nodes": float(len(outcome.failures)),
                                             "rejected_nodes": float(len(outcome.rejected)),
                                             "accepted_nodes": 0.0}, step=round_index)
            self._check_quorum(round_index, outcome, strategy)
            with steps.timed("aggregate", self.timings):
                aggregated = steps.aggregate_step(strategy, global_state, outcome.updates)
            if config.federation.bn_calibration_images:
                with steps.timed("bn_calibration", self.timings):
                    aggregated.state = self._calibrate_batchnorm(round_index, aggregated.state,
                                                                 round_dir)
            spread_metrics: dict[str, float] = {}
            if self.spreadout is not None:
                with steps.timed("spreadout", self.timings):
                    spread_metrics = self._spread_out_centres(round_index, round_dir,
                                                              aggregated.accepted)
            traffic = self._round_traffic(round_index, round_dir)
        finally:
            shutil.rmtree(round_dir, ignore_errors=True)
        rejected = len(outcome.rejected) + len(aggregated.rejected)
        round_metrics = {**aggregated.metrics, **spread_metrics, **traffic,
                         "failed_nodes": float(len(outcome.failures)),
                         "rejected_nodes": float(rejected)}
        tracker.log_metrics(parent, round_metrics, step=round_index)
        dropped = outcome.dropped()
        logger.info("round %d/%d: %d of %d nodes reported (%s), fused %d%s", round_index + 1,
                    config.train.rounds, len(outcome.updates), len(self.workers),
                    ", ".join(sorted(outcome.updates)), len(aggregated.accepted),
                    f"; dropped {', '.join(sorted(dropped))}" if dropped else "")
        self.history.append({"round": float(round_index), **round_metrics})
        return aggregated.state

    def _calibrate_batchnorm(self, round_index: int, fused_state: dict[str, torch.Tensor],
                             round_dir: Path) -> dict[str, torch.Tensor]:
        """Replace the fused model's averaged BatchNorm statistics with pooled node statistics.

        Each reachable node recomputes the statistics of the fused backbone on its own images
        (see `steps.calibrate_batchnorm`). Nodes that fail here are skipped with a warning;
        with no node left, the averaged statistics stay.
        """
        fused_path = steps.save_atomic(fused_state, round_dir / "fused.pt")
        requests = {name: {"op": "calibrate", "round": round_index,
                           "global_state_path": str(fused_path),
                           "stats_path": str(round_dir / "bn" / f"{name}.pt")}
                    for name in self.workers}
        replies = self._dispatch(requests, timeout=self.config.federation.round_timeout,
                                 what=f"recompute BatchNorm statistics in round {round_index + 1}")
        stats = {name: (Path(reply["stats_path"]), int(reply["num_samples"]))
                 for name, reply in replies.items() if reply.get("ok")}
        if not stats:
            logger.warning("round %d: no node recomputed BatchNorm statistics; keeping the "
                           "averaged ones", round_index + 1)
            return fused_state
        logger.info("round %d/%d: recomputed BatchNorm statistics on %d images from %d nodes",
                    round_index + 1, self.config.train.rounds,
                    sum(count for _, count in stats.values()), len(stats))
        return steps.merge_batchnorm_stats(fused_state, stats)

    def _centres_dir(self, round_index: int) -> Path:
        return self.run_dir / "server" / "centres" / f"round-{round_index:04d}"

    def _spread_out_centres(self, round_index: int, round_dir: Path,
                            accepted: list[str]) -> dict[str, float]:
        """Spread the class centres of the accepted nodes apart and keep them for next round.

        The adjusted centres of round r are kept under `server/centres/round-r` until round
        r + 1 has used them, so a run resumed from round r's checkpoint sends the same centres.
        """
        updates = {name: round_dir / "updates" / f"{name}.pt" for name in accepted}
        _, metrics = steps.spreadout_round(self.spreadout, updates, accepted,
                                           self._centres_dir(round_index))
        for folder in self._centres_dir(round_index).parent.glob("round-*"):
            if int(folder.name.split("-", 1)[1]) < round_index - 1:
                shutil.rmtree(folder, ignore_errors=True)
        return metrics

    def _round_traffic(self, round_index: int, round_dir: Path) -> dict[str, float]:
        """Return the bytes of the files that nodes downloaded and uploaded in this round.

        Downloads: the global state (to every node), the fused state for the BatchNorm
        recalibration, and the adjusted class centres. Uploads: backbone updates, class
        centres, BatchNorm statistics. NOTE: file sizes, without transport overhead.
        """
        def size(path: Path) -> int:
            return path.stat().st_size if path.is_file() else 0

        nodes = len(self.workers)
        download = nodes * (size(round_dir / "global.pt") + size(round_dir / "fused.pt"))
        if round_index > 0:
            download += sum(size(path) for path in self._centres_dir(round_index - 1).glob("*.pt"))
        upload = sum(size(path) for folder in ("updates", "bn")
                     for path in (round_dir / folder).glob("*.pt"))
        return {"download_bytes": float(download), "upload_bytes": float(upload)}

    def _train_requests(self, round_index: int, global_path: Path) -> dict[str, dict[str, Any]]:
        updates_dir = global_path.parent / "updates"
        requests = {}
        for name in self.workers:
            request = {"op": "train", "round": round_index, "global_state_path": str(global_path),
                       "update_path": str(updates_dir / f"{name}.pt"), "notify_start": True}
            centres = self._centres_dir(round_index - 1) / f"{name}.pt"
            if self.spreadout is not None and round_index > 0 and centres.is_file():
                request["centres_path"] = str(centres)
            fault = self.faults.get((name, round_index))
            if fault:
                logger.warning("round %d: injecting fault %r into %s (EDGEFACE_FAULTS)",
                               round_index + 1, fault, name)
                request["fail"] = fault
            requests[name] = request
        return requests

    def _screen_replies(self, round_index: int, replies: dict[str, dict[str, Any]],
                        global_state: dict[str, torch.Tensor]) -> RoundOutcome:
        """Sort the replies into usable updates, failed nodes and rejected updates.

        An update is rejected for the reasons `edgeface.aggregation.validate_update` gives
        (NaN or infinity, keys, shapes, dtypes), or when its file cannot be read. The strategy
        checks again when it aggregates.
        """
        outcome = RoundOutcome()
        for name, reply in sorted(replies.items()):
            if not reply.get("ok"):
                outcome.failures[name] = reply.get("error", "unknown error")
                continue
            path, count = Path(reply["update_path"]), reply["num_samples"]
            state, reason = steps.load_update(name, path, count, global_state)
            if reason is None:
                outcome.updates[name] = (state, count, reply["metrics"])
            else:
                logger.warning("round %d: rejected the update of %s: %s", round_index + 1,
                               name, reason)
                outcome.rejected[name] = reason
        return outcome

    def _log_node_results(self, tracker: Tracker, children: dict[str, str], round_index: int,
                          replies: dict[str, dict[str, Any]], outcome: RoundOutcome) -> None:
        """Log each node's training metrics and `failed` (1 when dropped, else 0) at this round.

        A dropped node's reason goes to its child run as the tag `edgeface.failure.round-NNNN`.
        """
        dropped = outcome.dropped()
        for name, run_id in sorted(children.items()):
            reply = replies.get(name, {})
            metrics = dict(reply.get("metrics", {})) if reply.get("ok") else {}
            metrics["failed"] = 1.0 if name in dropped else 0.0
            tracker.log_metrics(run_id, metrics, step=round_index)
            if name in dropped:
                tracker.set_tags(run_id, {f"edgeface.failure.round-{round_index:04d}":
                                          dropped[name][:MAX_REASON_TAG_CHARS]})

    def _check_quorum(self, round_index: int, outcome: RoundOutcome, strategy: Strategy) -> None:
        if len(outcome.updates) >= strategy.min_nodes:
            return
        federation = self.config.federation
        raise steps.quorum_error(
            round_index, self.config.train.rounds, len(outcome.updates), len(self.workers),
            outcome.dropped(), strategy.min_nodes,
            f"The quorum comes from min-nodes {federation.min_nodes} and min-fraction "
            f"{federation.min_fraction:g}. The {round_index} completed round(s) are kept in "
            f"{self.run_dir / 'checkpoints'}: fix the nodes and resume with `edgeface run "
            f"--resume {self.run_dir}`, or start a new run with a lower --min-nodes or "
            "--min-fraction")

    # --- export, registration, summary --------------------------------------------------

    def _finish(self, tracker, parent: str, global_state, evaluation, result, threshold: float,
                node_reports, fingerprint: str) -> dict[str, Any]:
        from edgeface import export, registry
        from edgeface.model import build_backbone

        config = self.config
        backbone = build_backbone(steps.model_spec(config))
        backbone.load_state_dict(global_state)
        backbone.eval()
        onnx_path = self.run_dir / "model" / "edgeface.onnx"
        with steps.timed("export", self.timings):
            export.export_onnx(backbone, config.data.image_size, onnx_path, opset=config.export.opset,
                               exporter=config.export.exporter)
            images, pairs = steps.parity_sample(evaluation)
            parity = export.check_parity(backbone, onnx_path, images, rtol=config.export.rtol,
                                         atol=config.export.atol, threshold=threshold, pairs=pairs)
        logger.info("ONNX parity on %d real faces: max abs diff %.2e, %s", len(images),
                    parity.max_abs_diff, "ok" if parity.ok else "FAILED")
        export.require_parity(parity)
        tags = steps.registration_tags(
            config, fingerprint=fingerprint, metrics=result.metrics(), threshold=threshold,
            protocol=evaluation.plan.name, parity_ok=parity.ok, max_abs_diff=parity.max_abs_diff)
        backbone_file = self.run_dir / "model" / registry.BACKBONE_FILE
        steps.save_atomic(global_state, backbone_file)
        with steps.timed("register", self.timings):
            version = steps.register_model(tracker, parent, onnx_path, backbone_file, config, tags)
        with steps.timed("int8", self.timings):
            int8 = self._publish_int8(tracker, parent, version, onnx_path, evaluation)
        summary = self._summary(tracker, parent, result, threshold, parity, onnx_path, version,
                                node_reports, fingerprint)
        if int8 is not None:
            summary["int8"] = {"chosen": int8.chosen.to_dict(), "fp32": int8.fp32.to_dict(),
                               "candidates": [item.to_dict() for item in int8.candidates]}
        started = time.perf_counter()
        summary["report"] = self._publish_report(tracker, parent, summary, evaluation, int8,
                                                 onnx_path, threshold)
        summary["timings"]["report"] = round(time.perf_counter() - started, 3)
        return summary

    def _publish_int8(self, tracker, parent: str, version, onnx_path: Path, evaluation):
        """Build the int8 variant, log it beside the fp32 model and tag the model version.

        Returns the `quantize.Int8Report`, or None when quantization failed. A failure is
        recorded in the version tag `edgeface.int8.error` and does not fail the run, because
        the fp32 model is already registered.
        """
        from edgeface import quantize
        from edgeface.errors import ExportError

        try:
            variant = quantize.build_int8_variant(onnx_path, evaluation.plan, evaluation.images,
                                                  evaluation.index, onnx_path.parent)
        except ExportError as error:
            logger.warning("no int8 variant for %s version %d: %s", version.name,
                           version.version, error)
            tracker.registry.set_version_tags(version.name, version.version,
                                              {"edgeface.int8.error": str(error)[:1000]})
            return None
        tracker.log_artifact(parent, variant.chosen.path)
        tracker.log_metrics(parent, variant.metrics(), step=self.config.train.rounds - 1)
        tracker.registry.set_version_tags(version.name, version.version,
                                          variant.version_tags(variant.chosen.path.name))
        return variant

    def _publish_report(self, tracker, parent: str, summary: dict[str, Any], evaluation,
                        int8, onnx_path: Path, threshold: float) -> str | None:
        """Write run_dir/report/ and log it as the parent run's `report` artifacts.

        Returns the HTML page's path, or None when the report could not be written, which is
        logged as a warning and does not fail the run.
        """
        from edgeface import report
        from edgeface.inference import open_session, run_session

        data = report.ReportData(title=f"edgeface run {self.run_dir.name}",
                                 key_numbers=report.summary_key_numbers(summary),
                                 rounds=self.history)
        try:
            data.partition = json.loads((self.run_dir / "partition.json").read_text())
            children = tracker.find_child_runs(parent)
            data.node_metrics = {node: {metric: tracker.metric_history(run_id, metric)
                                        for metric in report.NODE_METRICS}
                                 for node, run_id in children.items()}
            if int8 is not None:
                embeddings = int8.fp32_embeddings
            else:
                embeddings = run_session(open_session(onnx_path), evaluation.images)
            scores, labels = report.score_test_pairs(evaluation.plan, embeddings, evaluation.index)
            data.roc = report.roc_with_threshold(scores, labels, threshold)
            page = report.write_report(data, self.run_dir / "report")
            tracker.log_artifact(parent, page.parent, artifact_path="report")
        except (OSError, ValueError) as error:
            logger.warning("could not write the run report: %s", error)
            return None
        return str(page.resolve())

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
            "machine": self.machine,
            "machines": self.machines,
            "onnx": {"path": str(onnx_path.resolve()), "max_abs_diff": parity.max_abs_diff,
                     "parity_ok": parity.ok, "decisions_match": parity.decisions_match,
                     "opset": self.config.export.opset,
                     "exporter": self.config.export.exporter},
            "mlflow": {"tracking_uri": redact_uri(tracker.tracking_uri), "run_id": parent,
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
