"""int8 variants of an exported embedding model, measured against the fp32 model.

Two onnxruntime quantizations are built and measured:

- `dynamic`: int8 weights, activations quantized at run time (`quantize_dynamic`). Convolutions
  become ConvInteger.
- `static`: int8 weights and activations in QDQ format (`quantize_static`), with activation
  ranges calibrated on real preprocessed faces.

Each variant's verification accuracy is measured on the same evaluation pairs as the fp32 model,
and its latency as the median (p50) of single-image runs on one thread. `choose_variant` keeps
the most accurate one, or the faster one when their accuracies differ by at most a tolerance.

`edgeface run` builds only the static variant (`DEFAULT_METHODS`). Measured on a randomly
initialised 64 px MobileFaceNet (width 1.0) on LFW View 1 (4,992 images), on a shared 2-core
machine with onnxruntime 1.32: both variants were within 0.01 of fp32 accuracy, but the dynamic
one ran at 20.6 ms p50 against 7.7 ms for fp32 and 4-8 ms for static, and scoring its
evaluation images took 230 s against 45 s for static.

This module never imports torch.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeface.errors import ExportError
from edgeface.evaluation import VerificationResult, evaluate_plan
from edgeface.inference import INT8_THRESHOLD_TAG, open_session, run_session

if TYPE_CHECKING:
    from edgeface.data.ingest import ImageRecord
    from edgeface.data.protocol import EvaluationPlan

logger = logging.getLogger(__name__)

METHODS = ("dynamic", "static")
DEFAULT_METHODS = ("static",)
# Operators to quantize. The graph starts with a Transpose and a Cast of the uint8 input,
# which must stay as they are.
STATIC_OPS = ["Conv", "Gemm", "MatMul", "Add"]
DYNAMIC_OPS = ["Conv", "MatMul"]
CALIBRATION_IMAGES = 64
# Accuracy difference (fraction of pairs) below which the faster variant wins.
DEFAULT_TOLERANCE = 0.005
LATENCY_RUNS = 50
LATENCY_WARMUP = 5
# Fraction by which int8 must beat fp32's p50 latency before the run counts it as faster. On a
# 2-core VM the p50 of 50 single-image runs moved by up to 5% between measurements of one file.
INT8_SPEED_MARGIN = 0.05


@dataclass(frozen=True)
class VariantMeasurement:
    """One ONNX file of the model measured on the evaluation pairs.

    `accuracy_delta` is this variant's verification accuracy minus the fp32 model's (negative
    means worse). `latency_p50_ms` is the median milliseconds of one single-image run.
    `threshold` is the cosine-similarity threshold chosen for this file's own embeddings, the
    one its accuracy was measured with; None where it was not measured.
    """

    method: str
    path: Path
    size_bytes: int
    verification_accuracy: float
    accuracy_delta: float
    latency_p50_ms: float
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "path": str(self.path), "size_bytes": self.size_bytes,
                "verification_accuracy": self.verification_accuracy,
                "accuracy_delta": self.accuracy_delta, "latency_p50_ms": self.latency_p50_ms,
                "threshold": self.threshold}


@dataclass(frozen=True)
class Int8Report:
    """The fp32 baseline, every int8 candidate, the chosen one, and the fp32 embeddings.

    `fp32_embeddings` are the onnxruntime fp32 embeddings of the evaluation images, rows in
    the order of the `images` given to `build_int8_variant`.
    """

    fp32: VariantMeasurement
    candidates: tuple[VariantMeasurement, ...]
    chosen: VariantMeasurement
    calibration_images: int
    fp32_embeddings: np.ndarray

    def metrics(self) -> dict[str, float]:
        """Return run metrics: each variant's accuracy, delta, latency and size."""
        metrics = {"onnx_fp32_verification_accuracy": self.fp32.verification_accuracy,
                   "onnx_fp32_latency_p50_ms": self.fp32.latency_p50_ms}
        for item in self.candidates:
            prefix = f"int8_{item.method}"
            metrics[f"{prefix}_verification_accuracy"] = item.verification_accuracy
            metrics[f"{prefix}_accuracy_delta"] = item.accuracy_delta
            metrics[f"{prefix}_latency_p50_ms"] = item.latency_p50_ms
            metrics[f"{prefix}_size_bytes"] = float(item.size_bytes)
        return metrics

    def version_tags(self, artifact_path: str) -> dict[str, Any]:
        """Return `edgeface.int8.*` version tags describing the chosen file at `artifact_path`."""
        chosen = self.chosen
        tags = {
            "edgeface.int8.method": chosen.method,
            "edgeface.int8.artifact": artifact_path,
            "edgeface.int8.verification_accuracy": chosen.verification_accuracy,
            "edgeface.int8.accuracy_delta": chosen.accuracy_delta,
            "edgeface.int8.latency_p50_ms": chosen.latency_p50_ms,
            "edgeface.int8.size_bytes": chosen.size_bytes,
            "edgeface.int8.calibration_images": self.calibration_images,
            "edgeface.fp32.latency_p50_ms": self.fp32.latency_p50_ms,
            "edgeface.fp32.size_bytes": self.fp32.size_bytes,
        }
        if chosen.threshold is not None:
            tags[INT8_THRESHOLD_TAG] = chosen.threshold
        return tags


# --------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------


@contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """Raise the root logger to ERROR while onnxruntime quantizes.

    onnxruntime.quantization (1.32) logs one INFO or WARNING line per tensor through the root
    logger, hundreds per model, which would bury the run's own log.
    """
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_dynamic_int8(source: Path, target: Path) -> Path:
    """Write a dynamically quantized copy of `source` (int8 weights) to `target`.

    Raises:
        ExportError: onnxruntime could not quantize the model.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_root_logger():
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                             op_types_to_quantize=DYNAMIC_OPS)
    except (ValueError, RuntimeError, KeyError) as error:
        raise ExportError(f"dynamic int8 quantization of {source} failed: {error}") from error
    return target


class _FaceCalibrationReader:
    """Calibration data reader that feeds uint8 faces to `quantize_static`, one per batch."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self._batches = iter([{input_name: images[i:i + 1]} for i in range(len(images))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        raise NotImplementedError("calibration runs once")


def quantize_static_int8(source: Path, target: Path, calibration: np.ndarray) -> Path:
    """Write a QDQ int8 copy of `source` to `target`, calibrated on uint8 (N, S, S, 3) faces.

    Weights are quantized per channel to int8, activations to uint8 with MinMax ranges. The
    model is first optimized with `quant_pre_process`, without symbolic shape inference, which
    fails on the Expand node of the exported graph in onnxruntime 1.32.

    Raises:
        ExportError: no calibration images, or onnxruntime could not quantize the model.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if len(calibration) == 0:
        raise ExportError("static int8 quantization needs calibration images, got none")
    target.parent.mkdir(parents=True, exist_ok=True)
    input_name = open_session(source).get_inputs()[0].name
    reader = _FaceCalibrationReader(input_name, calibration)
    with tempfile.TemporaryDirectory(prefix="edgeface-quant-") as folder:
        prepared = Path(folder) / "prepared.onnx"
        try:
            with _quiet_root_logger():
                quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
                quantize_static(
                    str(prepared), str(target), reader, quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=STATIC_OPS,
                )
        except (ValueError, RuntimeError, KeyError) as error:
            raise ExportError(f"static int8 quantization of {source} failed: {error}") from error
    return target


def calibration_sample(
    plan: EvaluationPlan, images: np.ndarray, index: Mapping[str, int],
    count: int = CALIBRATION_IMAGES, seed: int = 0,
) -> np.ndarray:
    """Pick up to `count` evaluation faces for calibration, avoiding test-pair images.

    Images outside the test pairs (threshold pairs of LFW View 1, the gallery of the holdout
    protocol) are used when there are at least `min(count, 16)` of them. Otherwise the sample
    comes from all evaluation images, which then calibrate on the faces they are scored on.
    """
    tested = {record.path for fold in plan.test_folds for pair in fold
              for record in (pair.a, pair.b)}
    untested = sorted(row for path, row in index.items() if path not in tested)
    rows = untested
    if len(untested) < min(count, 16):
        logger.warning(
            "only %d evaluation images are outside the test pairs: calibrating int8 on test "
            "images too", len(untested),
        )
        rows = sorted(index.values())
    chosen = np.random.default_rng(seed).permutation(rows)[:count]
    return np.ascontiguousarray(images[np.sort(chosen)])


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def latency_p50_ms(path: Path, image_size: int, *, runs: int = LATENCY_RUNS,
                   warmup: int = LATENCY_WARMUP, threads: int = 1) -> float:
    """Return the median milliseconds of `runs` single-image runs on `threads` threads.

    The image is fixed seeded noise, because the run time does not depend on pixel values.
    """
    session = open_session(path, threads=threads)
    image = np.random.default_rng(0).integers(0, 256, (1, image_size, image_size, 3),
                                              dtype=np.uint8)
    name = session.get_inputs()[0].name
    for _ in range(warmup):
        session.run(None, {name: image})
    durations = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, {name: image})
        durations.append(time.perf_counter() - started)
    return float(np.median(durations) * 1000.0)


def plan_verification(
    plan: EvaluationPlan, embeddings: np.ndarray, index: Mapping[str, int]
) -> VerificationResult:
    """Score `plan`'s pairs with precomputed embeddings, rows located by `index[path]`."""
    def lookup(records: list[ImageRecord]) -> np.ndarray:
        return embeddings[[index[record.path] for record in records]]

    return evaluate_plan(plan, lookup).verification


def _measure(method: str, path: Path, plan: EvaluationPlan, images: np.ndarray,
             index: Mapping[str, int], fp32_accuracy: float | None
             ) -> tuple[VariantMeasurement, np.ndarray]:
    embeddings = run_session(open_session(path), images)
    verification = plan_verification(plan, embeddings, index)
    accuracy = verification.accuracy_mean
    baseline = accuracy if fp32_accuracy is None else fp32_accuracy
    measurement = VariantMeasurement(
        method=method, path=path, size_bytes=path.stat().st_size,
        verification_accuracy=float(accuracy), accuracy_delta=float(accuracy - baseline),
        latency_p50_ms=latency_p50_ms(path, images.shape[1]),
        threshold=float(verification.threshold),
    )
    logger.info("%s ONNX model: verification accuracy %.4f (delta %+.4f), p50 latency %.2f ms "
                "at batch 1, %.2f MiB", method, measurement.verification_accuracy,
                measurement.accuracy_delta, measurement.latency_p50_ms,
                measurement.size_bytes / 2**20)
    return measurement, embeddings


def choose_variant(candidates: Sequence[VariantMeasurement],
                   tolerance: float = DEFAULT_TOLERANCE) -> VariantMeasurement:
    """Return the most accurate candidate, or the fastest within `tolerance` of it.

    Raises:
        ValueError: no candidates.
    """
    if not candidates:
        raise ValueError("choose_variant needs at least one candidate")
    best = max(item.verification_accuracy for item in candidates)
    close = [item for item in candidates if item.verification_accuracy >= best - tolerance]
    return min(close, key=lambda item: item.latency_p50_ms)


def int8_speed_warning(chosen: VariantMeasurement, fp32: VariantMeasurement,
                       margin: float = INT8_SPEED_MARGIN) -> str | None:
    """Return a warning when the int8 model is not clearly faster than fp32, else None.

    Whether int8 pays off depends on the CPU's int8 instructions and on onnxruntime's kernels
    for them, so the run measures it. The p50 of one measurement moves by a few percent between
    measurements, so int8 must be `margin` (a fraction) faster than fp32 to count as faster.
    """
    if chosen.latency_p50_ms < fp32.latency_p50_ms * (1.0 - margin):
        return None
    size = chosen.size_bytes / fp32.size_bytes if fp32.size_bytes else float("nan")
    return (f"the int8 model is not {margin:.0%} faster than fp32 on this CPU "
            f"({chosen.latency_p50_ms:.3f} ms against {fp32.latency_p50_ms:.3f} ms p50 at batch "
            f"1). Deploy the fp32 model unless the int8 file's size ({size:.0%} of fp32's) "
            "matters more")


def build_int8_variant(
    onnx_path: Path,
    plan: EvaluationPlan,
    images: np.ndarray,
    index: Mapping[str, int],
    out_dir: Path,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    calibration_count: int = CALIBRATION_IMAGES,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Int8Report:
    """Quantize `onnx_path` with each of `methods`, measure all files, and choose one.

    `images` are the preprocessed uint8 evaluation faces and `index` maps each evaluation
    record's path to its row. The candidates are written to `out_dir/<stem>.int8-<method>.onnx`
    and the chosen one is copied to `out_dir/<stem>.int8.onnx`.

    Raises:
        ExportError: an unknown method, or a quantization failed.
    """
    import shutil

    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ExportError(f"invalid int8 methods {list(methods)}: choose from {list(METHODS)}")
    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    fp32, fp32_embeddings = _measure("fp32", onnx_path, plan, images, index, None)
    calibration = calibration_sample(plan, images, index, calibration_count)
    candidates = []
    for method in methods:
        target = out_dir / f"{onnx_path.stem}.int8-{method}.onnx"
        if method == "dynamic":
            quantize_dynamic_int8(onnx_path, target)
        else:
            quantize_static_int8(onnx_path, target, calibration)
        candidates.append(_measure(method, target, plan, images, index,
                                   fp32.verification_accuracy)[0])
    chosen_path = out_dir / f"{onnx_path.stem}.int8.onnx"
    best = choose_variant(candidates, tolerance)
    shutil.copyfile(best.path, chosen_path)
    chosen = replace(best, path=chosen_path)
    logger.info("chose the %s int8 model (%+.4f accuracy, %.2f ms vs %.2f ms fp32): %s",
                chosen.method, chosen.accuracy_delta, chosen.latency_p50_ms,
                fp32.latency_p50_ms, chosen_path)
    warning = int8_speed_warning(chosen, fp32)
    if warning:
        logger.warning(warning)
    return Int8Report(fp32=fp32, candidates=tuple(candidates), chosen=chosen,
                      calibration_images=len(calibration), fp32_embeddings=fp32_embeddings)
