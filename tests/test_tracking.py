"""Tests of edgeface.tracking against real MLflow stores, a real server and real onnxruntime.

Most tests share one SQLite store per module, because creating a store runs MLflow's schema
migrations (about 3 s). Each registry test uses its own model name, so version numbers do not
depend on test order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlflow_server import MlflowServer
from onnx import TensorProto, helper, numpy_helper

from edgeface.config import load_config
from edgeface.errors import ConfigError, RegistryError
from edgeface.tracking import (
    HTTP_ENV_DEFAULTS,
    LOGGED_MODEL_VERSION_TAG,
    MLFLOW_PARENT_RUN_TAG,
    NONFINITE_TAG_PREFIX,
    PARENT_RUN_VERSION_TAG,
    ModelRegistry,
    Tracker,
    TrackingError,
    check_alias,
    check_onnx_io,
    default_artifact_location,
    download_model,
    flatten_params,
    redact_uri,
    register_onnx_model,
    resolve_tracking_uri,
)

IMAGE_SIZE = 8
EMBEDDING_DIM = 4
VERSION_TAGS = {"edgeface.dataset_fingerprint": "lfw-abc123", "edgeface.config_hash": "cfg42"}


def tiny_embedder(path: Path, image_size: int = IMAGE_SIZE, embedding_dim: int = EMBEDDING_DIM,
                  seed: int = 0) -> Path:
    """Write an ONNX graph uint8 (N, S, S, 3) `image` -> float32 (N, D) `embedding`.

    The graph casts, flattens and multiplies by a seeded weight matrix. The weights are larger
    than onnx's 1 KiB external-data threshold, so MLflow stores them in a separate file.
    """
    features = image_size * image_size * 3
    weights = np.random.default_rng(seed).standard_normal((features, embedding_dim))
    initializers = [
        numpy_helper.from_array((weights / features).astype(np.float32), "weights"),
        numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
    ]
    nodes = [
        helper.make_node("Cast", ["image"], ["image_float"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["image_float", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weights"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_embedder",
        [helper.make_tensor_value_info("image", TensorProto.UINT8,
                                       ["batch", image_size, image_size, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", embedding_dim])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def run_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"image": images})[0]


def sample_images(batch: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tracking-workdir")


@pytest.fixture(scope="module")
def tracker(workdir: Path) -> Iterator[Tracker]:
    """Tracker on the default SQLite store of `workdir`, as `edgeface run` would build it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        uri = resolve_tracking_uri(None, workdir)
        yield Tracker(uri, "edgeface-tests")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_embedder(tmp_path_factory.mktemp("onnx") / "embedder.onnx")


@pytest.fixture
def clean_http_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the HTTP retry variables; whatever the test sets is removed afterwards."""
    for name in HTTP_ENV_DEFAULTS:
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("uri", "expected"), [
    ("http://user:secret@host:5000/path", "http://***@host:5000/path"),
    ("https://token@mlflow.example.com", "https://***@mlflow.example.com"),
    ("http://host:5000", "http://host:5000"),
    ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),
    ("databricks", "databricks"),
])
def test_redact_uri_hides_credentials(uri: str, expected: str) -> None:
    assert redact_uri(uri) == expected


def test_resolve_uri_prefers_explicit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_resolve_uri_uses_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5001"


def test_resolve_uri_defaults_to_absolute_sqlite(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    uri = resolve_tracking_uri(None, Path("work"))
    assert uri == f"sqlite:///{tmp_path.resolve() / 'work' / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")
    assert default_artifact_location(uri) == str(tmp_path.resolve() / "work" / "mlartifacts")


@pytest.mark.parametrize("bad", ["", "   ", "mlruns", "./store/mlflow.db"])
def test_resolve_uri_rejects_bare_paths(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sqlite:///"):
        resolve_tracking_uri(bad, tmp_path)


def test_artifact_location_only_for_sqlite() -> None:
    assert default_artifact_location("http://127.0.0.1:5000") is None
    assert default_artifact_location("sqlite:///:memory:") is None
    assert default_artifact_location("sqlite:////data/run/mlflow.db") == "/data/run/mlartifacts"


def test_flatten_params_nested_and_typed() -> None:
    config = {
        "model": {"arch": "mobilefacenet", "embedding-dim": 128, "width": 0.5},
        "federation": {"nodes": ["edge-0", "edge-1"], "quorum": None, "secure": False},
        "data": {"root": Path("/data/lfw"), "extra": {}},
        "seed": 7,
    }
    assert flatten_params(config) == {
        "model.arch": "mobilefacenet",
        "model.embedding-dim": "128",
        "model.width": "0.5",
        "federation.nodes": '["edge-0", "edge-1"]',
        "federation.quorum": "null",
        "federation.secure": "false",
        "data.root": "/data/lfw",
        "data.extra": "{}",
        "seed": "7",
    }


@pytest.mark.parametrize("alias", ["latest", "Latest", "v1", "V12"])
def test_check_alias_rejects_reserved(alias: str) -> None:
    with pytest.raises(RegistryError, match="reserved"):
        check_alias(alias)


@pytest.mark.parametrize("alias", ["has space", "a/b", ""])
def test_check_alias_rejects_bad_characters(alias: str) -> None:
    with pytest.raises(RegistryError, match="invalid alias"):
        check_alias(alias)


def test_check_alias_accepts_ordinary_names() -> None:
    for alias in ("challenger", "champion", "v1-candidate", "prod_2"):
        check_alias(alias)


def test_check_onnx_io_accepts_matching_graph(onnx_file: Path) -> None:
    check_onnx_io(onnx.load(str(onnx_file)), IMAGE_SIZE, EMBEDDING_DIM)


def test_check_onnx_io_rejects_wrong_sizes(onnx_file: Path) -> None:
    model = onnx.load(str(onnx_file))
    with pytest.raises(RegistryError, match="'embedding' is FLOAT"):
        check_onnx_io(model, IMAGE_SIZE, EMBEDDING_DIM + 1)
    with pytest.raises(RegistryError, match="'image' is UINT8"):
        check_onnx_io(model, IMAGE_SIZE * 2, EMBEDDING_DIM)


def test_check_onnx_io_rejects_wrong_names(tmp_path: Path, onnx_file: Path) -> None:
    model = onnx.load(str(onnx_file))
    model.graph.output[0].name = "features"
    with pytest.raises(RegistryError, match="no tensor named 'embedding'"):
        check_onnx_io(model, IMAGE_SIZE, EMBEDDING_DIM)


# ---------------------------------------------------------------------------------------------
# Runs on a SQLite store
# ---------------------------------------------------------------------------------------------


def test_experiment_artifacts_under_workdir(tracker: Tracker, workdir: Path) -> None:
    experiment = tracker.client.get_experiment(tracker.experiment_id)
    assert experiment.name == "edgeface-tests"
    assert experiment.artifact_location == str(workdir.resolve() / "mlartifacts")


def test_tracker_reuses_existing_experiment(tracker: Tracker) -> None:
    again = Tracker(tracker.tracking_uri, tracker.experiment_name)
    assert again.experiment_id == tracker.experiment_id


def test_tracker_rejects_deleted_experiment(tracker: Tracker) -> None:
    doomed = Tracker(tracker.tracking_uri, "edgeface-deleted")
    tracker.client.delete_experiment(doomed.experiment_id)
    with pytest.raises(TrackingError, match="mlflow experiments restore"):
        Tracker(tracker.tracking_uri, "edgeface-deleted")


def test_parent_and_child_runs(tracker: Tracker) -> None:
    parent = tracker.start_parent("fedavg-3-nodes", {"rounds": 3}, {"edgeface.code_version": "abc"})
    first = tracker.start_child("edge-0")
    second = tracker.start_child("edge-1")
    client = tracker.client

    assert tracker.parent_run_id == parent
    assert first != second
    for child, node in ((first, "edge-0"), (second, "edge-1")):
        run = client.get_run(child)
        assert run.data.tags[MLFLOW_PARENT_RUN_TAG] == parent
        assert run.data.tags["edgeface.node"] == node
        assert run.info.run_name == node
        assert run.info.experiment_id == tracker.experiment_id
    parent_run = client.get_run(parent)
    assert parent_run.info.run_name == "fedavg-3-nodes"
    assert parent_run.data.tags["edgeface.code_version"] == "abc"
    assert MLFLOW_PARENT_RUN_TAG not in parent_run.data.tags


def test_start_child_reuses_node_run(tracker: Tracker) -> None:
    parent = tracker.start_parent("reuse", {})
    child = tracker.start_child("edge-0")
    tracker.end_run(child, "FAILED")

    again = tracker.start_child("edge-0", parent_run_id=parent)
    assert again == child
    assert tracker.client.get_run(child).info.status == "RUNNING"


def test_start_child_rejects_unsafe_node_name(tracker: Tracker) -> None:
    tracker.start_parent("unsafe-node", {})
    with pytest.raises(ConfigError, match="invalid node name"):
        tracker.start_child("edge'0")


def test_end_run_statuses(tracker: Tracker) -> None:
    parent = tracker.start_parent("statuses", {})
    killed = tracker.start_child("edge-9")
    tracker.end_run(killed, "KILLED")
    tracker.end_run(parent)
    assert tracker.client.get_run(killed).info.status == "KILLED"
    assert tracker.client.get_run(parent).info.status == "FINISHED"
    with pytest.raises(ValueError, match="invalid run status 'DONE'"):
        tracker.end_run(parent, "DONE")  # type: ignore[arg-type]


def test_log_metrics_batches_per_step(tracker: Tracker) -> None:
    run_id = tracker.start_parent("metrics", {})
    for step in range(3):
        tracker.log_metrics(run_id, {"loss": 1.0 / (step + 1), "accuracy": 0.5 + step / 10}, step)

    history = tracker.client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    accuracy = tracker.client.get_metric_history(run_id, "accuracy")
    assert [m.step for m in accuracy] == [0, 1, 2]
    # One batch per step: both metrics of a step share one timestamp.
    assert [m.timestamp for m in history] == [m.timestamp for m in accuracy]


def test_log_metrics_skips_nonfinite(
    tracker: Tracker, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = tracker.start_parent("nonfinite", {})
    with caplog.at_level(logging.WARNING, logger="edgeface.tracking"):
        tracker.log_metrics(run_id, {"loss": math.nan, "grad_norm": math.inf, "lr": 0.1}, 4)

    run = tracker.client.get_run(run_id)
    assert run.data.metrics == {"lr": 0.1}
    assert run.data.tags[f"{NONFINITE_TAG_PREFIX}loss"] == "nan at step 4"
    assert run.data.tags[f"{NONFINITE_TAG_PREFIX}grad_norm"] == "inf at step 4"
    assert "skipped non-finite metric values" in caplog.text
    assert "'loss'" in caplog.text


def test_log_metrics_rejects_non_numbers(tracker: Tracker) -> None:
    run_id = tracker.start_parent("non-numeric", {})
    with pytest.raises(TypeError, match="metric 'loss'"):
        tracker.log_metrics(run_id, {"loss": "low"}, 0)  # type: ignore[dict-item]


def test_log_params_flattens_config(tracker: Tracker) -> None:
    config = {"train": {"lr": 0.05, "epochs": 2}, "nodes": ["edge-0", "edge-1"]}
    run_id = tracker.start_parent("params", config)
    params = tracker.client.get_run(run_id).data.params
    assert params == {"train.lr": "0.05", "train.epochs": "2", "nodes": '["edge-0", "edge-1"]'}


def test_log_params_records_spreadout(tracker: Tracker) -> None:
    config = load_config(overrides={"spreadout": True, "spreadout-lr": 0.2})
    run_id = tracker.start_parent("spreadout", config.to_dict())
    tracker.log_metrics(run_id, {"spreadout_max_cosine_after": 0.1}, 0)
    run = tracker.client.get_run(run_id)
    assert run.data.params["federation.spreadout"] == "true"
    assert run.data.params["federation.spreadout-lr"] == "0.2"
    assert run.data.params["federation.spreadout-margin"] == "1.4142"
    assert run.data.metrics["spreadout_max_cosine_after"] == pytest.approx(0.1)


def test_log_params_truncates_long_values(
    tracker: Tracker, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = tracker.start_parent("long-params", {})
    with caplog.at_level(logging.WARNING, logger="edgeface.tracking"):
        logged = tracker.log_params(run_id, {"notes": "x" * 7000})
    stored = tracker.client.get_run(run_id).data.params["notes"]
    assert len(stored) == 6000
    assert stored.endswith("...[truncated]")
    assert logged["notes"] == stored
    assert "over MLflow's limit" in caplog.text


def test_log_params_rejects_changed_values(tracker: Tracker) -> None:
    run_id = tracker.start_parent("immutable", {"train": {"lr": 0.1}})
    tracker.log_params(run_id, {"train": {"lr": 0.1}, "seed": 1})
    with pytest.raises(TrackingError, match=r"train\.lr: '0\.1' -> '0\.2'"):
        tracker.log_params(run_id, {"train": {"lr": 0.2}})


def test_resume_parent_run(tracker: Tracker) -> None:
    run_id = tracker.start_parent("resumable", {"rounds": 2})
    tracker.end_run(run_id, "FAILED")

    resumed = tracker.start_parent("resumable", {"rounds": 2}, {"edgeface.resumed": "1"},
                                   resume_run_id=run_id)
    run = tracker.client.get_run(run_id)
    assert resumed == run_id
    assert tracker.parent_run_id == run_id
    assert run.info.status == "RUNNING"
    assert run.data.tags["edgeface.resumed"] == "1"


def test_resume_rejects_unknown_and_child_runs(tracker: Tracker) -> None:
    parent = tracker.start_parent("resume-errors", {})
    child = tracker.start_child("edge-0")
    with pytest.raises(TrackingError, match="not found"):
        tracker.start_parent("x", {}, resume_run_id="0" * 32)
    with pytest.raises(TrackingError, match=f"child run of {parent}"):
        tracker.start_parent("x", {}, resume_run_id=child)


def test_resume_rejects_changed_config(tracker: Tracker) -> None:
    run_id = tracker.start_parent("resume-config", {"rounds": 2})
    tracker.end_run(run_id, "FAILED")
    with pytest.raises(TrackingError, match="rounds: '2' -> '5'"):
        tracker.start_parent("resume-config", {"rounds": 5}, resume_run_id=run_id)
    # A rejected resume leaves the run as it was.
    assert tracker.client.get_run(run_id).info.status == "FAILED"


def test_log_artifact_file_and_folder(tracker: Tracker, tmp_path: Path) -> None:
    run_id = tracker.start_parent("artifacts", {})
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"accuracy": 0.9}))
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "partition.json").write_text("{}")
    (reports / "nodes.csv").write_text("node,samples\nedge-0,10\n")

    tracker.log_artifact(run_id, summary)
    tracker.log_artifact(run_id, reports, artifact_path="reports")

    client = tracker.client
    assert [a.path for a in client.list_artifacts(run_id)] == ["reports", "summary.json"]
    assert sorted(a.path for a in client.list_artifacts(run_id, "reports")) == [
        "reports/nodes.csv", "reports/partition.json",
    ]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tracker.log_artifact(run_id, tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# Model registry on a SQLite store
# ---------------------------------------------------------------------------------------------


def register(tracker: Tracker, parent: str, onnx_path: Path, name: str, **kwargs: object):
    return register_onnx_model(
        tracker, parent, onnx_path, name, image_size=IMAGE_SIZE, embedding_dim=EMBEDDING_DIM,
        tags=VERSION_TAGS, **kwargs,  # type: ignore[arg-type]
    )


def test_register_creates_version_alias_tags(tracker: Tracker, onnx_file: Path) -> None:
    parent = tracker.start_parent("register-1", {})
    info = register(tracker, parent, onnx_file, "embedder-a")

    assert info.name == "embedder-a"
    assert info.version == 1
    assert info.model_uri == "models:/embedder-a/1"
    assert info.run_id == parent
    assert info.aliases == ("challenger",)
    assert info.tags[PARENT_RUN_VERSION_TAG] == parent
    assert info.tags["edgeface.dataset_fingerprint"] == "lfw-abc123"
    assert info.tags["edgeface.config_hash"] == "cfg42"
    assert info.tags["edgeface.image_size"] == str(IMAGE_SIZE)
    assert info.tags["edgeface.embedding_dim"] == str(EMBEDDING_DIM)
    assert tracker.registry.get_alias_target("embedder-a", "challenger") == 1


def test_register_logs_model_in_parent_experiment(
    tracker: Tracker, onnx_file: Path, workdir: Path
) -> None:
    parent = tracker.start_parent("register-location", {})
    register(tracker, parent, onnx_file, "embedder-location")

    version = tracker.client.get_model_version("embedder-location", "1")
    logged = tracker.client.get_logged_model(version.tags[LOGGED_MODEL_VERSION_TAG])
    assert version.source == logged.artifact_location
    assert logged.experiment_id == tracker.experiment_id
    assert logged.source_run_id == parent
    assert str(logged.status) == "READY"
    assert logged.artifact_location.startswith(str(workdir.resolve() / "mlartifacts"))
    run_outputs = tracker.client.get_run(parent).outputs.model_outputs
    assert [output.model_id for output in run_outputs] == [logged.model_id]


def test_register_writes_signature_and_providers(
    tracker: Tracker, onnx_file: Path, tmp_path: Path
) -> None:
    parent = tracker.start_parent("register-signature", {})
    register(tracker, parent, onnx_file, "embedder-signature")

    downloaded = download_model(tracker.tracking_uri, "models:/embedder-signature/1", tmp_path)
    mlmodel = mlflow.models.Model.load(str(downloaded / "MLmodel"))
    signature = mlmodel.signature.to_dict()
    assert json.loads(signature["inputs"]) == [{
        "name": "image", "type": "tensor",
        "tensor-spec": {"dtype": "uint8", "shape": [-1, IMAGE_SIZE, IMAGE_SIZE, 3]},
    }]
    assert json.loads(signature["outputs"]) == [{
        "name": "embedding", "type": "tensor",
        "tensor-spec": {"dtype": "float32", "shape": [-1, EMBEDDING_DIM]},
    }]
    assert mlmodel.flavors["onnx"]["providers"] == ["CPUExecutionProvider"]
    assert mlmodel.metadata == {"image_size": IMAGE_SIZE, "embedding_dim": EMBEDDING_DIM}
    requirements = (downloaded / "requirements.txt").read_text().split()
    assert f"onnxruntime=={ort.__version__}" in requirements
    assert f"onnx=={onnx.__version__}" in requirements
    assert f"mlflow=={mlflow.__version__}" in requirements


def test_register_is_idempotent_per_parent(tracker: Tracker, onnx_file: Path) -> None:
    parent = tracker.start_parent("register-twice", {})
    first = register(tracker, parent, onnx_file, "embedder-b")
    second = register(tracker, parent, onnx_file, "embedder-b")

    assert second == first
    assert [v.version for v in tracker.registry.list_versions("embedder-b")] == [1]


def test_second_parent_moves_alias(tracker: Tracker, onnx_file: Path, tmp_path: Path) -> None:
    first_parent = tracker.start_parent("register-c1", {})
    second_parent = tracker.start_parent("register-c2", {})
    other_weights = tiny_embedder(tmp_path / "other.onnx", seed=5)

    first = register(tracker, first_parent, onnx_file, "embedder-c")
    second = register(tracker, second_parent, other_weights, "embedder-c")

    assert (first.version, second.version) == (1, 2)
    assert second.run_id == second_parent
    assert tracker.registry.get_alias_target("embedder-c", "challenger") == 2
    versions = tracker.registry.list_versions("embedder-c")
    assert [(v.version, v.aliases) for v in versions] == [(1, ()), (2, ("challenger",))]


def test_retry_completes_interrupted_promotion(tracker: Tracker, onnx_file: Path) -> None:
    registry = tracker.registry
    old_parent = tracker.start_parent("register-d1", {})
    parent = tracker.start_parent("register-d2", {})
    register(tracker, old_parent, onnx_file, "embedder-d")
    register(tracker, parent, onnx_file, "embedder-d")
    # A step that crashed after creating version 2 but before moving the alias.
    registry.set_alias("embedder-d", "challenger", 1)

    retried = register(tracker, parent, onnx_file, "embedder-d")

    assert retried.version == 2
    assert registry.get_alias_target("embedder-d", "challenger") == 2
    assert len(registry.list_versions("embedder-d")) == 2


def test_retry_leaves_newer_alias_alone(tracker: Tracker, onnx_file: Path) -> None:
    registry = tracker.registry
    old_parent = tracker.start_parent("register-e1", {})
    new_parent = tracker.start_parent("register-e2", {})
    register(tracker, old_parent, onnx_file, "embedder-e")
    register(tracker, new_parent, onnx_file, "embedder-e")

    retried = register(tracker, old_parent, onnx_file, "embedder-e")

    assert retried.version == 1
    assert registry.get_alias_target("embedder-e", "challenger") == 2


def test_register_rejects_reserved_alias(tracker: Tracker, onnx_file: Path) -> None:
    parent = tracker.start_parent("register-reserved", {})
    for alias in ("latest", "v3"):
        with pytest.raises(RegistryError, match="reserved"):
            register(tracker, parent, onnx_file, "embedder-reserved", alias=alias)
    # Validation happens before anything is logged or registered.
    assert tracker.client.search_registered_models("name = 'embedder-reserved'") == []
    assert tracker.client.get_run(parent).outputs.model_outputs == []


def test_register_rejects_mismatched_graph(tracker: Tracker, onnx_file: Path) -> None:
    parent = tracker.start_parent("register-mismatch", {})
    with pytest.raises(RegistryError, match="embedding_dim \\(16\\)"):
        register_onnx_model(tracker, parent, onnx_file, "embedder-mismatch",
                            image_size=IMAGE_SIZE, embedding_dim=16, tags={})
    with pytest.raises(RegistryError, match="not found"):
        register(tracker, parent, onnx_file.with_name("absent.onnx"), "embedder-mismatch")
    with pytest.raises(RegistryError, match="invalid image_size 0"):
        register_onnx_model(tracker, parent, onnx_file, "embedder-mismatch",
                            image_size=0, embedding_dim=EMBEDDING_DIM, tags={})


def test_registered_model_matches_original(
    tracker: Tracker, onnx_file: Path, tmp_path: Path
) -> None:
    parent = tracker.start_parent("register-parity", {})
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"lfw_accuracy": 0.91}))
    register(tracker, parent, onnx_file, "embedder-f", extra_files=[summary])

    folder = download_model(tracker.tracking_uri, "models:/embedder-f@challenger",
                            tmp_path / "download")

    assert json.loads((folder / "extra_files" / "summary.json").read_text()) == {
        "lfw_accuracy": 0.91
    }
    # The weights were saved as external data beside the graph.
    assert len(list(folder.glob("*.data"))) == 1
    for batch in (1, 3):
        images = sample_images(batch)
        registered = run_onnx(folder / "model.onnx", images)
        original = run_onnx(onnx_file, images)
        assert registered.shape == (batch, EMBEDDING_DIM)
        assert registered.dtype == np.float32
        np.testing.assert_array_equal(registered, original)


def test_get_version_by_alias_number_latest(tracker: Tracker, onnx_file: Path) -> None:
    registry = tracker.registry
    for run_name in ("register-g1", "register-g2"):
        register(tracker, tracker.start_parent(run_name, {}), onnx_file, "embedder-g")
    registry.set_alias("embedder-g", "champion", 1)

    assert registry.get_version("embedder-g", "champion").version == 1
    assert registry.get_version("embedder-g", "challenger").version == 2
    assert registry.get_version("embedder-g", 1).aliases == ("champion",)
    assert registry.get_version("embedder-g", "2").aliases == ("challenger",)
    assert registry.get_version("embedder-g", "latest").version == 2


def test_set_version_tags(tracker: Tracker, onnx_file: Path) -> None:
    register(tracker, tracker.start_parent("register-h", {}), onnx_file, "embedder-h")
    tracker.registry.set_version_tags("embedder-h", 1, {"edgeface.lfw_accuracy": 0.93})
    assert tracker.registry.get_version("embedder-h", 1).tags["edgeface.lfw_accuracy"] == "0.93"


def test_registry_lookup_errors(tracker: Tracker, onnx_file: Path) -> None:
    registry = tracker.registry
    register(tracker, tracker.start_parent("register-i", {}), onnx_file, "embedder-i")

    with pytest.raises(RegistryError, match="registered model 'no-such-model' not found"):
        registry.get_version("no-such-model", 1)
    with pytest.raises(RegistryError, match=r"'Challenger' is neither a version number nor an "
                       r"existing alias.*\(aliases: challenger -> 1\)"):
        registry.get_version("embedder-i", "Challenger")
    with pytest.raises(RegistryError, match="has no version 7"):
        registry.get_version("embedder-i", 7)
    with pytest.raises(RegistryError, match="reserved"):
        registry.set_alias("embedder-i", "latest", 1)
    assert registry.get_alias_target("embedder-i", "champion") is None


def test_registry_without_experiment(tracker: Tracker, onnx_file: Path) -> None:
    register(tracker, tracker.start_parent("register-j", {}), onnx_file, "embedder-j")
    registry = ModelRegistry(tracker.tracking_uri)
    assert [v.version for v in registry.list_versions("embedder-j")] == [1]


# ---------------------------------------------------------------------------------------------
# Real MLflow server and a dead one
# ---------------------------------------------------------------------------------------------


# Marked slow because `mlflow server --workers 1` took 19-38 s to respond to /health on a loaded
# 2-core machine (about 10-13 s of CPU time), over the 15 s budget for default tests.
@pytest.mark.slow
def test_register_against_server(
    mlflow_server: MlflowServer, onnx_file: Path, tmp_path: Path, clean_http_env: None
) -> None:
    tracker = Tracker(mlflow_server.url, "edgeface-server-tests")
    parent = tracker.start_parent("server-run", {"train": {"lr": 0.1}})
    child = tracker.start_child("edge-0")
    tracker.log_metrics(child, {"loss": 0.7, "bad": math.nan}, step=0)

    first = register(tracker, parent, onnx_file, "embedder-server")
    again = register(tracker, parent, onnx_file, "embedder-server")
    folder = download_model(mlflow_server.url, "models:/embedder-server@challenger",
                            tmp_path / "download")
    tracker.end_run(child)
    tracker.end_run(parent)

    assert first == again
    assert first.version == 1
    assert first.aliases == ("challenger",)
    assert tracker.registry.get_alias_target("embedder-server", "challenger") == 1
    assert tracker.client.get_run(child).data.metrics == {"loss": 0.7}
    assert tracker.client.get_run(parent).data.params == {"train.lr": "0.1"}
    # Artifacts are proxied into the server's own folder, not written by the client.
    assert list(mlflow_server.artifacts_dir.rglob("model.onnx"))
    images = sample_images(2)
    np.testing.assert_array_equal(run_onnx(folder / "model.onnx", images),
                                  run_onnx(onnx_file, images))


def test_dead_server_fails_fast(clean_http_env: None) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"server at {uri} is unreachable"):
        Tracker(uri, "edgeface-dead")
    elapsed = time.monotonic() - started

    assert elapsed < 20, f"dead server took {elapsed:.1f} s to fail"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "30"


def test_http_defaults_respect_user_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(TrackingError):
        Tracker(f"http://127.0.0.1:{closed_port()}", "edgeface-dead")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"


def test_import_does_not_load_mlflow() -> None:
    code = "import sys, edgeface.tracking; print('mlflow' in sys.modules, 'onnx' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert result.stdout.split() == ["False", "False"]
