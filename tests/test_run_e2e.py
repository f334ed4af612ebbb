"""End-to-end `edgeface run` on ORL: real images, worker processes, MLflow, ONNX Runtime."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN_FLAGS = ["--nodes", "2", "--rounds", "2", "--image-size", "32", "--batch-size", "32",
             "--local-epochs", "1", "--no-progress"]


def run_edgeface(args: list[str], cwd: Path, env_extra: dict | None = None,
                 timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           "EDGEFACE_CACHE_DIR": str(cwd / "cache"), **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "edgeface.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished_run(orl_dir: Path, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp("e2e")
    # The TorchScript exporter here; the other end-to-end runs use the default dynamo exporter.
    result = run_edgeface(["run", "--data", str(orl_dir), "--out", "run1", *RUN_FLAGS,
                           "--exporter", "torchscript"], workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, result


def test_run_writes_summary(finished_run) -> None:
    workdir, result = finished_run
    summary = json.loads((workdir / "run1" / "summary.json").read_text())
    metrics = summary["metrics"]
    assert 0.5 <= metrics["verification_accuracy"] <= 1.0
    assert metrics["verification_std"] >= 0.0
    assert 0.0 <= metrics["identification_top1"] <= 1.0
    assert summary["rounds_completed"] == 2
    assert [n["name"] for n in summary["nodes"]] == ["node-0", "node-1"]
    assert sum(n["samples"] for n in summary["nodes"]) > 0
    assert summary["onnx"]["parity_ok"] is True
    assert summary["onnx"]["max_abs_diff"] < 1e-3
    assert Path(summary["onnx"]["path"]).is_file()
    assert summary["onnx"]["exporter"] == "torchscript"
    assert "torchscript exporter" in result.stderr
    assert summary["mlflow"]["model_version"] == 1
    for stage in ("plan", "partition", "validate_and_cache", "train", "aggregate", "evaluate",
                  "export", "register", "total", "rounds", "node_training"):
        assert stage in summary["timings"], stage
    timings = summary["timings"]
    # The nodes' training time is part of the rounds, which are part of the whole run.
    assert 0.0 < timings["node_training"] / 2 <= timings["rounds"] <= timings["total"]
    assert "summary:" in result.stdout
    assert "MLflow:" in result.stdout


def test_run_registers_challenger(finished_run) -> None:
    from edgeface.tracking import ModelRegistry

    workdir, _ = finished_run
    summary = json.loads((workdir / "run1" / "summary.json").read_text())
    registry = ModelRegistry(summary["mlflow"]["tracking_uri"])
    version = registry.get_version("edgeface", "challenger")
    assert version.version == 1
    assert version.tags["edgeface.dataset_fingerprint"] == summary["dataset_fingerprint"]
    assert version.tags["edgeface.config_hash"] == summary["config_hash"]
    assert version.tags["edgeface.parent_run_id"] == summary["mlflow"]["run_id"]


def test_run_ends_node_runs(finished_run) -> None:
    from edgeface.tracking import Tracker

    workdir, _ = finished_run
    summary = json.loads((workdir / "run1" / "summary.json").read_text())
    tracker = Tracker(summary["mlflow"]["tracking_uri"], "edgeface")
    children = tracker.find_child_runs(summary["mlflow"]["run_id"])
    assert sorted(children) == ["node-0", "node-1"]
    for run_id in children.values():
        assert tracker.client.get_run(run_id).info.status == "FINISHED"


def test_run_records_machine(finished_run) -> None:
    """The run names its processor and torch version: a seeded run repeats only with both."""
    import torch

    from edgeface.tracking import Tracker

    workdir, result = finished_run
    summary = json.loads((workdir / "run1" / "summary.json").read_text())
    machine = summary["machine"]
    assert machine["torch"] == torch.__version__
    assert machine["cores"] >= 1
    assert machine["cpu"]
    assert summary["machines"] == [{"first_round": 0, **machine}]
    tracker = Tracker(summary["mlflow"]["tracking_uri"], "edgeface")
    tags = tracker.client.get_run(summary["mlflow"]["run_id"]).data.tags
    assert tags["edgeface.machine.cpu"] == machine["cpu"]
    assert tags["edgeface.machine.torch"] == torch.__version__
    assert f"on {machine['cpu']} with torch" in result.stderr


def test_run_version_warm_starts(finished_run, tmp_path: Path) -> None:
    """The version carries backbone.pt, so a pipeline run can start from it."""
    import torch

    from edgeface import registry, steps
    from edgeface.config import load_config

    workdir, _ = finished_run
    summary = json.loads((workdir / "run1" / "summary.json").read_text())
    config = load_config(None, {"nodes": 2, "image-size": 32})
    seeded = steps.initial_state(config)
    state, source = registry.warm_start_state(summary["mlflow"]["tracking_uri"], "edgeface",
                                              "challenger", seeded, tmp_path)
    assert source == "models:/edgeface/1"
    final = torch.load(workdir / "run1" / "model" / registry.BACKBONE_FILE, weights_only=True)
    assert sorted(state) == sorted(seeded)
    assert all(torch.equal(state[key], final[key]) for key in final)
    assert not all(torch.equal(state[key], seeded[key]) for key in seeded)


def test_warm_start_rejects_other_architecture(finished_run, tmp_path: Path) -> None:
    from edgeface import registry, steps
    from edgeface.config import load_config

    workdir, _ = finished_run
    summary = json.loads((workdir / "run1" / "summary.json").read_text())
    wider = steps.initial_state(load_config(None, {"image-size": 32, "embedding-dim": 64}))
    state, source = registry.warm_start_state(summary["mlflow"]["tracking_uri"], "edgeface",
                                              "challenger", wider, tmp_path)
    assert state is wider
    assert "does not fit" in source


def test_run_writes_partition_report(finished_run) -> None:
    workdir, _ = finished_run
    report = json.loads((workdir / "run1" / "partition.json").read_text())
    assert report["strategy"] == "identity"
    assert len(report["nodes"]) == 2
    manifests = sorted((workdir / "run1" / "manifests").glob("node-*.json"))
    assert len(manifests) == 2


def test_run_refuses_existing_run_dir(finished_run, orl_dir: Path) -> None:
    workdir, _ = finished_run
    before = (workdir / "run1" / "summary.json").read_text()
    result = run_edgeface(["run", "--data", str(orl_dir), "--out", "run1", *RUN_FLAGS], workdir)
    assert result.returncode == 2
    assert "run1 already contains a finished run" in result.stderr
    assert "choose a new --out folder" in result.stderr
    # A finished run cannot be resumed, so the message does not suggest it.
    assert "--resume" not in result.stderr
    assert (workdir / "run1" / "summary.json").read_text() == before


def test_run_without_data_explains_fetch(tmp_path: Path) -> None:
    env = {"EDGEFACE_DATA": ""}
    result = run_edgeface(["run", "--out", "x"], tmp_path, env_extra=env)
    assert result.returncode == 2
    assert "edgeface data fetch lfw" in result.stderr


def test_run_rejects_bad_flags_at_once(tmp_path: Path, orl_dir: Path) -> None:
    result = run_edgeface(["run", "--data", str(orl_dir), "--nodes", "0", "--partition", "bogus",
                           "--lr", "-1"], tmp_path)
    assert result.returncode == 2
    for key in ("partition.nodes", "partition.strategy", "train.lr"):
        assert key in result.stderr, key
    assert not (tmp_path / "runs").exists()
