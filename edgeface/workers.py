"""Edge-node worker processes for the local runner.

Each edge node is one long-lived process (spawn start method) that holds only its own shard:
it validates and caches its images, then trains one round per request. Requests and replies
on its pipe are small dicts; weights travel as files (`global_state_path` in, `update_path`
out), never through the pipe. Raw images never cross the pipe either, and `_reply_payload`
enforces that by rejecting anything that is not a scalar, a string or a short list of them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SCALARS = (int, float, str, bool, type(None))


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


def worker_main(connection: Connection, node: str, images_root: str, manifest_path: str,
                config_dict: dict[str, Any], cache_dir: str, node_state_dir: str,
                threads: int, log_level: int) -> None:
    """Serve `prepare`, `train` and `stop` requests for one edge node until told to stop."""
    # The coordinator handles Ctrl-C and stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s {node}: %(message)s",
                        datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(threads)
    from edgeface import steps
    from edgeface.config import RunConfig

    config = RunConfig.model_validate(config_dict)
    shard = steps.load_node_shard(Path(manifest_path))
    data = None
    while True:
        request = connection.recv()
        operation = request.get("op")
        if operation == "stop":
            break
        try:
            if operation == "prepare":
                data = steps.prepare_node(Path(images_root), shard, config, Path(cache_dir))
                reply = {"ok": True, "num_samples": int(len(data.labels)),
                         "identities": len(data.identities), "checked": data.checked,
                         "bad": [list(item) for item in data.bad], "cache_hit": data.cache_hit}
            elif operation == "train":
                if data is None:
                    data = steps.prepare_node(Path(images_root), shard, config, Path(cache_dir))
                if request.get("fail"):
                    _inject_failure(request["fail"])
                metrics = steps.train_node(
                    data, Path(request["global_state_path"]), Path(node_state_dir),
                    Path(request["update_path"]), config, int(request["round"]),
                )
                reply = {"ok": True, "num_samples": int(len(data.labels)), "metrics": metrics,
                         "update_path": request["update_path"]}
            else:
                reply = {"ok": False, "error": f"unknown request {operation!r}"}
        except Exception as error:  # reported to the coordinator, which drops the node
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}",
                     "traceback": traceback.format_exc(limit=5)}
        _check_reply_payload(reply)
        connection.send(reply)


def _inject_failure(kind: str) -> None:
    """Simulate a failing edge node; used by the fault-tolerance tests via EDGEFACE_FAULTS."""
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "hang":
        time.sleep(3600)
    if kind == "error":
        raise RuntimeError("injected failure")


class NodeProcess:
    """Coordinator-side handle of one edge-node worker process."""

    def __init__(self, node: str, images_root: Path, manifest_path: Path,
                 config_dict: dict[str, Any], cache_dir: Path, node_state_dir: Path,
                 threads: int) -> None:
        self.node = node
        self._arguments = (node, str(images_root), str(manifest_path), config_dict,
                           str(cache_dir), str(node_state_dir), threads,
                           logging.getLogger().getEffectiveLevel())
        self.process: multiprocessing.process.BaseProcess | None = None
        self.connection: Connection | None = None
        self.busy_since: float | None = None

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self.process = context.Process(target=worker_main, args=(child, *self._arguments),
                                       name=f"edgeface-{self.node}", daemon=True)
        self.process.start()
        child.close()
        self.connection = parent
        logger.debug("started worker for %s (pid %s)", self.node, self.process.pid)

    def is_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def send(self, request: dict[str, Any]) -> None:
        if not self.is_alive():
            self.start()
        assert self.connection is not None
        self.connection.send(request)
        self.busy_since = time.monotonic()

    def receive(self) -> dict[str, Any]:
        assert self.connection is not None
        self.busy_since = None
        return self.connection.recv()

    def kill(self) -> None:
        """Stop the process at once (used for nodes past the round timeout)."""
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
        self._close()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.is_alive() and self.connection is not None and self.busy_since is None:
            try:
                self.connection.send({"op": "stop"})
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=timeout)
        self._close()

    def _close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.connection = None
        self.process = None
        self.busy_since = None
