"""Edge-node worker processes for the local runner.

Edge nodes run in a pool of long-lived worker processes (spawn start method). By default the
pool has one process per node that trains at once, so a 4-node run on 2 cores has 2 workers
that host 2 nodes each. With `worker-processes` set to the node count, every node gets its own
process.

A worker serves one request at a time, and every request names its node. The worker validates
and caches that node's images, then trains one round of that node per request. It keeps each
hosted node's data apart (an in-memory copy of each node's cache, loaded at the node's first
request), and a request for node X only touches X's data, head and state folder. So a node
trained in a shared process ends with the same weights as in a process of its own
(`tests/test_pool.py`).

Requests and replies on the pipe are small dicts. Weights travel as files
(`global_state_path` in, `update_path` out), never through the pipe. Raw images never cross
the pipe either, and `_check_reply_payload` enforces that by rejecting anything that is not a
scalar, a string, or a short list or dict of them.

A worker never outlives its coordinator. On Linux it asks the kernel to send it SIGKILL when
the coordinator dies (`PR_SET_PDEATHSIG`), so even a coordinator killed with SIGKILL leaves
no worker behind. On other systems a worker exits at its next request, when it finds the pipe
closed.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
import zlib
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SCALARS = (int, float, str, bool, type(None))

# Failures that a `train` request can ask for through its "fail" field, for the
# fault-tolerance tests (EDGEFACE_FAULTS, see `edgeface.runner.parse_faults`):
#   crash  the worker kills itself with SIGKILL before training, as the OOM killer would
#   hang   the worker sleeps for an hour after loading its data, past any round-timeout
#   error  the worker raises RuntimeError before training
#   nan    the worker trains, then writes NaN into its saved update
FAULT_KINDS = ("crash", "hang", "error", "nan")

# Message a worker sends when a train request has `"notify_start": True`, after its data is
# loaded and just before training starts. It is not the reply: the reply follows.
TRAINING_STARTED = {"event": "training-started"}

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def plan_parallelism(nodes: int, max_parallel: int, threads_per_worker: int) -> tuple[int, int]:
    """Return (nodes training at once, torch threads per node) for this machine.

    By default one node trains per core with one thread each, so the workers never
    oversubscribe the cores; with fewer nodes than cores each node gets more threads.
    """
    cores = available_cores()
    parallel = max_parallel or min(nodes, cores)
    parallel = max(1, min(parallel, nodes))
    threads = threads_per_worker or max(1, cores // parallel)
    return parallel, threads


def plan_workers(nodes: list[str], parallel: int, processes: int) -> dict[str, list[str]]:
    """Return {worker name: hosted nodes}: the worker pool for `nodes` in their given order.

    `processes` 0 gives one worker per node that trains at once (`parallel`), so no more
    processes hold the torch runtime and a model than the cores can keep busy. Otherwise
    there are `processes` workers, at least `parallel` and at most one per node. Node i goes to
    worker i mod the pool size, so the hosting is the same in every run and on resume.
    """
    size = max(parallel, processes) if processes else parallel
    size = max(1, min(size, len(nodes)))
    if 0 < processes < size:
        logger.warning("worker-processes %d is below the %d nodes that train at once, so the "
                       "pool has %d worker processes: set max-parallel to %d as well to get %d",
                       processes, parallel, size, processes, processes)
    pool: dict[str, list[str]] = {f"worker-{index}": [] for index in range(size)}
    for index, node in enumerate(nodes):
        pool[f"worker-{index % size}"].append(node)
    return pool


def release_memory() -> bool:
    """Return freed heap memory to the operating system; True if malloc_trim ran.

    glibc keeps the memory that a training step's activations freed (hundreds of MB at batch
    128) in the process heap, so an idle worker would hold its peak between rounds. On a
    non-glibc system this only runs the garbage collector and returns False.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def exit_reason(exitcode: int | None) -> str:
    """Describe how a worker process ended, for the failure reason of its node.

    `exitcode` is `multiprocessing.Process.exitcode`: negative for a signal, None while the
    process runs.
    """
    if exitcode is None:
        return "process stopped responding"
    if exitcode >= 0:
        return f"process exited with code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    reason = f"process killed by {name}"
    if -exitcode == signal.SIGKILL:
        # The kernel's out-of-memory killer sends SIGKILL, and so does `kill -9`.
        reason += " (out of memory, or killed from outside)"
    return reason


def _check_reply_payload(value: Any, depth: int = 0) -> None:
    """Raise TypeError unless `value` is made of scalars, short lists and dicts of them.

    This is the privacy boundary of the local runner: a node may send back counts, metrics,
    file names and failure reasons, but no arrays or tensors.
    """
    if isinstance(value, _SCALARS):
        return
    if depth < 4 and isinstance(value, (list, tuple)):
        for item in value:
            _check_reply_payload(item, depth + 1)
        return
    if depth < 4 and isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"reply key {key!r} is not a string")
            _check_reply_payload(item, depth + 1)
        return
    raise TypeError(f"a node reply may not carry {type(value).__name__} values")


class _NodeLogFilter(logging.Filter):
    """Prefix a worker's log records with the node whose request it is serving."""

    node = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.node = self.node
        return True


def worker_main(connection: Connection, name: str, nodes: dict[str, tuple[str, str]],
                images_root: str, config_dict: dict[str, Any], cache_dir: str, threads: int,
                log_level: int) -> None:
    """Serve `prepare`, `train`, `calibrate` and `stop` requests until it receives `stop`.

    `nodes` maps each hosted node to (manifest path, node state folder). Every request but
    `stop` names its node in "node". The worker also exits when the coordinator closes the
    pipe or dies.
    """
    # The coordinator handles Ctrl-C and stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_coordinator()
    node_filter = _NodeLogFilter()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(node)s: %(message)s",
                        datefmt="%H:%M:%S")
    for handler in logging.getLogger().handlers:
        handler.addFilter(node_filter)
    import torch

    # The same thread count in every process of a run, a restarted one included, keeps
    # the CPU kernels' reduction order and so the trained weights identical.
    torch.set_num_threads(threads)
    from edgeface import steps
    from edgeface.config import RunConfig

    config = RunConfig.model_validate(config_dict)
    hosted: dict[str, Any] = {}  # node -> its prepared data, loaded at the node's first request

    def node_data(node: str) -> Any:
        if node not in hosted:
            shard = steps.load_node_shard(Path(nodes[node][0]))
            hosted[node] = steps.prepare_node(Path(images_root), shard, config, Path(cache_dir))
        return hosted[node]

    while True:
        try:
            request = connection.recv()
        except EOFError:
            logger.warning("the coordinator closed the connection, so %s stops", name)
            break
        operation = request.get("op")
        if operation == "stop":
            break
        node = request.get("node")
        node_filter.node = node if node in nodes else name
        try:
            if node not in nodes:
                reply = {"ok": False, "error": f"{name} does not host node {node!r} "
                         f"(it hosts {', '.join(sorted(nodes))})"}
                logger.error("rejected a %s request: %s", operation, reply["error"])
            elif operation == "prepare":
                data = node_data(node)
                reply = {"ok": True, "num_samples": int(len(data.labels)),
                         "identities": len(data.identities), "checked": data.checked,
                         "bad": [list(item) for item in data.bad], "cache_hit": data.cache_hit}
            elif operation == "train":
                reply = _train(connection, request, node_data(node), config, Path(nodes[node][1]))
            elif operation == "calibrate":
                count = steps.calibrate_batchnorm(
                    node_data(node), Path(request["global_state_path"]),
                    Path(request["stats_path"]), config, int(request["round"]),
                )
                reply = {"ok": True, "num_samples": count, "stats_path": request["stats_path"]}
            else:
                reply = {"ok": False, "error": f"unknown request {operation!r}"}
        except Exception as error:  # reported to the coordinator, which drops the node
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}",
                     "traceback": traceback.format_exc(limit=5)}
        _check_reply_payload(reply)
        connection.send(reply)
        node_filter.node = name
        release_memory()
        # What survives a full collection here lives as long as the worker: the modules of
        # torch and edgeface and the hosted nodes' data, over 300,000 objects. Frozen, they are
        # left out of later collections. Unfrozen, on a loaded 2-core machine, release_memory's
        # collection took 0.25 s per request and interpreter shutdown 1.5 s instead of 0.4 s.
        gc.freeze()


def _train(connection: Connection, request: dict[str, Any], data: Any, config: Any,
           node_state_dir: Path) -> dict[str, Any]:
    """Train one round as `request` specifies, injecting the failure it requests, if any."""
    import torch

    from edgeface import steps

    if request.get("notify_start"):
        connection.send(TRAINING_STARTED)
    fault = request.get("fail")
    if fault:
        _inject_failure(fault)
    round_index = int(request["round"])
    # train_node seeds the training itself, but only after it builds the model. A head that
    # starts from scratch (round 0, or a node that missed the previous round) would otherwise
    # take its initial weights from the process's random state, which torch 2.14 seeds
    # differently in every process.
    torch.manual_seed(zlib.crc32(f"{config.seed}:{data.node}:{round_index}".encode()))
    update_path = Path(request["update_path"])
    centres_path = request.get("centres_path")
    metrics = steps.train_node(data, Path(request["global_state_path"]), node_state_dir,
                               update_path, config, round_index,
                               centres_path=Path(centres_path) if centres_path else None)
    if fault == "nan":
        _poison_update(update_path)
    return {"ok": True, "num_samples": int(len(data.labels)), "metrics": metrics,
            "update_path": str(update_path)}


def _exit_with_coordinator() -> None:
    """Have Linux SIGKILL this process when its parent dies, and exit if it is gone already."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = multiprocessing.parent_process()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this worker may outlive "
                       "a killed coordinator", ctypes.get_errno())
        return
    # The coordinator may have died before prctl took effect.
    if parent is not None and os.getppid() != parent.pid:
        os._exit(1)


def _inject_failure(kind: str) -> None:
    """Simulate a failing edge node before training; `kind` is one of FAULT_KINDS."""
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        time.sleep(3600)
    elif kind == "error":
        raise RuntimeError("injected failure (EDGEFACE_FAULTS)")
    elif kind != "nan":
        raise ValueError(f"unknown fault kind {kind!r}: expected one of {', '.join(FAULT_KINDS)}")


def _poison_update(update_path: Path) -> None:
    """Overwrite the first floating-point tensor of a saved update with NaN."""
    import torch

    from edgeface import steps

    state = torch.load(update_path, weights_only=True)
    for tensor in state.values():
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
            break
    steps.save_atomic(state, update_path)


class WorkerProcess:
    """Coordinator-side handle of one worker process and the edge nodes it hosts.

    `nodes` maps each hosted node to (manifest path, node state folder). `send` starts the
    process when it is not running, so a worker whose process died or was killed is restarted
    by its next request. A worker serves one request at a time: `busy` is True from `send`
    until the reply arrives.
    """

    def __init__(self, name: str, nodes: dict[str, tuple[Path, Path]], images_root: Path,
                 config_dict: dict[str, Any], cache_dir: Path, threads: int) -> None:
        self.name = name
        self.nodes = sorted(nodes)
        hosted = {node: (str(manifest), str(state)) for node, (manifest, state) in nodes.items()}
        self._arguments = (name, hosted, str(images_root), config_dict, str(cache_dir), threads,
                           logging.getLogger().getEffectiveLevel())
        self.process: multiprocessing.process.BaseProcess | None = None
        self.connection: Connection | None = None
        self.busy_since: float | None = None
        self.starts = 0

    @property
    def busy(self) -> bool:
        return self.busy_since is not None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child, *self._arguments),
                                       name=f"edgeface-{self.name}", daemon=True)
        self.process.start()
        child.close()
        self.connection = parent
        self.starts += 1
        if self.starts > 1:
            logger.info("restarted %s (pid %s) for %s; it reloads their data from the cache",
                        self.name, self.process.pid, ", ".join(self.nodes))
        else:
            logger.debug("started %s (pid %s) for %s", self.name, self.process.pid,
                         ", ".join(self.nodes))

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def send(self, request: dict[str, Any]) -> None:
        if not self.is_alive():
            self._close()
            self.start()
        assert self.connection is not None
        self.connection.send(request)
        self.busy_since = time.monotonic()

    def receive(self) -> dict[str, Any]:
        assert self.connection is not None
        self.busy_since = None
        return self.connection.recv()

    def poll_message(self) -> dict[str, Any] | None:
        """Return the next message, a failure reply if the process died, or None if none waits.

        A message with an "event" key (TRAINING_STARTED) leaves the worker busy. A failure
        reply is {"ok": False, "error": reason}, made after the dead process is reaped. The
        call waits only for that, at most 5 s after the pipe closed.
        """
        assert self.connection is not None and self.process is not None
        try:
            if self.connection.poll():
                message = self.connection.recv()
                if "event" not in message:
                    self.busy_since = None
                return message
        except (EOFError, OSError):
            # The pipe closes when the process exits; give it a moment to be reaped.
            self.process.join(timeout=5)
        if self.process.is_alive():
            return None
        reason = exit_reason(self.process.exitcode)
        self.kill()
        return {"ok": False, "error": reason}

    def kill(self) -> None:
        """Stop the process at once (used for nodes past the round timeout)."""
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
        self._close()

    def request_stop(self) -> bool:
        """Ask an idle worker to exit without waiting; return whether the request was sent."""
        if self.process is None or self.connection is None or self.busy_since is not None:
            return False
        if not self.process.is_alive():
            return False
        try:
            self.connection.send({"op": "stop"})
        except (BrokenPipeError, OSError):
            return False
        return True

    def stop(self, timeout: float = 10.0, *, requested: bool | None = None) -> None:
        """Ask an idle worker to exit, and kill it when it is busy or does not exit in time.

        `requested` is whether `request_stop` already sent the request (None: send it now).
        """
        if self.process is None:
            return
        if requested is None:
            requested = self.request_stop()
        if requested:
            self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=timeout)
        self._close()

    def _close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        if self.process is not None and not self.process.is_alive():
            self.process.close()
        self.connection = None
        self.process = None
        self.busy_since = None


def stop_workers(workers: list[WorkerProcess], timeout: float = 10.0) -> None:
    """Stop `workers` as `WorkerProcess.stop` does, sending every request before waiting.

    The processes then exit in parallel, because each exit takes a noticeable time.
    """
    requested = [worker.request_stop() for worker in workers]
    for worker, sent in zip(workers, requested):
        worker.stop(timeout, requested=sent)


def wait_for_reply(worker: WorkerProcess, timeout: float) -> dict[str, Any]:
    """Wait for the reply of a `WorkerProcess` to a train request with "notify_start".

    As in the local runner, the worker gets `timeout` seconds (0 = no limit) to start up and
    load its data, and `timeout` seconds again from the moment it reports that training
    started. A worker that dies or times out gets a reply {"ok": False, "error": reason}, and
    a timed-out worker is killed.
    """
    since, phase = time.monotonic(), "while starting up and loading its data"
    while True:
        wait([worker.connection, worker.process.sentinel], timeout=1.0)
        message = worker.poll_message()
        now = time.monotonic()
        if message is not None and "event" in message:
            since, phase = now, "of training"
        elif message is not None:
            return message
        if timeout and now - since > timeout:
            worker.kill()
            return {"ok": False, "error": f"timed out after {timeout:g} s {phase} (round-timeout)"}
