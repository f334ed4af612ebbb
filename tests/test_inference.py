"""`edgeface embed`, `verify` and `identify` against the PyTorch model, on real LFW images.

One seeded, randomly initialised MobileFaceNet is exported once per test session (about 30 s)
and registered on the session's `mlflow server`. The commands run in a subprocess, which also
checks that inference never imports torch. Their outputs are compared with the PyTorch model
applied to the same images through the training preprocessing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow_server import MlflowServer

from edgeface.data.cache import PreprocessSpec, preprocess
from edgeface.data.ingest import load_rgb
from edgeface.errors import ConfigError, ExportError, RegistryError
from edgeface.export import export_onnx
from edgeface.inference import (
    Embedder,
    identify_file,
    load_gallery,
    resolve_model,
    verify_files,
)
from edgeface.model import InferenceModel, ModelSpec, build_backbone
from edgeface.registry import register_version
from edgeface.tracking import Tracker

IMAGE_SIZE = 32
EMBEDDING_DIM = 32
# Not the default crop, so a test fails if inference ignores the crop stored with the model.
CROP = (0.2, 0.18, 0.8, 0.82)
THRESHOLD = 0.35
GALLERY_PEOPLE = ("Colin_Powell", "Donald_Rumsfeld", "George_W_Bush", "Gerhard_Schroeder",
                  "Tony_Blair")
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TinyModel:
    """A seeded MobileFaceNet: its ONNX export and the state dict of the same weights."""

    onnx_path: Path
    state_path: Path
    spec: ModelSpec

    def backbone(self) -> torch.nn.Module:
        backbone = build_backbone(self.spec)
        backbone.load_state_dict(torch.load(self.state_path, weights_only=True))
        return backbone.eval()


def export_tiny_model(base: Path) -> TinyModel:
    """Export the seeded model into `base/tiny-mobilefacenet/` unless an earlier test did."""
    folder = base / "tiny-mobilefacenet"
    spec = ModelSpec(arch="mobilefacenet", embedding_dim=EMBEDDING_DIM, width=0.25,
                     image_size=IMAGE_SIZE)
    model = TinyModel(folder / "model.onnx", folder / "backbone.pt", spec)
    if model.onnx_path.is_file() and model.state_path.is_file():
        return model
    torch.manual_seed(1234)
    backbone = build_backbone(spec).eval()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(backbone.state_dict(), model.state_path)
    export_onnx(backbone, IMAGE_SIZE, model.onnx_path)
    return model


def torch_embeddings(model: TinyModel, paths: list[Path], crop: tuple[float, ...]) -> np.ndarray:
    """Embed image files with the PyTorch model through the training preprocessing."""
    spec = PreprocessSpec(image_size=IMAGE_SIZE, crop=crop)
    images = np.stack([preprocess(load_rgb(path), spec) for path in paths])
    with torch.no_grad():
        return InferenceModel(model.backbone()).eval()(torch.from_numpy(images)).numpy()


def lfw_image(lfw_dir: Path, person: str, index: int) -> Path:
    return lfw_dir / "lfw-deepfunneled" / person / f"{person}_{index:04d}.jpg"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return export_tiny_model(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def registered(tiny_model: TinyModel, mlflow_server: MlflowServer) -> str:
    """Register the tiny model as version 1 of `faces-inference` with alias champion."""
    tracker = Tracker(mlflow_server.url, "inference-tests")
    parent = tracker.start_parent("inference-model", {"seed": 0})
    tags = {"edgeface.threshold": THRESHOLD, "edgeface.crop": json.dumps(list(CROP)),
            "edgeface.onnx_parity_ok": True}
    register_version(tracker, parent, tiny_model.onnx_path, "faces-inference",
                     image_size=IMAGE_SIZE, embedding_dim=EMBEDDING_DIM, tags=tags,
                     alias="champion")
    return "models:/faces-inference@champion"


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory: pytest.TempPathFactory, lfw_dir: Path) -> Path:
    """Five LFW identities with images 1-3 each, as symbolic links in a temporary folder."""
    folder = tmp_path_factory.mktemp("gallery")
    for person in GALLERY_PEOPLE:
        (folder / person).mkdir()
        for index in (1, 2, 3):
            source = lfw_image(lfw_dir, person, index)
            (folder / person / source.name).symlink_to(source)
    return folder


def run_commands(commands: dict[str, list[str]], env: dict[str, str]) -> dict[str, Any]:
    """Run `edgeface` commands in one fresh interpreter; return their exit codes and output.

    The result also records whether torch was imported by the end.
    """
    driver = textwrap.dedent("""
        import contextlib, io, json, sys
        from edgeface.cli.main import main
        results = {}
        for name, argv in json.loads(sys.argv[1]).items():
            output = io.StringIO()
            with contextlib.redirect_stdout(output):
                code = main(argv)
            results[name] = {"code": code, "stdout": output.getvalue()}
        results["torch_imported"] = "torch" in sys.modules
        print(json.dumps(results))
    """)
    completed = subprocess.run(
        [sys.executable, "-c", driver, json.dumps(commands)], capture_output=True, text=True,
        timeout=300, cwd=REPO_ROOT, env={**os.environ, **env},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cli_results(registered: str, gallery_dir: Path, lfw_dir: Path, mlflow_server: MlflowServer,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cache = tmp_path_factory.mktemp("inference-cache")
    same = [lfw_image(lfw_dir, "Tony_Blair", 5), lfw_image(lfw_dir, "Tony_Blair", 6)]
    other = lfw_image(lfw_dir, "Serena_Williams", 1)
    probe = lfw_image(lfw_dir, "George_W_Bush", 10)
    options = ["--format", "json"]
    commands = {
        "verify_same": ["verify", str(same[0]), str(same[1]), *options],
        "verify_other": ["verify", str(same[0]), str(other), "--model", registered, *options],
        "embed": ["embed", str(same[0]), str(other), "--output", str(cache / "e.npy"), *options],
        "identify": ["identify", str(probe), "--gallery", str(gallery_dir), *options],
        "identify_again": ["identify", str(probe), "--gallery", str(gallery_dir), *options],
    }
    env = {"MLFLOW_TRACKING_URI": mlflow_server.url, "EDGEFACE_CACHE_DIR": str(cache)}
    # The default --model is models:/edgeface@champion, so point it at the test model.
    for argv in commands.values():
        if "--model" not in argv:
            argv += ["--model", registered]
    results = run_commands(commands, env)
    results["paths"] = {"same": [str(p) for p in same], "other": str(other), "probe": str(probe),
                        "cache": str(cache)}
    return results


def test_inference_never_imports_torch(cli_results: dict[str, Any]) -> None:
    for name in ("verify_same", "verify_other", "embed", "identify"):
        assert cli_results[name]["code"] == 0, cli_results[name]
    assert cli_results["torch_imported"] is False


def test_verify_matches_pytorch(cli_results: dict[str, Any], tiny_model: TinyModel) -> None:
    paths = cli_results["paths"]
    images = [Path(p) for p in paths["same"]] + [Path(paths["other"])]
    reference = torch_embeddings(tiny_model, images, CROP)
    for name, (a, b) in (("verify_same", (0, 1)), ("verify_other", (0, 2))):
        result = json.loads(cli_results[name]["stdout"])
        expected = float(reference[a] @ reference[b])
        assert result["similarity"] == pytest.approx(expected, abs=1e-5)
        assert result["threshold"] == THRESHOLD
        assert result["decision"] == ("same" if expected > THRESHOLD else "different")
        assert result["crop"] == list(CROP)
        assert result["version"] == 1


def test_embed_matches_pytorch(cli_results: dict[str, Any], tiny_model: TinyModel) -> None:
    paths = cli_results["paths"]
    reference = torch_embeddings(tiny_model, [Path(paths["same"][0]), Path(paths["other"])],
                                 CROP)
    result = json.loads(cli_results["embed"]["stdout"])
    printed = np.array([item["embedding"] for item in result["embeddings"]])
    saved = np.load(Path(paths["cache"]) / "e.npy")
    np.testing.assert_allclose(printed, reference, atol=1e-5)
    np.testing.assert_allclose(saved, reference, atol=1e-5)
    assert saved.dtype == np.float32
    assert np.allclose(np.linalg.norm(saved, axis=1), 1.0, atol=1e-5)


def test_identify_matches_pytorch(cli_results: dict[str, Any], tiny_model: TinyModel,
                                  gallery_dir: Path) -> None:
    people = sorted(GALLERY_PEOPLE)
    gallery = [sorted((gallery_dir / person).iterdir()) for person in people]
    embeddings = torch_embeddings(tiny_model, [p for files in gallery for p in files], CROP)
    centroids = embeddings.reshape(len(people), 3, -1).mean(axis=1)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    probe = torch_embeddings(tiny_model, [Path(cli_results["paths"]["probe"])], CROP)[0]
    scores = centroids @ probe

    result = json.loads(cli_results["identify"]["stdout"])
    assert result["identity"] == people[int(np.argmax(scores))]
    assert result["score"] == pytest.approx(float(scores.max()), abs=1e-5)
    ranked = [candidate["identity"] for candidate in result["candidates"]]
    assert ranked == [people[i] for i in np.argsort(-scores)]
    assert result["gallery"] == {"path": str(gallery_dir), "identities": 5, "images": 15,
                                 "cache_hit": False}


def test_identify_reuses_gallery_cache(cli_results: dict[str, Any]) -> None:
    first = json.loads(cli_results["identify"]["stdout"])
    second = json.loads(cli_results["identify_again"]["stdout"])
    assert second["gallery"]["cache_hit"] is True
    assert second["identity"] == first["identity"]
    assert second["score"] == pytest.approx(first["score"], abs=1e-12)


def test_gallery_cache_invalidated_by_change(
    tiny_model: TinyModel, gallery_dir: Path, lfw_dir: Path, tmp_path: Path,
) -> None:
    source = resolve_model(str(tiny_model.onnx_path), crop=CROP, threshold=THRESHOLD)
    embedder = Embedder(source)
    gallery = tmp_path / "gallery"
    (gallery / "Tony_Blair").mkdir(parents=True)
    for index in (1, 2):
        source_image = lfw_image(lfw_dir, "Tony_Blair", index)
        (gallery / "Tony_Blair" / f"{index}.jpg").symlink_to(source_image)
    assert not load_gallery(embedder, gallery, cache_dir=tmp_path).cache_hit
    assert load_gallery(embedder, gallery, cache_dir=tmp_path).cache_hit

    (gallery / "Tony_Blair" / "3.jpg").symlink_to(lfw_image(lfw_dir, "Tony_Blair", 3))
    changed = load_gallery(embedder, gallery, cache_dir=tmp_path)
    assert not changed.cache_hit
    assert len(changed.paths) == 3


def test_file_model_with_overrides(tiny_model: TinyModel, lfw_dir: Path) -> None:
    """A bare .onnx file has no stored threshold or crop; flags supply them."""
    source = resolve_model(str(tiny_model.onnx_path))
    assert source.threshold is None
    assert source.preprocess == PreprocessSpec(image_size=IMAGE_SIZE)

    source = resolve_model(str(tiny_model.onnx_path), crop=CROP, threshold=0.5)
    a, b = lfw_image(lfw_dir, "Tony_Blair", 1), lfw_image(lfw_dir, "Tony_Blair", 2)
    outcome = verify_files(Embedder(source), a, b, source.threshold)
    reference = torch_embeddings(tiny_model, [a, b], CROP)
    assert outcome.similarity == pytest.approx(float(reference[0] @ reference[1]), abs=1e-5)
    assert outcome.same == (outcome.similarity > 0.5)


def test_file_model_reads_run_folder(tiny_model: TinyModel, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    onnx_path = run_dir / "model" / "edgeface.onnx"
    onnx_path.write_bytes(tiny_model.onnx_path.read_bytes())
    (run_dir / "config.yaml").write_text("data:\n  crop: [0.1, 0.1, 0.9, 0.9]\n")
    (run_dir / "summary.json").write_text(json.dumps({"metrics": {"threshold": 0.61}}))
    source = resolve_model(str(onnx_path))
    assert source.preprocess.crop == (0.1, 0.1, 0.9, 0.9)
    assert source.threshold == 0.61


def test_run_folder_int8_file_threshold(tiny_model: TinyModel, tmp_path: Path) -> None:
    """The run's int8 file gets the threshold measured on its own embeddings."""
    model_dir = tmp_path / "moved-run" / "model"
    model_dir.mkdir(parents=True)
    for name in ("edgeface.onnx", "edgeface.int8.onnx"):
        (model_dir / name).write_bytes(tiny_model.onnx_path.read_bytes())
    chosen = {"path": "/elsewhere/run/model/edgeface.int8.onnx", "threshold": 0.47}
    summary = {"metrics": {"threshold": 0.61}, "int8": {"chosen": chosen}}
    (model_dir.parent / "summary.json").write_text(json.dumps(summary))

    assert resolve_model(str(model_dir / "edgeface.int8.onnx")).threshold == 0.47
    assert resolve_model(str(model_dir / "edgeface.onnx")).threshold == 0.61
    # Summaries written before the int8 threshold existed: the fp32 threshold.
    del chosen["threshold"]
    (model_dir.parent / "summary.json").write_text(json.dumps(summary))
    assert resolve_model(str(model_dir / "edgeface.int8.onnx")).threshold == 0.61


def test_identify_with_inprocess_gallery(tiny_model: TinyModel, gallery_dir: Path,
                                         lfw_dir: Path, tmp_path: Path) -> None:
    embedder = Embedder(resolve_model(str(tiny_model.onnx_path), crop=CROP))
    gallery = load_gallery(embedder, gallery_dir, cache_dir=tmp_path)
    outcome = identify_file(embedder, gallery, lfw_image(lfw_dir, "Tony_Blair", 7), top_k=2,
                            threshold=None)
    assert len(outcome.candidates) == 2
    assert outcome.above_threshold is None
    assert outcome.candidates[0][1] >= outcome.candidates[1][1]
    with pytest.raises(ConfigError, match="--top-k 0"):
        identify_file(embedder, gallery, lfw_image(lfw_dir, "Tony_Blair", 7), top_k=0)


def test_input_errors(tiny_model: TinyModel, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      caplog: pytest.LogCaptureFixture) -> None:
    from edgeface.cli.main import main
    from edgeface.data.ingest import BadImageError

    embedder = Embedder(resolve_model(str(tiny_model.onnx_path)))
    with pytest.raises(BadImageError, match="file not found"):
        embedder.embed_files([tmp_path / "absent.jpg"])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("plain text")
    with pytest.raises(BadImageError, match="not an image"):
        embedder.embed_files([not_an_image])
    with pytest.raises(ExportError, match="ONNX model not found"):
        resolve_model(str(tmp_path / "missing.onnx"))
    with pytest.raises(ConfigError, match="needs a registered model"):
        resolve_model(str(tiny_model.onnx_path), variant="int8")
    with pytest.raises(RegistryError, match="invalid model URI"):
        resolve_model("models:/no-version-or-alias")

    code = main(["verify", str(not_an_image), str(not_an_image),
                 "--model", str(tiny_model.onnx_path)])
    assert code == 2
    assert "no stored decision threshold: pass --threshold" in caplog.text


@pytest.mark.parametrize("command", ["verify", "identify"])
@pytest.mark.parametrize("value", ["2", "-1.5", "nan", "high"])
def test_threshold_outside_cosine_range_rejected(
    command: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """The value is rejected while parsing, before any model is resolved or image read."""
    from edgeface.cli.main import main

    images = ["a.jpg", "b.jpg"] if command == "verify" else ["a.jpg", "--gallery", "g"]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *images, "--threshold", value, "--model", str(tmp_path / "none.onnx")])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert re.search(rf"argument --threshold: invalid threshold '?{re.escape(value)}'?:", error)
    assert "from -1 to 1" in error


@pytest.mark.parametrize("value", ["-1", "0.35", "1"])
def test_threshold_in_cosine_range_accepted(value: str) -> None:
    from edgeface.cli.inference import cosine_threshold

    assert cosine_threshold(value) == float(value)


CROP_TEXT = "0.2,0.18,0.8,0.82"


@pytest.mark.parametrize("argv", [
    ["verify", "a.jpg", "b.jpg", "--crop", CROP_TEXT],
    ["verify", "--crop", CROP_TEXT, "a.jpg", "b.jpg"],
    ["verify", "a.jpg", "b.jpg", "--crop", "0.2", "0.18", "0.8", "0.82"],
    ["verify", "--crop", "0.2", "0.18", "0.8", "0.82", "a.jpg", "b.jpg"],
    ["--log-level", "DEBUG", "verify", "--crop", "0.2", "0.18", "0.8", "0.82", "a.jpg", "b.jpg"],
])
def test_crop_comma_and_space_forms(argv: list[str]) -> None:
    """Both --crop forms give the same box, and the image paths stay positional."""
    from edgeface.cli.inference import join_crop_values
    from edgeface.cli.main import build_parser

    args = build_parser().parse_args(join_crop_values(argv))

    assert args.crop == CROP
    assert args.image_a == Path("a.jpg")
    assert args.image_b == Path("b.jpg")


@pytest.mark.parametrize("command", [["embed", "a.jpg"], ["identify", "a.jpg", "--gallery", "g"]])
def test_crop_comma_form_other_commands(command: list[str]) -> None:
    from edgeface.cli.main import build_parser

    args = build_parser().parse_args([*command, "--crop", CROP_TEXT])

    assert args.crop == CROP


def test_crop_join_leaves_run_unchanged() -> None:
    from edgeface.cli.inference import join_crop_values

    argv = ["run", "--crop", "0", "0", "1", "1"]

    assert join_crop_values(argv) == argv


def test_crop_space_form_reaches_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`main` joins the space form, so parsing passes and the missing model is reported."""
    from edgeface.cli.main import main

    code = main(["verify", "--crop", "0.2", "0.18", "0.8", "0.82", "a.jpg", "b.jpg",
                 "--model", str(tmp_path / "none.onnx")])

    assert code == 2
    assert "ONNX model not found" in caplog.text


@pytest.mark.parametrize("value", ["0.1,0.2,0.9", "0.1,0.2,0.9,0.8,0.5", "a,b,c,d", "0.5",
                                   "0.1,nan,0.9,0.8"])
def test_crop_invalid_value_rejected(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from edgeface.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "a.jpg", "b.jpg", "--crop", value])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument --crop: invalid crop {value!r}" in error
    assert "expected 4 numbers LEFT,TOP,RIGHT,BOTTOM" in error
