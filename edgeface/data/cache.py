"""Preprocessing (crop, resize) into one uint8 array, cached on disk under a content key.

`build_cache` decodes every image once, crops and resizes it with `preprocess`, and saves the
result as `<key>.npy` (shape (N, S, S, 3), HWC RGB). A JSON sidecar `<key>.json` lists the
images in array order and the files skipped with reasons. The key is a sha256 over
the preprocessing settings and every image's path and content hash, so any changed, added,
removed or renamed file gives a new cache file, while a moved dataset folder does not.
Training reads the array through a memory map (`load_cache`).

Both files are written to a temporary name in the cache folder, flushed to disk and renamed,
so an interrupted build never leaves a partial file under a final name. The sidecar is
written last and marks the pair complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Sequence

import numpy as np
import PIL
from PIL import Image
from tqdm import tqdm

from edgeface.data.ingest import (
    BadImageError,
    ImageRecord,
    ValidationReport,
    load_rgb,
    log_bad_files,
)
from edgeface.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Part of the cache key: raise it whenever `preprocess` or the file layout changes output.
CACHE_FORMAT_VERSION = 1

MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 512

_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class PreprocessSpec:
    """Crop box and output size that turn a decoded face image into a model input.

    `crop` is the box (left, top, right, bottom) as fractions of the decoded image's width and
    height. The default keeps the central face region of a 250x250 LFW image. The crop is then
    resized to `image_size` x `image_size` pixels.

    Raises:
        ConfigError: `image_size` is outside 16..512, or `crop` is not an ordered box inside 0..1.
    """

    image_size: int = 64
    crop: tuple[float, float, float, float] = (0.33, 0.31, 0.67, 0.70)

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int):
            raise ConfigError(f"invalid image size {size!r}: use a whole number of pixels")
        if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
            raise ConfigError(
                f"invalid image size {size}: use {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels"
            )
        object.__setattr__(self, "crop", _validate_crop(self.crop))

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "crop": list(self.crop)}


def _validate_crop(crop: Any) -> tuple[float, float, float, float]:
    try:
        left, top, right, bottom = (float(value) for value in crop)
    except (TypeError, ValueError):
        raise ConfigError(
            f"invalid crop {crop!r}: use four fractions (left, top, right, bottom), "
            "for example (0.33, 0.31, 0.67, 0.70)"
        ) from None
    if not (0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0):
        raise ConfigError(
            f"invalid crop {crop!r}: fractions must satisfy 0 <= left < right <= 1 and "
            "0 <= top < bottom <= 1"
        )
    return (left, top, right, bottom)


def preprocess(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Crop `image` to `spec.crop` and resize it to a (S, S, 3) uint8 HWC RGB array.

    The crop box is rounded to whole pixels (at least one pixel wide and high), so no pixel
    outside it leaks into the result. The bilinear resize filters with a support scaled to the
    reduction factor, so downscaling is antialiased. The output depends only on the pixels and
    `spec`, which makes it safe to reuse at inference time.

    Raises:
        DataError: `image` is not RGB (decode files with `edgeface.data.ingest.load_rgb`).
    """
    if image.mode != "RGB":
        raise DataError(
            f"preprocess expects an RGB image, got mode {image.mode}: decode images with "
            "edgeface.data.ingest.load_rgb or decode_rgb"
        )
    cropped = image.crop(_crop_box(image.size, spec.crop))
    size = (spec.image_size, spec.image_size)
    resized = cropped.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def _crop_box(
    image_size: tuple[int, int], crop: tuple[float, float, float, float]
) -> tuple[int, int, int, int]:
    width, height = image_size
    left, top, right, bottom = crop
    left_px = min(round(left * width), width - 1)
    top_px = min(round(top * height), height - 1)
    right_px = max(round(right * width), left_px + 1)
    bottom_px = max(round(bottom * height), top_px + 1)
    return (left_px, top_px, right_px, bottom_px)


@dataclass(frozen=True)
class CacheResult:
    """Outcome of `build_cache`: the array's path, its images in order, and whether it was reused."""

    path: Path
    records: list[ImageRecord]
    report: ValidationReport
    hit: bool
    key: str


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file's bytes, read in 1 MiB chunks.

    Raises:
        OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _content_digest(images_root: Path, record: ImageRecord) -> str:
    # An unreadable file still gets a digest, so the key changes once it becomes readable.
    # Decoding then reports the file as bad.
    try:
        return file_sha256(images_root / record.path)
    except OSError as error:
        return f"unreadable:{errno.errorcode.get(error.errno or 0, 'unknown')}"


def dataset_fingerprint(images_root: Path, records: Sequence[ImageRecord]) -> str:
    """Return a hex sha256 over the sorted (path, content sha256) pairs of `records`.

    Only file bytes are hashed, nothing is decoded, and record order does not matter.
    A file that cannot be read contributes a marker with its errno name.
    """
    pairs = sorted((record.path, _content_digest(images_root, record)) for record in records)
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps(pair).encode("utf-8") + b"\n")
    return digest.hexdigest()


def cache_key(images_root: Path, records: Sequence[ImageRecord], spec: PreprocessSpec) -> str:
    """Return the hex sha256 that names the cache of `records` preprocessed with `spec`.

    It covers the cache format version, the Pillow version (whose resize filters define the
    output), `spec`, and each record's identity, path and content sha256 in the given order,
    which is the array order.
    """
    digest = hashlib.sha256()
    header = {"format": CACHE_FORMAT_VERSION, "pillow": PIL.__version__, "spec": spec.to_dict()}
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8") + b"\n")
    for record in records:
        entry = [record.identity, record.path, _content_digest(images_root, record)]
        digest.update(json.dumps(entry).encode("utf-8") + b"\n")
    return digest.hexdigest()


def build_cache(
    images_root: Path,
    records: list[ImageRecord],
    spec: PreprocessSpec,
    cache_dir: Path,
    *,
    progress: bool = True,
    desc: str = "cache",
) -> CacheResult:
    """Validate, preprocess and save `records` as one array, or reuse the cached array.

    Files that fail to decode are left out and listed in the result's `report`. Callers decide
    whether that is acceptable with `edgeface.data.ingest.check_bad_fraction`. A tqdm progress
    bar labelled `desc` goes to stderr when `progress` is true. A build needs len(records) x S x
    S x 3 bytes of memory (163 MB for all 13,233 LFW images at S = 64).

    Raises:
        DataError: `records` is empty, no image could be decoded, or the cache folder cannot
            be written (including a full disk, where no temporary file is left behind).
    """
    images_root = Path(images_root)
    cache_dir = Path(cache_dir)
    if not records:
        raise DataError(f"no images to cache from {images_root}: the record list is empty")
    started = time.perf_counter()
    key = cache_key(images_root, records, spec)
    array_path = cache_dir / f"{key}.npy"
    cached = _reuse_cache(array_path, key)
    if cached is not None:
        log_bad_files(cached.report, desc)
        logger.info(
            "%s: reusing %s (%d images, %d skipped)",
            desc, array_path, len(cached.records), len(cached.report.bad),
        )
        return cached
    array, kept_records, report = _preprocess_all(images_root, records, spec, progress, desc)
    log_bad_files(report, desc)
    if not kept_records:
        raise DataError(
            f"{desc}: none of the {len(records)} images under {images_root} could be decoded; "
            f"first failure: {report.bad[0][0]} ({report.bad[0][1]})"
        )
    sidecar = _sidecar_content(key, spec, kept_records, report, array.shape)
    _write_cache_files(cache_dir, array_path, array, sidecar)
    logger.info(
        "%s: cached %d images (%d skipped) in %.1f s to %s",
        desc, len(kept_records), len(report.bad), time.perf_counter() - started, array_path,
    )
    return CacheResult(path=array_path, records=kept_records, report=report, hit=False, key=key)


def _preprocess_all(
    images_root: Path,
    records: Sequence[ImageRecord],
    spec: PreprocessSpec,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, list[ImageRecord], ValidationReport]:
    """Decode and preprocess every record, and return the filled rows, kept records and report."""
    size = spec.image_size
    array = np.empty((len(records), size, size, 3), dtype=np.uint8)
    kept_records: list[ImageRecord] = []
    report = ValidationReport(checked=len(records))
    for record in tqdm(records, desc=desc, unit="img", disable=not progress):
        try:
            image = load_rgb(images_root / record.path)
        except BadImageError as error:
            report.bad.append((record.path, error.reason))
            continue
        array[len(kept_records)] = preprocess(image, spec)
        kept_records.append(record)
    return array[: len(kept_records)], kept_records, report


def _sidecar_content(
    key: str,
    spec: PreprocessSpec,
    kept_records: Sequence[ImageRecord],
    report: ValidationReport,
    shape: tuple[int, ...],
) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT_VERSION,
        "key": key,
        "spec": spec.to_dict(),
        "shape": list(shape),
        "records": [[record.identity, record.path] for record in kept_records],
        "checked": report.checked,
        "bad": [[path, reason] for path, reason in report.bad],
    }


def _reuse_cache(array_path: Path, key: str) -> CacheResult | None:
    """Return the cached result for `key` if its array and sidecar load, else None."""
    if not (array_path.is_file() and array_path.with_suffix(".json").is_file()):
        return None
    try:
        _, records, sidecar = _load_cache_files(array_path)
    except DataError as error:
        logger.warning("rebuilding the cache because the existing one is unusable: %s", error)
        return None
    if sidecar.get("key") != key:
        logger.warning("rebuilding %s: its sidecar names a different key", array_path)
        return None
    report = ValidationReport(
        checked=int(sidecar["checked"]),
        bad=[(str(path), str(reason)) for path, reason in sidecar["bad"]],
    )
    return CacheResult(path=array_path, records=records, report=report, hit=True, key=key)


def load_cache(path: Path) -> tuple[np.ndarray, list[ImageRecord]]:
    """Open a cached array read-only through a memory map, with its records in array order.

    Raises:
        DataError: the array or its `.json` sidecar is missing, corrupt, or they disagree.
    """
    array, records, _ = _load_cache_files(Path(path))
    return array, records


def _load_cache_files(path: Path) -> tuple[np.ndarray, list[ImageRecord], dict[str, Any]]:
    sidecar_path = path.with_suffix(".json")
    fix = "delete both files to rebuild the cache"
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"cannot read cache array {path}: {error}; {fix}") from None
    try:
        sidecar = json.loads(sidecar_path.read_text(encoding="utf-8"))
        records = [ImageRecord(str(identity), str(rel)) for identity, rel in sidecar["records"]]
        expected_shape = tuple(int(dim) for dim in sidecar["shape"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"cannot read cache sidecar {sidecar_path}: {error!r}; {fix}") from None
    if (
        array.dtype != np.uint8
        or array.ndim != 4
        or array.shape[3] != 3
        or array.shape != expected_shape
        or array.shape[0] != len(records)
    ):
        raise DataError(
            f"cache array {path} ({array.dtype}, shape {array.shape}) does not match its "
            f"sidecar ({len(records)} records, shape {expected_shape}); {fix}"
        )
    return array, records, sidecar


def _write_cache_files(
    cache_dir: Path, array_path: Path, array: np.ndarray, sidecar: dict[str, Any]
) -> None:
    """Write the array, then the sidecar, each atomically, and raise DataError on failure."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(array_path, lambda file: np.lib.format.write_array(file, array))
        sidecar_bytes = json.dumps(sidecar, indent=1).encode("utf-8")
        _write_atomic(array_path.with_suffix(".json"), lambda file: file.write(sidecar_bytes))
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(
                f"no space left to write the preprocessing cache in {cache_dir} "
                f"(about {array.nbytes / 1e6:.0f} MB needed): free disk space or choose "
                "another cache folder"
            ) from error
        raise DataError(f"cannot write the preprocessing cache in {cache_dir}: {error}") from error


def _write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temporary file in the same folder, fsync, then rename it."""
    descriptor, temp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    # Persist the rename itself. Some file systems reject fsync on a folder, which is not an
    # error because the file's own data is already on disk at this point.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
