"""`edgeface pipeline`: compile, submit and schedule the Kubeflow pipeline; list and stop runs.

Registered as a plugin of the `edgeface` command through the `edgeface.commands` entry point,
because the library itself never imports kfp.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from edgeface.errors import ConfigError

logger = logging.getLogger(__name__)

# Parameters of a KFP run, in bytes, that the API server accepts at most.
MAX_PARAMETER_BYTES = 10_000


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pipeline",
        help="compile, submit and schedule the federated Kubeflow pipeline",
        description=(
            "Generate the Kubeflow Pipelines v2 pipeline of a federated run for a fleet file, "
            "upload it to a KFP API server, start or schedule runs, and list or stop them."
        ),
    )
    commands = parser.add_subparsers(dest="pipeline_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: _print_help(parser))
    _add_compile(commands)
    _add_submit(commands)
    _add_schedule(commands)
    _add_runs(commands)
    _add_unschedule(commands)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _add_pipeline_source(parser: argparse.ArgumentParser, *, package: bool) -> None:
    group = parser.add_argument_group("pipeline")
    # A compiled package already fixes the fleet, so the two sources exclude each other.
    source = group.add_mutually_exclusive_group() if package else group
    source.add_argument("--fleet", type=Path, help="fleet file the pipeline is generated for")
    group.add_argument("--rounds", type=int, help="federated rounds (default: the config's)")
    group.add_argument("--mode", choices=["simulation", "pre-placed"], default=None,
                       help="data mode: one partitioned dataset, or images already on each node "
                            "(default simulation)")
    group.add_argument("--config", type=Path, help="run config YAML; its values become the "
                                                   "default of the config_json parameter")
    group.add_argument("--task-timeout", type=int, default=None, metavar="SECONDS",
                       help="hard limit on each edge task's pod, in seconds (default 14400)")
    if package:
        source.add_argument("--package", type=Path,
                            help="a compiled pipeline YAML to use instead of --fleet; with "
                                 "--wait, pass --context too")


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="KFP API server URL (default $KFP_HOST or "
                                       "http://localhost:8080)")


def _add_compile(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("compile", help="write the pipeline YAML for a fleet")
    _add_pipeline_source(parser, package=False)
    parser.add_argument("-o", "--output", type=Path, required=True, help="pipeline YAML to write")
    parser.set_defaults(func=run_compile)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    _add_pipeline_source(parser, package=True)
    _add_connection(parser)
    parser.add_argument("--experiment", default="edgeface", help="KFP experiment (created if "
                                                                 "missing; default edgeface)")
    parser.add_argument("--pipeline-name", help="KFP pipeline to upload a version of (default "
                                                "edgeface-<fleet>-<mode>, or edgeface-federated "
                                                "with --package)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline parameter, e.g. dataset_dir=/data/dataset/lfw; repeatable")
    parser.add_argument("--format", choices=["text", "json"], default="text",
                        help="output format (default text)")


def _add_submit(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("submit", help="upload a pipeline version and start a run")
    _add_run_options(parser)
    parser.add_argument("--run-name", help="run name (default <pipeline name>-<version>)")
    parser.add_argument("--wait", action="store_true",
                        help="wait for the run to end, stopping it if a pod cannot start")
    parser.add_argument("--timeout", type=float, default=6 * 3600, metavar="SECONDS",
                        help="with --wait: how long to wait (default 21600)")
    parser.add_argument("--poll-interval", type=float, default=10.0, metavar="SECONDS",
                        help="with --wait: seconds between status checks (default 10)")
    parser.add_argument("--pending-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="with --wait: stop the run when a pod stays unschedulable this "
                             "long (default 300)")
    parser.add_argument("--pull-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="with --wait: stop the run when a pod cannot pull its image this "
                             "long (default 60)")
    parser.add_argument("--context", help="with --wait: kubectl context for the watchdog "
                                          "(default k3d-<fleet name>, else kubectl's current)")
    parser.set_defaults(func=run_submit)


def _add_schedule(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("schedule", help="upload a pipeline version and run it on a "
                                                  "cron schedule")
    _add_run_options(parser)
    parser.add_argument("--cron", required=True,
                        help="6-field cron expression, seconds first: '0 0 3 * * *' is 03:00 "
                             "daily")
    parser.add_argument("--name", help="recurring run name (default <pipeline name>-schedule)")
    parser.set_defaults(func=run_schedule)


def _add_runs(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("runs", help="list recent runs and recurring runs")
    _add_connection(parser)
    parser.add_argument("--experiment", help="only this experiment's runs")
    parser.add_argument("--limit", type=int, default=20, help="how many of each (default 20)")
    parser.add_argument("--format", choices=["text", "json"], default="text",
                        help="output format (default text)")
    parser.set_defaults(func=run_runs)


def _add_unschedule(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("unschedule", help="disable (or delete) a recurring run")
    _add_connection(parser)
    parser.add_argument("recurring_run_id", metavar="RECURRING_RUN_ID",
                        help="id from `edgeface pipeline runs`")
    parser.add_argument("--delete", action="store_true", help="delete it instead of disabling")
    parser.set_defaults(func=run_unschedule)


# --- compile --------------------------------------------------------------------------------


def _options(args: argparse.Namespace):
    from edgeface.fleet import load_fleet
    from pipelines.federated import DEFAULT_TASK_TIMEOUT_S, make_options, pipeline_config

    if args.fleet is None:
        # Only submit and schedule have --package, so only they suggest it.
        package_hint = (", or --package PIPELINE.yaml with a file from `edgeface pipeline "
                        "compile`" if hasattr(args, "package") else "")
        raise ConfigError("no fleet file given: pass --fleet FLEET.yaml (for example "
                          f"pipelines/fleet.example.yaml){package_hint}")
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"invalid --rounds {args.rounds}: expected 1 or more")
    fleet = load_fleet(args.fleet)
    config = pipeline_config(fleet, args.config, args.rounds)
    return make_options(fleet, config, args.mode or "simulation",
                        args.task_timeout or DEFAULT_TASK_TIMEOUT_S)


def run_compile(args: argparse.Namespace) -> int:
    from pipelines.federated import compile_pipeline

    options = _options(args)
    path = compile_pipeline(options, args.output)
    print(f"pipeline: {path} ({len(options.fleet.nodes)} nodes x {options.rounds} rounds, "
          f"{options.mode} data, {path.stat().st_size / 1024:.0f} KiB)")
    return 0


# --- compiled package -----------------------------------------------------------------------


def read_package(package: Path) -> dict[str, Any]:
    """Parse a compiled pipeline YAML and return its KFP pipeline spec, the first document.

    Raises:
        ConfigError: the file cannot be read or parsed, or is not a KFP pipeline spec.
    """
    fix = "pass a file written by `edgeface pipeline compile -o FILE`, or pass --fleet"
    try:
        with package.open(encoding="utf-8") as stream:
            documents = list(yaml.safe_load_all(stream))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        # PyYAML's message spans lines to point at the column, so it is joined for the log.
        reason = " ".join(str(error).split())
        raise ConfigError(f"invalid pipeline package {package}: {reason}. Fix: {fix}") from None
    spec = documents[0] if documents else None
    keys = sorted(map(str, spec)) if isinstance(spec, dict) else []
    if not (isinstance(spec, dict) and isinstance(spec.get("pipelineInfo"), dict)
            and isinstance(spec.get("root"), dict) and "schemaVersion" in spec):
        found = f"its top-level keys are {', '.join(keys)}" if keys else "it is not a mapping"
        raise ConfigError(f"{package} is not a compiled Kubeflow pipeline: {found}, but a KFP "
                          f"pipeline spec has pipelineInfo, root and schemaVersion. Fix: {fix}")
    return spec


def package_parameters(spec: dict[str, Any]) -> set[str]:
    """Return the names of a compiled pipeline's parameters."""
    return set(_mapping(_mapping(spec["root"].get("inputDefinitions")).get("parameters")))


# Inputs of the prepare-evaluation-set task that record the shape of the compiled DAG, in the
# order of the arguments of `components.common.check_compiled_shape`.
COMPILED_SHAPE_INPUTS = ("compiled_nodes", "compiled_rounds", "compiled_eval_every",
                         "compiled_calibration", "compiled_spreadout")


def compiled_shape(spec: dict[str, Any]) -> tuple[int, int, int, bool, bool] | None:
    """Return the compiled shape constants of a pipeline spec, or None if no task has them.

    The compiler puts the task inside the exit handler's DAG, so every DAG is searched.
    """
    components = list((spec.get("components") or {}).values())
    for owner in [spec["root"]] + components:
        for task in _mapping(_mapping(_mapping(owner).get("dag")).get("tasks")).values():
            inputs = _mapping(_mapping(_mapping(task).get("inputs")).get("parameters"))
            values = [_mapping(_mapping(inputs.get(name)).get("runtimeValue")).get("constant")
                      for name in COMPILED_SHAPE_INPUTS]
            if not all(isinstance(value, (bool, int, float)) for value in values):
                continue
            # The compiler stores integer constants as floats, for example 2.0.
            nodes, rounds, eval_every, calibration, spreadout = values
            return int(nodes), int(rounds), int(eval_every), bool(calibration), bool(spreadout)
    return None


def _mapping(value: Any) -> dict[str, Any]:
    """Return `value` if it is a dict, else an empty dict, to read a spec of unknown shape."""
    return value if isinstance(value, dict) else {}


def check_config_json(value: str, spec: dict[str, Any]) -> None:
    """Check a config_json value as the pipeline's prepare-evaluation-set task will.

    Raises:
        ConfigError: the value is not a valid run config in JSON, its nodes, rounds or
            schedule differ from the compiled pipeline's, or the package does not record
            its compiled shape.
    """
    from components.common import check_compiled_shape, load_run_config

    quoted_value = repr(value if len(value) <= 80 else value[:77] + "...")
    shape = compiled_shape(spec)
    if shape is None:
        raise ConfigError(f"cannot check --param config_json={quoted_value}: the package has no "
                          f"task with the inputs {', '.join(COMPILED_SHAPE_INPUTS)}. Compile "
                          "it again with `edgeface pipeline compile`")
    try:
        check_compiled_shape(load_run_config(value), *shape)
    except ConfigError as error:
        raise ConfigError(f"invalid --param config_json={quoted_value}: {error}") from None


def check_run_inputs(package: Path, items: list[str]) -> dict[str, str]:
    """Check a package and the --param items for it, and return the parameters of a run.

    Raises:
        ConfigError: from `read_package`, `parse_params` or `check_config_json`.
    """
    spec = read_package(package)
    params = parse_params(items, package_parameters(spec))
    if "config_json" in params:
        check_config_json(params["config_json"], spec)
    return params


# --- submit and schedule --------------------------------------------------------------------


def parse_params(items: list[str], allowed: set[str]) -> dict[str, str]:
    """Parse NAME=VALUE items into a dict, checking names and the total size.

    Raises:
        ConfigError: an item without '=', an unknown name, or more than 10,000 bytes in all.
    """
    params: dict[str, str] = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator or not name:
            raise ConfigError(f"invalid --param {item!r}: expected NAME=VALUE")
        if name not in allowed:
            raise ConfigError(f"unknown pipeline parameter {name!r} in --param: the pipeline "
                              f"takes {', '.join(sorted(allowed))}")
        params[name] = value
    size = sum(len(k) + len(v.encode()) for k, v in params.items())
    if size > MAX_PARAMETER_BYTES:
        raise ConfigError(f"--param values take {size} bytes, over the API server's limit of "
                          f"{MAX_PARAMETER_BYTES}: put large inputs in a file or a volume")
    return params


def _prepare_package(args: argparse.Namespace, workdir: Path) -> tuple[Path, str, str | None]:
    """Return (package path, pipeline name, fleet cluster name or None) for submit/schedule."""
    if args.package is not None:
        options = {"--rounds": args.rounds, "--mode": args.mode, "--config": args.config,
                   "--task-timeout": args.task_timeout}
        ignored = [flag for flag, value in options.items() if value is not None]
        if ignored:
            raise ConfigError(f"{', '.join(ignored)} cannot change a compiled --package: pass "
                              "them to `edgeface pipeline compile`, or use --fleet instead of "
                              "--package")
        if not args.package.is_file():
            raise ConfigError(f"pipeline package not found: {args.package}: compile one with "
                              "`edgeface pipeline compile` or pass --fleet")
        from pipelines.federated import PIPELINE_NAME

        return args.package, args.pipeline_name or PIPELINE_NAME, None
    from pipelines.federated import compile_pipeline

    options = _options(args)
    path = compile_pipeline(options, workdir / "pipeline.yaml")
    return path, args.pipeline_name or options.display_name(), options.fleet.name


def _upload(args: argparse.Namespace, workdir: Path):
    from pipelines.client import PipelineClient

    package, pipeline_name, cluster = _prepare_package(args, workdir)
    # Every check runs before the first request, so invalid input uploads nothing.
    params = check_run_inputs(package, args.param)
    digest = hashlib.sha256(package.read_bytes()).hexdigest()[:12]
    client = PipelineClient(args.host)
    version = client.upload(str(package), pipeline_name, f"{pipeline_name}-{digest}")
    return client, version, params, cluster


def run_submit(args: argparse.Namespace) -> int:
    from pipelines.client import PodWatchdog

    with tempfile.TemporaryDirectory(prefix="edgeface-pipeline-") as workdir:
        client, version, params, cluster = _upload(args, Path(workdir))
    run_name = args.run_name or version.version_name
    run_id = client.start_run(version, args.experiment, run_name, params)
    result: dict[str, Any] = {"run_id": run_id, "run_name": run_name,
                              "pipeline_id": version.pipeline_id,
                              "version_id": version.version_id,
                              "url": f"{client.host}/#/runs/details/{run_id}"}
    if args.wait:
        context = args.context or (f"k3d-{cluster}" if cluster else None)
        watchdog = PodWatchdog(run_id, context=context, pending_timeout_s=args.pending_timeout,
                               pull_timeout_s=args.pull_timeout)
        result["state"] = client.wait_for_run(run_id, timeout_s=args.timeout,
                                              poll_interval_s=args.poll_interval,
                                              watchdog=watchdog)
    _print_result(args.format, result, f"run {run_id} ({run_name}): {result['url']}")
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    from pipelines.client import validate_cron

    cron = validate_cron(args.cron)
    with tempfile.TemporaryDirectory(prefix="edgeface-pipeline-") as workdir:
        client, version, params, _ = _upload(args, Path(workdir))
    name = args.name or f"{version.version_name.rsplit('-', 1)[0]}-schedule"
    recurring_run_id = client.schedule(version, args.experiment, name, cron, params)
    result = {"recurring_run_id": recurring_run_id, "name": name, "cron": cron,
              "pipeline_id": version.pipeline_id, "version_id": version.version_id}
    _print_result(args.format, result,
                  f"recurring run {recurring_run_id} ({name}) at {cron!r}; stop it with "
                  f"`edgeface pipeline unschedule {recurring_run_id}`")
    return 0


def _print_result(output_format: str, result: dict[str, Any], text: str) -> None:
    print(json.dumps(result, indent=2) if output_format == "json" else text)


# --- runs and unschedule --------------------------------------------------------------------


def run_runs(args: argparse.Namespace) -> int:
    from pipelines.client import PipelineClient

    if args.limit < 1:
        raise ConfigError(f"invalid --limit {args.limit}: expected 1 or more")
    client = PipelineClient(args.host)
    runs = client.list_runs(args.experiment, args.limit)
    recurring = client.list_recurring_runs(args.experiment, args.limit)
    if args.format == "json":
        print(json.dumps({"runs": runs, "recurring_runs": recurring}, indent=2))
        return 0
    _print_table(["RUN ID", "STATE", "CREATED", "NAME"],
                 [[r["run_id"], r["state"], r["created_at"], r["name"]] for r in runs])
    print()
    _print_table(["RECURRING RUN ID", "STATUS", "CRON", "NAME"],
                 [[r["recurring_run_id"], r["status"], r["cron"], r["name"]] for r in recurring])
    return 0


def _print_table(header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip())
    if not rows:
        print("(none)")
    sys.stdout.flush()


def run_unschedule(args: argparse.Namespace) -> int:
    from pipelines.client import PipelineClient

    PipelineClient(args.host).unschedule(args.recurring_run_id, delete=args.delete)
    print(f"{'deleted' if args.delete else 'disabled'} recurring run {args.recurring_run_id}")
    return 0
