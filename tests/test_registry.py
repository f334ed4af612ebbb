"""Promotion, rollback, locking and `edgeface models` against a real `mlflow server`.

All server tests share the session's lean server (SQLite backend, proxied artifacts) on
127.0.0.1 and use their own registered model name, so they do not depend on each other. Model
versions are registered from a tiny ONNX graph built with onnx.helper: the registry workflow
reads only version tags, so a trained network would only add export time.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from mlflow_server import MlflowServer
from onnx import TensorProto, helper, numpy_helper

from edgeface.cli.main import main
from edgeface.errors import EXIT_TEMPFAIL, RegistryError
from edgeface.registry import (
    ALIAS_STACK_TAG,
    LOCK_EXPIRES_TAG,
    LOCK_MODEL_SUFFIX,
    LOCK_OWNER_TAG,
    describe_version,
    promote,
    read_alias_history,
    register_version,
    registry_lock,
    rollback,
)
from edgeface.tracking import ModelRegistry, ModelVersionInfo, Tracker

IMAGE_SIZE = 16
EMBEDDING_DIM = 4


def write_tiny_embedder(path: Path, seed: int = 0) -> Path:
    """Write an ONNX graph uint8 (N, S, S, 3) `image` -> float32 (N, D) `embedding`."""
    features = IMAGE_SIZE * IMAGE_SIZE * 3
    weights = np.random.default_rng(seed).standard_normal((features, EMBEDDING_DIM))
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["image_float"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["image_float", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weights"], ["embedding"]),
        ],
        "tiny_embedder",
        [helper.make_tensor_value_info("image", TensorProto.UINT8,
                                       ["batch", IMAGE_SIZE, IMAGE_SIZE, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", EMBEDDING_DIM])],
        [numpy_helper.from_array((weights / features).astype(np.float32), "weights"),
         numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def version_tags(accuracy: float, *, parity: bool = True, auc: float = 0.9,
                 protocol: str | None = None,
                 fingerprint: str = "fingerprint-abc") -> dict[str, Any]:
    """Version tags as `edgeface run` writes them, with the given accuracy and parity.

    Without `protocol` the `edgeface.protocol` tag is left out, as in versions registered
    before edgeface wrote it.
    """
    protocol_tag = {} if protocol is None else {"edgeface.protocol": protocol}
    return {
        **protocol_tag,
        "edgeface.metric.verification_accuracy_mean": accuracy,
        "edgeface.metric.verification_auc": auc,
        "edgeface.threshold": 0.42,
        "edgeface.onnx_parity_ok": parity,
        "edgeface.onnx_max_abs_diff": 2e-7 if parity else 0.3,
        "edgeface.dataset_fingerprint": fingerprint,
        "edgeface.config_hash": "cfg0123",
        "edgeface.code_version": "0.1.0",
        "edgeface.partition": "identity",
        "edgeface.rounds": 3,
    }


@pytest.fixture(scope="module")
def tracker(mlflow_server: MlflowServer) -> Tracker:
    return Tracker(mlflow_server.url, "registry-tests")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_embedder(tmp_path_factory.mktemp("registry-onnx") / "tiny.onnx")


@pytest.fixture
def model_name() -> str:
    return f"faces-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def register(tracker: Tracker, onnx_file: Path) -> Callable[..., int]:
    """Return a function that registers a new version with given tags and returns its number."""

    def register_one(name: str, accuracy: float, **options: Any) -> int:
        parent = tracker.start_parent(f"run-{uuid.uuid4().hex[:6]}", {"seed": 0})
        info = register_version(tracker, parent, onnx_file, name, image_size=IMAGE_SIZE,
                                embedding_dim=EMBEDDING_DIM, tags=version_tags(accuracy, **options))
        return info.version

    return register_one


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run `edgeface ARGV` in this process; return the exit code and stdout."""
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Promotion gates
# ---------------------------------------------------------------------------------------------


def test_promote_moves_alias_and_records(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str],
) -> None:
    first = register(model_name, 0.70)
    second = register(model_name, 0.72)

    code, output = cli(capsys, "promote", model_name, "--from", str(first),
                       "--tracking-uri", mlflow_server.url)
    assert code == 0, output
    code, output = cli(capsys, "promote", model_name, "--tracking-uri", mlflow_server.url)
    assert code == 0, output
    assert f"from version {first} to version {second}" in output

    registry = tracker.registry
    assert registry.get_alias_target(model_name, "champion") == second
    assert registry.get_alias_target(model_name, "challenger") == second
    tags = registry.get_version(model_name, second).tags
    assert tags["edgeface.promotion.decision"] == "promoted"
    assert tags["edgeface.promotion.alias"] == "champion"
    assert tags["edgeface.promotion.compared_version"] == str(first)
    assert float(tags["edgeface.promotion.compared_accuracy"]) == 0.70
    assert float(tags["edgeface.promotion.candidate_accuracy"]) == 0.72
    assert tags["edgeface.promotion.failed_gates"] == "none"
    assert read_alias_history(registry, model_name, "champion").stack == [first, second]


def test_promote_rejects_lower_accuracy(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str],
) -> None:
    champion = register(model_name, 0.80)
    promote(tracker.registry, model_name, source=champion)
    challenger = register(model_name, 0.75)

    code, output = cli(capsys, "promote", model_name, "--tracking-uri", mlflow_server.url)
    assert code == 1
    assert "accuracy failed" in output
    assert "0.0500 below the required 0.8000" in output
    assert tracker.registry.get_alias_target(model_name, "champion") == champion
    tags = tracker.registry.get_version(model_name, challenger).tags
    assert tags["edgeface.promotion.decision"] == "rejected"
    assert tags["edgeface.promotion.failed_gates"] == "accuracy"
    assert float(tags["edgeface.promotion.compared_accuracy"]) == 0.80

    code, output = cli(capsys, "promote", model_name, "--max-regression", "0.06",
                       "--tracking-uri", mlflow_server.url)
    assert code == 0, output
    assert tracker.registry.get_alias_target(model_name, "champion") == challenger


def test_promote_rejects_other_evaluation(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str],
) -> None:
    champion = register(model_name, 0.70, protocol="holdout", fingerprint="orl-32px")
    promote(tracker.registry, model_name, source=champion)
    candidate = register(model_name, 0.80, protocol="lfw-view1", fingerprint="lfw-64px")

    code, output = cli(capsys, "promote", model_name, "--tracking-uri", mlflow_server.url)
    assert code == 1, output
    assert "accuracy failed" in output
    assert "protocol 'lfw-view1' versus 'holdout'" in output
    assert "dataset fingerprint 'lfw-64px' versus 'orl-32px'" in output
    assert "--skip-accuracy-gate" in output
    assert tracker.registry.get_alias_target(model_name, "champion") == champion

    code, output = cli(capsys, "promote", model_name, "--skip-accuracy-gate",
                       "--tracking-uri", mlflow_server.url)
    assert code == 0, output
    assert "skipped (--skip-accuracy-gate)" in output
    assert tracker.registry.get_alias_target(model_name, "champion") == candidate


def test_promote_rejects_other_fingerprint_only(
    tracker: Tracker, register: Callable[..., int], model_name: str,
) -> None:
    champion = register(model_name, 0.70, protocol="lfw-view1", fingerprint="lfw-a")
    promote(tracker.registry, model_name, source=champion)
    register(model_name, 0.90, protocol="lfw-view1", fingerprint="lfw-b")

    decision = promote(tracker.registry, model_name)
    assert not decision.accepted
    [failed] = decision.failed_gates
    assert failed.name == "accuracy"
    assert "dataset fingerprint 'lfw-b' versus 'lfw-a'" in failed.detail
    assert "protocol '" not in failed.detail


def test_promote_same_evaluation_compares(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    champion = register(model_name, 0.70, protocol="lfw-view1")
    promote(tracker.registry, model_name, source=champion)
    register(model_name, 0.72, protocol="lfw-view1")

    caplog.clear()
    decision = promote(tracker.registry, model_name)
    assert decision.outcome == "promoted"
    assert "cannot check" not in caplog.text


def test_promote_untagged_versions_warn(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    champion = register(model_name, 0.70)
    promote(tracker.registry, model_name, source=champion)
    register(model_name, 0.72, protocol="lfw-view1")

    caplog.clear()
    decision = promote(tracker.registry, model_name)
    assert decision.outcome == "promoted"
    assert "cannot check that versions" in caplog.text
    assert "edgeface.protocol missing on one of them" in caplog.text


def test_promote_rejects_failed_parity(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str],
) -> None:
    version = register(model_name, 0.99, parity=False)

    code, output = cli(capsys, "promote", model_name, "--format", "json",
                       "--tracking-uri", mlflow_server.url)
    decision = json.loads(output)
    assert code == 1
    assert decision["outcome"] == "rejected"
    failed = [gate for gate in decision["gates"] if not gate["passed"]]
    assert [gate["name"] for gate in failed] == ["onnx_parity"]
    assert "max abs diff 0.3" in failed[0]["detail"]
    assert tracker.registry.get_alias_target(model_name, "champion") is None
    tags = tracker.registry.get_version(model_name, version).tags
    assert tags["edgeface.promotion.failed_gates"] == "onnx_parity"


def test_promote_rejects_nan_metric(
    tracker: Tracker, register: Callable[..., int], model_name: str,
) -> None:
    champion = register(model_name, 0.60)
    promote(tracker.registry, model_name, source=champion)
    register(model_name, 0.90, auc=math.nan)

    decision = promote(tracker.registry, model_name)
    assert not decision.accepted
    assert [gate.name for gate in decision.failed_gates] == ["finite_metrics"]
    assert "edgeface.metric.verification_auc=nan" in decision.failed_gates[0].detail
    assert tracker.registry.get_alias_target(model_name, "champion") == champion


def test_dry_run_changes_nothing(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str],
) -> None:
    registry = tracker.registry
    first, champion = register(model_name, 0.70), register(model_name, 0.75)
    promote(registry, model_name, source=first)
    promote(registry, model_name, source=champion)
    candidate = register(model_name, 0.90)
    before = (registry.get_model_tags(model_name), registry.list_versions(model_name))

    code, output = cli(capsys, "promote", model_name, "--dry-run",
                       "--tracking-uri", mlflow_server.url)
    assert code == 0, output
    assert output.startswith(f"dry run: would move {model_name}@champion from version "
                             f"{champion} to version {candidate}")
    code, output = cli(capsys, "rollback", model_name, "--dry-run",
                       "--tracking-uri", mlflow_server.url)
    assert code == 0, output
    assert f"would move {model_name}@champion back from version {champion} to version {first}" \
        in output

    after = (registry.get_model_tags(model_name), registry.list_versions(model_name))
    assert after == before
    assert registry.get_alias_target(model_name, "champion") == champion
    assert "edgeface.promotion.decision" not in registry.get_version(model_name, candidate).tags


def test_promote_holder_again_is_noop(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str],
) -> None:
    version = register(model_name, 0.70)
    promote(tracker.registry, model_name)
    before = tracker.registry.get_model_tags(model_name)

    code, output = cli(capsys, "promote", model_name, "--tracking-uri", mlflow_server.url)
    assert code == 0
    assert f"already points to version {version}: nothing to do" in output
    assert tracker.registry.get_model_tags(model_name) == before


# ---------------------------------------------------------------------------------------------
# Rollback and alias checks
# ---------------------------------------------------------------------------------------------


def test_rollback_walks_back_history(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = tracker.registry
    versions = [register(model_name, accuracy) for accuracy in (0.70, 0.71, 0.72)]
    for version in versions:
        assert promote(registry, model_name, source=version).outcome == "promoted"

    code, output = cli(capsys, "rollback", model_name, "--to", "champion",
                       "--tracking-uri", mlflow_server.url)
    assert code == 0, output
    assert registry.get_alias_target(model_name, "champion") == versions[1]
    restored = registry.get_version(model_name, versions[1]).tags
    assert restored["edgeface.rollback.replaced_version"] == str(versions[2])
    removed = registry.get_version(model_name, versions[2]).tags
    assert removed["edgeface.rollback.restored_version"] == str(versions[1])

    rollback(registry, model_name)
    assert registry.get_alias_target(model_name, "champion") == versions[0]
    history = read_alias_history(registry, model_name, "champion")
    assert history.stack == [versions[0]]
    assert [entry["action"] for entry in history.log] == ["promote"] * 3 + ["rollback"] * 2

    caplog.clear()
    code, _ = cli(capsys, "rollback", model_name, "--tracking-uri", mlflow_server.url)
    assert code == 2
    assert "no earlier version is recorded" in caplog.text

    # A deleted earlier version cannot be restored, and the alias stays where it is.
    promote(registry, model_name, source=versions[2])
    registry.client.delete_model_version(model_name, str(versions[0]))
    with pytest.raises(RegistryError, match=f"to version {versions[0]}: .*has no version"):
        rollback(registry, model_name)
    assert registry.get_alias_target(model_name, "champion") == versions[2]


def test_rollback_error_messages(
    tracker: Tracker, register: Callable[..., int], model_name: str,
) -> None:
    registry = tracker.registry
    register(model_name, 0.70)
    with pytest.raises(RegistryError, match="is not set, so there is nothing to roll back"):
        rollback(registry, model_name)
    promote(registry, model_name)
    with pytest.raises(RegistryError, match="no earlier version is recorded"):
        rollback(registry, model_name)


@pytest.mark.parametrize("alias", ["latest", "v2", "V10"])
def test_reserved_target_alias_rejected(tracker: Tracker, model_name: str, alias: str) -> None:
    """Reserved names are rejected before the store is read, so no model is needed."""
    with pytest.raises(RegistryError, match="reserved by MLflow"):
        promote(tracker.registry, model_name, alias=alias)
    with pytest.raises(RegistryError, match="reserved by MLflow"):
        rollback(tracker.registry, model_name, alias=alias)


def test_missing_targets_rejected(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str],
) -> None:
    registry = tracker.registry
    version = register(model_name, 0.70)
    with pytest.raises(RegistryError, match="'staging' is neither a version number nor an "
                                            "existing alias"):
        promote(registry, model_name, source="staging")
    with pytest.raises(RegistryError, match=f"has no version {version + 40}"):
        promote(registry, model_name, source=version + 40)
    with pytest.raises(RegistryError, match="not found"):
        promote(registry, f"{model_name}-absent")
    assert registry.get_alias_target(model_name, "champion") is None

    code, _ = cli(capsys, "promote", model_name, "--from", "v1",
                  "--tracking-uri", mlflow_server.url)
    assert code == 2


def test_promote_rejects_alias_case_variant(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = tracker.registry
    champion = register(model_name, 0.70)
    promote(registry, model_name)
    register(model_name, 0.80)

    with pytest.raises(RegistryError, match=f"alias 'Champion' differs only in case from the "
                                            f"existing alias 'champion' of '{model_name}' "
                                            f"\\(version {champion}\\)"):
        promote(registry, model_name, alias="Champion")
    code, _ = cli(capsys, "promote", model_name, "--to", "CHAMPION", "--dry-run",
                  "--tracking-uri", mlflow_server.url)
    assert code == 2
    assert "Use --to champion to move it" in caplog.text
    assert registry.get_aliases(model_name) == {"champion": champion, "challenger": champion + 1}


def test_models_show_unknown_key_lists_aliases(
    register: Callable[..., int], model_name: str, mlflow_server: MlflowServer,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    version = register(model_name, 0.70)

    code, _ = cli(capsys, "models", "show", f"{model_name}/abc",
                  "--tracking-uri", mlflow_server.url)

    assert code == 2
    assert (f"'abc' is neither a version number nor an existing alias of registered model "
            f"'{model_name}' (aliases: challenger -> {version})") in caplog.text


def test_invalid_max_regression(tracker: Tracker, model_name: str) -> None:
    from edgeface.errors import ConfigError

    for bad in (-0.1, math.nan, 2.0):
        with pytest.raises(ConfigError, match="invalid max regression"):
            promote(tracker.registry, model_name, max_regression=bad)


# ---------------------------------------------------------------------------------------------
# Locking and concurrency
# ---------------------------------------------------------------------------------------------


def test_server_lock_excludes_and_releases(tracker: Tracker, model_name: str) -> None:
    registry = tracker.registry
    lock_name = model_name + LOCK_MODEL_SUFFIX
    with registry_lock(registry, model_name) as owner:
        assert registry.get_model_tags(lock_name)[LOCK_OWNER_TAG] == owner
        started = time.monotonic()
        with pytest.raises(RegistryError, match="timed out after 1 s") as raised:
            with registry_lock(registry, model_name, timeout_s=1.0):
                pass
        assert time.monotonic() - started >= 1.0
        assert f"held by {owner} until 20" in str(raised.value)
        assert f"delete the registered model {lock_name!r}" in str(raised.value)
    with pytest.raises(RegistryError, match="not found"):
        registry.get_model_tags(lock_name)


def test_server_lock_takes_over_expired(tracker: Tracker, model_name: str) -> None:
    registry = tracker.registry
    lock_name = model_name + LOCK_MODEL_SUFFIX
    created = registry.create_model_if_absent(
        lock_name, {LOCK_OWNER_TAG: "crashed-client", LOCK_EXPIRES_TAG: time.time() - 1.0}
    )
    assert created
    with registry_lock(registry, model_name, timeout_s=10.0) as owner:
        assert registry.get_model_tags(lock_name)[LOCK_OWNER_TAG] == owner


def test_lock_create_release_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lock released between a failed insert and MLflow's read-back is not an error.

    MLflow's SQL store, the backend of `mlflow server` with a database URI, reads the existing
    model back after a failed insert. Here the holder's release lands between the two.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = ModelRegistry(uri)
    lock_name = "faces" + LOCK_MODEL_SUFFIX
    assert registry.create_model_if_absent(lock_name, {LOCK_OWNER_TAG: "holder"})

    store = registry.client._get_registry_client().store
    read_back = store.get_registered_model
    released: list[str] = []

    def release_then_read(name: str) -> Any:
        store.delete_registered_model(name)
        released.append(name)
        return read_back(name)

    monkeypatch.setattr(store, "get_registered_model", release_then_read)
    assert not registry.create_model_if_absent(lock_name, {LOCK_OWNER_TAG: "second"})
    monkeypatch.undo()
    assert released == [lock_name]
    assert registry.create_model_if_absent(lock_name, {LOCK_OWNER_TAG: "second"})
    assert registry.get_model_tags(lock_name)[LOCK_OWNER_TAG] == "second"


def test_models_list_hides_lock_models(
    tracker: Tracker, model_name: str, mlflow_server: MlflowServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tracker.registry.ensure_registered_model(model_name)
    with registry_lock(tracker.registry, model_name):
        code, output = cli(capsys, "models", "list", "--format", "json",
                           "--tracking-uri", mlflow_server.url)
    names = [model["name"] for model in json.loads(output)]
    assert code == 0
    assert model_name in names
    assert not [name for name in names if name.endswith(LOCK_MODEL_SUFFIX)]


def test_concurrent_promotions_keep_best(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    mlflow_server: MlflowServer,
) -> None:
    """Two clients promote different versions at once; the better one must end up champion."""
    champion = register(model_name, 0.70)
    promote(tracker.registry, model_name, source=champion)
    weaker, stronger = register(model_name, 0.80), register(model_name, 0.85)
    barrier = threading.Barrier(2)
    outcomes: dict[int, str] = {}
    errors: list[BaseException] = []

    def promote_in_thread(version: int) -> None:
        try:
            registry = ModelRegistry(mlflow_server.url)  # one client per thread
            barrier.wait(timeout=30)
            outcomes[version] = promote(registry, model_name, source=version).outcome
        except BaseException as error:  # collected and re-raised in the test thread
            errors.append(error)

    threads = [threading.Thread(target=promote_in_thread, args=(v,)) for v in (weaker, stronger)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert outcomes[stronger] == "promoted"
    assert outcomes[weaker] in ("promoted", "rejected")
    assert tracker.registry.get_alias_target(model_name, "champion") == stronger
    stack = read_alias_history(tracker.registry, model_name, "champion").stack
    expected = [champion, weaker, stronger] if outcomes[weaker] == "promoted" \
        else [champion, stronger]
    assert stack == expected


def test_concurrent_registration_one_version(
    tracker: Tracker, onnx_file: Path, model_name: str, mlflow_server: MlflowServer,
) -> None:
    parent = tracker.start_parent("retried-run", {"seed": 0})
    first = register_version(tracker, parent, onnx_file, model_name, image_size=IMAGE_SIZE,
                             embedding_dim=EMBEDDING_DIM, tags=version_tags(0.7))
    again = register_version(tracker, parent, onnx_file, model_name, image_size=IMAGE_SIZE,
                             embedding_dim=EMBEDDING_DIM, tags=version_tags(0.7))
    assert again.version == first.version

    racing_parent = tracker.start_parent("racing-run", {"seed": 1})
    barrier = threading.Barrier(2)
    versions: list[int] = []
    errors: list[BaseException] = []

    def register_in_thread() -> None:
        try:
            own = Tracker(mlflow_server.url, "registry-tests")
            barrier.wait(timeout=30)
            info = register_version(own, racing_parent, onnx_file, model_name,
                                    image_size=IMAGE_SIZE, embedding_dim=EMBEDDING_DIM,
                                    tags=version_tags(0.7))
            versions.append(info.version)
        except BaseException as error:  # collected and re-raised in the test thread
            errors.append(error)

    threads = [threading.Thread(target=register_in_thread) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors, errors
    assert len(versions) == 2
    assert versions[0] == versions[1]
    registered = [v for v in tracker.registry.list_versions(model_name)
                  if v.tags.get("edgeface.parent_run_id") == racing_parent]
    assert [v.version for v in registered] == [versions[0]]


def test_file_lock_excludes_second_holder(tmp_path: Path) -> None:
    """The flock beside a SQLite store blocks a second holder, in this process too."""
    # A SQLite lock needs only the store's URI, and a real client would create the database.
    registry = SimpleNamespace(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with registry_lock(registry, "faces") as owner:
        lock_file = tmp_path / "mlflow.db.registry.lock"
        assert lock_file.read_text().strip() == owner
        with pytest.raises(RegistryError, match=f"held by {owner}"):
            with registry_lock(registry, "faces", timeout_s=0.5):
                pass
    with registry_lock(registry, "faces", timeout_s=0.5):
        pass


def _promote_in_process(uri: str, name: str, version: int, start_at: float) -> str:
    time.sleep(max(0.0, start_at - time.time()))
    return promote(ModelRegistry(uri), name, source=version).outcome


@pytest.mark.slow
def test_sqlite_file_lock_across_processes(tmp_path: Path, onnx_file: Path) -> None:
    """Two processes promote at once against one SQLite store, serialised by the file lock.

    Slow because each spawned process imports mlflow before the promotions start.
    """
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = Tracker(uri, "file-lock")
    name = "faces-sqlite"
    versions = []
    for accuracy in (0.70, 0.80, 0.85):
        parent = local.start_parent(f"run-{accuracy}", {"seed": 0})
        versions.append(register_version(local, parent, onnx_file, name, image_size=IMAGE_SIZE,
                                         embedding_dim=EMBEDDING_DIM,
                                         tags=version_tags(accuracy)).version)
    promote(local.registry, name, source=versions[0])

    start_at = time.time() + 12.0  # both processes import mlflow first
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        jobs = [(uri, name, versions[1], start_at), (uri, name, versions[2], start_at)]
        results = pool.starmap(_promote_in_process, jobs)
    assert results[1] == "promoted"
    assert local.registry.get_alias_target(name, "champion") == versions[2]
    tags = local.registry.get_model_tags(name)
    stack = json.loads(tags[ALIAS_STACK_TAG.format(alias="champion")])
    assert stack[-1] == versions[2]
    assert (tmp_path / "mlflow.db.registry.lock").is_file()


# ---------------------------------------------------------------------------------------------
# edgeface models list / show
# ---------------------------------------------------------------------------------------------


def test_models_list_and_show(
    tracker: Tracker, register: Callable[..., int], model_name: str,
    mlflow_server: MlflowServer, capsys: pytest.CaptureFixture[str],
) -> None:
    first = register(model_name, 0.70)
    promote(tracker.registry, model_name)
    second = register(model_name, 0.74)

    code, output = cli(capsys, "models", "list", model_name, "--format", "json",
                       "--tracking-uri", mlflow_server.url)
    assert code == 0
    listed = {item["version"]: item for item in json.loads(output)}
    assert sorted(listed) == [first, second]
    assert listed[first]["aliases"] == ["champion"]
    assert listed[second]["aliases"] == ["challenger"]
    assert listed[second]["metrics"]["verification_accuracy_mean"] == 0.74
    assert listed[second]["lineage"]["dataset_fingerprint"] == "fingerprint-abc"
    assert listed[second]["lineage"]["config_hash"] == "cfg0123"
    assert listed[second]["lineage"]["rounds"] == 3
    assert listed[second]["onnx"]["parity_ok"] is True

    code, output = cli(capsys, "models", "show", f"{model_name}@champion", "--format", "json",
                       "--tracking-uri", mlflow_server.url)
    described = json.loads(output)
    assert code == 0
    assert described["version"] == first
    assert described["promotion"]["decision"] == "promoted"
    assert described["threshold"] == 0.42

    code, output = cli(capsys, "models", "show", f"{model_name}/{second}",
                       "--tracking-uri", mlflow_server.url)
    assert code == 0
    assert f"{model_name} version {second} (aliases: challenger)" in output
    assert "parity_ok: True" in output

    code, output = cli(capsys, "models", "list", model_name, "--tracking-uri", mlflow_server.url)
    assert code == 0
    assert "0.7400" in output


def test_models_commands_reject_missing_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _ = cli(capsys, "models", "list")
    assert code == 2
    assert not (tmp_path / "mlflow.db").exists()
    assert f"MLflow store not found at {tmp_path / 'mlflow.db'}" in caplog.text
    assert "pass --tracking-uri" in caplog.text


def test_missing_store_names_given_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The error names the --tracking-uri value and does not suggest passing the flag."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    database = tmp_path / "x" / "nosuch.db"
    uri = f"sqlite:///{database}"

    code, _ = cli(capsys, "models", "list", "--tracking-uri", uri)

    assert code == 2
    assert not database.exists()
    assert f"--tracking-uri {uri} names {database}, which does not exist" in caplog.text
    assert "Check the path" in caplog.text
    assert "`edgeface run`" in caplog.text
    assert "pass --tracking-uri" not in caplog.text


def test_missing_store_names_environment_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    database = tmp_path / "nosuch.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")

    code, _ = cli(capsys, "models", "show", "edgeface")

    assert code == 2
    assert f"MLFLOW_TRACKING_URI=sqlite:///{database} names {database}" in caplog.text
    assert "set MLFLOW_TRACKING_URI" not in caplog.text


# Accuracy deltas of the int8 variant for the versions of `local_store`, in order.
INT8_DELTAS = (0.005333333333, -0.002, 0.0)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory, onnx_file: Path) -> str:
    """Return the URI of a SQLite store with model `faces-local`: three versions carrying
    int8 and fp32 tags as `edgeface run` writes them, one per delta in INT8_DELTAS."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('local-store') / 'mlflow.db'}"
    local = Tracker(uri, "models-output")
    for index, delta in enumerate(INT8_DELTAS):
        parent = local.start_parent(f"run-{index}", {"seed": index})
        int8_tags = {
            "edgeface.int8.method": "static",
            "edgeface.int8.artifact": "edgeface.int8.onnx",
            "edgeface.int8.verification_accuracy": 0.8 + delta,
            "edgeface.int8.accuracy_delta": delta,
            "edgeface.int8.latency_p50_ms": 1.25,
            "edgeface.int8.size_bytes": 4096,
            "edgeface.int8.calibration_images": 64,
            "edgeface.int8.threshold": 0.41,
            "edgeface.fp32.latency_p50_ms": 2.5,
            "edgeface.fp32.size_bytes": 16384,
        }
        register_version(local, parent, onnx_file, "faces-local", image_size=IMAGE_SIZE,
                         embedding_dim=EMBEDDING_DIM,
                         tags={**version_tags(0.8), **int8_tags})
    return uri


def test_promote_lock_timeout_exit_status(
    local_store: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    """A lock held past --lock-timeout exits with 75 (retry later), not 2 (invalid input)."""
    with registry_lock(ModelRegistry(local_store), "faces-local"):
        code, _ = cli(capsys, "promote", "faces-local", "--from", "1", "--to", "champion",
                      "--lock-timeout", "0.5", "--tracking-uri", local_store)
    assert code == EXIT_TEMPFAIL
    assert "timed out after 0.5 s" in caplog.text
    code, _ = cli(capsys, "promote", "faces-local", "--from", "99", "--to", "champion",
                  "--tracking-uri", local_store)
    assert code == 2


def test_models_list_int8_delta_column(
    local_store: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Every int8 delta has a sign and four decimals, whatever the tag's digits."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    code, output = cli(capsys, "models", "list", "faces-local", "--tracking-uri", local_store)

    assert code == 0
    header, *rows = output.splitlines()
    assert len(rows) == len(INT8_DELTAS)
    column = header.index("int8 delta")
    deltas = {int(row.split()[0]): row[column:column + len("int8 delta")].strip()
              for row in rows}
    assert deltas == {1: "+0.0053", 2: "-0.0020", 3: "+0.0000"}


def test_models_show_json_numbers(
    local_store: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Numeric tags become JSON numbers, and text tags stay strings."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    code, output = cli(capsys, "models", "show", "faces-local/1", "--format", "json",
                       "--tracking-uri", local_store)

    assert code == 0
    described = json.loads(output)
    int8, fp32 = described["int8"], described["fp32"]
    assert int8["accuracy_delta"] == pytest.approx(INT8_DELTAS[0])
    assert isinstance(int8["accuracy_delta"], float)
    assert int8["verification_accuracy"] == pytest.approx(0.8 + INT8_DELTAS[0])
    assert int8["latency_p50_ms"] == 1.25
    assert int8["threshold"] == 0.41
    assert int8["size_bytes"] == 4096
    assert isinstance(int8["size_bytes"], int)
    assert int8["calibration_images"] == 64
    assert int8["method"] == "static"
    assert int8["artifact"] == "edgeface.int8.onnx"
    assert fp32 == {"latency_p50_ms": 2.5, "size_bytes": 16384}
    assert described["onnx"]["image_size"] == IMAGE_SIZE
    assert described["onnx"]["embedding_dim"] == EMBEDDING_DIM
    assert described["lineage"]["rounds"] == 3
    assert described["lineage"]["code_version"] == "0.1.0"
    assert described["metrics"]["verification_accuracy_mean"] == 0.8


def test_describe_version_keeps_unparsable_tags() -> None:
    """A numeric field whose tag is not a number keeps the stored string."""
    info = ModelVersionInfo(
        name="faces", version=1, model_uri="models:/faces/1", run_id=None,
        tags={"edgeface.int8.size_bytes": "unknown", "edgeface.int8.latency_p50_ms": "0.5",
              "edgeface.int8.error": "cannot load", "edgeface.rounds": "3.5"},
    )

    described = describe_version(info)

    assert described["int8"] == {"size_bytes": "unknown", "latency_p50_ms": 0.5,
                                 "error": "cannot load"}
    assert described["lineage"]["rounds"] == "3.5"


def test_models_show_closed_pipe_quiet(local_store: str, tmp_path: Path) -> None:
    """A reader that closes stdout early (`| head`) gets no traceback and status 141."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeface.cli.main", "models", "show", "faces-local/1",
         "--format", "json", "--tracking-uri", local_store],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    # The child needs seconds to import MLflow, so the pipe is closed before it writes.
    process.stdout.close()
    try:
        stderr = process.stderr.read().decode()
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()

    assert code == 141, stderr
    assert "Traceback" not in stderr
    assert "BrokenPipeError" not in stderr


# ---------------------------------------------------------------------------------------------
# edgeface ui
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ui_serves_local_store(tmp_path: Path, onnx_file: Path) -> None:
    """`edgeface ui` serves the SQLite store on 127.0.0.1 until it gets SIGINT (20-40 s)."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    from conftest import restore_default_sigint
    from mlflow_server import free_port

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local = Tracker(uri, "ui")
    parent = local.start_parent("ui-run", {"seed": 0})
    register_version(local, parent, onnx_file, "faces-ui", image_size=IMAGE_SIZE,
                     embedding_dim=EMBEDDING_DIM, tags=version_tags(0.7))
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeface.cli.main", "ui", "--port", str(port)], cwd=tmp_path,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        preexec_fn=restore_default_sigint,
    )
    try:
        line = process.stdout.readline()
        assert re.search(rf"at http://127\.0\.0\.1:{port} \(server pid \d+\)", line), line
        search = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models/search"
        with urllib.request.urlopen(search, timeout=30) as response:
            names = [m["name"] for m in json.load(response)["registered_models"]]
        assert names == ["faces-ui"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
    finally:
        # SIGTERM lets `edgeface ui` stop its server; SIGKILL would leave the server running.
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
