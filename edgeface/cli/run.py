"""`edgeface run`: the whole federated job on this machine."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from edgeface.config import SECTIONS, leaf_keys, load_config
from edgeface.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

NO_DATA_MESSAGE = (
    "no dataset given: pass --data DATASET_DIR or set EDGEFACE_DATA. To get LFW, run "
    "`edgeface data fetch lfw --dest data/lfw` and then `edgeface run --data data/lfw`"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="train a federated face model end to end on this machine",
        description=(
            "Partition a face dataset across edge nodes, train every node in its own process, "
            "fuse the node models for R rounds, evaluate, export to ONNX and register the model "
            "in MLflow. Every config key can be overridden by a flag of the same name."
        ),
    )
    parser.add_argument("--data", type=Path, help="dataset folder (default: $EDGEFACE_DATA)")
    parser.add_argument("--out", type=Path, help="run directory (default: runs/<timestamp>)")
    parser.add_argument("--config", type=Path, help="YAML config file; flags override it")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="continue an interrupted run from its last completed round")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    overrides = parser.add_argument_group("config overrides")
    for flag, (section, yaml_key) in sorted(leaf_keys().items()):
        overrides.add_argument(f"--{flag}", dest=f"override:{flag}", metavar="VALUE",
                               help=_help_for(section, yaml_key))
    parser.set_defaults(func=run_command)


def _help_for(section: str | None, yaml_key: str) -> str:
    if section is None:
        return "random seed for partitioning, initialisation and training"
    model = SECTIONS[section]
    field = model.model_fields[yaml_key.replace("-", "_")]
    description = field.description or ""
    return f"{section}.{yaml_key}: {description} (default {field.default!r})".replace("%", "%%")


def collect_overrides(args: argparse.Namespace) -> dict[str, object]:
    overrides: dict[str, object] = {}
    for name, value in vars(args).items():
        if not name.startswith("override:") or value is None:
            continue
        flag = name.split(":", 1)[1]
        overrides[flag] = value.split(",") if "," in value else value
    return overrides


def run_command(args: argparse.Namespace) -> int:
    from edgeface.runner import LocalRunner

    if args.resume:
        run_dir = args.resume
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(
                f"cannot resume {run_dir}: no config.yaml there. Pass the folder of an earlier "
                "`edgeface run --out`"
            )
        if collect_overrides(args) or args.config:
            raise ConfigError("--resume takes no --config or config flags: the run keeps its config")
        config = load_config(config_path)
        state = _read_run_state(run_dir / "state.json")
        data_dir = args.data or state.get("data_dir") or os.environ.get("EDGEFACE_DATA")
    else:
        config = load_config(args.config, collect_overrides(args))
        data_dir = args.data or os.environ.get("EDGEFACE_DATA")
        run_dir = args.out or _default_run_dir()
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"invalid --out {run_dir}: it is a file, not a folder. Choose a "
                              "new folder for the run")
    if not data_dir:
        raise DataError(NO_DATA_MESSAGE)
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DataError(f"dataset folder not found: {data_dir}. {NO_DATA_MESSAGE}")

    progress = not args.no_progress and sys.stderr.isatty()
    if not progress:
        # MLflow draws its own bar when it downloads artifacts (the int8 step does).
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    runner = LocalRunner(config, data_dir, run_dir, resume=bool(args.resume), progress=progress)
    summary = runner.run()
    metrics = summary["metrics"]
    print(f"verification accuracy {metrics['verification_accuracy']:.4f} "
          f"+- {metrics['verification_std']:.4f} ({summary['protocol']})")
    if "identification_top1" in metrics:
        print(f"identification top-1 {metrics['identification_top1']:.4f}")
    print(f"summary: {run_dir / 'summary.json'}")
    print(f"ONNX model: {summary['onnx']['path']}")
    print(f"MLflow: {summary['mlflow']['tracking_uri']} (run {summary['mlflow']['run_id']}, "
          f"model {summary['mlflow']['model_name']} version {summary['mlflow']['model_version']} "
          f"@{summary['mlflow']['alias']})")
    return 0


def _read_run_state(path: Path) -> dict[str, object]:
    """Return the run state of `path`, or {} when there is none."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ConfigError(f"cannot resume: run state {path} is not valid JSON ({error}). "
                          "Restore it, or start a new run with another --out folder") from None


def _default_run_dir() -> Path:
    from datetime import datetime

    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
