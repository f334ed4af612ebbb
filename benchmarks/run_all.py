"""Run every speed benchmark and write their JSON records into one folder.

    python -m benchmarks.run_all --quick --out bench-out \
        --lfw ../shared/data/lfw --orl ../shared/data/att_faces \
        --flower-python /tmp/flwr-venv/bin/python

Writes training.json, flower.json, scaling.json, aggregation.json, ingest.json,
inference.json, compile.json and all.json (every record, with the command line and the total time). `--quick` sizes each
benchmark to a few minutes on 2 cores. Without `--flower-python` the Flower comparison is
skipped, and all.json records
the reason. `--only NAME ...` runs a subset.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import (bench_aggregation, bench_compile, bench_flower, bench_inference,
                        bench_ingest, bench_scaling, bench_training)
from benchmarks.common import machine, utc_now, write_json

NAMES = ("training", "flower", "scaling", "aggregation", "ingest", "inference", "compile")


def benchmark_calls(args: argparse.Namespace) -> dict[str, Callable[[], dict[str, Any]]]:
    out, quick = args.out.resolve(), args.quick
    return {
        "training": lambda: bench_training.run(args.lfw, out / "training", quick=quick,
                                               accuracy_rounds=args.accuracy_rounds),
        "flower": lambda: bench_flower.run(args.flower_data or args.orl, out / "flower",
                                           quick=quick, flower_python=args.flower_python,
                                           repeats=1 if quick else 3),
        "scaling": lambda: bench_scaling.run(args.lfw, args.orl, out / "scaling", quick=quick),
        "aggregation": lambda: bench_aggregation.run(out / "aggregation", quick=quick),
        "ingest": lambda: bench_ingest.run(args.lfw, out / "ingest", quick=quick),
        "inference": lambda: bench_inference.run(args.lfw, out / "inference", quick=quick),
        "compile": lambda: bench_compile.run(out / "compile", quick=quick),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--lfw", type=Path, required=True, help="LFW folder with protocol files")
    parser.add_argument("--orl", type=Path, required=True, help="ORL (AT&T faces) folder")
    parser.add_argument("--quick", action="store_true", help="a few minutes per benchmark")
    parser.add_argument("--flower-python",
                        help="a Python with flwr[simulation] installed; without it the "
                             "Flower comparison is skipped")
    parser.add_argument("--flower-data", type=Path,
                        help="dataset of the Flower comparison (default: the ORL folder)")
    parser.add_argument("--accuracy-rounds", type=int, default=2,
                        help="rounds of the fp32 against bf16 accuracy check on LFW View 1 "
                             "(default 2; 0 skips it)")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="run only these benchmarks")
    args = parser.parse_args(argv)
    # The benchmarks run `edgeface run` in their own output folders, so relative paths
    # would point elsewhere there.
    for name in ("lfw", "orl", "flower_data"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())

    started = time.perf_counter()
    records: dict[str, Any] = {}
    calls = benchmark_calls(args)
    for name in args.only or NAMES:
        if name == "flower" and not args.flower_python:
            records[name] = {"skipped": "no --flower-python given"}
            continue
        began = time.perf_counter()
        records[name] = calls[name]()
        print(f"{name}: done in {time.perf_counter() - began:.0f} s", flush=True)

    summary = {"date": utc_now(), "machine": machine(), "quick": args.quick,
               "command": " ".join(sys.argv), "seconds": round(time.perf_counter() - started, 1),
               "records": records}
    path = write_json(summary, args.out / "all.json")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
