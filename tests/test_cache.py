"""Tests for preprocessing and the content-keyed array cache in edgeface.data.cache."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
from PIL import Image

import edgeface.data.cache as cache_module
from edgeface.data.cache import (
    PreprocessSpec,
    build_cache,
    dataset_fingerprint,
    load_cache,
    preprocess,
)
from edgeface.data.ingest import ImageRecord, list_images, load_rgb
from edgeface.errors import ConfigError, DataError

# Eleven LFW people with 52 images in all (4 + 19 + 4 + 2 + 7 + 2 + 5 + 6 + 1 + 1 + 1).
IDENTITIES = [
    "Aaron_Peirsol", "Abdullah_Gul", "Adam_Sandler", "Al_Davis", "Al_Sharpton", "Alan_Ball",
    "Alastair_Campbell", "Albert_Costa", "Albert_Pujols", "AJ_Cook", "AJ_Lamas",
]


@pytest.fixture
def images_root(tmp_path: Path, lfw_dir: Path) -> Path:
    root = tmp_path / "images"
    for identity in IDENTITIES:
        shutil.copytree(lfw_dir / "lfw-deepfunneled" / identity, root / identity)
    return root


@pytest.fixture
def records(images_root: Path) -> list[ImageRecord]:
    return list_images(images_root)


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path: Path) -> Image.Image:
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr(cache_module, "load_rgb", fail)


def _failing_write_array(error: BaseException) -> Any:
    """Stand-in for np.lib.format.write_array that writes part of the data, then raises."""

    def write_array(file: BinaryIO, array: np.ndarray, *args: Any, **kwargs: Any) -> None:
        file.write(b"\x93NUMPY partial array data")
        raise error

    return write_array


# --- PreprocessSpec and preprocess ---------------------------------------------------------------


@pytest.mark.parametrize("size", [8, 513, 0, 64.0, True])
def test_spec_rejects_image_size(size: Any) -> None:
    with pytest.raises(ConfigError, match="invalid image size"):
        PreprocessSpec(image_size=size)


@pytest.mark.parametrize(
    "crop",
    [(0.5, 0.0, 0.4, 1.0), (0.0, 0.6, 1.0, 0.6), (-0.1, 0.0, 1.0, 1.0), (0.0, 0.0, 1.0, 1.2),
     (0.1, 0.2, 0.3), "wide"],
)
def test_spec_rejects_crop(crop: Any) -> None:
    with pytest.raises(ConfigError, match="invalid crop"):
        PreprocessSpec(crop=crop)


def test_spec_accepts_crop_list() -> None:
    spec = PreprocessSpec(image_size=32, crop=[0, 0, 1, 1])  # type: ignore[arg-type]
    assert spec.crop == (0.0, 0.0, 1.0, 1.0)


def test_preprocess_shape_and_determinism(lfw_dir: Path) -> None:
    image = load_rgb(lfw_dir / "lfw-deepfunneled" / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg")
    spec = PreprocessSpec(image_size=48)

    first = preprocess(image, spec)
    second = preprocess(image.copy(), spec)

    assert first.dtype == np.uint8
    assert first.shape == (48, 48, 3)
    assert np.array_equal(first, second)


def test_preprocess_crops_the_box() -> None:
    # Four 100x100 quadrants: the crop (0.5, 0.5, 1, 1) must keep only the bottom-right one.
    image = Image.new("RGB", (200, 200), (255, 0, 0))
    image.paste((0, 0, 255), (100, 100, 200, 200))

    pixels = preprocess(image, PreprocessSpec(image_size=16, crop=(0.5, 0.5, 1.0, 1.0)))

    assert np.all(pixels == np.array([0, 0, 255], dtype=np.uint8))


def test_preprocess_rejects_non_rgb() -> None:
    with pytest.raises(DataError, match="mode L"):
        preprocess(Image.new("L", (20, 20)), PreprocessSpec())


# --- build_cache -------------------------------------------------------------------------------


def test_build_writes_array_and_sidecar(
    images_root: Path, records: list[ImageRecord], tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    spec = PreprocessSpec()

    result = build_cache(images_root, records, spec, cache_dir, progress=False)
    array, cached_records = load_cache(result.path)

    assert len(records) == 52
    assert not result.hit
    assert len(result.key) == 64
    assert result.path == cache_dir / f"{result.key}.npy"
    assert result.records == records
    assert cached_records == records
    assert result.report.checked == 52
    assert result.report.bad == []
    assert isinstance(array, np.memmap)
    assert array.dtype == np.uint8
    assert array.shape == (52, 64, 64, 3)
    for index in (0, 25, 51):
        expected = preprocess(load_rgb(images_root / records[index].path), spec)
        assert np.array_equal(array[index], expected)
    sidecar = json.loads(result.path.with_suffix(".json").read_text())
    assert sidecar["key"] == result.key
    assert sidecar["spec"] == {"image_size": 64, "crop": [0.33, 0.31, 0.67, 0.70]}
    assert sorted(path.name for path in cache_dir.iterdir()) == [
        f"{result.key}.json", f"{result.key}.npy"
    ]


def test_second_build_is_hit_without_decoding(
    images_root: Path, records: list[ImageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)
    _forbid_decoding(monkeypatch)

    second = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)

    assert second.hit
    assert second.key == first.key
    assert second.path == first.path
    assert second.records == first.records


def test_changed_bytes_give_new_key(
    images_root: Path, records: list[ImageRecord], tmp_path: Path
) -> None:
    first = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)
    target = images_root / records[10].path
    Image.open(target).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target, "JPEG")

    second = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)
    array, _ = load_cache(second.path)
    expected = preprocess(load_rgb(target), PreprocessSpec())

    assert second.key != first.key
    assert not second.hit
    assert np.array_equal(array[10], expected)


def test_renamed_file_gives_new_key(
    images_root: Path, records: list[ImageRecord], tmp_path: Path
) -> None:
    first = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)
    old = images_root / "Al_Davis" / "Al_Davis_0002.jpg"
    old.rename(images_root / "Al_Davis" / "Al_Davis_0003.jpg")

    second = build_cache(
        images_root, list_images(images_root), PreprocessSpec(), tmp_path / "cache", progress=False
    )

    assert second.key != first.key


def test_spec_change_gives_new_key(
    images_root: Path, records: list[ImageRecord], tmp_path: Path
) -> None:
    small = build_cache(
        images_root, records, PreprocessSpec(image_size=32), tmp_path / "cache", progress=False
    )
    default = build_cache(
        images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False
    )

    assert small.key != default.key
    assert load_cache(small.path)[0].shape == (52, 32, 32, 3)


def test_moved_dataset_keeps_key(
    images_root: Path, records: list[ImageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)
    moved = shutil.move(images_root, tmp_path / "moved")
    _forbid_decoding(monkeypatch)

    second = build_cache(Path(moved), records, PreprocessSpec(), tmp_path / "cache", progress=False)

    assert second.hit
    assert second.key == first.key


def test_bad_files_are_left_out(
    images_root: Path, records: list[ImageRecord], tmp_path: Path
) -> None:
    (images_root / records[3].path).write_bytes(b"")
    (images_root / records[40].path).write_text("not a JPEG")

    result = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)
    array, cached_records = load_cache(result.path)

    assert result.report.checked == 52
    assert result.report.bad == [
        (records[3].path, "zero bytes"),
        (records[40].path, "not an image"),
    ]
    kept = [record for index, record in enumerate(records) if index not in (3, 40)]
    assert cached_records == kept
    assert array.shape[0] == 50
    assert np.array_equal(array[3], preprocess(load_rgb(images_root / records[4].path),
                                               PreprocessSpec()))


def test_hit_restores_bad_files(
    images_root: Path, records: list[ImageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (images_root / records[0].path).write_bytes(b"")
    build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)
    _forbid_decoding(monkeypatch)

    again = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)

    assert again.hit
    assert again.report.checked == 52
    assert again.report.bad == [(records[0].path, "zero bytes")]


def test_all_files_bad_fails(tmp_path: Path) -> None:
    (tmp_path / "images" / "Person").mkdir(parents=True)
    (tmp_path / "images" / "Person" / "Person_0001.jpg").write_bytes(b"")
    records = list_images(tmp_path / "images")

    with pytest.raises(DataError, match="none of the 1 images"):
        build_cache(tmp_path / "images", records, PreprocessSpec(), tmp_path / "cache",
                    progress=False)


def test_empty_record_list_fails(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="record list is empty"):
        build_cache(tmp_path, [], PreprocessSpec(), tmp_path / "cache", progress=False)


# --- atomic writes and failures ------------------------------------------------------------------


def test_failure_mid_write_leaves_nothing(
    images_root: Path, records: list[ImageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    monkeypatch.setattr(np.lib.format, "write_array", _failing_write_array(RuntimeError("crash")))

    with pytest.raises(RuntimeError, match="crash"):
        build_cache(images_root, records, PreprocessSpec(), cache_dir, progress=False)

    assert list(cache_dir.iterdir()) == []


def test_full_disk_raises_data_error(
    images_root: Path, records: list[ImageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np.lib.format, "write_array", _failing_write_array(full))

    with pytest.raises(DataError) as error:
        build_cache(images_root, records, PreprocessSpec(), cache_dir, progress=False)

    assert str(cache_dir) in str(error.value)
    assert "no space left" in str(error.value)
    assert list(cache_dir.iterdir()) == []


def test_full_disk_on_sidecar_keeps_no_temp(
    images_root: Path, records: list[ImageRecord], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_dir = tmp_path / "cache"
    real_fsync = cache_module.os.fsync
    calls = {"count": 0}

    # fsync runs on the array's temporary file, then on the cache folder, then on the sidecar's
    # temporary file: the third call fails.
    def fsync_fails_on_sidecar(descriptor: int) -> None:
        calls["count"] += 1
        if calls["count"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(cache_module.os, "fsync", fsync_fails_on_sidecar)

    with pytest.raises(DataError, match="no space left"):
        build_cache(images_root, records, PreprocessSpec(), cache_dir, progress=False)

    assert calls["count"] == 3
    # The array was complete and renamed, but without its sidecar it is never reused.
    assert [path.suffix for path in cache_dir.iterdir()] == [".npy"]


def test_array_without_sidecar_is_rebuilt(
    images_root: Path, records: list[ImageRecord], tmp_path: Path
) -> None:
    first = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)
    first.path.with_suffix(".json").unlink()

    second = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)

    assert not second.hit
    assert load_cache(second.path)[0].shape == (52, 64, 64, 3)


# --- load_cache ----------------------------------------------------------------------------------


def test_load_truncated_array_fails(
    images_root: Path, records: list[ImageRecord], tmp_path: Path
) -> None:
    result = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)
    data = result.path.read_bytes()
    result.path.write_bytes(data[: len(data) // 2])

    with pytest.raises(DataError, match="cannot read cache array"):
        load_cache(result.path)
    rebuilt = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache",
                          progress=False)
    assert not rebuilt.hit
    assert load_cache(rebuilt.path)[0].shape == (52, 64, 64, 3)


def test_load_mismatched_sidecar_fails(
    images_root: Path, records: list[ImageRecord], tmp_path: Path
) -> None:
    result = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)
    sidecar_path = result.path.with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["records"] = sidecar["records"][:-1]
    sidecar_path.write_text(json.dumps(sidecar))

    with pytest.raises(DataError, match="does not match its sidecar"):
        load_cache(result.path)


def test_load_corrupt_sidecar_fails(
    images_root: Path, records: list[ImageRecord], tmp_path: Path
) -> None:
    result = build_cache(images_root, records, PreprocessSpec(), tmp_path / "cache", progress=False)
    result.path.with_suffix(".json").write_text("{not json")

    with pytest.raises(DataError, match="cannot read cache sidecar"):
        load_cache(result.path)


# --- dataset_fingerprint -------------------------------------------------------------------------


def test_fingerprint_is_content_keyed(
    images_root: Path, records: list[ImageRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    _forbid_decoding(monkeypatch)

    first = dataset_fingerprint(images_root, records)
    shuffled = dataset_fingerprint(images_root, list(reversed(records)))
    (images_root / records[7].path).write_bytes(b"changed bytes")
    changed = dataset_fingerprint(images_root, records)

    assert len(first) == 64
    assert shuffled == first
    assert changed != first


def test_fingerprint_covers_paths(images_root: Path, records: list[ImageRecord]) -> None:
    first = dataset_fingerprint(images_root, records)
    subset = dataset_fingerprint(images_root, records[:-1])

    assert subset != first
