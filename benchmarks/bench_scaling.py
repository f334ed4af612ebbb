"""Scaling of `edgeface run`: node count on fixed data, data size on fixed nodes, memory.

Every point is one `edgeface run` process, timed as a whole with the peak RSS and PSS summed
over its process tree (coordinator and edge workers). The node and evaluation caches and the
MLflow database are made before the timed runs, so the times exclude preprocessing (see
`bench_ingest`) and the MLflow schema migration.

Round overhead per round is everything in the rounds that is not training or evaluation
compute: the wall time of the rounds, less the evaluation time, less the nodes' training time
divided by the nodes that train at once. It covers sending requests, loading and saving
weights, validation, aggregation, BatchNorm recalibration, checkpoints and MLflow logging.

Growing data sizes use the first K people (in name order) of LFW, linked into a folder under
the output folder, with the holdout protocol, since LFW's protocol files name all people.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks.bench_flower import warm_caches
from benchmarks.common import edgeface_command, machine, run_measured, utc_now, write_json


def lfw_subset(lfw: Path, images: int, folder: Path) -> tuple[Path, int]:
    """Link the first people of LFW into `folder` until at least `images` images; return both."""
    from edgeface.data.ingest import resolve_images_root

    root = resolve_images_root(lfw)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    total = 0
    for person in sorted(path for path in root.iterdir() if path.is_dir()):
        count = sum(1 for _ in person.glob("*.jpg"))
        if count < 2:
            continue  # the holdout protocol needs probes; single-image people add none
        (folder / person.name).symlink_to(person, target_is_directory=True)
        total += count
        if total >= images:
            break
    return folder, total


def run_point(data: Path, out: Path, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run `edgeface run` once with `overrides` and return its times, memory and accuracy."""
    from edgeface.workers import plan_parallelism

    warm_caches(data, overrides)
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    flags = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    command = edgeface_command("run", "--data", str(data), "--out", str(run_dir), *flags,
                               "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}",
                               "--no-progress")
    measured = run_measured(command, cwd=out, log_path=out / f"{name}.log")
    summary = json.loads((run_dir / "summary.json").read_text())
    timings = summary["timings"]
    rounds = int(overrides["rounds"])
    parallel, _ = plan_parallelism(int(overrides["nodes"]), 0, 0)
    compute = timings.get("node_training", 0.0) / parallel + timings.get("evaluate", 0.0)
    overhead = (timings.get("rounds", 0.0) - compute) / rounds
    shutil.rmtree(run_dir / "model", ignore_errors=True)
    return {"name": name, **overrides, **measured,
            "training_images": sum(node["samples"] for node in summary["nodes"]),
            "verification_accuracy": summary["metrics"]["verification_accuracy"],
            "round_overhead_seconds": round(overhead, 2),
            "bn_calibration_seconds_per_round": round(
                timings.get("bn_calibration", 0.0) / rounds, 2),
            "aggregate_seconds_per_round": round(timings.get("aggregate", 0.0) / rounds, 3),
            "timings": timings, "command": " ".join(command[2:])}


def run(lfw: Path, orl: Path, out: Path, *, quick: bool) -> dict[str, Any]:
    from edgeface.tracking import Tracker

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    Tracker(f"sqlite:///{out / 'mlflow.db'}", "edgeface")  # migrate the schema before timing
    cache = str(out / "cache")
    rounds = 2 if quick else 4
    common = {"rounds": rounds, "eval-every": 0, "seed": 0, "cache-dir": cache}

    nodes_data = orl if quick else lfw
    by_nodes = [run_point(nodes_data, out, f"nodes-{n}", {**common, "nodes": n})
                for n in (1, 2, 4, 8, 16)]

    sizes = [500, 1000, 2000] if quick else [1000, 2000, 4000, 8000]
    by_size = []
    for size in sizes:
        folder, images = lfw_subset(lfw, size, out / "subsets" / f"lfw-{size}")
        point = run_point(folder, out, f"images-{size}", {**common, "nodes": 4})
        by_size.append({**point, "dataset_images": images})

    # The default job (LFW View 1, 4 nodes, every default) for its peak memory. Quick runs
    # stop after one round, because by then every worker has trained once, and the export
    # still follows.
    default_rounds = 1 if quick else 14
    default_run = run_point(lfw, out, "default-4-nodes",
                            {"rounds": default_rounds, "cache-dir": cache, "nodes": 4})
    record = {"benchmark": "scaling", "date": utc_now(), "machine": machine(),
              "nodes_dataset": str(nodes_data), "by_nodes": by_nodes, "by_size": by_size,
              "default_run": default_run}
    write_json(record, out / "scaling.json")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lfw", type=Path, required=True, help="LFW folder")
    parser.add_argument("--orl", type=Path, required=True, help="ORL (AT&T faces) folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--quick", action="store_true",
                        help="ORL for the node sweep, smaller LFW subsets, 2 rounds")
    args = parser.parse_args(argv)
    record = run(args.lfw, args.orl, args.out, quick=args.quick)
    for point in record["by_nodes"] + record["by_size"] + [record["default_run"]]:
        print(f"{point['name']}: {point['wall_seconds']:.1f} s, peak RSS "
              f"{point['peak_rss_mib']:.0f} MiB, PSS {point['peak_pss_mib']:.0f} MiB, "
              f"overhead {point['round_overhead_seconds']:.2f} s/round")
    return 0


if __name__ == "__main__":
    sys.exit(main())
