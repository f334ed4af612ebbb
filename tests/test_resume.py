"""Checkpoints and resume of the local runner, with real worker processes on ORL.

A reference run trains without faults. A second run with the same config fails its quorum in
round 2, because a node returns NaN weights, and keeps round 1. Resumed, it must end with the
same weights, node heads and metrics as the reference, in the same MLflow parent run. The slow
tests kill the coordinator with SIGKILL during a round and between rounds, then resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from edgeface.config import RunConfig, load_config
from edgeface.errors import EdgefaceError, QuorumError
from edgeface.runner import LocalRunner, TrainingResult
from edgeface.tracking import ModelRegistry, Tracker, resolve_tracking_uri
from conftest import run_workdir

# Both nodes must report in every round, so one bad update fails the round.
OVERRIDES = {"nodes": 2, "rounds": 2, "image-size": 32, "batch-size": 16, "local-epochs": 1,
             "min-fraction": 1.0, "eval-every": 1}
CLI_FLAGS = [flag for key, value in OVERRIDES.items() for flag in (f"--{key}", str(value))]
# Differences allowed between a resumed and an uninterrupted run: float32 rounding.
WEIGHT_ATOL = 1e-5
METRIC_ATOL = 1e-6


def tiny_config() -> RunConfig:
    return load_config(overrides=OVERRIDES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working directory shared by the module: ./mlflow.db, ./cache and the run folders."""
    path = tmp_path_factory.mktemp("resume")
    with run_workdir(path):
        yield path


def tracker_for(workdir: Path) -> Tracker:
    return Tracker(resolve_tracking_uri(None, workdir), "edgeface")


def registry_snapshot(workdir: Path) -> list[tuple[str, int, tuple[str, ...]]]:
    if not (workdir / "mlflow.db").exists():
        return []
    registry = ModelRegistry(resolve_tracking_uri(None, workdir))
    return [(version.name, version.version, version.aliases)
            for model in registry.list_models() for version in registry.list_versions(model.name)]


def read_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "state.json").read_text())


def load_heads(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {path.parent.name: torch.load(path, weights_only=True)
            for path in sorted(run_dir.glob("nodes/node-*/head-round-*.pt"))
            if path.stem.endswith(f"{OVERRIDES['rounds'] - 1:04d}")}


def assert_same_training(resumed: TrainingResult, reference: TrainingResult) -> None:
    for key, expected in reference.global_state.items():
        torch.testing.assert_close(resumed.global_state[key], expected, atol=WEIGHT_ATOL,
                                   rtol=0, msg=lambda text: f"{key}: {text}")
    metrics, expected_metrics = resumed.evaluation.metrics(), reference.evaluation.metrics()
    assert metrics.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
        assert metrics[key] == pytest.approx(value, abs=METRIC_ATOL), key


def assert_same_heads(run_dir: Path, reference_dir: Path) -> None:
    heads, expected = load_heads(run_dir), load_heads(reference_dir)
    assert sorted(heads) == ["node-0", "node-1"]
    for node, state in expected.items():
        for key, tensor in state.items():
            torch.testing.assert_close(heads[node][key], tensor, atol=WEIGHT_ATOL, rtol=0)


@pytest.fixture(scope="module")
def reference(workdir: Path, orl_dir: Path) -> TrainingResult:
    return LocalRunner(tiny_config(), orl_dir, workdir / "reference", progress=False).train()


@pytest.fixture(scope="module")
def quorum_failure(workdir: Path, orl_dir: Path, reference: TrainingResult):
    """Run until node-1's NaN update fails round 2's quorum; return the run dir, the error and
    the registry before and after."""
    registry_before = registry_snapshot(workdir)
    run_dir = workdir / "quorum"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFACE_FAULTS", "node-1:nan@1")
        with pytest.raises(QuorumError) as raised:
            LocalRunner(tiny_config(), orl_dir, run_dir, progress=False).train()
    state = read_state(run_dir)
    return run_dir, raised.value, state, registry_before, registry_snapshot(workdir)


def test_quorum_error_names_node_and_reason(quorum_failure) -> None:
    run_dir, error, _, _, _ = quorum_failure
    message = str(error)
    assert "round 2/2" in message
    assert "only 1 of 2 nodes" in message
    assert "node-1: update rejected" in message
    assert "non-finite" in message
    assert f"edgeface run --resume {run_dir}" in message


def test_failed_run_keeps_earlier_rounds(quorum_failure, workdir: Path) -> None:
    run_dir, _, state, registry_before, registry_after = quorum_failure
    assert state["status"] == "failed"
    assert state["rounds_completed"] == 1
    assert (run_dir / "checkpoints" / "round-0000.pt").is_file()
    assert not (run_dir / "checkpoints" / "round-0001.pt").exists()
    assert not (run_dir / "rounds").exists() or not any((run_dir / "rounds").iterdir())
    assert not list(run_dir.rglob(".*.tmp"))
    assert registry_after == registry_before
    run = tracker_for(workdir).client.get_run(state["parent_run_id"])
    assert run.info.status == "FAILED"


def test_failed_round_logs_node_counts(quorum_failure, workdir: Path) -> None:
    _, _, state, _, _ = quorum_failure
    tracker = tracker_for(workdir)
    parent = state["parent_run_id"]
    # Round 2 (step 1) failed its quorum: node-1's NaN update was rejected, none was fused.
    assert (1, 1.0) in tracker.metric_history(parent, "rejected_nodes")
    assert (1, 0.0) in tracker.metric_history(parent, "failed_nodes")
    assert (1, 0.0) in tracker.metric_history(parent, "accepted_nodes")


def test_resume_rejects_other_store(quorum_failure, orl_dir: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, _, _, _, _ = quorum_failure
    other = tmp_path / "other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    before = (run_dir / "state.json").read_text()

    with pytest.raises(EdgefaceError, match="it is tracked in sqlite:///") as raised:
        LocalRunner(tiny_config(), orl_dir, run_dir, resume=True, progress=False).train()

    assert f"MLFLOW_TRACKING_URI={json.loads(before)['tracking_uri']}" in str(raised.value)
    assert not other.exists()
    assert (run_dir / "state.json").read_text() == before


def test_resume_after_quorum_failure_matches_reference(
    quorum_failure, reference: TrainingResult, orl_dir: Path, workdir: Path
) -> None:
    run_dir, _, state, _, _ = quorum_failure
    resumed = LocalRunner(tiny_config(), orl_dir, run_dir, resume=True, progress=False).train()

    assert resumed.parent_run_id == state["parent_run_id"]
    assert_same_training(resumed, reference)
    assert_same_heads(run_dir, workdir / "reference")
    assert [entry["round"] for entry in resumed.history] == [0.0, 1.0]
    assert read_state(run_dir)["rounds_completed"] == 2

    tracker = tracker_for(workdir)
    assert tracker.client.get_run(resumed.parent_run_id).info.status == "FINISHED"
    steps = [step for step, _ in tracker.metric_history(resumed.parent_run_id,
                                                        "verification_accuracy_mean")]
    assert sorted(set(steps)) == [0, 1]
    children = tracker.find_child_runs(resumed.parent_run_id)
    assert sorted(children) == ["node-0", "node-1"]
    # Round 2 failed once and succeeded once: node-1 logged failed = 1, then 0, at step 1.
    failed = tracker.metric_history(children["node-1"], "failed")
    assert (1, 1.0) in failed
    assert (1, 0.0) in failed


def test_resume_other_machine_keeps_record(
    workdir: Path, orl_dir: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A resume on another machine keeps the first machine's record and warns."""
    import logging

    run_dir = workdir / "other-machine"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFACE_FAULTS", "node-1:nan@1")
        with pytest.raises(QuorumError):
            LocalRunner(tiny_config(), orl_dir, run_dir, progress=False).train()
    state = read_state(run_dir)
    [first] = state["machines"]
    assert first["first_round"] == 0
    # Stand in for a first machine with another processor.
    first["cpu"] = "Earlier Processor (family 1, model 2, stepping 3)"
    (run_dir / "state.json").write_text(json.dumps({**state, "machines": [first]}))

    with caplog.at_level(logging.WARNING, logger="edgeface.runner"):
        resumed = LocalRunner(tiny_config(), orl_dir, run_dir, resume=True,
                              progress=False).train()
    warnings = [r.getMessage() for r in caplog.records if "on another machine" in r.getMessage()]
    assert len(warnings) == 1
    assert "from round 2" in warnings[0]
    assert "Earlier Processor" in warnings[0]
    machines = read_state(run_dir)["machines"]
    assert [segment["first_round"] for segment in machines] == [0, 1]
    assert machines[0]["cpu"] == first["cpu"]
    assert machines[1]["cpu"] != first["cpu"]
    tags = tracker_for(workdir).client.get_run(resumed.parent_run_id).data.tags
    assert tags["edgeface.machine.cpu"] == first["cpu"]
    assert tags["edgeface.machine.changes"].startswith(f"from round 2: {machines[1]['cpu']}")


def test_resume_rejects_changed_config(quorum_failure, orl_dir: Path) -> None:
    run_dir, _, _, _, _ = quorum_failure
    changed = load_config(overrides={**OVERRIDES, "rounds": 3})
    before = (run_dir / "state.json").read_text()
    with pytest.raises(EdgefaceError, match="config hash"):
        LocalRunner(changed, orl_dir, run_dir, resume=True, progress=False).train()
    assert (run_dir / "state.json").read_text() == before


def test_resume_rejects_locked_run_dir(quorum_failure, orl_dir: Path) -> None:
    import fcntl

    run_dir, _, _, _, _ = quorum_failure
    with open(run_dir / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(EdgefaceError, match="in use by another edgeface process"):
            LocalRunner(tiny_config(), orl_dir, run_dir, resume=True, progress=False).train()


def test_resume_rejects_finished_run(tmp_path: Path, orl_dir: Path) -> None:
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"status": "finished", "rounds_completed": 2}))
    with pytest.raises(EdgefaceError, match="has finished"):
        LocalRunner(tiny_config(), orl_dir, run_dir, resume=True, progress=False).train()


def test_new_run_into_finished_folder(tmp_path: Path, orl_dir: Path) -> None:
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"status": "finished", "rounds_completed": 2}))
    with pytest.raises(EdgefaceError, match="already contains a finished run") as raised:
        LocalRunner(tiny_config(), orl_dir, run_dir, progress=False).train()
    assert "--resume" not in str(raised.value)


def test_new_run_into_interrupted_folder(tmp_path: Path, orl_dir: Path) -> None:
    run_dir = tmp_path / "stopped"
    run_dir.mkdir()
    (run_dir / "state.json").write_text(json.dumps({"status": "interrupted",
                                                    "rounds_completed": 1}))
    with pytest.raises(EdgefaceError, match=f"resume it with `edgeface run --resume {run_dir}`"):
        LocalRunner(tiny_config(), orl_dir, run_dir, progress=False).train()


def test_resume_without_state_explains(tmp_path: Path, orl_dir: Path) -> None:
    with pytest.raises(EdgefaceError, match="no state.json"):
        LocalRunner(tiny_config(), orl_dir, tmp_path / "never-ran", resume=True,
                    progress=False).train()


# --- SIGKILL of the whole run -------------------------------------------------------------


def worker_pids(coordinator: int) -> set[int]:
    """Return the pids of the spawned worker processes whose parent is `coordinator`."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # the process exited while we looked
        if int(fields[1]) == coordinator and b"spawn_main" in cmdline:
            pids.add(int(stat.parent.name))
    return pids


def is_running(pid: int) -> bool:
    """Return True while `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


def start_cli_run(workdir: Path, orl_dir: Path, run_name: str) -> tuple[subprocess.Popen, Path]:
    log = workdir / f"{run_name}.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeface.cli.main", "run", "--data", str(orl_dir), "--out",
         run_name, "--no-progress", *CLI_FLAGS],
        cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
    )
    return process, log


def kill_run(process: subprocess.Popen) -> set[int]:
    """SIGKILL the coordinator; return its workers' pids, after checking that they died too."""
    workers = worker_pids(process.pid)
    process.kill()
    process.wait(timeout=30)
    try:
        wait_until(lambda: not any(is_running(pid) for pid in workers), 20, "workers to exit")
    finally:
        for pid in workers:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
    return workers


def check_consistent(run_dir: Path, workdir: Path) -> dict:
    """Assert that a killed run left a readable state, checkpoint, cache and MLflow store."""
    from edgeface.data.cache import load_cache

    state = read_state(run_dir)
    completed = state["rounds_completed"]
    if completed:
        checkpoint = torch.load(run_dir / "checkpoints" / f"round-{completed - 1:04d}.pt",
                                weights_only=False)
        assert checkpoint["round"] == completed - 1
    for array in (workdir / "cache").glob("*.npy"):
        load_cache(array)
    run = tracker_for(workdir).client.get_run(state["parent_run_id"])
    assert run.info.status == "RUNNING"  # a killed coordinator cannot end its MLflow run
    return state


@pytest.mark.slow
def test_sigkill_during_round_then_resume(
    workdir: Path, orl_dir: Path, reference: TrainingResult
) -> None:
    process, log = start_cli_run(workdir, orl_dir, "killed-in-round")
    try:
        wait_until(lambda: "round 1/2: training" in log.read_text(), 300, "round 1 to start")
        time.sleep(2)  # let the workers get into training
    finally:
        workers = kill_run(process)
    assert len(workers) == 2, log.read_text()[-3000:]
    run_dir = workdir / "killed-in-round"
    state = check_consistent(run_dir, workdir)
    assert state["rounds_completed"] == 0

    resumed = LocalRunner(tiny_config(), orl_dir, run_dir, resume=True, progress=False).train()
    assert resumed.parent_run_id == state["parent_run_id"]
    assert_same_training(resumed, reference)
    assert_same_heads(run_dir, workdir / "reference")
    assert not list(run_dir.rglob(".*.tmp"))


@pytest.mark.slow
def test_sigkill_between_rounds_then_cli_resume(
    workdir: Path, orl_dir: Path, reference: TrainingResult
) -> None:
    run_dir = workdir / "killed-between"
    process, log = start_cli_run(workdir, orl_dir, run_dir.name)
    try:
        wait_until(lambda: (run_dir / "state.json").exists()
                   and read_state(run_dir).get("rounds_completed") == 1, 300,
                   "round 1's checkpoint")
    finally:
        kill_run(process)
    state = check_consistent(run_dir, workdir)
    assert state["rounds_completed"] == 1

    result = subprocess.run(
        [sys.executable, "-m", "edgeface.cli.main", "run", "--resume", str(run_dir),
         "--no-progress"],
        cwd=workdir, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resuming" in result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mlflow"]["run_id"] == state["parent_run_id"]
    expected = reference.evaluation.metrics()
    assert summary["metrics"]["verification_accuracy"] == pytest.approx(
        expected["verification_accuracy_mean"], abs=METRIC_ATOL)
    assert summary["metrics"]["verification_auc"] == pytest.approx(
        expected["verification_auc"], abs=METRIC_ATOL)
    assert_same_heads(run_dir, workdir / "reference")
    assert read_state(run_dir)["status"] == "finished"
