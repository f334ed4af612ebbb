"""Dataset scan, image validation by content, and conversion to RGB.

A dataset is a folder of `<identity>/<image>` files. LFW keeps that folder one level down
(`lfw-deepfunneled/` beside the protocol files), while ORL is laid out directly as `s1/` ...
`s40/`. The listing keeps only files with an image extension, so a README beside the images is
skipped. Decoding then goes by the bytes, never by the extension: a PNG named `.jpg` loads, and a
text file named `.jpg` is unreadable. Every image comes out as an 8-bit RGB `PIL.Image.Image`
with its EXIF orientation applied.
"""

from __future__ import annotations

import io
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from edgeface.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

# Folder names that the official LFW archives unpack to, in order of preference.
LFW_IMAGE_FOLDERS = ("lfw-deepfunneled", "lfw", "lfw-funneled")

# Formats that Image.open may try. Restricting the list keeps Pillow from handing EPS or PDF
# bytes to Ghostscript and makes anything else fail as "not an image". Pillow's JPEG plugin
# also opens multi-picture (MPO) camera files.
ACCEPTED_FORMATS = ("JPEG", "PNG", "PPM", "BMP", "GIF", "TIFF", "WEBP")

# File extensions (lower case) that Pillow 13 registers for ACCEPTED_FORMATS. Other files are
# left out of a dataset listing. Files without an extension are left out too.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".ppm", ".pgm", ".pbm", ".pnm",
    ".pfm", ".bmp", ".gif", ".tif", ".tiff", ".webp",
})

# Files without an image extension named in the listing's log line before the rest are counted.
MAX_NAMED_SKIPPED_FILES = 3

# Colour that transparent pixels are composited onto: black, the value that zero padding
# gives elsewhere in the pipeline.
ALPHA_BACKGROUND = (0, 0, 0)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_DEPTH_GREY_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_EXIF_ORIENTATION_TAG = 0x0112

# Skipped files logged one by one before the rest are only counted.
MAX_LOGGED_BAD_FILES = 10


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset: its identity label and its POSIX path under the images root."""

    identity: str
    path: str


class BadImageError(DataError):
    """File that cannot be decoded as an image, with a short `reason` such as "truncated"."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass
class ValidationReport:
    """Outcome of decoding a set of images: how many were checked, and which failed and why."""

    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)

    @property
    def bad_fraction(self) -> float:
        """Fraction of checked images that failed, 0.0 when nothing was checked."""
        return len(self.bad) / self.checked if self.checked else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "bad_count": len(self.bad),
            "bad_fraction": self.bad_fraction,
            "bad": [{"path": path, "reason": reason} for path, reason in self.bad],
        }


@dataclass(frozen=True)
class DatasetListing:
    """Images of a dataset folder and the files left out because they lack an image extension.

    Both lists are sorted by identity, then file name, and hold POSIX paths under the images
    root.
    """

    records: list[ImageRecord]
    skipped: list[str]


def count_noun(count: int, singular: str, plural: str | None = None) -> str:
    """Return `count` with the noun in the right number: "1 identity", "3 identities"."""
    if count == 1:
        return f"{count} {singular}"
    return f"{count} {plural or singular + 's'}"


def resolve_images_root(data_dir: Path) -> Path:
    """Return the folder under `data_dir` that contains the `<identity>/<image>` files.

    An LFW data folder contains one of `lfw-deepfunneled/`, `lfw/` or `lfw-funneled/` (checked
    in that order). Any other folder with at least one visible subfolder, such as ORL's `s1/` ...
    `s40/`, is its own images root.

    Raises:
        DataError: `data_dir` does not exist or contains no identity folders.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(
            f"dataset folder {data_dir} not found: pass the folder that contains the images, "
            "or run `edgeface data fetch lfw` to download LFW"
        )
    for name in LFW_IMAGE_FOLDERS:
        if (data_dir / name).is_dir():
            return data_dir / name
    if any(_is_visible_dir(entry) for entry in os.scandir(data_dir)):
        return data_dir
    raise DataError(
        f"no image folders in {data_dir}: expected {'/, '.join(LFW_IMAGE_FOLDERS)}/ or "
        "<identity>/<image> subfolders; run `edgeface data fetch lfw` to download LFW"
    )


def list_images(images_root: Path) -> list[ImageRecord]:
    """List every image file under `images_root/<identity>/`, sorted by identity, then name.

    See `scan_images` for what is skipped. The skipped files without an image extension are
    logged at INFO.

    Raises:
        DataError: `images_root` is missing, or no identity folder contains an image file.
    """
    listing = scan_images(images_root)
    if listing.skipped:
        logger.info("%s: skipped %s without an image extension: %s", images_root,
                    count_noun(len(listing.skipped), "file"), _name_some(listing.skipped))
    return listing.records


def scan_images(images_root: Path) -> DatasetListing:
    """List the image files under `images_root/<identity>/` and the files skipped as non-images.

    Only names are read. Hidden entries (names starting with '.'), files at the top level and
    folders nested inside an identity folder are left out silently. Visible files whose
    extension is not in `IMAGE_EXTENSIONS` (compared in lower case) go to `skipped`.

    Raises:
        DataError: `images_root` is missing, or no identity folder contains an image file.
    """
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise DataError(f"images folder {images_root} not found")
    records: list[ImageRecord] = []
    skipped: list[ImageRecord] = []
    with os.scandir(images_root) as identity_entries:
        identity_dirs = [entry for entry in identity_entries if _is_visible_dir(entry)]
    for identity_dir in identity_dirs:
        with os.scandir(identity_dir.path) as file_entries:
            for entry in file_entries:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                record = ImageRecord(identity_dir.name, f"{identity_dir.name}/{entry.name}")
                if Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS:
                    records.append(record)
                else:
                    skipped.append(record)
    records.sort(key=lambda record: (record.identity, record.path))
    skipped.sort(key=lambda record: (record.identity, record.path))
    skipped_paths = [record.path for record in skipped]
    if not records:
        found = ""
        if skipped_paths:
            found = (f" (found {count_noun(len(skipped_paths), 'file')} without an image "
                     f"extension: {_name_some(skipped_paths)})")
        raise DataError(
            f"no images in {images_root}{found}: expected <identity>/<image> files, one folder "
            f"per person, with an image extension such as .jpg, .png or .pgm"
        )
    return DatasetListing(records, skipped_paths)


def _name_some(paths: Sequence[str], limit: int = MAX_NAMED_SKIPPED_FILES) -> str:
    named = ", ".join(paths[:limit])
    return f"{named} and {len(paths) - limit} more" if len(paths) > limit else named


def _is_visible_dir(entry: os.DirEntry[str]) -> bool:
    return not entry.name.startswith(".") and entry.is_dir()


def load_rgb(path: Path) -> Image.Image:
    """Read the image file at `path` and decode it with `decode_rgb`.

    Raises:
        BadImageError: the file is missing, unreadable or not a decodable image.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadImageError(str(path), "file not found") from None
    except OSError as error:
        raise BadImageError(str(path), f"unreadable ({error.strerror or error})") from None
    return decode_rgb(data, str(path))


def decode_rgb(data: bytes, source: str = "<bytes>") -> Image.Image:
    """Decode image bytes into a fully loaded 8-bit RGB image with EXIF orientation applied.

    The format comes from the content (one of `ACCEPTED_FORMATS`), not from a file name.
    Grey, palette, CMYK and YCbCr images are converted to RGB, 16-bit and float grey are scaled
    to 8 bits (see `_high_depth_grey_to_rgb`), and transparent pixels are composited onto
    `ALPHA_BACKGROUND` (black). Truncated files fail, as long as
    `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` keeps Pillow's default of False.

    Raises:
        BadImageError: with reason "zero bytes", "not an image", "truncated", "corrupt (...)",
            "too large (...)", "invalid EXIF data" or "unsupported colour mode ...".
            `source` names the file in the message.
    """
    if not data:
        raise BadImageError(source, "zero bytes")
    image = _open_fully(data, source)
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except (SyntaxError, ValueError, OSError, struct.error):
        raise BadImageError(source, "invalid EXIF data") from None
    return _to_rgb(image, source)


def _open_fully(data: bytes, source: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        image.load()
    except UnidentifiedImageError:
        raise BadImageError(source, "not an image") from None
    except Image.DecompressionBombError as error:
        raise BadImageError(source, f"too large ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        reason = "truncated" if "truncated" in str(error).lower() else f"corrupt ({error})"
        raise BadImageError(source, reason) from None
    return image


def _to_rgb(image: Image.Image, source: str) -> Image.Image:
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_background(image)
    if mode in _HIGH_DEPTH_GREY_MODES:
        return _high_depth_grey_to_rgb(image)
    try:
        return image.convert("RGB")
    except ValueError:
        raise BadImageError(source, f"unsupported colour mode {mode}") from None


def _composite_on_background(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_grey_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer or float grey to 8 bits, then replicate it to RGB.

    Pillow's own conversion clips such values at 255 instead of scaling them. 16-bit modes map
    0..65535 to 0..255. Integer mode "I" is treated as 8-bit when its maximum is at most 255 and
    as 16-bit otherwise. Float mode "F" is treated as 0..1 when its maximum is at most 1.0 and
    as 0..255 otherwise. Values outside the range are clipped.
    """
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif image.mode == "I":
        scale = 1.0 if values.max(initial=0) <= 255 else 255.0 / 65535.0
    else:
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
    grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def validate_images(
    images_root: Path,
    records: Sequence[ImageRecord],
    *,
    progress: bool = False,
    desc: str = "validate",
) -> ValidationReport:
    """Decode every record's file with `load_rgb` and report the ones that fail.

    A tqdm progress bar labelled `desc` goes to stderr when `progress` is true. Failed files
    are logged through `log_bad_files`.
    """
    report = ValidationReport()
    for record in tqdm(records, desc=desc, unit="img", disable=not progress):
        report.checked += 1
        try:
            load_rgb(images_root / record.path)
        except BadImageError as error:
            report.bad.append((record.path, error.reason))
    log_bad_files(report, desc)
    return report


def log_bad_files(report: ValidationReport, where: str, limit: int = MAX_LOGGED_BAD_FILES) -> None:
    """Log each skipped file at WARNING, the first `limit` by name and the rest as one count."""
    for path, reason in report.bad[:limit]:
        logger.warning("%s: skipping %s: %s", where, path, reason)
    if len(report.bad) > limit:
        logger.warning(
            "%s: skipping %s (%d of %d in total)",
            where, count_noun(len(report.bad) - limit, "more unreadable image"), len(report.bad),
            report.checked,
        )


# Default end of the `check_bad_fraction` error: how a run raises the limit.
ALLOW_MORE_BAD_IMAGES = "allow more with the config key `max-bad-fraction` or the flag " \
                        "`--max-bad-fraction`"


def check_bad_fraction(report: ValidationReport, max_bad_fraction: float, where: str,
                       allow_more: str = ALLOW_MORE_BAD_IMAGES) -> None:
    """Raise DataError when more than `max_bad_fraction` (0..1) of the checked images failed.

    `where` names the dataset or node in the message, for example "node-2". `allow_more` ends
    the message: how to raise the limit in the caller's command.

    Raises:
        ConfigError: `max_bad_fraction` is outside 0..1.
        DataError: too many images failed. The message lists the first few with reasons.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ConfigError(
            f"invalid max-bad-fraction {max_bad_fraction!r}: use a fraction from 0 to 1, "
            "for example 0.01 for 1%"
        )
    if report.bad_fraction <= max_bad_fraction:
        return
    examples = "; ".join(f"{path} ({reason})" for path, reason in report.bad[:5])
    more = f"; and {len(report.bad) - 5} more" if len(report.bad) > 5 else ""
    raise DataError(
        f"{where}: {len(report.bad)} of {count_noun(report.checked, 'image')} "
        f"{'is' if len(report.bad) == 1 else 'are'} unreadable "
        f"({report.bad_fraction:.2%}), more than max-bad-fraction {max_bad_fraction:.2%}: "
        f"{examples}{more}. Replace or remove those files, or {allow_more}"
    )
