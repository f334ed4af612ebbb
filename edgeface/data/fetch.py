"""`edgeface data fetch`: download a face dataset, verify it and unpack it safely.

For LFW this fetches the deep-funneled image archive `lfw-deepfunneled.tgz` and the protocol
files from the LFW site. Each file is downloaded to `<name>.part` and renamed only after its
sha256 matched, and a leftover `.part` file is deleted, never resumed. The archive's official
checksum is not recorded here, so unless the caller passes one, the archive counts as valid
when it unpacks to exactly 13,233 images in 5,749 identity folders. A second call whose files
are all present and verified downloads nothing.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from tqdm import tqdm

from edgeface import __version__
from edgeface.data.cache import file_sha256
from edgeface.data.ingest import list_images
from edgeface.errors import DataError

logger = logging.getLogger(__name__)

# Seconds that one connection attempt or one read on the socket may take.
REQUEST_TIMEOUT_S = 60.0

# Written into the destination folder after the images were unpacked and verified.
MARKER_NAME = ".edgeface-fetch.json"

_CHUNK_BYTES = 1 << 20
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_STAGING_PREFIX = ".unpack-"


@dataclass(frozen=True)
class DatasetSource:
    """Download location and expected content of one dataset.

    `files` maps each plain file (fetched from `<base URL><name>`) to its expected sha256.
    The archive unpacks to `image_folder`. Without `archive_sha256`, the archive is accepted
    when that folder contains exactly `image_count` images in `identity_count` identity folders.
    """

    name: str
    default_base_url: str
    url_env: str
    archive: str
    image_folder: str
    files: Mapping[str, str]
    image_count: int
    identity_count: int
    archive_sha256: str | None = None


# The protocol files' checksums were computed from copies that are byte-identical to the files
# in the LFW project's website repository (umass-vis-lfw/umass-vis-lfw.github.io).
LFW = DatasetSource(
    name="lfw",
    default_base_url="https://vis-www.cs.umass.edu/lfw/",
    url_env="EDGEFACE_LFW_URL",
    archive="lfw-deepfunneled.tgz",
    image_folder="lfw-deepfunneled",
    files={
        "pairs.txt": "ea42330c62c92989f9d7c03237ed5d591365e89b3e649747777b70e692dc1592",
        "pairsDevTrain.txt": "1d454dada7dfeca0e7eab6f65dc4e97a6312d44cf142207be28d688be92aabfa",
        "pairsDevTest.txt": "7cb06600ea8b2814ac26e946201cdb304296262aad67d046a16a7ec85d0ff87c",
        "people.txt": "bc8fa2b7f25c895cf7efb6de4f4fc27ca8b8d1cfa63350ad8b96eae2b198d365",
        "peopleDevTrain.txt": "2e58df13ba4cc143189336e001cc2c195f1dfa5b29a6475c02857be353c2a2fa",
        "peopleDevTest.txt": "c3ed1f90499473401542101a56c14c1d82396bb8218c67a356d7460601047555",
        "lfw-names.txt": "403cd39411ee297f99f69241959bd8f0496b44377711913a76ccdd8562874164",
    },
    image_count=13_233,
    identity_count=5_749,
)

DATASETS: dict[str, DatasetSource] = {LFW.name: LFW}


def fetch_dataset(
    name: str,
    dest: Path,
    *,
    base_url: str | None = None,
    progress: bool = True,
    archive_sha256: str | None = None,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> Path:
    """Download, verify and unpack dataset `name` (only "lfw") into `dest`, and return `dest`.

    The base URL is `base_url`, else the EDGEFACE_LFW_URL environment variable, else
    https://vis-www.cs.umass.edu/lfw/. `archive_sha256` (64 hex digits), if given, replaces the
    image-count check of the archive. To work offline, place the archive in `dest` first: an
    archive already there is unpacked instead of downloaded. tqdm progress bars go to stderr
    when `progress` is true. `timeout_s` limits each connection attempt and socket read.

    Raises:
        DataError: unknown name, invalid URL or checksum, HTTP or network failure, checksum
            mismatch, unsafe archive member, or wrong image counts. No file with a final name
            is left behind for a download that failed.
    """
    source = DATASETS.get(name)
    if source is None:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}")
    if archive_sha256 is not None:
        checksum = archive_sha256.strip().lower()
        if not _SHA256_PATTERN.fullmatch(checksum):
            raise DataError(
                f"invalid archive sha256 {archive_sha256!r}: use 64 hexadecimal digits"
            )
        source = dataclasses.replace(source, archive_sha256=checksum)
    return fetch_source(source, dest, base_url=base_url, progress=progress, timeout_s=timeout_s)


def fetch_source(
    source: DatasetSource,
    dest: Path,
    *,
    base_url: str | None = None,
    progress: bool = True,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> Path:
    """Fetch `source` into `dest` as `fetch_dataset` describes, and return `dest`."""
    dest = Path(dest)
    base = _resolve_base_url(source, base_url)
    if not hasattr(tarfile, "data_filter"):
        raise DataError(
            "this Python's tarfile has no extraction filters: use Python 3.10.12, 3.11.4, "
            "3.12 or newer to unpack archives safely"
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create destination folder {dest}: {error}") from error
    started = time.perf_counter()
    for file_name, expected in source.files.items():
        _fetch_file(source, base, file_name, expected, dest, progress, timeout_s)
    _fetch_images(source, base, dest, progress, timeout_s)
    logger.info("%s is ready in %s (%.1f s)", source.name, dest, time.perf_counter() - started)
    return dest


def _resolve_base_url(source: DatasetSource, base_url: str | None) -> str:
    base = base_url or os.environ.get(source.url_env) or source.default_base_url
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DataError(
            f"invalid base URL {base!r}: use an http:// or https:// URL such as "
            f"{source.default_base_url} (set by --base-url or {source.url_env})"
        )
    return base if base.endswith("/") else base + "/"


def _fetch_file(
    source: DatasetSource,
    base: str,
    file_name: str,
    expected: str,
    dest: Path,
    progress: bool,
    timeout_s: float,
) -> None:
    """Download one plain file unless a copy with the expected sha256 is already there."""
    final = dest / file_name
    if final.is_file():
        if file_sha256(final) == expected:
            logger.debug("%s is present and verified", final)
            return
        logger.warning("%s has an unexpected sha256; downloading it again", final)
    url = base + file_name
    part = dest / f"{file_name}.part"
    actual = _download(source, url, part, progress, timeout_s)
    _require_checksum(source, url, part, expected, actual)
    os.replace(part, final)


def _require_checksum(
    source: DatasetSource, url: str, part: Path, expected: str, actual: str
) -> None:
    if actual == expected:
        return
    part.unlink(missing_ok=True)
    raise DataError(
        f"sha256 mismatch for {url}: expected {expected}, got {actual}. The download was "
        f"deleted. Retry, or point --base-url (or {source.url_env}) to a mirror that serves "
        "the official file"
    )


def _download(
    source: DatasetSource, url: str, part: Path, progress: bool, timeout_s: float
) -> str:
    """Stream `url` into `part` from scratch and return the sha256 of the bytes received.

    Raises:
        DataError: HTTP error, network failure, timeout, short read or write failure. `part`
            is deleted in every failure case.
    """
    part.unlink(missing_ok=True)
    fix = f"check the URL, or point --base-url (or {source.url_env}) to a mirror"
    request = urllib.request.Request(url, headers={"User-Agent": f"edgeface/{__version__}"})
    logger.info("downloading %s", url)
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            digest, received = _stream_to_file(response, part, progress)
    except urllib.error.HTTPError as error:
        part.unlink(missing_ok=True)
        raise DataError(
            f"download of {url} failed: HTTP {error.code} {error.reason}; {fix}"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        part.unlink(missing_ok=True)
        reason = _failure_reason(error, timeout_s)
        raise DataError(f"download of {url} to {part} failed: {reason}; {fix}") from error
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    logger.info(
        "downloaded %s (%.1f MB in %.1f s)", url, received / 1e6, time.perf_counter() - started
    )
    return digest


def _failure_reason(error: Exception, timeout_s: float) -> str:
    reason = getattr(error, "reason", None) or error
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    if isinstance(reason, http.client.IncompleteRead):
        return f"the connection closed with {reason.expected:,} bytes still expected"
    return str(reason)


def _stream_to_file(response: Any, part: Path, progress: bool) -> tuple[str, int]:
    """Copy an HTTP response body into `part` and return its (sha256 hex, byte count)."""
    length_header = response.headers.get("Content-Length")
    total = int(length_header) if length_header and length_header.isdigit() else None
    digest = hashlib.sha256()
    received = 0
    with open(part, "wb") as file, tqdm(
        total=total, desc=part.name.removesuffix(".part"), unit="B", unit_scale=True,
        unit_divisor=1024, disable=not progress,
    ) as bar:
        while chunk := response.read(_CHUNK_BYTES):
            file.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
        file.flush()
        os.fsync(file.fileno())
    if total is not None and received != total:
        raise http.client.IncompleteRead(b"", total - received)
    return digest.hexdigest(), received


def _fetch_images(
    source: DatasetSource, base: str, dest: Path, progress: bool, timeout_s: float
) -> None:
    """Make sure `dest/<image_folder>` is complete, downloading and unpacking if needed."""
    if _images_present(source, dest):
        logger.info("%s is present and complete", dest / source.image_folder)
        return
    archive = dest / source.archive
    if archive.is_file():
        logger.info("unpacking the archive already in %s", archive)
        digest = file_sha256(archive)
    else:
        url = base + source.archive
        part = dest / f"{source.archive}.part"
        digest = _download(source, url, part, progress, timeout_s)
        if source.archive_sha256 is not None:
            _require_checksum(source, url, part, source.archive_sha256, digest)
        os.replace(part, archive)
    if source.archive_sha256 is not None and digest != source.archive_sha256:
        archive.unlink()
        raise DataError(
            f"sha256 mismatch for {archive}: expected {source.archive_sha256}, got {digest}. "
            "The file was deleted; run the command again to download it"
        )
    images, identities = _unpack_images(source, archive, dest)
    _write_marker(dest, source, digest, images, identities)
    archive.unlink()


def _images_present(source: DatasetSource, dest: Path) -> bool:
    """Return whether the image folder has the counts that the marker (or the source) expects."""
    image_dir = dest / source.image_folder
    if not image_dir.is_dir():
        return False
    expected = (source.image_count, source.identity_count)
    marker = _read_marker(dest)
    if marker is not None and marker["archive"] == source.archive:
        if source.archive_sha256 not in (None, marker["sha256"]):
            return False
        expected = (marker["images"], marker["identities"])
    return _count_images(image_dir) == expected


def _read_marker(dest: Path) -> dict[str, Any] | None:
    """Return the marker of an earlier fetch, or None when it is missing or malformed."""
    try:
        content = json.loads((dest / MARKER_NAME).read_text(encoding="utf-8"))
        return {
            "archive": str(content["archive"]),
            "sha256": str(content["sha256"]),
            "images": int(content["images"]),
            "identities": int(content["identities"]),
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_marker(
    dest: Path, source: DatasetSource, digest: str, images: int, identities: int
) -> None:
    content = {
        "dataset": source.name,
        "archive": source.archive,
        "sha256": digest,
        "images": images,
        "identities": identities,
    }
    temp = dest / f"{MARKER_NAME}.part"
    temp.write_text(json.dumps(content, indent=1), encoding="utf-8")
    os.replace(temp, dest / MARKER_NAME)


def _count_images(image_dir: Path) -> tuple[int, int]:
    """Return (image files, identity folders with at least one file) under `image_dir`."""
    try:
        records = list_images(image_dir)
    except DataError:
        return (0, 0)
    return (len(records), len({record.identity for record in records}))


def _unpack_images(source: DatasetSource, archive: Path, dest: Path) -> tuple[int, int]:
    """Unpack `archive` in a staging folder, verify it, move the image folder into `dest`.

    The archive is deleted when its content is wrong, so that the next call downloads it again.
    Returns the (images, identities) counts.
    """
    # A staging folder left by an interrupted run is useless: it is never resumed.
    for leftover in dest.glob(f"{_STAGING_PREFIX}*"):
        logger.info("removing %s left by an interrupted fetch", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=_STAGING_PREFIX))
    try:
        try:
            unpacked = _extract_and_verify(source, archive, staging)
        except DataError:
            archive.unlink(missing_ok=True)
            raise
        target = dest / source.image_folder
        if target.exists():
            logger.warning("replacing the incomplete folder %s", target)
            shutil.rmtree(target)
        os.replace(unpacked, target)
    except OSError as error:
        raise DataError(f"cannot unpack {archive} into {dest}: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _count_images(target)


def _extract_and_verify(source: DatasetSource, archive: Path, staging: Path) -> Path:
    _extract_safely(archive, staging)
    unpacked = staging / source.image_folder
    if not unpacked.is_dir():
        raise DataError(
            f"{archive} does not contain the folder {source.image_folder}/: it is not the "
            "expected archive; it was deleted"
        )
    images, identities = _count_images(unpacked)
    if source.archive_sha256 is None and (images, identities) != (
        source.image_count, source.identity_count
    ):
        raise DataError(
            f"{archive} unpacked to {images:,} images in {identities:,} folders, expected "
            f"{source.image_count:,} in {source.identity_count:,}: the archive is incomplete or "
            "not the official one; it was deleted. Run again, or pass its checksum with --sha256 "
            "to accept another version"
        )
    return unpacked


def _extract_safely(archive: Path, staging: Path) -> None:
    """Extract `archive` into `staging`, rejecting absolute paths, '..' and outside links.

    Member names are checked first, because tarfile's "data" filter strips a leading '/'
    instead of rejecting it. The filter then rejects links that point outside `staging`,
    device files and unsafe permission bits.
    """
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member_name(archive, member.name)
            tar.extractall(staging, members=members, filter="data")
    except tarfile.FilterError as error:
        raise DataError(f"unsafe member in {archive}: {error}; it was deleted") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{archive} is not a valid tar archive ({error}); it was deleted") from None


def _check_member_name(archive: Path, name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise DataError(
            f"unsafe member {name!r} in {archive}: absolute paths and '..' are rejected; "
            "the archive was deleted"
        )
