"""Aggregation time: FedAvg of N node updates of the MobileFaceNet backbone, in milliseconds.

Times `Strategy.aggregate` (screening and fusing, the call the runner makes each round) on
seeded random updates, for the default width (about 0.36M parameters) and width 2 (about 1.3M
parameters), 4 and 16 nodes, with the process's default torch thread count.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, percentile, utc_now, write_json


def time_aggregation(width: float, nodes: int, repeats: int) -> dict[str, Any]:
    from edgeface.aggregation import NodeUpdate, build_strategy
    from edgeface.model import ModelSpec, build_backbone

    torch.manual_seed(0)
    global_state = {key: value.clone()
                    for key, value in build_backbone(ModelSpec(width=width)).state_dict().items()}
    updates = []
    for index in range(nodes):
        state = {key: value + 0.01 * torch.randn_like(value) if value.is_floating_point()
                 else value.clone() for key, value in global_state.items()}
        updates.append(NodeUpdate(node=f"node-{index}", state=state, num_samples=100 + index))
    strategy = build_strategy("fedavg", min_nodes=1)
    strategy.aggregate(global_state, updates)  # warm-up
    durations = []
    for _ in range(repeats):
        started = time.perf_counter()
        strategy.aggregate(global_state, updates)
        durations.append(time.perf_counter() - started)
    parameters = sum(value.numel() for value in global_state.values()
                     if value.is_floating_point())
    return {"width": width, "nodes": nodes, "parameters": parameters,
            "keys": len(global_state), "p50_ms": round(percentile(durations, 0.5) * 1000, 2),
            "p95_ms": round(percentile(durations, 0.95) * 1000, 2), "repeats": repeats}


def run(out: Path, *, quick: bool) -> dict[str, Any]:
    repeats = 10 if quick else 50
    points = [time_aggregation(width, nodes, repeats) for width in (1.0, 2.0)
              for nodes in (4, 16)]
    record = {"benchmark": "aggregation", "date": utc_now(), "machine": machine(),
              "torch_threads": torch.get_num_threads(), "points": points}
    write_json(record, out / "aggregation.json")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="10 timed calls instead of 50")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.out, quick=args.quick)["points"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
