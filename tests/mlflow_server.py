"""Start and stop a real `mlflow server` process on 127.0.0.1 for tests.

The server is the lean configuration: one uvicorn worker, no job runner, telemetry off, a SQLite
backend store and proxied artifacts, all inside a folder the caller owns. It took 19-38 s to
start on a loaded 2-core machine (about 10-13 s of CPU time). `mlflow server` runs uvicorn as a
child process, so the server is started in its own process group and stopped by signalling that
group, whose id is the server's pid.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
# Port collisions between picking a free port and the server binding it are retried this often.
BIND_ATTEMPTS = 3


@dataclass
class MlflowServer:
    """A running `mlflow server`: `url` is its tracking URI, `log_path` its stdout and stderr."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    backend_store_uri: str
    artifacts_dir: Path
    log_path: Path

    def log_tail(self, chars: int = 4000) -> str:
        """Return the end of the server's log, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as error:
            return f"(log {self.log_path} unreadable: {error})"

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Send SIGTERM to the server's process group, then SIGKILL after `timeout_s` seconds."""
        if self.process.poll() is not None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("mlflow server pid %d ignored SIGTERM: killing it", self.process.pid)
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)
        # The uvicorn child may outlive its parent for a moment; make sure it is gone too.
        _signal_group(self.process.pid, signal.SIGKILL)
        logger.info("stopped mlflow server pid %d (%s)", self.process.pid, self.url)


def _signal_group(process_group_id: int, signum: int) -> None:
    try:
        os.killpg(process_group_id, signum)
    except ProcessLookupError:
        pass


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def server_command(backend_store_uri: str, artifacts_dir: Path, port: int) -> list[str]:
    """Return the lean `mlflow server` command line, run with the current interpreter."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(artifacts_dir),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]


def server_environment() -> dict[str, str]:
    """Return the environment for the server: no job runner and no usage telemetry."""
    env = dict(os.environ)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # A tracking URI inherited from the test process must not redirect the server itself.
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def wait_until_healthy(server: MlflowServer, timeout_s: float) -> None:
    """Poll `GET /health` until it returns 200.

    Raises:
        RuntimeError: the process exited, or `timeout_s` seconds passed; the message ends with
            the server log.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with code {server.process.returncode} before becoming "
                f"healthy; log {server.log_path}:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(
        f"mlflow server at {server.url} not healthy after {timeout_s:.0f} s; log "
        f"{server.log_path}:\n{server.log_tail()}"
    )


def start_mlflow_server(
    workdir: Path, *, startup_timeout_s: float = STARTUP_TIMEOUT_S
) -> MlflowServer:
    """Start `mlflow server` with its store, artifacts and log in `workdir` and wait for /health.

    The backend store is `workdir/mlflow.db`, proxied artifacts go to `workdir/artifacts`, and
    the log is `workdir/server.log`. A server that exits during startup (for example because
    another process took the port) is retried on a new port, up to BIND_ATTEMPTS times.

    Raises:
        RuntimeError: the server did not become healthy; the message ends with its log.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    backend_store_uri = f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    artifacts_dir = workdir / "artifacts"
    artifacts_dir.mkdir(exist_ok=True)
    log_path = workdir / "server.log"

    for attempt in range(1, BIND_ATTEMPTS + 1):
        port = free_port()
        started = time.monotonic()
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                server_command(backend_store_uri, artifacts_dir, port),
                stdout=log, stderr=subprocess.STDOUT, env=server_environment(),
                start_new_session=True,
            )
        server = MlflowServer(
            url=f"http://127.0.0.1:{port}", port=port, process=process,
            backend_store_uri=backend_store_uri, artifacts_dir=artifacts_dir, log_path=log_path,
        )
        try:
            wait_until_healthy(server, startup_timeout_s)
        except RuntimeError:
            exited_on_its_own = process.poll() is not None
            server.stop()
            if attempt < BIND_ATTEMPTS and exited_on_its_own and "in use" in server.log_tail():
                logger.warning("port %d was taken before mlflow server bound it: retrying", port)
                continue
            raise
        logger.info(
            "mlflow server pid %d healthy at %s after %.1f s",
            process.pid, server.url, time.monotonic() - started,
        )
        return server
    raise AssertionError("the last start attempt returns or raises")
