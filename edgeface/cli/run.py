"""`edgeface run`: the whole federated job on this machine."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from edgeface.config import SECTIONS, RunConfig, leaf_keys, load_config
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
            "Partition a face dataset across edge nodes, train the nodes in local worker processes, "
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
    overrides = parser.add_argument_group(
        "config overrides", "defaults are those of the built-in config (edgeface/configs/"
                            "default.yaml); a --config file changes them")
    # The help shows the built-in config's values, which differ from some field defaults of
    # the config classes (for example eval-every).
    defaults = load_config()
    for flag, (section, yaml_key) in sorted(leaf_keys().items()):
        # The choices are shown but not passed to argparse, so that an invalid value is
        # reported by load_config together with every other invalid key.
        choices = _choices(section, yaml_key)
        metavar = "{" + ",".join(choices) + "}" if choices else "VALUE"
        overrides.add_argument(f"--{flag}", dest=f"override:{flag}", metavar=metavar,
                               help=_help_for(defaults, section, yaml_key))
    parser.set_defaults(func=run_command)


def _field(section: str | None, yaml_key: str) -> Any:
    """Return the pydantic field of a config key; `section` None is the top level (`seed`)."""
    model = RunConfig if section is None else SECTIONS[section]
    return model.model_fields[yaml_key.replace("-", "_")]


def _choices(section: str | None, yaml_key: str) -> list[str] | None:
    """Return the allowed values of a key typed as a Literal of strings, else None."""
    annotation = _field(section, yaml_key).annotation
    if get_origin(annotation) is not Literal:
        return None
    values = get_args(annotation)
    return list(values) if all(isinstance(value, str) for value in values) else None


def _help_for(defaults: RunConfig, section: str | None, yaml_key: str) -> str:
    """Return the help of one config flag: key, description and the built-in default."""
    attribute = yaml_key.replace("-", "_")
    if section is None:
        key, value = yaml_key, getattr(defaults, attribute)
        description = "random seed for partitioning, initialisation and training"
    else:
        key, value = f"{section}.{yaml_key}", getattr(getattr(defaults, section), attribute)
        description = _field(section, yaml_key).description
    text = f"{key}: {description}" if description else key
    # Keys without a value (cache-dir, server-lr, tracking-uri) describe their fallback.
    if value is not None:
        text += f" (default {_format_value(value)})"
    return text.replace("%", "%%")


def _format_value(value: Any) -> str:
    """Write a config value as it would be passed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return ",".join(_format_value(item) for item in value)
    return str(value)


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
        if not run_dir.is_dir():
            problem = "it is not a folder" if run_dir.exists() else "folder not found"
            raise ConfigError(
                f"cannot resume {run_dir}: {problem}. Pass the folder of an earlier "
                "`edgeface run --out`"
            )
        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(
                f"cannot resume {run_dir}: no config.yaml there. Pass the folder of an earlier "
                "`edgeface run --out`"
            )
        if args.out is not None and args.out.resolve() != run_dir.resolve():
            raise ConfigError(
                f"--resume {run_dir} continues the run in that folder, so --out {args.out} "
                "does not apply: drop --out, or start a new run in it without --resume"
            )
        given_flags = [f"--{flag}" for flag in collect_overrides(args)]
        if args.config:
            given_flags.insert(0, f"--config {args.config}")
        if given_flags:
            raise ConfigError(
                "--resume takes no --config or config flags, but got "
                f"{', '.join(given_flags)}: the run keeps its own config.yaml. Drop them, or "
                "start a new run with them"
            )
        config = load_config(config_path)
        state = _read_run_state(run_dir / "state.json")
        data_dir = _dataset_folder(args.data, state.get("data_dir"))
    else:
        config = load_config(args.config, collect_overrides(args))
        data_dir = _dataset_folder(args.data, None)
        run_dir = args.out or _default_run_dir()
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError(f"invalid --out {run_dir}: it is a file, not a folder. Choose a "
                              "new folder for the run")

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


def _dataset_folder(flag: Path | None, resumed: str | None) -> Path:
    """Return the dataset folder from --data, else the resumed run's, else $EDGEFACE_DATA.

    Raises:
        DataError: no folder is given, or the path is not a folder. The message names where
            the path came from.
    """
    if flag is not None:
        path, source = flag, "--data"
    elif resumed:
        path, source = Path(resumed), "the resumed run's state.json"
    elif os.environ.get("EDGEFACE_DATA"):
        path, source = Path(os.environ["EDGEFACE_DATA"]), "EDGEFACE_DATA"
    else:
        raise DataError(NO_DATA_MESSAGE)
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "not found"
        raise DataError(
            f"dataset folder {path} (from {source}) {problem}: pass --data with a folder of "
            "<identity>/<image> subfolders or an LFW folder, or get LFW with `edgeface data "
            "fetch lfw --dest data/lfw`"
        )
    return path


def _default_run_dir() -> Path:
    from datetime import datetime

    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
