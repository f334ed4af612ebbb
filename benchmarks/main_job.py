"""Benchmark the main job: federated (4 nodes) against centralized (1 node) on LFW View 1.

Runs `edgeface run` twice with the default config, once with `--nodes 4` and once with
`--nodes 1` (same rounds, epochs and model, so the same compute budget), and writes one JSON
record per run plus a combined `main_job.json` to the output folder.

    python benchmarks/main_job.py --data ../shared/data/lfw --out bench-out
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

# Run as `python benchmarks/NAME.py`, so the repository root is not on sys.path yet.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine  # noqa: E402


def run_once(data: Path, out: Path, nodes: int, extra: list[str]) -> dict[str, object]:
    run_dir = out / f"nodes-{nodes}"
    started = time.perf_counter()
    command = [sys.executable, "-m", "edgeface.cli.main", "run", "--data", str(data),
               "--out", str(run_dir), "--nodes", str(nodes), "--no-progress", *extra]
    subprocess.run(command, check=True, cwd=out)
    wall = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"nodes": nodes, "command": " ".join(command[2:]), "wall_seconds": round(wall, 1),
            "metrics": summary["metrics"], "timings": summary["timings"],
            "protocol": summary["protocol"], "history": summary["history"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="LFW folder with protocol files")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output folder")
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 1],
                        help="node counts to run (default 4 1)")
    parser.add_argument("extra", nargs="*", help="extra flags passed to `edgeface run` after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    records = [run_once(args.data.resolve(), args.out.resolve(), n, args.extra) for n in args.nodes]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "runs": records}
    (args.out / "main_job.json").write_text(json.dumps(result, indent=2) + "\n")
    for record in records:
        metrics = record["metrics"]
        print(f"nodes={record['nodes']}: accuracy {metrics['verification_accuracy']:.4f} "
              f"+- {metrics['verification_std']:.4f}, wall {record['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
