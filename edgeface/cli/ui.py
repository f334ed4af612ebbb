"""`edgeface ui`: the MLflow web UI for the store that `edgeface run` writes.

It runs `mlflow server` in the lean configuration (one worker, no job runner) on 127.0.0.1 for
the store's SQLite file, with the store's artifact folder as the artifact destination, prints
the address once the server responds, and stops the server on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType

from edgeface.errors import EdgefaceError
from edgeface.tracking import resolve_tracking_uri

logger = logging.getLogger(__name__)

DEFAULT_PORT = 5000
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0
# Seconds the server must keep running after its first successful health probe.
SETTLE_S = 1.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ui", help="start the MLflow UI for the current store on 127.0.0.1",
        description="Start `mlflow server` for the tracking store (default ./mlflow.db) and print "
                    "its address. Ctrl-C stops it. A tracking server URI is only printed.",
    )
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                             "sqlite:///./mlflow.db)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port (default {DEFAULT_PORT})")
    parser.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT_S,
                        help=f"seconds to wait for the server to respond (default "
                             f"{STARTUP_TIMEOUT_S:g})")
    parser.set_defaults(func=run_ui)


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """Return the `mlflow server` command line for a local store."""
    from edgeface.tracking import default_artifact_location

    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    artifacts = default_artifact_location(tracking_uri)
    if artifacts is not None:
        command += ["--artifacts-destination", artifacts]
    return command


def run_ui(args: argparse.Namespace) -> int:
    from edgeface.registry import open_store

    if not 1 <= args.port <= 65535:
        raise EdgefaceError(f"invalid --port {args.port}: use 1 to 65535")
    uri = resolve_tracking_uri(args.tracking_uri, Path.cwd())
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is already a server: open {uri}")
        return 0
    # The port check comes before open_store, which imports mlflow (seconds), so a busy port
    # fails at once.
    _check_port_free(args.host, args.port)
    open_store(uri)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    # Its own process group, so stopping it also stops the uvicorn worker it starts. Its
    # output goes to stderr, so stdout carries only the address line.
    process = subprocess.Popen(server_command(uri, args.host, args.port), env=env,
                               stdout=sys.stderr.fileno(), start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        address = f"http://{args.host}:{args.port}"
        _wait_until_healthy(process, address, args.port, args.startup_timeout)
        print(f"MLflow UI for {uri} at {address} (server pid {process.pid}); press Ctrl-C to "
              "stop", flush=True)
        code = process.wait()
        if code != 0:
            raise EdgefaceError(f"mlflow server pid {process.pid} exited with code {code}: see "
                                "its output above")
        return 0
    except KeyboardInterrupt:
        logger.info("stopping mlflow server pid %d", process.pid)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(process)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _check_port_free(host: str, port: int) -> None:
    """Raise unless a server could listen on `host`:`port` now.

    Without this check another server on the port responds to the health probe, and the address
    printed would serve that server's store while our own server fails to bind. The probe
    socket sets SO_REUSEADDR as uvicorn does, so connections in TIME_WAIT do not count as busy.
    """
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise EdgefaceError(f"invalid --host {host!r}: {error.strerror}") from error
    family, kind, protocol, _, address = addresses[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise EdgefaceError(
                f"port {port} on {host} is not available ({error.strerror}): another server "
                f"probably listens on it. Choose another port with --port, or stop the server "
                f"that uses port {port}"
            ) from error


def _wait_until_healthy(process: subprocess.Popen[bytes], address: str, port: int,
                        timeout_s: float) -> None:
    """Wait until the server at `address` responds to its health probe while `process` still runs.

    After a successful probe it waits up to SETTLE_S more and fails if `process` exits in that
    time, because then some other server on `port` responded to the probe.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _raise_if_exited(process, port)
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=1.0) as response:
                healthy = response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            healthy = False
        if healthy:
            try:
                process.wait(timeout=SETTLE_S)
            except subprocess.TimeoutExpired:
                return
            _raise_if_exited(process, port)
        time.sleep(0.3)
    raise EdgefaceError(
        f"mlflow server did not respond at {address} within {timeout_s:g} s: raise "
        "--startup-timeout on a slow machine"
    )


def _raise_if_exited(process: subprocess.Popen[bytes], port: int) -> None:
    if process.poll() is not None:
        raise EdgefaceError(
            f"mlflow server exited with code {process.returncode} before it was ready (see its "
            f"output above): if port {port} is in use, choose another with --port"
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        logger.warning("mlflow server pid %d ignored SIGTERM: killing it", process.pid)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)
    except ProcessLookupError:
        pass
