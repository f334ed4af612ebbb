"""ONNX export of the embedding model, and parity checks of onnxruntime against PyTorch.

The exported graph is `edgeface.model.InferenceModel`: input "image", uint8 [batch, S, S, 3]
RGB, and output "embedding", float32 [batch, D] with unit L2 norm. The batch axis is dynamic.
The file is self-contained (no external data file) and passes `onnx.checker` with
`full_check=True`.

Two exporters are available. "dynamo" (the default) is torch's maintained `torch.export`
path; it traces and decomposes the model on every call, which takes about 5 s for
MobileFaceNet on one core of a 2-core AMD EPYC. "torchscript" is torch's older tracing exporter,
deprecated since torch 2.9 but still shipped in 2.14: it exports the same model in about 0.2 s.
Both produce the same interface, and the same checker and parity checks apply to both.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
from torch import nn

from edgeface.config import TORCHSCRIPT_MAX_OPSET
from edgeface.errors import DataError, ExportError
from edgeface.model import InferenceModel

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")
# The torch.onnx dynamo exporter (torch 2.14) implements operators at opset 18. It reaches a
# lower opset only through a version conversion that can fail and then keeps opset 18.
MIN_OPSET = 18
# Batch size of the example input. torch.export specializes dimensions of size 0 and 1, so the
# example needs at least 2 images for the batch axis to stay dynamic.
_EXAMPLE_BATCH = 2
# Pairs closer than this to the decision threshold (in cosine similarity) are not used to
# compare decisions, because float rounding of about 1e-7 can flip them.
DECISION_MARGIN = 1e-4
_MAX_CAUSE_CHARS = 800
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")

# Exception types that onnxruntime raises from its C++ core. None of them derives from
# RuntimeError, so they are listed one by one.
_ORT_ERRORS = (
    ort_state.Fail, ort_state.InvalidArgument, ort_state.NoSuchFile, ort_state.NoModel,
    ort_state.EngineError, ort_state.RuntimeException, ort_state.InvalidProtobuf,
    ort_state.InvalidGraph, ort_state.NotImplemented,
)


@dataclass(frozen=True)
class ParityResult:
    """Comparison of onnxruntime and PyTorch eager embeddings of the same images.

    `max_abs_diff` is the largest absolute difference over all batch sizes. `ok` is True when
    the embeddings are close (`np.allclose` with `rtol` and `atol`) at every batch size and no
    pair changed its decision. `decisions_match` is None when no threshold and pairs were given.
    `embeddings_close` is the `np.allclose` part of `ok` alone. `mismatched_pairs` counts
    pairs whose same/different decision differs, at the worst batch size.
    """

    max_abs_diff: float
    ok: bool
    batch_sizes: list[int]
    decisions_match: bool | None
    rtol: float = 1e-3
    atol: float = 1e-5
    embeddings_close: bool = True
    threshold: float | None = None
    num_pairs: int = 0
    mismatched_pairs: int = 0


def export_onnx(backbone: nn.Module, image_size: int, path: Path, opset: int = DEFAULT_OPSET,
                exporter: str = "dynamo") -> Path:
    """Export `backbone` wrapped in `InferenceModel` to an ONNX file at `path` and return it.

    The backbone is copied to CPU float32 in eval mode, so the caller's module is not changed.
    `image_size` is the side S in pixels of the square input, and must match the size the
    backbone was built for. The file is written to a temporary file in the same folder, checked
    with `onnx.checker.check_model(full_check=True)`, and then renamed over `path`, so a failed
    export leaves any earlier file at `path` untouched. Missing parent folders are created.
    `exporter` is "dynamo" or "torchscript" (see the module docstring).

    Raises:
        ExportError: invalid image_size, opset or exporter, the exporter failed, or the
            exported file fails the checker, has external data, a static batch axis or no
            fixed embedding size. The message contains the cause.
    """
    _check_export_arguments(image_size, opset, exporter)
    path = Path(path)
    started = time.perf_counter()
    model = InferenceModel(_with_split_prelu(copy.deepcopy(backbone).cpu().float())).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files have mode 0600, and the renamed model would keep it.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _run_exporter(model, image_size, opset, temporary, path, exporter)
        _check_exported(temporary, image_size, opset, path)
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
        Path(f"{temporary}.data").unlink(missing_ok=True)

    logger.info(
        "exported ONNX model to %s (%s exporter, opset %d, %.2f MiB) in %.1f s",
        path, exporter, opset, path.stat().st_size / 2**20, time.perf_counter() - started,
    )
    return path


class _SplitPReLU(nn.Module):
    """PReLU written as relu(x) - a * relu(-x), the same function with other ONNX operators.

    onnxruntime 1.32's PRelu kernel broadcasts the per-channel slope element by element. On a
    2-core AMD EPYC it took 65% of a batch-1 MobileFaceNet call at 64 px, and this form cut the
    call from 2.2 ms to 1.0 ms on one thread.
    """

    def __init__(self, prelu: nn.PReLU) -> None:
        super().__init__()
        self.slope = nn.Parameter(prelu.weight.detach().clone(), requires_grad=False)
        # A Python bool, so that tracing records a constant rather than a tensor comparison.
        self.per_channel = prelu.weight.numel() > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slope = self.slope
        if self.per_channel:  # one slope per channel, dimension 1 of the input
            slope = slope.view(1, -1, *([1] * (x.dim() - 2)))
        return torch.relu(x) - slope * torch.relu(-x)


def _with_split_prelu(module: nn.Module) -> nn.Module:
    """Replace every nn.PReLU in `module` (in place) with `_SplitPReLU`, and return it."""
    for name, child in module.named_children():
        if isinstance(child, nn.PReLU):
            setattr(module, name, _SplitPReLU(child))
        else:
            _with_split_prelu(child)
    return module


def _fsync(path: Path) -> None:
    """Flush the file's data to disk, so that the rename never publishes a partial file."""
    with path.open("rb") as file:
        os.fsync(file.fileno())


def _check_export_arguments(image_size: int, opset: int, exporter: str = "dynamo") -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ExportError(f"invalid image_size {image_size!r}: expected a positive number of pixels")
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}: choose one of {', '.join(EXPORTERS)}")
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ExportError(
            f"invalid ONNX opset {opset!r}: expected an integer from {MIN_OPSET} to {newest} "
            f"(the newest that onnx {onnx.__version__} knows)"
        )
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        raise ExportError(
            f"ONNX opset {opset} is newer than the torchscript exporter can write (up to "
            f"{TORCHSCRIPT_MAX_OPSET}): choose opset {TORCHSCRIPT_MAX_OPSET} or lower, or the "
            "dynamo exporter"
        )


def _run_exporter(model: nn.Module, image_size: int, opset: int, target: Path, path: Path,
                  exporter: str = "dynamo") -> None:
    """Run a torch.onnx exporter with a dynamic batch axis, weights inside the file."""
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(
        0, 256, (_EXAMPLE_BATCH, image_size, image_size, 3), dtype=torch.uint8, generator=generator
    )
    # An eager forward pass takes milliseconds and finds a wrong image_size before the
    # exporter spends seconds tracing.
    try:
        with torch.no_grad():
            embedding_dim = model(example).shape[1]
    except RuntimeError as error:
        raise ExportError(
            f"the backbone cannot embed {image_size}x{image_size} images: {_short_cause(error)}. "
            "Pass the image_size the backbone was built for (ModelSpec.image_size)"
        ) from error
    common = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    try:
        if exporter == "torchscript":
            with warnings.catch_warnings():
                # The exporter was chosen knowingly, so its deprecation notice would only
                # repeat in every run's log.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(model, (example,), str(target), **common, dynamo=False,
                                  dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            _set_output_shape(target, embedding_dim)
        else:
            torch.onnx.export(model, (example,), str(target), **common, dynamo=True,
                              external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as error:  # the exporter raises many types, from torch.export and onnxscript
        raise ExportError(f"ONNX export to {path} failed: {_short_cause(error)}") from error


def _set_output_shape(path: Path, embedding_dim: int) -> None:
    """Declare the output shape [batch, embedding_dim] in the ONNX file at `path`.

    The TorchScript exporter leaves the embedding axis symbolic after the L2 normalization,
    although its size is fixed. Consumers that size buffers from the declared shape need it.
    """
    model = onnx.load(str(path))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[0].dim_param = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    dims[1].dim_value = embedding_dim
    onnx.save(model, str(path))


def _check_exported(exported: Path, image_size: int, opset: int, path: Path) -> None:
    """Raise ExportError unless the exported file is self-contained, valid and as expected.

    Valid means that `onnx.checker` with full_check passes. Expected means the requested
    opset, the input and output names, and a dynamic batch axis. Messages name `path`.
    """
    model = onnx.load(str(exported), load_external_data=False)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ExportError(
            f"exported model {path} keeps {len(external)} initializers in an external data "
            "file, but a self-contained file is expected"
        )
    try:
        onnx.checker.check_model(str(exported), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"exported model {path} fails onnx.checker: {_short_cause(error)}") from error

    versions = {entry.domain: entry.version for entry in model.opset_import}
    if versions.get("", versions.get("ai.onnx")) != opset:
        raise ExportError(
            f"exported model {path} declares ONNX opsets {versions}, expected opset {opset}: "
            f"the exporter could not convert to opset {opset}, so choose another opset"
        )
    _check_interface(model.graph, image_size, path)


def _check_interface(graph: onnx.GraphProto, image_size: int, path: Path) -> None:
    """Raise ExportError unless the graph has the input and output names, a dynamic batch
    axis shared by input and output, and a fixed embedding size."""
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
        raise ExportError(
            f"exported model {path} has inputs {inputs} and outputs {outputs}, "
            f"expected [{INPUT_NAME!r}] and [{OUTPUT_NAME!r}]"
        )
    dims = graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_param or d.dim_value for d in dims]
    if len(dims) != 4 or not dims[0].dim_param or shape[1:] != [image_size, image_size, 3]:
        raise ExportError(
            f"exported model {path} has input shape {shape}, expected "
            f"['batch', {image_size}, {image_size}, 3] with a dynamic batch axis"
        )
    out_dims = graph.output[0].type.tensor_type.shape.dim
    out_shape = [d.dim_param or d.dim_value for d in out_dims]
    if len(out_dims) != 2 or out_dims[0].dim_param != dims[0].dim_param or not out_dims[1].dim_value:
        raise ExportError(
            f"exported model {path} has output shape {out_shape}, expected "
            f"[{dims[0].dim_param!r}, D]: the input's batch axis and a fixed embedding size"
        )


def _short_cause(error: BaseException) -> str:
    """Describe the innermost cause of `error` on one line of at most _MAX_CAUSE_CHARS.

    The torch.onnx exporter wraps the real error in a long message with terminal colour
    codes, so the innermost cause is the informative part.
    """
    while error.__cause__ is not None:
        error = error.__cause__
    text = _ANSI_ESCAPE.sub("", f"{type(error).__name__}: {error}")
    text = " ".join(text.split())
    return text if len(text) <= _MAX_CAUSE_CHARS else text[:_MAX_CAUSE_CHARS] + " ..."


def onnx_session(path: Path | str) -> onnxruntime.InferenceSession:
    """Open an ONNX model in onnxruntime with the CPU execution provider only.

    Raises:
        ExportError: the file does not exist or onnxruntime cannot load it.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX model not found: {path}. Export it first with export_onnx")
    try:
        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as error:
        raise ExportError(f"onnxruntime cannot load {path}: {_short_cause(error)}") from error


def embed_onnx(
    session: onnxruntime.InferenceSession, images: np.ndarray, batch_size: int = 64
) -> np.ndarray:
    """Return float32 (N, D) embeddings of uint8 (N, S, S, 3) RGB images, `batch_size` at a time.

    Raises:
        DataError: the images are not a uint8 (N, S, S, 3) array with the model's S.
        ValueError: batch_size is below 1.
    """
    model_input = session.get_inputs()[0]
    side = model_input.shape[1] if isinstance(model_input.shape[1], int) else None
    _check_images(images, side)
    if batch_size < 1:
        raise ValueError(f"invalid batch_size {batch_size}: expected at least 1")

    if len(images) == 0:
        width = session.get_outputs()[0].shape[1]
        return np.empty((0, width if isinstance(width, int) else 0), dtype=np.float32)
    batches = [
        session.run(None, {model_input.name: np.ascontiguousarray(images[start:start + batch_size])})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(batches).astype(np.float32, copy=False)


def _check_images(images: np.ndarray, side: int | None) -> None:
    """Raise DataError unless `images` is uint8 (N, side, side, 3). A side of None accepts any S."""
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    valid = (
        isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
        and images.shape[3] == 3 and images.shape[1] == images.shape[2]
        and (side is None or images.shape[1] == side)
    )
    if not valid:
        expected = f"(N, {side}, {side}, 3)" if side else "(N, S, S, 3)"
        raise DataError(
            f"invalid images: expected a uint8 RGB array of shape {expected}, got {dtype} "
            f"with shape {shape}. Crop and resize faces with the preprocessing of "
            "edgeface.data.cache"
        )


def embed_eager(backbone: nn.Module, images: np.ndarray) -> np.ndarray:
    """Return float32 (N, D) embeddings from PyTorch eager, through `InferenceModel` in eval mode.

    The backbone is copied, so the caller's module keeps its mode and device.
    """
    model = InferenceModel(copy.deepcopy(backbone).cpu().float()).eval()
    with torch.no_grad():
        # A copy: torch warns on read-only arrays, such as a memory-mapped cache.
        return model(torch.from_numpy(np.array(images, copy=True, order="C"))).numpy()


def check_parity(
    backbone: nn.Module,
    onnx_path: Path | str,
    images: np.ndarray,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-5,
    threshold: float | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> ParityResult:
    """Compare onnxruntime embeddings of `onnx_path` with PyTorch eager embeddings of `backbone`.

    `images` is uint8 (N, S, S, 3) RGB with N >= 2. onnxruntime runs them at batch sizes 1
    and N, and each result must satisfy `np.allclose(onnx, eager, rtol, atol)`. When
    `threshold` and `pairs` are both given, each pair (i, j) of image indices must also get the
    same decision from both. As in `edgeface.evaluation`, a cosine similarity strictly greater
    than the threshold means "same person". The check does not raise on a mismatch, so pass
    the result to `require_parity`.

    Pairs whose eager similarity lies within `DECISION_MARGIN` of the threshold are left out of
    the decision comparison, because float rounding alone can flip them.

    Raises:
        DataError: invalid images.
        ExportError: fewer than 2 images, only one of threshold and pairs given, a pair index
            out of range, or the model cannot be loaded.
    """
    _check_images(images, None)
    if len(images) < 2:
        raise ExportError(f"parity needs at least 2 images to compare two batch sizes, got {len(images)}")
    pair_array = _check_pairs(threshold, pairs, len(images))

    eager = embed_eager(backbone, images)
    session = onnx_session(onnx_path)
    expected_decisions = _decisions(eager, pair_array, threshold)
    # Pairs whose eager similarity lies within DECISION_MARGIN of the threshold can flip from
    # float rounding alone (seen with collapsed embeddings of an undertrained model, where the
    # threshold sits near 1.0). They are left out of the decision check; the embeddings
    # themselves are still compared with rtol and atol.
    decided = None
    if expected_decisions is not None:
        decided = np.abs(_similarities(eager, pair_array) - threshold) > DECISION_MARGIN
    batch_sizes = [1, len(images)]
    max_abs_diff, close, mismatched = 0.0, True, 0
    for batch_size in batch_sizes:
        actual = embed_onnx(session, images, batch_size=batch_size)
        max_abs_diff = max(max_abs_diff, float(np.max(np.abs(actual - eager))))
        close = close and bool(np.allclose(actual, eager, rtol=rtol, atol=atol))
        if expected_decisions is not None:
            changed = _decisions(actual, pair_array, threshold) != expected_decisions
            mismatched = max(mismatched, int((changed & decided).sum()))

    result = ParityResult(
        max_abs_diff=max_abs_diff,
        ok=close and mismatched == 0,
        batch_sizes=batch_sizes,
        decisions_match=None if expected_decisions is None else mismatched == 0,
        rtol=rtol,
        atol=atol,
        embeddings_close=close,
        threshold=threshold,
        num_pairs=0 if pair_array is None else len(pair_array),
        mismatched_pairs=mismatched,
    )
    logger.info(
        "ONNX parity for %s: max abs diff %.3g at batch sizes %s, decisions match %s, ok %s",
        onnx_path, max_abs_diff, batch_sizes, result.decisions_match, result.ok,
    )
    return result


def _check_pairs(
    threshold: float | None, pairs: Sequence[tuple[int, int]] | None, count: int
) -> np.ndarray | None:
    """Return the pairs as an int array (P, 2), or None when no decisions are compared."""
    if (threshold is None) != (pairs is None):
        raise ExportError(
            "threshold and pairs go together: pass both to compare verification decisions, "
            "or neither"
        )
    if pairs is None:
        return None
    array = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    out_of_range = [tuple(int(i) for i in pair) for pair in array if not (0 <= pair).all() or not (pair < count).all()]
    if out_of_range:
        raise ExportError(
            f"pair indices {out_of_range[:3]} are out of range for {count} images: "
            f"expected indices from 0 to {count - 1}"
        )
    return array


def _decisions(
    embeddings: np.ndarray, pairs: np.ndarray | None, threshold: float | None
) -> np.ndarray | None:
    """Return True for each pair whose cosine similarity is greater than the threshold."""
    if pairs is None or threshold is None:
        return None
    return _similarities(embeddings, pairs) > threshold


def _similarities(embeddings: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    # The embeddings have unit norm, so the dot product is the cosine similarity.
    return np.sum(embeddings[pairs[:, 0]] * embeddings[pairs[:, 1]], axis=1)


def require_parity(result: ParityResult) -> None:
    """Raise ExportError with the measured numbers unless `result.ok`."""
    if result.ok:
        return
    problems = []
    if not result.embeddings_close:
        problems.append(
            f"onnxruntime and PyTorch embeddings differ by up to {result.max_abs_diff:.3g}, "
            f"beyond rtol {result.rtol:g} and atol {result.atol:g}"
        )
    if result.mismatched_pairs:
        problems.append(
            f"{result.mismatched_pairs} of {result.num_pairs} pairs get a different "
            f"same/different decision at threshold {result.threshold:g} (max abs diff "
            f"{result.max_abs_diff:.3g})"
        )
    raise ExportError(
        f"ONNX parity check failed at batch sizes {result.batch_sizes}: "
        + " and ".join(problems)
        + ". Do not deploy this file: re-export it and check the exporter's warnings"
    )
