"""Tests for `edgeface data fetch` against a real HTTP server on 127.0.0.1.

The server serves a folder that each test builds: a small synthetic archive in the
`lfw-deepfunneled/<Name>/<Name>_NNNN.jpg` layout, plus the real LFW protocol files, so that the
checksum table in edgeface.data.fetch is checked against real bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import shutil
import tarfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from PIL import Image

from edgeface.cli.main import main
from edgeface.data.fetch import LFW, MARKER_NAME, fetch_dataset, fetch_source
from edgeface.data.ingest import list_images, load_rgb, resolve_images_root
from edgeface.errors import DataError

PEOPLE = {"Alice_Example": 2, "Bob_Example": 3, "Carol_Example": 1}
IMAGE_COUNT = 6
SLOW_RESPONSE_S = 2.0


class _SiteServer(ThreadingHTTPServer):
    daemon_threads = True
    requested: list[str]


class _SiteHandler(SimpleHTTPRequestHandler):
    """Static file handler that records each requested path.

    Paths under /slow/ get no response, and under /short/ the connection closes before the
    announced Content-Length was sent.
    """

    server: _SiteServer

    def do_GET(self) -> None:
        self.server.requested.append(self.path)
        if self.path.startswith("/slow/"):
            time.sleep(SLOW_RESPONSE_S)
            return
        if self.path.startswith("/short/"):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"only ten b")
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclasses.dataclass
class Site:
    folder: Path
    url: str
    requested: list[str]
    archive_sha256: str


def _jpeg_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_archive(
    path: Path, extra: Callable[[tarfile.TarFile], None] | None = None
) -> str:
    """Write a .tgz in the official layout (plus `extra` members) and return its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        seed = 0
        for person, count in PEOPLE.items():
            for index in range(1, count + 1):
                seed += 1
                _add_file(tar, f"lfw-deepfunneled/{person}/{person}_{index:04d}.jpg",
                          _jpeg_bytes(seed))
        if extra is not None:
            extra(tar)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def site(tmp_path: Path, lfw_dir: Path) -> Iterator[Site]:
    folder = tmp_path / "site"
    folder.mkdir()
    for name in LFW.files:
        shutil.copyfile(lfw_dir / name, folder / name)
    archive_sha256 = _write_archive(folder / LFW.archive)
    server = _SiteServer(("127.0.0.1", 0), functools.partial(_SiteHandler, directory=str(folder)))
    server.requested = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield Site(folder, f"http://{host}:{port}/", server.requested, archive_sha256)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _leftovers(dest: Path) -> list[str]:
    return sorted(
        path.name for path in dest.iterdir()
        if path.name.endswith(".part") or path.name.startswith(".unpack-")
        or path.name == LFW.archive
    )


def _fetch(site: Site, dest: Path, **kwargs: Any) -> Path:
    options: dict[str, Any] = {
        "base_url": site.url, "progress": False, "archive_sha256": site.archive_sha256
    }
    options.update(kwargs)
    return fetch_dataset("lfw", dest, **options)


# --- successful fetches --------------------------------------------------------------------------


def test_fetch_unpacks_official_layout(site: Site, tmp_path: Path, lfw_dir: Path) -> None:
    dest = tmp_path / "data" / "lfw"

    returned = _fetch(site, dest)

    assert returned == dest
    images_root = resolve_images_root(dest)
    assert images_root == dest / "lfw-deepfunneled"
    records = list_images(images_root)
    assert len(records) == IMAGE_COUNT
    assert {record.identity for record in records} == set(PEOPLE)
    assert load_rgb(images_root / "Bob_Example" / "Bob_Example_0003.jpg").size == (40, 40)
    for name in LFW.files:
        assert (dest / name).read_bytes() == (lfw_dir / name).read_bytes()
    assert (dest / MARKER_NAME).is_file()
    assert _leftovers(dest) == []
    assert sorted(site.requested) == sorted("/" + name for name in [*LFW.files, LFW.archive])


def test_second_fetch_downloads_nothing(site: Site, tmp_path: Path) -> None:
    dest = tmp_path / "lfw"
    _fetch(site, dest)
    site.requested.clear()

    _fetch(site, dest)
    _fetch(site, dest, archive_sha256=None)

    assert site.requested == []


def test_changed_protocol_file_is_downloaded_again(site: Site, tmp_path: Path) -> None:
    dest = tmp_path / "lfw"
    _fetch(site, dest)
    (dest / "pairs.txt").write_text("edited\n")
    site.requested.clear()

    _fetch(site, dest)

    assert site.requested == ["/pairs.txt"]
    assert (dest / "pairs.txt").read_bytes() == (site.folder / "pairs.txt").read_bytes()


def test_base_url_from_environment(
    site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFACE_LFW_URL", site.url.rstrip("/"))

    _fetch(site, tmp_path / "lfw", base_url=None)

    assert "/pairs.txt" in site.requested


def test_count_check_accepts_expected_counts(site: Site, tmp_path: Path) -> None:
    small_lfw = dataclasses.replace(LFW, image_count=IMAGE_COUNT, identity_count=len(PEOPLE))

    fetch_source(small_lfw, tmp_path / "lfw", base_url=site.url, progress=False)

    assert len(list_images(tmp_path / "lfw" / "lfw-deepfunneled")) == IMAGE_COUNT


def test_stale_part_files_are_discarded(site: Site, tmp_path: Path) -> None:
    dest = tmp_path / "lfw"
    dest.mkdir()
    (dest / "pairs.txt.part").write_bytes(b"half of an old download")
    (dest / f"{LFW.archive}.part").write_bytes(b"\x1f\x8b half an archive")
    (dest / ".unpack-old").mkdir()

    _fetch(site, dest)

    assert _leftovers(dest) == []
    assert len(list_images(dest / "lfw-deepfunneled")) == IMAGE_COUNT


def test_archive_in_dest_is_not_downloaded(site: Site, tmp_path: Path) -> None:
    dest = tmp_path / "lfw"
    dest.mkdir()
    shutil.copyfile(site.folder / LFW.archive, dest / LFW.archive)

    _fetch(site, dest)

    assert f"/{LFW.archive}" not in site.requested
    assert len(list_images(dest / "lfw-deepfunneled")) == IMAGE_COUNT


def test_incomplete_image_folder_is_replaced(site: Site, tmp_path: Path) -> None:
    dest = tmp_path / "lfw"
    (dest / "lfw-deepfunneled" / "Alice_Example").mkdir(parents=True)
    (dest / "lfw-deepfunneled" / "Alice_Example" / "Alice_Example_0001.jpg").write_bytes(b"")

    _fetch(site, dest)

    assert len(list_images(dest / "lfw-deepfunneled")) == IMAGE_COUNT


# --- failures ------------------------------------------------------------------------------------


def test_count_check_rejects_other_archive(site: Site, tmp_path: Path) -> None:
    dest = tmp_path / "lfw"

    with pytest.raises(DataError) as error:
        _fetch(site, dest, archive_sha256=None)

    assert "6 images in 3 folders" in str(error.value)
    assert "13,233" in str(error.value)
    assert not (dest / "lfw-deepfunneled").exists()
    assert _leftovers(dest) == []


def test_archive_checksum_mismatch(site: Site, tmp_path: Path) -> None:
    dest = tmp_path / "lfw"

    with pytest.raises(DataError) as error:
        _fetch(site, dest, archive_sha256="0" * 64)

    assert "sha256 mismatch" in str(error.value)
    assert site.archive_sha256 in str(error.value)
    assert not (dest / "lfw-deepfunneled").exists()
    assert _leftovers(dest) == []


def test_protocol_checksum_mismatch(site: Site, tmp_path: Path) -> None:
    (site.folder / "pairs.txt").write_text("10\t300\nnot the official file\n")
    dest = tmp_path / "lfw"

    with pytest.raises(DataError) as error:
        _fetch(site, dest)

    assert f"{site.url}pairs.txt" in str(error.value)
    assert LFW.files["pairs.txt"] in str(error.value)
    assert not (dest / "pairs.txt").exists()
    assert _leftovers(dest) == []


def test_http_404_names_url_and_fix(site: Site, tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        _fetch(site, tmp_path / "lfw", base_url=site.url + "mirror/")

    message = str(error.value)
    assert f"{site.url}mirror/pairs.txt" in message
    assert "HTTP 404" in message
    assert "--base-url" in message
    assert _leftovers(tmp_path / "lfw") == []


def test_slow_server_times_out(site: Site, tmp_path: Path) -> None:
    started = time.monotonic()

    with pytest.raises(DataError, match="timed out after 0.3 s"):
        _fetch(site, tmp_path / "lfw", base_url=site.url + "slow/", timeout_s=0.3)

    assert time.monotonic() - started < SLOW_RESPONSE_S
    assert _leftovers(tmp_path / "lfw") == []


def test_short_response_is_rejected(site: Site, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="short/pairs.txt"):
        _fetch(site, tmp_path / "lfw", base_url=site.url + "short/")

    assert _leftovers(tmp_path / "lfw") == []
    assert not (tmp_path / "lfw" / "pairs.txt").exists()


def _parent_member(tar: tarfile.TarFile) -> None:
    _add_file(tar, "../evil", b"outside")


def _nested_parent_member(tar: tarfile.TarFile) -> None:
    _add_file(tar, "lfw-deepfunneled/Alice_Example/../../../evil", b"outside")


def _absolute_member(tar: tarfile.TarFile) -> None:
    _add_file(tar, "/tmp/edgeface-evil", b"outside")


def _link_outside(tar: tarfile.TarFile) -> None:
    link = tarfile.TarInfo("lfw-deepfunneled/Alice_Example/Alice_Example_0009.jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "../../../../evil"
    tar.addfile(link)


def _absolute_link(tar: tarfile.TarFile) -> None:
    link = tarfile.TarInfo("lfw-deepfunneled/Alice_Example/Alice_Example_0009.jpg")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    tar.addfile(link)


@pytest.mark.parametrize(
    "extra",
    [_parent_member, _nested_parent_member, _absolute_member, _link_outside, _absolute_link],
)
def test_unsafe_archive_is_rejected(
    site: Site, tmp_path: Path, extra: Callable[[tarfile.TarFile], None]
) -> None:
    checksum = _write_archive(site.folder / LFW.archive, extra)
    dest = tmp_path / "deep" / "lfw"

    with pytest.raises(DataError, match="unsafe member"):
        _fetch(site, dest, archive_sha256=checksum)

    assert not (tmp_path / "deep" / "evil").exists()
    assert not (tmp_path / "evil").exists()
    assert not (dest / "lfw-deepfunneled").exists()
    assert _leftovers(dest) == []


def test_corrupt_archive_is_rejected(site: Site, tmp_path: Path) -> None:
    (site.folder / LFW.archive).write_bytes(b"\x1f\x8b\x08\x00 this is not gzip data")
    checksum = hashlib.sha256((site.folder / LFW.archive).read_bytes()).hexdigest()
    dest = tmp_path / "lfw"

    with pytest.raises(DataError, match="not a valid tar archive"):
        _fetch(site, dest, archive_sha256=checksum)

    assert _leftovers(dest) == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda dest: fetch_dataset("imagenet", dest), "unknown dataset 'imagenet'"),
        (lambda dest: fetch_dataset("lfw", dest, base_url="ftp://example.org/lfw/"),
         "invalid base URL"),
        (lambda dest: fetch_dataset("lfw", dest, archive_sha256="abc"), "invalid archive sha256"),
    ],
)
def test_invalid_requests_fail_before_download(
    tmp_path: Path, call: Callable[[Path], Path], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        call(tmp_path / "lfw")
    assert not (tmp_path / "lfw").exists()


# --- edgeface data fetch -------------------------------------------------------------------------


def test_cli_fetch(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "cli-lfw"

    code = main(["data", "fetch", "lfw", "--dest", str(dest), "--base-url", site.url,
                 "--sha256", site.archive_sha256, "--no-progress"])

    assert code == 0
    assert str(dest) in capsys.readouterr().out
    assert len(list_images(dest / "lfw-deepfunneled")) == IMAGE_COUNT


def test_cli_fetch_error_exit_code(site: Site, tmp_path: Path) -> None:
    code = main(["data", "fetch", "lfw", "--dest", str(tmp_path / "lfw"),
                 "--base-url", site.url + "missing/", "--no-progress"])

    assert code == 2
