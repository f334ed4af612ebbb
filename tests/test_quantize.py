"""int8 variants: quantization, measured accuracy delta and latency, and their MLflow record.

The model is the seeded tiny MobileFaceNet of test_inference (exported once per session). The
evaluation plan is the holdout protocol on the real ORL faces, preprocessed at 32 px.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from mlflow_server import MlflowServer
from test_inference import CROP, EMBEDDING_DIM, IMAGE_SIZE, TinyModel, export_tiny_model

from edgeface.config import load_config
from edgeface.data.cache import PreprocessSpec, build_cache, load_cache
from edgeface.data.ingest import list_images, resolve_images_root
from edgeface.data.protocol import EvaluationPlan, make_plan
from edgeface.errors import ExportError
from edgeface.evaluation import evaluate_plan
from edgeface.inference import open_session, run_session
from edgeface.model import InferenceModel
from edgeface.quantize import (
    Int8Report,
    VariantMeasurement,
    build_int8_variant,
    calibration_sample,
    choose_variant,
    int8_speed_warning,
)
from edgeface.registry import register_version
from edgeface.runner import LocalRunner
from edgeface.steps import EvaluationSet
from edgeface.tracking import Tracker


@dataclass(frozen=True)
class Evaluation:
    plan: EvaluationPlan
    images: np.ndarray
    index: dict[str, int]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return export_tiny_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def evaluation(orl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Evaluation:
    root = resolve_images_root(orl_dir)
    plan = make_plan(orl_dir, root, list_images(root), "holdout", seed=0)
    cache = build_cache(root, plan.eval_records(), PreprocessSpec(IMAGE_SIZE, CROP),
                        tmp_path_factory.mktemp("orl-cache"), progress=False)
    images, records = load_cache(cache.path)
    return Evaluation(plan, np.asarray(images), {r.path: i for i, r in enumerate(records)})


@pytest.fixture(scope="module")
def int8_report(tiny_model: TinyModel, evaluation: Evaluation,
                tmp_path_factory: pytest.TempPathFactory) -> Int8Report:
    out_dir = tmp_path_factory.mktemp("int8")
    return build_int8_variant(tiny_model.onnx_path, evaluation.plan, evaluation.images,
                              evaluation.index, out_dir, methods=("dynamic", "static"))


def oracle_accuracy(path: Path, evaluation: Evaluation) -> float:
    """Verification accuracy of an ONNX file, scored directly with edgeface.evaluation."""
    embeddings = run_session(open_session(path), evaluation.images)
    result = evaluate_plan(evaluation.plan,
                           lambda records: embeddings[[evaluation.index[r.path] for r in records]])
    return result.verification.accuracy_mean


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_fp32_embeddings_match_pytorch(int8_report: Int8Report, tiny_model: TinyModel,
                                       evaluation: Evaluation) -> None:
    with torch.no_grad():
        images = torch.from_numpy(evaluation.images.copy())
        reference = InferenceModel(tiny_model.backbone())(images)
    np.testing.assert_allclose(int8_report.fp32_embeddings, reference.numpy(), atol=1e-5)
    assert int8_report.fp32.accuracy_delta == 0.0


def test_variants_are_quantized(int8_report: Int8Report) -> None:
    by_method = {item.method: item for item in int8_report.candidates}
    assert sorted(by_method) == ["dynamic", "static"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(by_method["static"].path)
    assert "ConvInteger" in op_types(by_method["dynamic"].path)
    for item in int8_report.candidates:
        assert item.size_bytes < int8_report.fp32.size_bytes


def test_threshold_measured_per_variant(int8_report: Int8Report, evaluation: Evaluation) -> None:
    """Each variant's accuracy is measured at the threshold chosen for its own embeddings."""
    from edgeface.quantize import plan_verification

    for item in (int8_report.fp32, *int8_report.candidates):
        embeddings = run_session(open_session(item.path), evaluation.images)
        verification = plan_verification(evaluation.plan, embeddings, evaluation.index)
        assert item.threshold == pytest.approx(verification.threshold)
        assert item.to_dict()["threshold"] == item.threshold


def test_accuracy_delta_measured(int8_report: Int8Report, evaluation: Evaluation) -> None:
    fp32_accuracy = oracle_accuracy(int8_report.fp32.path, evaluation)
    assert int8_report.fp32.verification_accuracy == pytest.approx(fp32_accuracy, abs=1e-12)
    for item in int8_report.candidates:
        accuracy = oracle_accuracy(item.path, evaluation)
        assert item.verification_accuracy == pytest.approx(accuracy, abs=1e-12)
        assert item.accuracy_delta == pytest.approx(accuracy - fp32_accuracy, abs=1e-12)
        assert 0.0 < item.latency_p50_ms < 1000.0


def test_int8_embeddings_close_to_fp32(int8_report: Int8Report, evaluation: Evaluation) -> None:
    fp32 = int8_report.fp32_embeddings
    for item in int8_report.candidates:
        quantized = run_session(open_session(item.path), evaluation.images)
        cosine = np.sum(quantized * fp32, axis=1) / np.linalg.norm(quantized, axis=1)
        assert float(np.median(cosine)) > 0.9, item.method


def test_int8_file_labelled_int8(int8_report: Int8Report, tiny_model: TinyModel) -> None:
    from edgeface.inference import resolve_model

    assert resolve_model(str(int8_report.chosen.path)).variant == "int8"
    for candidate in int8_report.candidates:
        assert resolve_model(str(candidate.path)).variant == "int8"
    assert resolve_model(str(tiny_model.onnx_path)).variant == "fp32"


def test_chosen_file_is_a_candidate(int8_report: Int8Report) -> None:
    chosen = int8_report.chosen
    assert chosen.path.name == "model.int8.onnx"
    source = next(item for item in int8_report.candidates if item.method == chosen.method)
    assert chosen.path.read_bytes() == source.path.read_bytes()
    assert choose_variant(int8_report.candidates).method == chosen.method


def test_choose_variant_rule() -> None:
    def measured(method: str, accuracy: float, latency: float) -> VariantMeasurement:
        return VariantMeasurement(method, Path(f"{method}.onnx"), 1, accuracy, 0.0, latency)

    slow_best = measured("dynamic", 0.900, 20.0)
    fast_close = measured("static", 0.897, 4.0)
    fast_worse = measured("static", 0.880, 4.0)
    assert choose_variant([slow_best, fast_close]).method == "static"
    assert choose_variant([slow_best, fast_worse]).method == "dynamic"
    assert choose_variant([slow_best, fast_close], tolerance=0.001).method == "dynamic"
    with pytest.raises(ValueError, match="at least one candidate"):
        choose_variant([])


def test_int8_speed_warning_margin() -> None:
    fp32 = VariantMeasurement("fp32", Path("fp32.onnx"), 1_634_068, 0.846, 0.0, 0.710)
    slower = VariantMeasurement("static", Path("static.onnx"), 699_055, 0.837, -0.009, 0.730)
    within_noise = replace(slower, latency_p50_ms=0.690)
    faster = replace(slower, latency_p50_ms=0.500)
    warning = int8_speed_warning(slower, fp32)
    assert warning is not None
    assert "not 5% faster" in warning
    assert "0.730 ms against 0.710 ms" in warning
    assert "43% of fp32's" in warning
    assert "Deploy the fp32 model" in warning
    assert int8_speed_warning(within_noise, fp32) is not None
    assert int8_speed_warning(faster, fp32) is None
    assert int8_speed_warning(within_noise, fp32, margin=0.0) is None


def test_calibration_avoids_test_pairs(evaluation: Evaluation) -> None:
    sample = calibration_sample(evaluation.plan, evaluation.images, evaluation.index, count=40)
    tested = {record.path for fold in evaluation.plan.test_folds for pair in fold
              for record in (pair.a, pair.b)}
    allowed = [row for path, row in evaluation.index.items() if path not in tested]
    assert len(sample) == 40
    allowed_images = {evaluation.images[row].tobytes() for row in allowed}
    assert all(image.tobytes() in allowed_images for image in sample)


def test_unknown_method_rejected(tiny_model: TinyModel, evaluation: Evaluation,
                                 tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="invalid int8 methods"):
        build_int8_variant(tiny_model.onnx_path, evaluation.plan, evaluation.images,
                           evaluation.index, tmp_path, methods=("float16",))


def register_tiny_model(tiny_model: TinyModel, mlflow_server: MlflowServer, tmp_path: Path,
                        name: str, tags: dict) -> tuple:
    """Register a copy of the tiny model as `name`; return (tracker, parent, onnx_path, version)."""
    tracker = Tracker(mlflow_server.url, "quantize-tests")
    parent = tracker.start_parent(name, {"seed": 0})
    onnx_path = tmp_path / "model" / "edgeface.onnx"
    onnx_path.parent.mkdir()
    onnx_path.write_bytes(tiny_model.onnx_path.read_bytes())
    version = register_version(tracker, parent, onnx_path, name, image_size=IMAGE_SIZE,
                               embedding_dim=EMBEDDING_DIM, tags=tags)
    return tracker, parent, onnx_path, version


def test_int8_recorded_in_mlflow(
    tiny_model: TinyModel, evaluation: Evaluation, mlflow_server: MlflowServer,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lfw_dir: Path,
) -> None:
    """The runner's int8 step logs the file and metrics and tags the registered version."""
    tracker, parent, onnx_path, version = register_tiny_model(
        tiny_model, mlflow_server, tmp_path, "faces-int8",
        {"edgeface.threshold": 0.3, "edgeface.crop": json.dumps(list(CROP))})
    runner = LocalRunner(load_config(None, {"rounds": 1, "image-size": IMAGE_SIZE}), tmp_path,
                         tmp_path)
    evaluation_set = EvaluationSet(evaluation.plan, evaluation.images, evaluation.index)

    report = runner._publish_int8(tracker, parent, version, onnx_path, evaluation_set)

    assert report is not None and report.chosen.method == "static"
    tags = tracker.registry.get_version("faces-int8", version.version).tags
    assert tags["edgeface.int8.method"] == "static"
    assert tags["edgeface.int8.artifact"] == "edgeface.int8.onnx"
    assert float(tags["edgeface.int8.accuracy_delta"]) == pytest.approx(
        report.chosen.accuracy_delta)
    assert float(tags["edgeface.int8.latency_p50_ms"]) > 0
    assert float(tags["edgeface.int8.threshold"]) == pytest.approx(report.chosen.threshold)
    assert float(tags["edgeface.fp32.latency_p50_ms"]) > 0
    metrics = tracker.client.get_run(parent).data.metrics
    assert metrics["int8_static_accuracy_delta"] == pytest.approx(report.chosen.accuracy_delta)
    assert metrics["int8_static_latency_p50_ms"] > 0
    artifacts = [item.path for item in tracker.client.list_artifacts(parent)]
    assert "edgeface.int8.onnx" in artifacts

    # An edge device picks the int8 file through the registry.
    from edgeface.inference import Embedder, resolve_model, verify_files

    monkeypatch.setenv("EDGEFACE_CACHE_DIR", str(tmp_path / "cache"))
    source = resolve_model("models:/faces-int8@challenger", tracking_uri=mlflow_server.url,
                           variant="int8")
    assert source.onnx_path.read_bytes() == report.chosen.path.read_bytes()
    assert source.threshold == pytest.approx(report.chosen.threshold)
    a = lfw_dir / "lfw-deepfunneled" / "Tony_Blair" / "Tony_Blair_0001.jpg"
    b = lfw_dir / "lfw-deepfunneled" / "Tony_Blair" / "Tony_Blair_0002.jpg"
    int8_outcome = verify_files(Embedder(source), a, b, 0.3)
    fp32_source = resolve_model("models:/faces-int8@challenger", tracking_uri=mlflow_server.url)
    assert fp32_source.threshold == 0.3
    fp32_outcome = verify_files(Embedder(fp32_source), a, b, 0.3)
    assert int8_outcome.similarity == pytest.approx(fp32_outcome.similarity, abs=0.1)


def test_int8_failure_becomes_version_tag(
    tiny_model: TinyModel, evaluation: Evaluation, mlflow_server: MlflowServer, tmp_path: Path,
) -> None:
    """A quantization failure becomes the version tag edgeface.int8.error, not a failed run."""
    tracker, parent, onnx_path, version = register_tiny_model(
        tiny_model, mlflow_server, tmp_path, "faces-int8-failure", {"edgeface.threshold": 0.3})
    runner = LocalRunner(load_config(None, {"rounds": 1, "image-size": IMAGE_SIZE}), tmp_path,
                         tmp_path)
    onnx_path.write_bytes(b"not an ONNX model")  # broken after registration
    evaluation_set = EvaluationSet(evaluation.plan, evaluation.images, evaluation.index)

    assert runner._publish_int8(tracker, parent, version, onnx_path, evaluation_set) is None
    tags = tracker.registry.get_version("faces-int8-failure", version.version).tags
    assert "cannot load" in tags["edgeface.int8.error"]
    assert "edgeface.int8.method" not in tags
