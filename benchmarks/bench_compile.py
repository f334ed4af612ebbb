"""Pipeline compile time and compiled size for growing fleets (nodes) and rounds.

Builds a fleet of N edge nodes from `pipelines/fleet.example.yaml`, compiles the Kubeflow
pipeline with `pipelines.federated.compile_pipeline` (the code behind `edgeface pipeline
compile`) and records the wall time and the size of the YAML file. Importing kfp is timed once,
apart from the compiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import REPO_ROOT, machine, utc_now, write_json


def fleet_file(nodes: int, folder: Path) -> Path:
    """Write a copy of the example fleet with `nodes` edge nodes and return its path."""
    example = yaml.safe_load((REPO_ROOT / "pipelines" / "fleet.example.yaml").read_text())
    template = example["nodes"][0]
    example["nodes"] = [{**template, "name": f"edge-{k}", "label": f"edge-{k}",
                         "host-data-path": f"../fleet-data/edge-{k}"} for k in range(nodes)]
    path = folder / f"fleet-{nodes}.yaml"
    path.write_text(yaml.safe_dump(example, sort_keys=False))
    return path


def run(out: Path, *, quick: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from pipelines.federated import compile_pipeline, make_options, pipeline_config

    import_seconds = time.perf_counter() - started
    from edgeface.fleet import load_fleet

    node_counts = [2, 4, 8] if quick else [2, 4, 8, 16]
    round_counts = [2, 8] if quick else [2, 4, 8, 14, 28]
    points = []
    for nodes in node_counts:
        fleet = load_fleet(fleet_file(nodes, out))
        for rounds in round_counts:
            options = make_options(fleet, pipeline_config(fleet, None, rounds))
            package = out / f"pipeline-{nodes}x{rounds}.yaml"
            started = time.perf_counter()
            compile_pipeline(options, package)
            seconds = time.perf_counter() - started
            points.append({"nodes": nodes, "rounds": rounds, "seconds": round(seconds, 3),
                           "bytes": package.stat().st_size})
            package.unlink()
    record = {"benchmark": "compile", "date": utc_now(), "machine": machine(),
              "kfp_import_seconds": round(import_seconds, 2), "points": points}
    write_json(record, out / "compile.json")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="fewer fleet sizes and rounds")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.out, quick=args.quick)["points"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
