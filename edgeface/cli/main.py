"""Entry point of the `edgeface` command.

Each command group lives in its own module that exposes `add_parser(subparsers)`. The parser it
adds sets `func`, a callable that takes the parsed arguments and returns an exit code.

Command groups that need Kubeflow Pipelines (`edgeface pipeline`) live outside the library, in
the `pipelines` package, and are found through the `edgeface.commands` entry-point group, so the
library itself never imports kfp.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import signal
import sys
import threading
from importlib.metadata import entry_points

from edgeface import __version__
from edgeface.errors import EXIT_TEMPFAIL, EdgefaceError, LockTimeoutError

logger = logging.getLogger("edgeface")

# Command-group modules under edgeface.cli, in the order `edgeface --help` lists them.
COMMAND_MODULES = ["run", "data", "models", "inference", "cluster", "ui"]
PLUGIN_GROUP = "edgeface.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeface",
        description="Federated face-recognition training across edge nodes.",
    )
    parser.add_argument("--version", action="version", version=f"edgeface {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("EDGEFACE_LOG_LEVEL", "INFO"),
        help="logging level: DEBUG, INFO, WARNING or ERROR (default INFO, or EDGEFACE_LOG_LEVEL)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"edgeface.cli.{name}")
        except ModuleNotFoundError as error:
            # A command group whose module is not written yet is left out of the parser.
            if error.name != f"edgeface.cli.{name}":
                raise
            continue
        module.add_parser(subparsers)
    for entry_point in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            add_parser = entry_point.load()
        except ImportError as error:
            # For example `edgeface pipeline` without the kfp extra installed.
            logger.debug("command group %s unavailable: %s", entry_point.name, error)
            continue
        add_parser(subparsers)
    return parser


def configure_logging(level: str) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise EdgefaceError(
            f"invalid --log-level {level!r}: use DEBUG, INFO, WARNING or ERROR"
        )
    logging.basicConfig(
        level=numeric,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # MLflow, alembic and the ONNX exporter log every internal step at INFO; keep the run's
    # story readable.
    for noisy in ("alembic", "mlflow", "urllib3", "httpx", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: stop as on Ctrl-C, so the run state and MLflow record the stop."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _handle_sigterm() -> bool:
    """Turn SIGTERM (timeout, systemd, Kubernetes) into `Terminated` in the main thread.

    Only when SIGTERM still has its default action, so a program that embeds `main` keeps its
    own handler. Returns whether the handler was installed.
    """
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _raise_terminated)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    from edgeface.cli.inference import join_crop_values

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    args = parser.parse_args(join_crop_values(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    installed = _handle_sigterm()
    try:
        configure_logging(args.log_level)
        return int(args.func(args) or 0)
    except LockTimeoutError as error:
        logger.error("%s", error)
        return EXIT_TEMPFAIL
    except EdgefaceError as error:
        logger.error("%s", error)
        return 2
    except Terminated:
        logger.error("terminated by SIGTERM")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def console_main() -> None:
    """Run `main` on the command line's arguments and exit with its code: the `edgeface` program.

    When the reader closes stdout early (`edgeface models show edgeface | head`), the program
    exits quietly with 141, the status of a process stopped by SIGPIPE.
    """
    try:
        code = main()
        # Output to a pipe is buffered, so a closed pipe often shows only at this flush.
        sys.stdout.flush()
    except BrokenPipeError:
        # Python ignores SIGPIPE, so a write to a closed pipe raises instead of stopping the
        # process. Point stdout at devnull so that the flush at interpreter exit cannot raise
        # again and print a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 128 + signal.SIGPIPE
    # Interpreter shutdown runs full garbage collections over every object of torch, MLflow
    # and onnx: 3.4 s after an `edgeface run` on a 2-core machine at load average 4, 0.5 s
    # with the objects frozen. Nothing needs collecting once the command is done.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console_main()
