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
import subprocess
import sys
import time
import urllib.error
import urllib.request
from types import FrameType

from edgeface.errors import EdgefaceError

logger = logging.getLogger(__name__)

DEFAULT_PORT = 5000
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10.0


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
    uri = open_store(args.tracking_uri).tracking_uri
    if uri.startswith(("http://", "https://")):
        print(f"the tracking store is already a server: open {uri}")
        return 0
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
        return process.wait()
    except KeyboardInterrupt:
        logger.info("stopping mlflow server pid %d", process.pid)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        _stop(process)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _wait_until_healthy(process: subprocess.Popen[bytes], address: str, port: int,
                        timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EdgefaceError(
                f"mlflow server exited with code {process.returncode} before it responded (see "
                f"its output above): if port {port} is in use, choose another with --port"
            )
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise EdgefaceError(
        f"mlflow server did not respond at {address} within {timeout_s:g} s: raise "
        "--startup-timeout on a slow machine"
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
