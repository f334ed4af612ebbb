"""Time split of one edge worker's training step by kind of operator.

Runs `edgeface.training.train_local` under `torch.profiler` on preprocessed LFW crops: the
default model and input size, batch 128, channels-last fp32 with the fused BatchNorm+PReLU
path. It sums the operators' self CPU time into a few groups: convolution forward and
backward, BatchNorm forward and backward, elementwise ops, and the rest.

    python -m benchmarks.profile_training --data ../shared/data/lfw --out bench-profile

Writes `OUT/profile.json`, and prints the groups with their share of the profiled time.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine, utc_now, write_json

BATCH = 128
ELEMENTWISE = {"aten::clamp", "aten::gt", "aten::mul", "aten::mul_", "aten::lerp", "aten::sum",
               "aten::div_", "aten::sub_", "aten::add", "aten::add_", "aten::where",
               "aten::sub", "aten::div", "aten::neg", "aten::relu", "aten::copy_"}


def group_of(name: str) -> str:
    """Return the group that a profiler event name belongs to."""
    if name == "aten::mkldnn_convolution":
        return "convolution forward"
    if name == "aten::convolution_backward":
        return "convolution backward"
    if name == "aten::native_batch_norm":
        return "BatchNorm forward"
    if name == "aten::native_batch_norm_backward":
        return "BatchNorm backward"
    if name in ELEMENTWISE:
        return "elementwise (PReLU, its gradients, optimizer)"
    return "other"


def profile(data: Path, out: Path, *, steps: int, threads: int) -> dict[str, Any]:
    """Profile `steps` training steps after one warm-up step; return the grouped times."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from benchmarks.bench_training import load_faces
    from edgeface.config import ModelConfig, TrainConfig
    from edgeface.model import ModelSpec
    from edgeface.training import build_face_model, train_local

    torch.set_num_threads(threads)
    images, labels = load_faces(data, 1024, 64, out / "cache")
    per_epoch = len(labels) / BATCH
    torch.manual_seed(0)
    model = build_face_model(ModelSpec(), ModelConfig(), int(labels.max()) + 1)
    train_local(model, images, labels, TrainConfig(local_epochs=1 / per_epoch, batch_size=BATCH),
                lr=0.05, seed=0)
    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        result = train_local(model, images, labels,
                             TrainConfig(local_epochs=steps / per_epoch, batch_size=BATCH),
                             lr=0.05, seed=1)
    groups: Counter[str] = Counter()
    for event in profiler.key_averages():
        groups[group_of(event.key)] += event.self_cpu_time_total
    total = sum(groups.values())
    return {
        "benchmark": "profile_training", "date": utc_now(), "machine": machine(),
        "threads": threads, "steps": steps, "batch": BATCH,
        "images_per_second": round(result.images_per_second, 1),
        "groups": {name: {"ms": round(us / 1e3, 1), "share": round(us / total, 3)}
                   for name, us in groups.most_common()},
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.profile_training",
                             *sys.argv[1:]]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="LFW folder")
    parser.add_argument("--out", type=Path, default=Path("bench-profile"), help="output folder")
    parser.add_argument("--steps", type=int, default=4, help="profiled training steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    record = profile(args.data, args.out, steps=args.steps, threads=args.threads)
    write_json(record, args.out / "profile.json")
    for name, group in record["groups"].items():
        print(f"{100 * group['share']:5.1f}%  {group['ms']:9.1f} ms  {name}")
    print(f"{record['images_per_second']} images/s while profiled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
