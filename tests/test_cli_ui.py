"""`edgeface ui` startup checks: a busy port and a server that exits before it is ready.

These tests stop before a real `mlflow server` would start. A small HTTP server on 127.0.0.1
plays the other server that already listens on the port and responds to the health probe.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edgeface.cli.main import main
from edgeface.cli.ui import _wait_until_healthy
from edgeface.errors import EdgefaceError


class HealthyHandler(BaseHTTPRequestHandler):
    """Respond to every GET with 200 OK, as a running MLflow server responds to `/health`."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, format: str, *args: object) -> None:
        """Keep request lines out of the test output."""


@pytest.fixture
def other_server() -> Iterator[int]:
    """Start an HTTP server on a free 127.0.0.1 port and yield the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HealthyHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_ui_rejects_busy_port(
    other_server: int, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    database = tmp_path / "mlflow.db"
    database.touch()

    code = main(["ui", "--port", str(other_server), "--tracking-uri", f"sqlite:///{database}"])

    assert code == 2
    assert "MLflow UI" not in capsys.readouterr().out
    assert f"port {other_server} on 127.0.0.1 is not available" in caplog.text
    assert "Choose another port with --port" in caplog.text


def test_ui_rejects_unknown_host(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    database = tmp_path / "mlflow.db"
    database.touch()

    code = main(["ui", "--host", "no-such-host.invalid", "--tracking-uri",
                 f"sqlite:///{database}"])

    assert code == 2
    assert "invalid --host 'no-such-host.invalid'" in caplog.text


def test_wait_fails_when_child_exits_after_probe(other_server: int) -> None:
    """The probe succeeds against the other server, but our own child exits soon after."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    try:
        with pytest.raises(EdgefaceError, match="exited with code 0 before it was ready"):
            _wait_until_healthy(child, f"http://127.0.0.1:{other_server}", other_server, 10.0)
    finally:
        child.kill()
        child.wait()


def test_wait_fails_when_child_exits_at_once() -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    child.wait()
    with pytest.raises(EdgefaceError, match="exited with code 3 before it was ready"):
        _wait_until_healthy(child, "http://127.0.0.1:9", 9, 10.0)


def test_wait_accepts_child_that_keeps_running(other_server: int) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _wait_until_healthy(child, f"http://127.0.0.1:{other_server}", other_server, 10.0)
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()
