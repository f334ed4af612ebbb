"""Tests for the dataset scan, content-based decoding and validation in edgeface.data.ingest."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeface.cli.main import main
from edgeface.config import load_config
from edgeface.data.ingest import (
    ACCEPTED_FORMATS,
    IMAGE_EXTENSIONS,
    BadImageError,
    ImageRecord,
    ValidationReport,
    check_bad_fraction,
    count_noun,
    decode_rgb,
    list_images,
    load_rgb,
    resolve_images_root,
    scan_images,
    validate_images,
)
from edgeface.errors import ConfigError, DataError

LFW_IDENTITIES = ["Aaron_Peirsol", "Abdullah_Gul", "Adam_Sandler"]


@pytest.fixture
def lfw_images(lfw_dir: Path) -> Path:
    return lfw_dir / "lfw-deepfunneled"


@pytest.fixture
def small_dataset(tmp_path: Path, lfw_images: Path, orl_dir: Path) -> Path:
    """Copies of three LFW people and one ORL subject, plus entries that must be skipped."""
    root = tmp_path / "faces"
    for identity in LFW_IDENTITIES:
        shutil.copytree(lfw_images / identity, root / identity)
    shutil.copytree(orl_dir / "s1", root / "s1")
    (root / "README.txt").write_text("top-level file, not an identity\n")
    (root / "Aaron_Peirsol" / ".DS_Store").write_bytes(b"\x00\x01hidden")
    (root / ".thumbnails" / "x").mkdir(parents=True)
    (root / ".thumbnails" / "x" / "x_0001.jpg").write_bytes(b"hidden folder")
    (root / "Empty_Person").mkdir()
    (root / "Adam_Sandler" / "nested").mkdir()
    return root


def _save(image: Image.Image, path: Path, image_format: str, **params: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, image_format, **params)
    return path


# --- resolve_images_root ---------------------------------------------------------------------


def test_resolve_lfw_folder(lfw_dir: Path) -> None:
    assert resolve_images_root(lfw_dir) == lfw_dir / "lfw-deepfunneled"


def test_resolve_orl_folder(orl_dir: Path) -> None:
    assert resolve_images_root(orl_dir) == orl_dir


@pytest.mark.parametrize("folder", ["lfw", "lfw-funneled"])
def test_resolve_other_lfw_archive_names(tmp_path: Path, folder: str) -> None:
    (tmp_path / folder / "Someone").mkdir(parents=True)
    (tmp_path / "pairs.txt").write_text("10\t300\n")
    assert resolve_images_root(tmp_path) == tmp_path / folder


def test_resolve_missing_folder_names_fetch(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as error:
        resolve_images_root(missing)
    assert str(missing) in str(error.value)
    assert "edgeface data fetch lfw" in str(error.value)


def test_resolve_folder_without_identities(tmp_path: Path) -> None:
    (tmp_path / "pairs.txt").write_text("10\t300\n")
    (tmp_path / ".hidden").mkdir()
    with pytest.raises(DataError) as error:
        resolve_images_root(tmp_path)
    assert str(tmp_path) in str(error.value)
    assert "edgeface data fetch lfw" in str(error.value)


# --- list_images -----------------------------------------------------------------------------


def test_list_skips_hidden_and_top_level(
    small_dataset: Path, lfw_images: Path, orl_dir: Path
) -> None:
    records = list_images(small_dataset)

    sources = {identity: lfw_images / identity for identity in LFW_IDENTITIES}
    sources["s1"] = orl_dir / "s1"
    expected = [
        ImageRecord(identity, f"{identity}/{path.name}")
        for identity, folder in sorted(sources.items())
        for path in sorted(folder.iterdir())
    ]
    assert records == expected
    assert len(records) == 4 + 19 + 4 + 10


def test_list_full_lfw_counts(lfw_images: Path) -> None:
    records = list_images(lfw_images)

    assert len(records) == 13_233
    assert len({record.identity for record in records}) == 5_749
    assert records[0] == ImageRecord("AJ_Cook", "AJ_Cook/AJ_Cook_0001.jpg")
    assert records == sorted(records, key=lambda record: (record.identity, record.path))


def test_list_orl_counts(orl_dir: Path) -> None:
    records = list_images(orl_dir)

    assert len(records) == 400
    assert len({record.identity for record in records}) == 40
    assert "README" not in {record.path for record in records}


def test_list_only_hidden_entries_fails(tmp_path: Path) -> None:
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "a.jpg").write_bytes(b"x")
    (tmp_path / "Person").mkdir()
    (tmp_path / "Person" / ".hidden.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="no images in"):
        list_images(tmp_path)


def test_list_missing_root_fails(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        list_images(tmp_path / "missing")


def _synthetic_png(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return _save(Image.fromarray(pixels), path, "PNG")


def test_list_skips_files_without_image_extension(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _synthetic_png(tmp_path / "Person" / "a.png")
    _synthetic_png(tmp_path / "Person" / "b.JPG")
    (tmp_path / "Person" / "notes.txt").write_text("not an image\n")
    (tmp_path / "Person" / "README").write_text("no extension\n")
    (tmp_path / "Person" / "c.jpg").write_text("text named .jpg\n")

    with caplog.at_level(logging.INFO, logger="edgeface.data.ingest"):
        records = list_images(tmp_path)

    assert [record.path for record in records] == ["Person/a.png", "Person/b.JPG", "Person/c.jpg"]
    assert scan_images(tmp_path).skipped == ["Person/README", "Person/notes.txt"]
    assert "skipped 2 files without an image extension: Person/README, Person/notes.txt" \
        in caplog.text


def test_non_image_file_does_not_count_as_bad(tmp_path: Path) -> None:
    _synthetic_png(tmp_path / "Person" / "a.png")
    (tmp_path / "Person" / "notes.txt").write_text("not an image\n")

    report = validate_images(tmp_path, list_images(tmp_path))

    assert report.checked == 1
    assert report.bad == []
    check_bad_fraction(report, 0.0, "tmp")


def test_corrupt_file_with_image_extension_counts_as_bad(tmp_path: Path) -> None:
    _synthetic_png(tmp_path / "Person" / "a.png")
    (tmp_path / "Person" / "b.jpg").write_text("text named .jpg\n")

    report = validate_images(tmp_path, list_images(tmp_path))

    assert report.checked == 2
    assert report.bad == [("Person/b.jpg", "not an image")]


def test_list_only_non_images_names_them(tmp_path: Path) -> None:
    (tmp_path / "Person").mkdir()
    (tmp_path / "Person" / "notes.txt").write_text("x")

    with pytest.raises(DataError) as error:
        list_images(tmp_path)

    message = str(error.value)
    assert "no images in" in message
    assert "found 1 file without an image extension: Person/notes.txt" in message
    assert ".jpg, .png or .pgm" in message


def test_image_extensions_cover_pillow_registry() -> None:
    registered = {extension for extension, image_format in Image.registered_extensions().items()
                  if image_format in ACCEPTED_FORMATS or image_format == "MPO"}

    assert registered <= IMAGE_EXTENSIONS
    assert {".jpg", ".png", ".pgm"} <= IMAGE_EXTENSIONS


def test_count_noun_singular_and_plural() -> None:
    assert count_noun(1, "identity", "identities") == "1 identity"
    assert count_noun(3, "identity", "identities") == "3 identities"
    assert count_noun(0, "image") == "0 images"
    assert count_noun(1, "image") == "1 image"


# --- load_rgb on real files ------------------------------------------------------------------


def test_load_lfw_jpeg(lfw_images: Path) -> None:
    image = load_rgb(lfw_images / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg")

    assert image.mode == "RGB"
    assert image.size == (250, 250)


def test_load_orl_pgm_as_grey_rgb(orl_dir: Path) -> None:
    path = orl_dir / "s1" / "1.pgm"
    image = load_rgb(path)
    pixels = np.asarray(image)

    assert image.mode == "RGB"
    assert image.size == (92, 112)
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    assert np.array_equal(pixels[..., 0], np.asarray(Image.open(path)))


# --- load_rgb on generated files -------------------------------------------------------------


def test_load_grey_png(tmp_path: Path) -> None:
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    path = _save(Image.fromarray(grey, mode="L"), tmp_path / "grey.png", "PNG")

    pixels = np.asarray(load_rgb(path))

    assert pixels.shape == (6, 8, 3)
    for channel in range(3):
        assert np.array_equal(pixels[..., channel], grey)


def test_load_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (4, 2), 1)
    image.putpalette([255, 255, 255, 200, 30, 40] + [0] * (256 * 3 - 6))
    image.putpixel((0, 0), 0)
    path = _save(image, tmp_path / "palette.png", "PNG", transparency=0)

    pixels = np.asarray(load_rgb(path))

    assert pixels.shape == (2, 4, 3)
    assert tuple(pixels[0, 0]) == (0, 0, 0)  # transparent white on the black background
    assert tuple(pixels[1, 3]) == (200, 30, 40)


def test_load_rgba_composites_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (255, 0, 0, 0)
    rgba[1, 0] = (200, 100, 50, 128)
    path = _save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "alpha.png", "PNG")

    pixels = np.asarray(load_rgb(path)).astype(int)

    assert tuple(pixels[0, 0]) == (255, 0, 0)
    assert tuple(pixels[0, 1]) == (0, 0, 0)
    assert np.all(np.abs(pixels[1, 0] - np.array([100, 50, 25])) <= 1)


def test_load_grey_with_alpha(tmp_path: Path) -> None:
    image = Image.new("LA", (3, 3), (180, 255))
    image.putpixel((1, 1), (180, 0))
    path = _save(image, tmp_path / "la.png", "PNG")

    pixels = np.asarray(load_rgb(path))

    assert tuple(pixels[0, 0]) == (180, 180, 180)
    assert tuple(pixels[1, 1]) == (0, 0, 0)


def test_load_cmyk_jpeg(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), tmp_path / "cmyk.jpg", "JPEG",
                 quality=95)
    assert Image.open(path).mode == "CMYK"

    pixels = np.asarray(load_rgb(path)).astype(int)

    # Full cyan ink: no red, full green and blue, up to JPEG rounding.
    assert np.all(np.abs(pixels - np.array([0, 255, 255])) <= 3)


def test_load_16bit_grey_scales_to_8bit(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png", "PNG")
    assert Image.open(path).mode.startswith("I;16")

    pixels = np.asarray(load_rgb(path))

    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_load_float_grey_in_unit_range(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    path = _save(Image.fromarray(values, mode="F"), tmp_path / "float.tiff", "TIFF")

    pixels = np.asarray(load_rgb(path))

    assert pixels[0, :, 1].tolist() == [0, 128, 255]


def test_load_png_named_jpg(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (5, 7), (10, 20, 30)), tmp_path / "photo.jpg", "PNG")
    assert path.read_bytes().startswith(b"\x89PNG")

    image = load_rgb(path)

    assert image.size == (5, 7)
    assert tuple(np.asarray(image)[3, 2]) == (10, 20, 30)


def test_load_applies_exif_orientation(tmp_path: Path) -> None:
    # 60 wide, 30 high: left half red, right half blue. Orientation 6 means a viewer turns
    # the stored pixels 90 degrees clockwise, so the red half ends up on top.
    stored = Image.new("RGB", (60, 30), (255, 0, 0))
    stored.paste((0, 0, 255), (30, 0, 60, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(stored, tmp_path / "rotated.jpg", "JPEG", exif=exif, quality=95)

    image = load_rgb(path)
    pixels = np.asarray(image).astype(int)

    assert image.size == (30, 60)
    assert np.all(np.abs(pixels[10, 15] - np.array([255, 0, 0])) <= 8)
    assert np.all(np.abs(pixels[50, 15] - np.array([0, 0, 255])) <= 8)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "zero bytes"),
        (b"Name\tcount\nAaron_Peirsol\t4\n", "not an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not an image"),
    ],
)
def test_load_rejects_non_images(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "Person_0001.jpg"
    path.write_bytes(content)

    with pytest.raises(BadImageError) as error:
        load_rgb(path)

    assert error.value.reason == reason
    assert str(path) in str(error.value)
    assert isinstance(error.value, DataError)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.95])
def test_load_rejects_truncated_jpeg(
    tmp_path: Path, lfw_images: Path, keep_fraction: float
) -> None:
    data = (lfw_images / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * keep_fraction)])

    with pytest.raises(BadImageError) as error:
        load_rgb(path)

    assert error.value.reason == "truncated"


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadImageError) as error:
        load_rgb(tmp_path / "gone.jpg")
    assert error.value.reason == "file not found"


def test_decode_bytes_names_source() -> None:
    with pytest.raises(BadImageError, match="upload.jpg: not an image"):
        decode_rgb(b"not an image at all", "upload.jpg")


# --- validation and the bad-fraction limit ---------------------------------------------------


def _dataset_with_bad_files(root: Path, lfw_images: Path) -> None:
    shutil.copytree(lfw_images / "Abdullah_Gul", root / "Abdullah_Gul")
    (root / "Abdullah_Gul" / "Abdullah_Gul_0099.jpg").write_bytes(b"")
    (root / "Broken").mkdir()
    (root / "Broken" / "Broken_0001.jpg").write_text("text, not JPEG")


def test_validate_reports_bad_files(tmp_path: Path, lfw_images: Path) -> None:
    _dataset_with_bad_files(tmp_path, lfw_images)
    records = list_images(tmp_path)

    report = validate_images(tmp_path, records)

    assert report.checked == len(records) == 21
    assert report.bad == [
        ("Abdullah_Gul/Abdullah_Gul_0099.jpg", "zero bytes"),
        ("Broken/Broken_0001.jpg", "not an image"),
    ]
    assert report.bad_fraction == pytest.approx(2 / 21)
    as_dict = report.to_dict()
    assert as_dict["bad_count"] == 2
    assert as_dict["bad"][1] == {"path": "Broken/Broken_0001.jpg", "reason": "not an image"}


def test_bad_fraction_over_limit_fails() -> None:
    report = ValidationReport(
        checked=100, bad=[(f"P/P_{index:04d}.jpg", "truncated") for index in range(1, 8)]
    )

    with pytest.raises(DataError) as error:
        check_bad_fraction(report, 0.05, "node-2")

    message = str(error.value)
    assert "node-2" in message
    assert "7 of 100" in message
    assert "P/P_0001.jpg (truncated)" in message
    assert "P/P_0006.jpg" not in message
    assert "and 2 more" in message
    assert "`max-bad-fraction`" in message
    assert "--max-bad-fraction" in message


def test_bad_fraction_at_limit_passes() -> None:
    report = ValidationReport(checked=100, bad=[("P/P_0001.jpg", "truncated")] * 5)
    check_bad_fraction(report, 0.05, "node-1")
    check_bad_fraction(ValidationReport(), 0.0, "empty")


def test_bad_fraction_limit_must_be_fraction() -> None:
    with pytest.raises(ConfigError, match="max-bad-fraction"):
        check_bad_fraction(ValidationReport(checked=1), 5.0, "node-1")


def test_bad_file_warnings_are_rate_limited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "Person").mkdir()
    for index in range(1, 16):
        (tmp_path / "Person" / f"Person_{index:04d}.jpg").write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger="edgeface.data.ingest"):
        report = validate_images(tmp_path, list_images(tmp_path), desc="node-3")

    assert len(report.bad) == 15
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 11
    assert messages[0] == "node-3: skipping Person/Person_0001.jpg: zero bytes"
    assert "5 more unreadable images (15 of 15 in total)" in messages[-1]


# --- edgeface data inspect ---------------------------------------------------------------------


def test_inspect_json_summary(
    tmp_path: Path, lfw_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _dataset_with_bad_files(tmp_path, lfw_images)

    code = main(["data", "inspect", str(tmp_path), "--format", "json", "--no-progress",
                 "--max-bad-fraction", "0.5"])

    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert summary["images_root"] == str(tmp_path)
    assert summary["identities"] == 2
    assert summary["images"] == 21
    assert summary["images_per_identity"] == {"min": 1, "median": 10.5, "max": 20}
    assert summary["validation"]["bad_count"] == 2


def test_inspect_fails_over_limit(
    tmp_path: Path, lfw_images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _dataset_with_bad_files(tmp_path, lfw_images)

    code = main(["data", "inspect", str(tmp_path), "--no-progress"])

    output = capsys.readouterr().out
    assert code == 2
    assert "unreadable:  2 of 21" in output
    assert "Broken/Broken_0001.jpg: not an image" in output


def test_inspect_default_limit_matches_run(
    tmp_path: Path, orl_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One unreadable file in 401 is below the 1% that `edgeface run` tolerates by default."""
    shutil.copytree(orl_dir, tmp_path / "orl")
    (tmp_path / "orl" / "s1" / "broken.pgm").write_bytes(b"")

    code = main(["data", "inspect", str(tmp_path / "orl"), "--no-progress"])

    assert code == 0
    assert "unreadable:  1 of 401" in capsys.readouterr().out
    assert load_config().data.max_bad_fraction == 0.01


def test_inspect_error_names_own_flag(
    tmp_path: Path, lfw_images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _dataset_with_bad_files(tmp_path, lfw_images)

    code = main(["data", "inspect", str(tmp_path), "--no-progress"])

    assert code == 2
    assert "more than max-bad-fraction 1.00%" in caplog.text
    assert "allow more with `edgeface data inspect --max-bad-fraction`" in caplog.text
    assert "config key" not in caplog.text


def test_inspect_rejects_invalid_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["data", "inspect", str(tmp_path), "--max-bad-fraction", "5"])

    assert code == 2
    assert "invalid --max-bad-fraction 5.0: use a fraction from 0 to 1" in caplog.text
    assert capsys.readouterr().out == ""


def test_inspect_reports_skipped_non_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for identity in ("A", "B"):
        for index in range(2):
            _synthetic_png(tmp_path / identity / f"{index}.png", seed=index)
    (tmp_path / "A" / "notes.txt").write_text("x")

    text_code = main(["data", "inspect", str(tmp_path), "--no-progress", "--max-bad-fraction", "0"])
    text = capsys.readouterr().out
    json_code = main(["data", "inspect", str(tmp_path), "--no-progress", "--format", "json"])
    summary = json.loads(capsys.readouterr().out)

    assert text_code == 0
    assert "skipped:     1 file without an image extension: A/notes.txt" in text
    assert "unreadable:  0 of 4" in text
    assert json_code == 0
    assert summary["images"] == 4
    assert summary["skipped_non_images"] == ["A/notes.txt"]


def test_inspect_all_corrupt_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for identity in ("A", "B", "C"):
        (tmp_path / identity).mkdir()
        for index in range(3):
            (tmp_path / identity / f"{index}.jpg").write_text("not a JPEG\n")

    code = main(["data", "inspect", str(tmp_path), "--no-progress"])

    assert code == 2
    assert "9 of 9 images are unreadable (100.00%)" in caplog.text


def test_bad_fraction_message_singular() -> None:
    report = ValidationReport(checked=1, bad=[("P/P_0001.jpg", "truncated")])

    with pytest.raises(DataError) as error:
        check_bad_fraction(report, 0.0, "node-0")

    assert "1 of 1 image is unreadable" in str(error.value)


def test_inspect_orl_text(orl_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "inspect", str(orl_dir), "--no-progress"])

    output = capsys.readouterr().out
    assert code == 0
    assert "identities:  40 (40 with 2 or more images)" in output
    assert "unreadable:  0 of 400" in output
