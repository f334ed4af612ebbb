"""Face embedding, verification and identification with onnxruntime, without PyTorch.

A model is either a registered version (`models:/NAME@ALIAS` or `models:/NAME/VERSION`) or an
`.onnx` file. Images go through the same decode (`edgeface.data.ingest.load_rgb`) and crop and
resize (`edgeface.data.cache.preprocess`) as at training, with the image size and crop stored
with the model version. Two faces are the same person when the cosine similarity of their
embeddings is greater than the decision threshold, the rule that chose the threshold at
evaluation (`edgeface.evaluation`).

This module must not import torch: edge devices run it with onnxruntime alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from edgeface.data.cache import PreprocessSpec, file_sha256, preprocess
from edgeface.data.ingest import (
    BadImageError,
    ValidationReport,
    list_images,
    load_rgb,
    log_bad_files,
)
from edgeface.errors import ConfigError, DataError, ExportError, RegistryError
from edgeface.evaluation import l2_normalize

logger = logging.getLogger(__name__)

DEFAULT_MODEL_URI = "models:/edgeface@champion"
VARIANTS = ("fp32", "int8")
THRESHOLD_TAG = "edgeface.threshold"
IMAGE_SIZE_TAG = "edgeface.image_size"
CROP_TAG = "edgeface.crop"
INT8_ARTIFACT_TAG = "edgeface.int8.artifact"
# Decision threshold chosen for the int8 file's own embeddings. Versions registered before this
# tag existed have none, and their int8 variant uses the fp32 threshold.
INT8_THRESHOLD_TAG = "edgeface.int8.threshold"
BATCH_SIZE = 64
# Marks a completely downloaded model version in the model cache.
_COMPLETE_MARKER = ".edgeface-complete.json"
# Exception types that onnxruntime raises from its C++ core. None derives from RuntimeError.
_ORT_ERRORS = (
    ort_state.Fail, ort_state.InvalidArgument, ort_state.NoSuchFile, ort_state.NoModel,
    ort_state.EngineError, ort_state.RuntimeException, ort_state.InvalidProtobuf,
    ort_state.InvalidGraph, ort_state.NotImplemented,
)


def default_cache_dir() -> Path:
    """Return $EDGEFACE_CACHE_DIR, else $XDG_CACHE_HOME/edgeface, else ~/.cache/edgeface.

    The same folder as the training cache (`edgeface.steps.default_cache_dir`), repeated here
    because `edgeface.steps` imports torch.
    """
    configured = os.environ.get("EDGEFACE_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgeface"


# --------------------------------------------------------------------------------------------
# Model resolution
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A local ONNX file ready to load, and the settings stored with it.

    `identity` names the model's bytes for caches: the registry URI, version and variant, or
    the file's sha256. `threshold` is None when neither the registry nor a run folder stores one.
    """

    onnx_path: Path
    description: str
    preprocess: PreprocessSpec
    threshold: float | None
    identity: str
    variant: str = "fp32"
    version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.description, "onnx_path": str(self.onnx_path),
                "variant": self.variant, "version": self.version, "threshold": self.threshold,
                **self.preprocess.to_dict()}


def resolve_model(
    model: str,
    *,
    tracking_uri: str | None = None,
    cache_dir: Path | None = None,
    variant: str = "fp32",
    crop: Sequence[float] | None = None,
    threshold: float | None = None,
) -> ModelSource:
    """Find the ONNX file and the preprocessing settings of `model`.

    `model` is `models:/NAME@ALIAS`, `models:/NAME/VERSION` or a path to an `.onnx` file. A
    registered version is downloaded once into `cache_dir/models/` (default
    `default_cache_dir()`), but its alias is looked up on every call. `crop` and `threshold`
    override the stored values. The `int8` variant is the quantized file that `edgeface run`
    logs beside the fp32 model, and exists only for registered versions.

    Raises:
        ConfigError: unknown variant, or int8 requested for a file.
        RegistryError: the model, version, alias or int8 artifact is not found.
        ExportError: the ONNX file does not exist.
    """
    if variant not in VARIANTS:
        raise ConfigError(f"invalid model variant {variant!r}: use one of {', '.join(VARIANTS)}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if model.startswith("models:/"):
        source = _resolve_registered(model, tracking_uri, cache, variant)
    elif variant != "fp32":
        raise ConfigError(
            f"the {variant} variant needs a registered model (models:/NAME@ALIAS), but "
            f"{model!r} is a file: pass the quantized .onnx file itself instead"
        )
    else:
        source = _resolve_file(Path(model))
    return _apply_overrides(source, crop, threshold)


def _apply_overrides(
    source: ModelSource, crop: Sequence[float] | None, threshold: float | None
) -> ModelSource:
    from dataclasses import replace

    if crop is not None:
        source = replace(source, preprocess=PreprocessSpec(source.preprocess.image_size,
                                                           tuple(crop)))
    if threshold is not None:
        source = replace(source, threshold=float(threshold))
    return source


def _resolve_registered(
    model_uri: str, tracking_uri: str | None, cache: Path, variant: str
) -> ModelSource:
    from edgeface.registry import open_store

    name, key = _split_model_uri(model_uri)
    registry = open_store(tracking_uri)
    info = registry.get_version(name, key)
    store_key = hashlib.sha256(registry.tracking_uri.encode("utf-8")).hexdigest()[:16]
    folder = cache / "models" / store_key / name / str(info.version) / variant
    onnx_path = _cached_file(folder)
    if onnx_path is None:
        onnx_path = _download(registry.tracking_uri, info, variant, folder)
    spec = _spec_from_tags(info.tags, model_uri)
    threshold = _float_tag(info.tags, THRESHOLD_TAG)
    int8_threshold = _float_tag(info.tags, INT8_THRESHOLD_TAG) if variant == "int8" else None
    if int8_threshold is not None:
        threshold = int8_threshold
    return ModelSource(
        onnx_path=onnx_path, description=f"models:/{name}/{info.version}", preprocess=spec,
        threshold=threshold, variant=variant, version=info.version,
        identity=f"{registry.tracking_uri}|{name}|{info.version}|{variant}",
    )


def _split_model_uri(model_uri: str) -> tuple[str, str]:
    rest = model_uri[len("models:/"):].rstrip("/")
    if "@" in rest:
        name, _, key = rest.partition("@")
    else:
        name, _, key = rest.rpartition("/")
    if not name or not key:
        raise RegistryError(
            f"invalid model URI {model_uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    return name, key


def _download(tracking_uri: str, info: Any, variant: str, folder: Path) -> Path:
    """Download a version's file into a temporary folder, then rename it to `folder`.

    A concurrent download of the same version that finishes first wins, and this one is
    discarded, so `folder` always contains one complete download.
    """
    import shutil
    import tempfile

    from edgeface import tracking

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{variant}-", dir=folder.parent))
    try:
        if variant == "fp32":
            local = tracking.download_model(
                tracking_uri, f"models:/{info.name}/{info.version}", staging
            )
            onnx_path = local / "model.onnx"
        else:
            onnx_path = _download_int8(tracking_uri, info, staging)
        _mark_complete(staging, onnx_path)
        if _cached_file(folder) is None:
            shutil.rmtree(folder, ignore_errors=True)  # left by an interrupted download
            try:
                os.replace(staging, folder)
            except OSError:
                if _cached_file(folder) is None:  # no concurrent download completed it
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    cached = _cached_file(folder)
    if cached is None:
        raise RegistryError(f"the download of {info.model_uri} into {folder} is incomplete: "
                            "delete that folder and retry")
    return cached


def _cached_file(folder: Path) -> Path | None:
    marker = folder / _COMPLETE_MARKER
    try:
        onnx_path = folder / json.loads(marker.read_text(encoding="utf-8"))["onnx"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return onnx_path if onnx_path.is_file() else None


def _mark_complete(folder: Path, onnx_path: Path) -> None:
    marker = folder / _COMPLETE_MARKER
    marker.write_text(json.dumps({"onnx": str(onnx_path.relative_to(folder))}), encoding="utf-8")


def _download_int8(tracking_uri: str, info: Any, folder: Path) -> Path:
    from edgeface import tracking

    artifact = info.tags.get(INT8_ARTIFACT_TAG)
    if not artifact or not info.run_id:
        raise RegistryError(
            f"{info.model_uri} has no int8 variant (tag {INT8_ARTIFACT_TAG} is not set): use "
            "--variant fp32, or a model registered by an `edgeface run` that quantized it"
        )
    return tracking.download_run_artifact(tracking_uri, info.run_id, artifact, folder)


def _float_tag(tags: dict[str, str], key: str) -> float | None:
    value = tags.get(key)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise RegistryError(f"model version tag {key}={value!r} is not a number") from None


def _spec_from_tags(tags: dict[str, str], model_uri: str) -> PreprocessSpec:
    size_text = tags.get(IMAGE_SIZE_TAG)
    if size_text is None:
        raise RegistryError(
            f"{model_uri} has no {IMAGE_SIZE_TAG} tag, so its input size is unknown: register "
            "it with edgeface.tracking.register_onnx_model"
        )
    crop_text = tags.get(CROP_TAG)
    if crop_text is None:
        # NOTE: versions registered before the crop tag existed were trained with the default
        # crop unless their run configured another one; check the run's data.crop param.
        logger.warning("%s has no %s tag: using the default crop %s", model_uri, CROP_TAG,
                       PreprocessSpec().crop)
        return PreprocessSpec(image_size=int(size_text))
    try:
        crop = tuple(float(value) for value in json.loads(crop_text))
    except (ValueError, TypeError):
        raise RegistryError(f"{model_uri} has an invalid {CROP_TAG} tag {crop_text!r}") from None
    return PreprocessSpec(image_size=int(size_text), crop=crop)


def _resolve_file(path: Path) -> ModelSource:
    """Settings for a plain `.onnx` file: size from its input, crop and threshold from its run.

    A file at `RUN_DIR/model/*.onnx` written by `edgeface run` takes its crop from
    `RUN_DIR/config.yaml` and its threshold from `RUN_DIR/summary.json`: the int8 file's own
    threshold where the summary has one, else the fp32 model's. Other files use the default
    crop and have no threshold.
    """
    if not path.is_file():
        raise ExportError(
            f"ONNX model not found: {path}. Pass an .onnx file, or a registered model as "
            "models:/NAME@ALIAS"
        )
    image_size = _input_side(open_session(path), str(path))
    crop, threshold = _run_dir_settings(path)
    spec = PreprocessSpec(image_size=image_size, crop=crop or PreprocessSpec().crop)
    return ModelSource(onnx_path=path, description=str(path), preprocess=spec,
                       threshold=threshold, identity=f"sha256:{file_sha256(path)}",
                       variant=_file_variant(path))


# Operators that onnxruntime's static (QDQ) and dynamic int8 quantization write.
_QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                            "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"})


def _file_variant(path: Path) -> str:
    """Return "int8" when the ONNX graph at `path` contains quantized operators, else "fp32"."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return "int8" if any(node.op_type in _QUANTIZED_OPS for node in graph.node) else "fp32"


def _run_dir_settings(path: Path) -> tuple[tuple[float, ...] | None, float | None]:
    import yaml

    run_dir = path.resolve().parent.parent
    crop = threshold = None
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        crop = tuple(float(value) for value in config["data"]["crop"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        pass
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        threshold = float(summary["metrics"]["threshold"])
        # The run's int8 file has a threshold of its own (absent in older summaries). Names
        # are compared, not paths, so that a moved run folder keeps it.
        chosen = summary.get("int8", {}).get("chosen", {})
        if chosen.get("threshold") is not None and Path(chosen["path"]).name == path.name:
            threshold = float(chosen["threshold"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    if crop is not None or threshold is not None:
        logger.info("using the crop %s and threshold %s of run folder %s", crop, threshold,
                    run_dir)
    return crop, threshold


# --------------------------------------------------------------------------------------------
# Sessions and embeddings
# --------------------------------------------------------------------------------------------


def open_session(path: Path, *, threads: int = 0) -> onnxruntime.InferenceSession:
    """Open an ONNX file with the CPU execution provider and `threads` threads (0: automatic).

    Raises:
        ExportError: the file does not exist or onnxruntime cannot load it.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX model not found: {path}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    except _ORT_ERRORS as error:
        raise ExportError(f"onnxruntime cannot load {path}: {error}") from error


def _input_side(session: onnxruntime.InferenceSession, source: str) -> int:
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or not isinstance(shape[1], int) or shape[1] != shape[2] \
            or shape[3] != 3:
        raise ExportError(
            f"{source} takes input of shape {shape}, expected [batch, S, S, 3] uint8 RGB as "
            "exported by edgeface.export.export_onnx"
        )
    return int(shape[1])


def run_session(
    session: onnxruntime.InferenceSession, images: np.ndarray, batch_size: int = BATCH_SIZE
) -> np.ndarray:
    """Return float32 (N, D) model outputs for uint8 (N, S, S, 3) images, batch by batch."""
    name = session.get_inputs()[0].name
    if len(images) == 0:
        width = session.get_outputs()[0].shape[1]
        return np.empty((0, width if isinstance(width, int) else 0), dtype=np.float32)
    batches = [
        session.run(None, {name: np.ascontiguousarray(images[start:start + batch_size])})[0]
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(batches).astype(np.float32, copy=False)


class Embedder:
    """Embeds face image files with one ONNX model and its preprocessing."""

    def __init__(self, source: ModelSource, *, threads: int = 0) -> None:
        self.source = source
        self.session = open_session(source.onnx_path, threads=threads)
        side = _input_side(self.session, source.description)
        if side != source.preprocess.image_size:
            raise RegistryError(
                f"{source.description} takes {side}x{side} images but its {IMAGE_SIZE_TAG} tag "
                f"is {source.preprocess.image_size}: re-register the model with the right size"
            )

    def load(self, path: Path) -> np.ndarray:
        """Decode, crop and resize one image file to uint8 (S, S, 3).

        Raises:
            BadImageError: the file is missing or not a decodable image.
        """
        return preprocess(load_rgb(Path(path)), self.source.preprocess)

    def embed_files(self, paths: Sequence[Path]) -> np.ndarray:
        """Return unit-norm float64 (N, D) embeddings of image files, in order.

        Raises:
            BadImageError: a file is missing or not a decodable image.
        """
        images = np.stack([self.load(path) for path in paths]) if paths else np.empty(
            (0, self.source.preprocess.image_size, self.source.preprocess.image_size, 3),
            dtype=np.uint8)
        return self.embed_array(images)

    def embed_array(self, images: np.ndarray) -> np.ndarray:
        """Return unit-norm float64 (N, D) embeddings of preprocessed uint8 (N, S, S, 3) images."""
        outputs = run_session(self.session, images)
        return l2_normalize(outputs) if len(outputs) else outputs.astype(np.float64)


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationOutcome:
    """Cosine similarity of two faces and the decision at `threshold` (score > threshold)."""

    image_a: str
    image_b: str
    similarity: float
    threshold: float
    same: bool

    def to_dict(self) -> dict[str, Any]:
        return {"image_a": self.image_a, "image_b": self.image_b,
                "similarity": self.similarity, "threshold": self.threshold,
                "decision": "same" if self.same else "different"}


def require_threshold(source: ModelSource) -> float:
    """Return the model's threshold, or raise ConfigError naming `--threshold`."""
    if source.threshold is None:
        raise ConfigError(
            f"{source.description} has no stored decision threshold: pass --threshold, a "
            "cosine similarity such as 0.3"
        )
    return source.threshold


def verify_files(embedder: Embedder, image_a: Path, image_b: Path,
                 threshold: float) -> VerificationOutcome:
    """Compare two face images, which show the same person when similarity > `threshold`.

    Raises:
        BadImageError: an image is missing or not decodable.
    """
    embeddings = embedder.embed_files([Path(image_a), Path(image_b)])
    similarity = float(embeddings[0] @ embeddings[1])
    return VerificationOutcome(str(image_a), str(image_b), similarity, float(threshold),
                               similarity > threshold)


# --------------------------------------------------------------------------------------------
# Identification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gallery:
    """Embedded gallery images and one unit-norm centroid per identity.

    `identities[k]` owns `centroids[k]`. `image_identities` and `paths` describe the rows of
    `embeddings`. `cache_hit` is True when the embeddings came from the gallery cache.
    """

    identities: list[str]
    centroids: np.ndarray
    paths: list[str]
    image_identities: list[str]
    embeddings: np.ndarray
    cache_hit: bool = False


def _gallery_key(source: ModelSource, gallery_dir: Path, records: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    header = {"model": source.identity, "preprocess": source.preprocess.to_dict()}
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8") + b"\n")
    for record in records:
        try:
            content = file_sha256(gallery_dir / record.path)
        except OSError as error:
            content = f"unreadable:{error.errno}"
        digest.update(json.dumps([record.identity, record.path, content]).encode("utf-8"))
    return digest.hexdigest()


def load_gallery(embedder: Embedder, gallery_dir: Path, *, cache_dir: Path | None = None,
                 use_cache: bool = True) -> Gallery:
    """Embed a gallery folder (`<identity>/<image>`), reusing cached embeddings when valid.

    The cache file `cache_dir/gallery/<key>.npz` is keyed by the model, the preprocessing and
    every file's path and content sha256, so any change to the gallery or the model embeds it
    again. Unreadable images are skipped with a warning.

    Raises:
        DataError: the folder is missing, has no images, or none of them can be decoded.
    """
    gallery_dir = Path(gallery_dir)
    records = list_images(gallery_dir)
    cache = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "gallery"
    cache_path = cache / f"{_gallery_key(embedder.source, gallery_dir, records)}.npz"
    if use_cache and cache_path.is_file():
        try:
            with np.load(cache_path, allow_pickle=False) as stored:
                paths = [str(p) for p in stored["paths"]]
                identities = [str(i) for i in stored["identities"]]
                embeddings = np.asarray(stored["embeddings"], dtype=np.float64)
            logger.info("gallery %s: reusing cached embeddings %s", gallery_dir, cache_path)
            return _build_gallery(paths, identities, embeddings, cache_hit=True)
        except (OSError, ValueError, KeyError) as error:
            logger.warning("ignoring unreadable gallery cache %s: %s", cache_path, error)
    paths, identities, embeddings = _embed_gallery(embedder, gallery_dir, records)
    if use_cache:
        _save_gallery(cache_path, paths, identities, embeddings)
    return _build_gallery(paths, identities, embeddings, cache_hit=False)


def _embed_gallery(
    embedder: Embedder, gallery_dir: Path, records: Sequence[Any]
) -> tuple[list[str], list[str], np.ndarray]:
    report = ValidationReport(checked=len(records))
    images, decoded = [], []
    for record in records:
        try:
            images.append(embedder.load(gallery_dir / record.path))
        except BadImageError as error:
            report.bad.append((record.path, error.reason))
            continue
        decoded.append(record)
    log_bad_files(report, f"gallery {gallery_dir}")
    if not decoded:
        raise DataError(f"none of the {len(records)} gallery images in {gallery_dir} could be "
                        "decoded: check the files")
    embeddings = embedder.embed_array(np.stack(images))
    logger.info("gallery %s: embedded %d images of %d identities", gallery_dir, len(decoded),
                len({record.identity for record in decoded}))
    return [r.path for r in decoded], [r.identity for r in decoded], embeddings


def _save_gallery(path: Path, paths: list[str], identities: list[str],
                  embeddings: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(temporary, paths=np.array(paths), identities=np.array(identities),
                 embeddings=embeddings)
        os.replace(temporary, path)
    except OSError as error:
        logger.warning("could not write the gallery cache %s: %s", path, error)
    finally:
        temporary.unlink(missing_ok=True)


def _build_gallery(paths: list[str], identities: list[str], embeddings: np.ndarray,
                   *, cache_hit: bool) -> Gallery:
    names, members = np.unique(np.array(identities), return_inverse=True)
    centroids = np.zeros((len(names), embeddings.shape[1]))
    np.add.at(centroids, members, embeddings)
    return Gallery(identities=[str(n) for n in names], centroids=l2_normalize(centroids),
                   paths=paths, image_identities=identities, embeddings=embeddings,
                   cache_hit=cache_hit)


@dataclass(frozen=True)
class IdentificationOutcome:
    """Nearest gallery identity of one image, with the `candidates` as (identity, score).

    `score` is the cosine similarity between the image's embedding and the identity's
    centroid. `above_threshold` is None when no threshold is known.
    """

    image: str
    identity: str
    score: float
    threshold: float | None
    above_threshold: bool | None
    candidates: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.image, "identity": self.identity, "score": self.score,
                "threshold": self.threshold, "above_threshold": self.above_threshold,
                "candidates": [{"identity": i, "score": s} for i, s in self.candidates]}


def identify_file(embedder: Embedder, gallery: Gallery, image: Path, *, top_k: int = 5,
                  threshold: float | None = None) -> IdentificationOutcome:
    """Rank the gallery identities by cosine similarity to the image's embedding.

    Raises:
        BadImageError: the image is missing or not decodable.
        ConfigError: `top_k` is below 1.
    """
    if top_k < 1:
        raise ConfigError(f"invalid --top-k {top_k}: expected at least 1")
    embedding = embedder.embed_files([Path(image)])[0]
    scores = gallery.centroids @ embedding
    order = np.argsort(-scores, kind="stable")[:top_k]
    candidates = [(gallery.identities[i], float(scores[i])) for i in order]
    best_identity, best_score = candidates[0]
    above = None if threshold is None else best_score > threshold
    return IdentificationOutcome(str(image), best_identity, best_score, threshold, above,
                                 candidates)
