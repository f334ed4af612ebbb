"""Federated wall time of `edgeface run` against Flower's simulation engine, same workload.

Both runs use the same config: model, partition, nodes, rounds, local epochs and seed, with
BatchNorm recalibration off (Flower's FedAvg has no step for it) and one evaluation after
the last round. The node and evaluation caches and the MLflow database are made before
either run is timed, so neither pays for preprocessing or a schema migration. Each side is timed as a whole process, start-up included, with
the peak memory of its process tree. `edgeface run` also exports, quantizes, registers and
reports the model, so its time up to the final evaluation is given too. edgeface runs twice:
with the default ONNX exporter (dynamo) and with `--exporter torchscript`.

The Flower side (`benchmarks/flower_app.py`) needs a Python with `flwr[simulation]`, for
example a virtual environment made with `--system-site-packages` so that it can import
edgeface's dependencies:

    python3 -m venv --system-site-packages /tmp/flwr-venv
    /tmp/flwr-venv/bin/pip install "flwr[simulation]"
    python -m benchmarks.bench_flower --data ../shared/data/att_faces --out bench-out/flower \
        --flower-python /tmp/flwr-venv/bin/python --repeats 3

One run of each side varies by up to a few seconds from run to run on a 2-core machine, so
`--repeats` runs each side several times and compares the middle runs by wall time (the
median for an odd count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (REPO_ROOT, edgeface_command, machine, run_measured, utc_now,
                               write_json)


def workload(rounds: int, nodes: int, cache_dir: Path) -> dict[str, Any]:
    """Return the config overrides (flag name -> value) that both runs use."""
    return {"nodes": nodes, "rounds": rounds, "local-epochs": 1, "seed": 0,
            "bn-calibration-images": 0, "eval-every": 0, "cache-dir": str(cache_dir)}


def warm_caches(data: Path, overrides: dict[str, Any]) -> None:
    """Build every node's cache and the evaluation cache, as both runs will read them."""
    from edgeface import steps
    from edgeface.config import load_config

    config = load_config(None, overrides)
    cache_dir = steps.resolve_cache_dir(config)
    images_root, _, plan = steps.plan_step(data, config)
    with tempfile.TemporaryDirectory(prefix="edgeface-bench-") as folder:
        shards = steps.partition_step(plan.train_records, config, Path(folder))
    for shard in shards.nodes:
        steps.prepare_node(images_root, shard, config, cache_dir)
    steps.prepare_evaluation(images_root, plan, config, cache_dir)


def run_edgeface(data: Path, out: Path, overrides: dict[str, Any],
                 name: str = "edgeface") -> dict[str, Any]:
    """Time one `edgeface run`; its folder is OUT/NAME-run and its log OUT/NAME.log."""
    run_dir = out / f"{name}-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    command = edgeface_command("run", "--data", str(data), "--out", str(run_dir), *flags,
                               "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}",
                               "--no-progress")
    measured = run_measured(command, cwd=out, log_path=out / f"{name}.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    timings = summary["timings"]
    after_training = sum(timings.get(key, 0.0) for key in ("export", "register", "int8",
                                                          "report"))
    return {**measured, "metrics": summary["metrics"], "timings": timings,
            "wall_seconds_to_final_evaluation": round(measured["wall_seconds"] - after_training,
                                                      2),
            "command": " ".join(command[2:])}


def run_flower(data: Path, out: Path, overrides: dict[str, Any],
               flower_python: str, name: str = "flower") -> dict[str, Any]:
    """Time one Flower simulation; its log is OUT/NAME.log and its result OUT/NAME-result.json."""
    work = out / f"{name}-run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result_path = out / f"{name}-result.json"
    command = [flower_python, "-m", "benchmarks.flower_app", "--data", str(data), "--out",
               str(work), "--result", str(result_path), "--config-json", json.dumps(overrides)]
    measured = run_measured(command, cwd=REPO_ROOT, log_path=out / f"{name}.log",
                            env={"RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    result = json.loads(result_path.read_text())
    return {**measured, **result, "command": " ".join(command[1:])}


def compare(edgeface: dict[str, Any], flower: dict[str, Any]) -> dict[str, Any]:
    """Return the wall-time ratios and whether the accuracies agree within their fold spread.

    The accuracies agree when they differ by at most the larger of the two fold-to-fold
    standard deviations. Otherwise the two runs did not do the same work, and the time
    comparison is void.
    """
    ours, theirs = edgeface["metrics"], flower["metrics"]
    delta = abs(ours["verification_accuracy"] - theirs["verification_accuracy"])
    noise = max(ours["verification_std"], theirs["verification_std"])
    return {
        "edgeface_over_flower_wall": round(edgeface["wall_seconds"] / flower["wall_seconds"], 3),
        "edgeface_to_final_evaluation_over_flower_wall": round(
            edgeface["wall_seconds_to_final_evaluation"] / flower["wall_seconds"], 3),
        "accuracy_delta": round(delta, 4), "accuracy_noise": round(noise, 4),
        "accuracies_match": delta <= noise,
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the middle run by wall time, with the wall times of all runs added.

    For an even count it is the faster of the two middle runs, so for 2 runs the faster one.
    `wall_seconds_runs` (and `wall_seconds_to_final_evaluation_runs` for edgeface) list every
    run in order.
    """
    chosen = dict(sorted(runs, key=lambda item: item["wall_seconds"])[(len(runs) - 1) // 2])
    for key in ("wall_seconds", "wall_seconds_to_final_evaluation"):
        if key in chosen:
            chosen[f"{key}_runs"] = [item[key] for item in runs]
    return chosen


def run(data: Path, out: Path, *, quick: bool, flower_python: str,
        nodes: int = 4, repeats: int = 1) -> dict[str, Any]:
    """Run both sides `repeats` times, interleaved, and compare their middle runs.

    See `median_run` for which run is the middle one.

    Interleaving (edgeface, edgeface with the TorchScript exporter, Flower, then again) spreads
    any drift of the machine's speed over all three sides.
    """
    if repeats < 1:
        raise ValueError(f"repeats is {repeats}: give 1 or more")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rounds = 3 if quick else 6
    overrides = workload(rounds, nodes, out / "cache")
    warm_caches(data, overrides)
    from edgeface.tracking import Tracker

    Tracker(f"sqlite:///{out / 'mlflow.db'}", "edgeface")  # migrate the schema before timing
    sides: dict[str, list[dict[str, Any]]] = {"edgeface": [], "torchscript": [], "flower": []}
    for repeat in range(repeats):
        suffix = f"-{repeat + 1}" if repeat else ""  # every run keeps its folder and log
        sides["edgeface"].append(run_edgeface(data, out, overrides, name=f"edgeface{suffix}"))
        # The same run with the TorchScript ONNX exporter, which takes about 5 s less (see
        # edgeface.export); everything else is identical.
        sides["torchscript"].append(run_edgeface(
            data, out, {**overrides, "exporter": "torchscript"},
            name=f"edgeface-torchscript{suffix}"))
        sides["flower"].append(run_flower(data, out, overrides, flower_python,
                                          name=f"flower{suffix}"))
    edgeface, fast_export, flower = (median_run(sides[key])
                                     for key in ("edgeface", "torchscript", "flower"))
    record = {"benchmark": "flower", "date": utc_now(), "machine": machine(),
              "dataset": str(data), "workload": overrides, "repeats": repeats,
              "edgeface": edgeface,
              "edgeface_torchscript_export": fast_export, "flower": flower,
              "comparison": compare(edgeface, flower),
              "comparison_torchscript_export": compare(fast_export, flower)}
    write_json(record, out / "flower.json")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (ORL or LFW)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 6")
    parser.add_argument("--nodes", type=int, default=4, help="edge nodes (default 4)")
    parser.add_argument("--flower-python", required=True,
                        help="a Python with flwr[simulation] installed")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each side, compared by their middle runs "
                             "(default 1; use an odd count)")
    args = parser.parse_args(argv)
    record = run(args.data, args.out, quick=args.quick, flower_python=args.flower_python,
                 nodes=args.nodes, repeats=args.repeats)
    print(json.dumps(record["comparison"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
