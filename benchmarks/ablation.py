"""Ablation on LFW View 1: partition x aggregation strategy, at a reduced budget.

Runs `edgeface run` once per (partition, strategy) cell with the same budget flags, one after
the other, and writes `OUT/ablation.json` with View 1 accuracy, wall time and the bytes that
the nodes downloaded and uploaded per round (mean over rounds). A cell whose run folder has a
`summary.json` is read, not run again, so an interrupted ablation continues where it stopped.

    python benchmarks/ablation.py --data ../shared/data/lfw --out bench-ablation \\
        --partitions identity iid --strategies fedavg spreadout
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine  # noqa: E402

PARTITIONS: dict[str, list[str]] = {
    "identity": ["--partition", "identity"],
    "iid": ["--partition", "iid"],
    "dirichlet-0.5": ["--partition", "dirichlet", "--alpha", "0.5"],
}

STRATEGIES: dict[str, list[str]] = {
    "fedavg": ["--aggregation", "fedavg"],
    "fedprox": ["--aggregation", "fedavg", "--fedprox-mu", "0.01"],
    # Server learning rate 1 and momentum 0.5: the default 0.1 and 0.9 need more rounds than
    # the reduced budget has before the steps reach FedAvg size.
    "fedavgm": ["--aggregation", "fedavgm", "--server-lr", "1.0", "--server-momentum", "0.5"],
    "fedbn": ["--aggregation", "fedavg", "--fedbn", "true"],
    "spreadout": ["--aggregation", "fedavg", "--spreadout", "true"],
}

# 32 px crops and 6 rounds: about a quarter of the default config's compute per round.
REDUCED_BUDGET = ["--image-size", "32", "--rounds", "6", "--eval-every", "0", "--nodes", "4"]


def run_cell(data: Path, out: Path, partition: str, strategy: str,
             budget: list[str]) -> dict[str, object]:
    run_dir = out / f"{partition}-{strategy}"
    flags = [*budget, *PARTITIONS[partition], *STRATEGIES[strategy]]
    command = [sys.executable, "-m", "edgeface.cli.main", "run", "--data", str(data),
               "--out", str(run_dir), "--no-progress", *flags]
    record_path = run_dir / "cell.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=out)
    wall = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    history = summary["history"]
    record = {
        "partition": partition, "strategy": strategy,
        "command": " ".join(["edgeface", *command[3:]]).replace(str(data), "LFW"),
        "accuracy": summary["metrics"]["verification_accuracy"],
        "std": summary["metrics"]["verification_std"],
        "wall_seconds": round(wall, 1),
        "train_seconds": summary["timings"].get("train"),
        "download_bytes_per_round": statistics.fmean(r["download_bytes"] for r in history),
        "upload_bytes_per_round": statistics.fmean(r["upload_bytes"] for r in history),
    }
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def markdown_table(records: list[dict[str, object]]) -> str:
    """Format the cells as a Markdown table, one row per (partition, strategy)."""
    lines = ["| partition | strategy | View 1 accuracy | wall time | MiB down / up per round |",
             "| --- | --- | --- | --- | --- |"]
    for record in records:
        lines.append(
            f"| {record['partition']} | {record['strategy']} | {record['accuracy']:.3f} +- "
            f"{record['std']:.3f} | {record['wall_seconds'] / 60:.1f} min | "
            f"{record['download_bytes_per_round'] / 2**20:.1f} / "
            f"{record['upload_bytes_per_round'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="LFW folder with protocol files")
    parser.add_argument("--out", type=Path, default=Path("bench-ablation"), help="output folder")
    parser.add_argument("--partitions", nargs="+", choices=list(PARTITIONS), default=list(PARTITIONS))
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    records = []
    for partition in args.partitions:
        for strategy in args.strategies:
            record = run_cell(args.data.resolve(), out, partition, strategy, REDUCED_BUDGET)
            records.append(record)
            print(f"{partition} {strategy}: accuracy {record['accuracy']:.4f} +- "
                  f"{record['std']:.4f}, wall {record['wall_seconds']:.0f} s, "
                  f"{record['download_bytes_per_round'] / 2**20:.1f} MiB down and "
                  f"{record['upload_bytes_per_round'] / 2**20:.1f} MiB up per round", flush=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "budget": REDUCED_BUDGET, "cells": records}
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ablation.md").write_text(markdown_table(records))
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
