"""The worker pool of the local runner: several edge nodes share a process, nothing else.

A run whose nodes share worker processes must train exactly what a run with one process per
node trains. If a shared worker handed one node's images, head or state to another, the
weights would differ.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from edgeface.config import load_config
from edgeface.runner import LocalRunner
from edgeface.workers import WorkerProcess, plan_workers, wait_for_reply
from conftest import run_workdir

OVERRIDES = {"nodes": 3, "rounds": 2, "image-size": 32, "batch-size": 16, "local-epochs": 1,
             "max-parallel": 2, "eval-every": 0, "bn-calibration-images": 64}


@pytest.mark.parametrize(("nodes", "parallel", "processes", "expected"), [
    (4, 2, 0, {"worker-0": ["n0", "n2"], "worker-1": ["n1", "n3"]}),
    (4, 2, 4, {f"worker-{i}": [f"n{i}"] for i in range(4)}),
    (4, 2, 9, {f"worker-{i}": [f"n{i}"] for i in range(4)}),
    (4, 2, 1, {"worker-0": ["n0", "n2"], "worker-1": ["n1", "n3"]}),
    (3, 3, 0, {"worker-0": ["n0"], "worker-1": ["n1"], "worker-2": ["n2"]}),
    (5, 1, 0, {"worker-0": ["n0", "n1", "n2", "n3", "n4"]}),
])
def test_plan_workers(nodes: int, parallel: int, processes: int,
                      expected: dict[str, list[str]]) -> None:
    names = [f"n{index}" for index in range(nodes)]
    assert plan_workers(names, parallel, processes) == expected


def test_plan_workers_warns_when_raised(caplog: pytest.LogCaptureFixture) -> None:
    names = [f"n{index}" for index in range(4)]
    with caplog.at_level(logging.WARNING, logger="edgeface.workers"):
        assert len(plan_workers(names, 2, 1)) == 2
    assert "worker-processes 1 is below the 2 nodes that train at once" in caplog.text
    assert "set max-parallel to 1 as well" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgeface.workers"):
        plan_workers(names, 2, 0)
        plan_workers(names, 2, 2)
        plan_workers(names, 2, 9)
    assert caplog.text == ""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("pool")
    with run_workdir(path):
        yield path


def train(orl_dir: Path, run_dir: Path, caplog: pytest.LogCaptureFixture, **extra: object):
    config = load_config(overrides={**OVERRIDES, **extra})
    with caplog.at_level(logging.INFO, logger="edgeface"):
        runner = LocalRunner(config, orl_dir, run_dir, progress=False)
        result = runner.train()
    hosts = {node: worker.name for node, worker in runner.workers.items()}
    return result, hosts


def test_shared_workers_match_own_processes(workdir: Path, orl_dir: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    shared, shared_hosts = train(orl_dir, workdir / "shared", caplog)
    assert "3 edge nodes in 2 worker process(es)" in caplog.text
    caplog.clear()
    own, own_hosts = train(orl_dir, workdir / "own", caplog, **{"worker-processes": 3})
    assert "3 edge nodes in 3 worker process(es)" in caplog.text

    assert shared_hosts == {"node-0": "worker-0", "node-1": "worker-1", "node-2": "worker-0"}
    assert own_hosts == {"node-0": "worker-0", "node-1": "worker-1", "node-2": "worker-2"}
    assert shared.global_state.keys() == own.global_state.keys()
    for key, tensor in shared.global_state.items():
        torch.testing.assert_close(tensor, own.global_state[key], rtol=0, atol=1e-6, msg=key)
    # Each node keeps its own classification head, whichever process trained it.
    for node in ("node-0", "node-1", "node-2"):
        heads = [torch.load(run / "nodes" / node / "head-round-0001.pt", weights_only=True)
                 for run in (workdir / "shared", workdir / "own")]
        for key, tensor in heads[0].items():
            torch.testing.assert_close(tensor, heads[1][key], rtol=0, atol=1e-6)
    assert shared.evaluation.verification.accuracy_mean == pytest.approx(
        own.evaluation.verification.accuracy_mean, abs=1e-6)


def test_worker_rejects_unhosted_node(workdir: Path, orl_dir: Path) -> None:
    config = load_config(overrides=OVERRIDES)
    worker = WorkerProcess("worker-0", {"node-0": (workdir / "node-0.json", workdir / "n0")},
                           orl_dir, config.model_dump(mode="json"), workdir / "cache", 1)
    try:
        worker.send({"op": "prepare", "node": "node-1"})
        reply = wait_for_reply(worker, 60)
    finally:
        worker.stop()
    assert reply["ok"] is False
    assert reply["error"] == "worker-0 does not host node 'node-1' (it hosts node-0)"
    assert worker.process is None
