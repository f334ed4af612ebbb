"""ONNX export of MobileFaceNet and onnxruntime parity on real LFW faces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edgeface.data.cache import PreprocessSpec, preprocess
from edgeface.data.ingest import load_rgb
from edgeface.errors import DataError, ExportError
from edgeface.export import (
    EXPORTERS,
    ParityResult,
    check_parity,
    embed_eager,
    embed_onnx,
    export_onnx,
    onnx_session,
    require_parity,
)
from edgeface.model import ModelSpec, build_backbone, to_input

SPEC = ModelSpec(image_size=64, embedding_dim=128)
FACE_FILES = [
    "Aaron_Peirsol/Aaron_Peirsol_0001.jpg",
    "Aaron_Peirsol/Aaron_Peirsol_0002.jpg",
    "Aaron_Peirsol/Aaron_Peirsol_0003.jpg",
    "Abdullah_Gul/Abdullah_Gul_0001.jpg",
    "Abdullah_Gul/Abdullah_Gul_0002.jpg",
]
# Same-person pairs first, then different-person pairs. With an even count, the median
# threshold lies between two similarities.
PAIRS = [(0, 1), (0, 2), (1, 2), (3, 4), (0, 3), (1, 4), (2, 3), (2, 4)]


@pytest.fixture(scope="module")
def faces(lfw_dir: Path) -> np.ndarray:
    """Five real LFW faces, cropped and resized to uint8 (5, 64, 64, 3)."""
    spec = PreprocessSpec(image_size=SPEC.image_size)
    root = lfw_dir / "lfw-deepfunneled"
    return np.stack([preprocess(load_rgb(root / name), spec) for name in FACE_FILES])


@pytest.fixture(scope="module")
def backbone(faces: np.ndarray) -> nn.Module:
    """A seeded MobileFaceNet in train mode with BatchNorm statistics measured on real faces.

    A random network with identity BatchNorm statistics maps every face to nearly the same
    embedding (cosine similarity about 1), which would make the decision check meaningless.
    Measuring the statistics on the faces and their mirror images, as training does, spreads
    the embeddings. The affine BatchNorm parameters are perturbed too.
    """
    torch.manual_seed(0)
    model = build_backbone(SPEC)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in batchnorms:
        module.reset_running_stats()
        module.momentum = None  # cumulative average over the calibration pass
    calibration = np.concatenate([faces, faces[:, :, ::-1]])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.train()(to_input(torch.from_numpy(calibration.copy())))
        for module in batchnorms:
            module.momentum = 0.1
            module.weight.copy_(1 + 0.2 * torch.randn(module.num_features, generator=generator))
            module.bias.copy_(0.1 * torch.randn(module.num_features, generator=generator))
        # Per-channel PReLU slopes, so the export's rewrite of PReLU must keep the channels.
        for module in model.modules():
            if isinstance(module, nn.PReLU):
                module.weight.uniform_(0.05, 0.5, generator=generator)
    return model


@pytest.fixture(scope="module", params=EXPORTERS)
def exported(request: pytest.FixtureRequest, backbone: nn.Module,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The backbone exported over a stale file, which the export must replace, by each exporter."""
    path = tmp_path_factory.mktemp(f"export-{request.param}") / "model.onnx"
    path.write_bytes(b"stale file from an earlier export")
    return export_onnx(backbone, SPEC.image_size, path, exporter=request.param)


def test_export_writes_checked_self_contained_file(exported: Path) -> None:
    onnx.checker.check_model(str(exported), full_check=True)
    assert sorted(p.name for p in exported.parent.iterdir()) == ["model.onnx"]
    plain_file = exported.parent / "plain"
    plain_file.write_bytes(b"")
    assert exported.stat().st_mode == plain_file.stat().st_mode
    plain_file.unlink()

    model = onnx.load(str(exported), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert {entry.domain: entry.version for entry in model.opset_import}[""] == 18

    (image,) = model.graph.input
    assert image.name == "image"
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    image_dims = image.type.tensor_type.shape.dim
    assert image_dims[0].dim_param != ""
    assert [d.dim_value for d in image_dims[1:]] == [64, 64, 3]

    (embedding,) = model.graph.output
    assert embedding.name == "embedding"
    assert embedding.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    output_dims = embedding.type.tensor_type.shape.dim
    assert output_dims[0].dim_param == image_dims[0].dim_param
    assert output_dims[1].dim_value == 128


def test_export_keeps_caller_module_unchanged(backbone: nn.Module, exported: Path) -> None:
    assert exported.is_file()
    assert backbone.training
    assert any(isinstance(module, nn.PReLU) for module in backbone.modules())


def test_export_writes_prelu_as_relu(exported: Path) -> None:
    """onnxruntime's PRelu kernel is slow; the export writes relu(x) - a * relu(-x) instead."""
    operators = {node.op_type for node in onnx.load(str(exported)).graph.node}
    assert "PRelu" not in operators
    assert "Relu" in operators


def test_parity_on_lfw_faces(backbone: nn.Module, exported: Path, faces: np.ndarray) -> None:
    similarities = [float(a @ b) for a, b in (embed_eager(backbone, faces)[list(pair)] for pair in PAIRS)]
    threshold = float(np.median(similarities))

    result = check_parity(backbone, exported, faces, threshold=threshold, pairs=PAIRS)

    assert result.ok, result
    assert result.batch_sizes == [1, 5]
    assert result.decisions_match is True
    assert result.max_abs_diff < 1e-5
    # The median threshold splits the pairs, so both decisions are compared.
    assert 0 < sum(s > threshold for s in similarities) < len(PAIRS)
    require_parity(result)


def test_parity_without_pairs_compares_embeddings_only(
    backbone: nn.Module, exported: Path, faces: np.ndarray
) -> None:
    result = check_parity(backbone, exported, faces)
    assert result.ok
    assert result.decisions_match is None


def test_dynamic_batch_runs_batch_of_three(
    backbone: nn.Module, exported: Path, faces: np.ndarray
) -> None:
    session = onnx_session(exported)
    eager = embed_eager(backbone, faces)

    (three,) = session.run(None, {"image": faces[:3]})
    assert three.shape == (3, 128)
    assert three.dtype == np.float32
    np.testing.assert_allclose(three, eager[:3], rtol=1e-3, atol=1e-5)

    # Batches of 2, 2 and 1.
    chunked = embed_onnx(session, faces, batch_size=2)
    np.testing.assert_allclose(chunked, eager, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(chunked, axis=1), 1.0, rtol=1e-5)


def test_embed_onnx_of_no_images(exported: Path) -> None:
    empty = embed_onnx(onnx_session(exported), np.zeros((0, 64, 64, 3), dtype=np.uint8))
    assert empty.shape == (0, 128)


def test_corrupted_initializer_fails_parity(
    backbone: nn.Module, exported: Path, faces: np.ndarray, tmp_path: Path
) -> None:
    model = onnx.load(str(exported))
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4]
    target = max(weights, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(target)
    noise = np.random.default_rng(0).normal(0.0, values.std(), values.shape).astype(np.float32)
    target.CopyFrom(numpy_helper.from_array(values + noise, target.name))
    corrupted = tmp_path / "corrupted.onnx"
    onnx.save(model, str(corrupted))

    result = check_parity(backbone, corrupted, faces)

    assert not result.ok
    assert not result.embeddings_close
    assert result.max_abs_diff > 1e-2
    with pytest.raises(ExportError, match=r"ONNX parity check failed at batch sizes \[1, 5\]: "
                       r"onnxruntime and PyTorch embeddings differ by up to [0-9.e-]+, beyond "
                       r"rtol 0.001 and atol 1e-05"):
        require_parity(result)


def test_require_parity_reports_changed_decisions() -> None:
    result = ParityResult(
        max_abs_diff=3e-6, ok=False, batch_sizes=[1, 5], decisions_match=False,
        threshold=0.42, num_pairs=8, mismatched_pairs=1,
    )
    with pytest.raises(ExportError, match="1 of 8 pairs get a different same/different "
                       "decision at threshold 0.42"):
        require_parity(result)


def test_failed_export_keeps_existing_file(backbone: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"earlier model")

    # The global depthwise convolution of a 64-pixel model cannot run on 32-pixel input.
    with pytest.raises(ExportError, match="the backbone cannot embed 32x32 images: RuntimeError: "):
        export_onnx(backbone, 32, path)

    assert path.read_bytes() == b"earlier model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize(
    ("image_size", "opset", "exporter", "message"),
    [
        (0, 18, "dynamo", "invalid image_size 0"),
        (64, 11, "dynamo", "invalid ONNX opset 11: expected an integer from 18"),
        (64, 99, "dynamo", "invalid ONNX opset 99"),
        (64, 18, "onnx", "unknown exporter 'onnx': choose one of dynamo, torchscript"),
        (64, 21, "torchscript", "ONNX opset 21 is newer than the torchscript exporter can write"),
    ],
)
def test_export_rejects_invalid_arguments(
    backbone: nn.Module, tmp_path: Path, image_size: int, opset: int, exporter: str, message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        export_onnx(backbone, image_size, tmp_path / "model.onnx", opset=opset, exporter=exporter)
    assert list(tmp_path.iterdir()) == []


def test_onnx_session_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="ONNX model not found"):
        onnx_session(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf")
    with pytest.raises(ExportError, match="onnxruntime cannot load .*garbage.onnx"):
        onnx_session(garbage)


def test_check_parity_rejects_bad_arguments(
    backbone: nn.Module, exported: Path, faces: np.ndarray
) -> None:
    with pytest.raises(DataError, match="expected a uint8 RGB array"):
        check_parity(backbone, exported, faces.astype(np.float32))
    with pytest.raises(ExportError, match="at least 2 images"):
        check_parity(backbone, exported, faces[:1])
    with pytest.raises(ExportError, match="threshold and pairs go together"):
        check_parity(backbone, exported, faces, threshold=0.5)
    with pytest.raises(ExportError, match=r"pair indices \[\(0, 5\)\] are out of range for 5 images"):
        check_parity(backbone, exported, faces, threshold=0.5, pairs=[(0, 1), (0, 5)])


def test_embed_onnx_rejects_wrong_image_size(exported: Path) -> None:
    with pytest.raises(DataError, match=r"shape \(N, 64, 64, 3\), got uint8 with shape \(2, 32, 32, 3\)"):
        embed_onnx(onnx_session(exported), np.zeros((2, 32, 32, 3), dtype=np.uint8))


def write_tiny_model(path: Path, *, batch: int | str = "batch", input_name: str = "image",
                     opset: int = 18, external: bool = False,
                     output_shape: list[int | str] | None = None) -> None:
    """Write a tiny valid ONNX model that flattens scaled uint8 (batch, 64, 64, 3) images."""
    from onnx import helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", [input_name], ["pixels"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", ["pixels", "scale"], ["scaled"]),
            helper.make_node("Flatten", ["scaled"], ["embedding"]),
        ],
        "tiny",
        [helper.make_tensor_value_info(input_name, onnx.TensorProto.UINT8, [batch, 64, 64, 3])],
        [helper.make_tensor_value_info("embedding", onnx.TensorProto.FLOAT,
                                       output_shape or [batch, 64 * 64 * 3])],
        initializer=[numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.save(model, str(path), save_as_external_data=external, size_threshold=0)


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({}, None),
        ({"batch": 2}, "has input shape \\[2, 64, 64, 3\\], expected \\['batch', 64, 64, 3\\]"),
        ({"input_name": "pixels_in"}, "has inputs \\['pixels_in'\\]"),
        ({"opset": 17}, "declares ONNX opsets \\{'': 17\\}, expected opset 18"),
        ({"external": True}, "keeps 1 initializers in an external data file"),
        ({"output_shape": ["batch", "dim"]}, "has output shape \\['batch', 'dim'\\]"),
        ({"output_shape": ["n", 12288]}, "has output shape \\['n', 12288\\], expected \\['batch', D\\]"),
    ],
)
def test_exported_file_checks(tmp_path: Path, variant: dict, message: str | None) -> None:
    from edgeface.export import _check_exported

    path = tmp_path / "tiny.onnx"
    write_tiny_model(path, **variant)
    if message is None:
        _check_exported(path, 64, 18, path)
    else:
        with pytest.raises(ExportError, match=message):
            _check_exported(path, 64, 18, path)
