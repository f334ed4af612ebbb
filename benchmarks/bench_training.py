"""Training throughput of one edge worker against the machine's measured matmul peak.

Times `edgeface.training.train_local`, the loop an edge worker runs, on real LFW crops with
the default model (MobileFaceNet, 64 px, batch 128) in three variants:

    baseline       fp32, contiguous (NCHW) tensors: plain eager PyTorch
    channels-last  fp32, channels-last tensors
    optimised      channels-last with bf16 autocast (the `precision: bf16` setting)

In the same process it times a large matmul in fp32 and in bf16 as the peak, counts the
model's FLOPs per training image with `torch.utils.flop_counter`, and reports model FLOP
utilisation (MFU). With `--accuracy-rounds R` it also trains `edgeface run --nodes 1` for R
rounds on LFW View 1 in fp32 and in bf16 and compares their verification accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import edgeface_command, machine, run_measured, utc_now, write_json

VARIANTS = {
    "baseline": {"precision": "fp32", "channels_last": False},
    "channels-last": {"precision": "fp32", "channels_last": True},
    "optimised": {"precision": "bf16", "channels_last": True},
}


def matmul_gflops(dtype: torch.dtype, size: int, repeats: int) -> float:
    """Return the best-of-`repeats` GFLOP/s of a (size x size) @ (size x size) product."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # warm-up: oneDNN and MKL pick and cache their kernels on the first call
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def training_flops_per_image(image_size: int, batch: int) -> float:
    """Count forward and backward FLOPs of one training step of the face model, per image."""
    from torch.utils.flop_counter import FlopCounterMode

    from edgeface.config import ModelConfig
    from edgeface.model import ModelSpec
    from edgeface.training import build_face_model

    model = build_face_model(ModelSpec(image_size=image_size), ModelConfig(), 1000).train()
    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.randint(0, 1000, (batch,))
    with FlopCounterMode(display=False) as counter:
        loss = F.cross_entropy(model.head(model.backbone(images), labels), labels)
        loss.backward()
    return counter.get_total_flops() / batch


def load_faces(data: Path, count: int, image_size: int, cache_dir: Path) -> tuple[torch.Tensor,
                                                                                   torch.Tensor]:
    """Return `count` preprocessed LFW crops (uint8 NHWC) and their identity labels."""
    from edgeface.data.cache import PreprocessSpec, build_cache, load_cache
    from edgeface.data.ingest import list_images, resolve_images_root

    root = resolve_images_root(data)
    records = list_images(root)[:count]
    result = build_cache(root, records, PreprocessSpec(image_size=image_size), cache_dir,
                         progress=False, desc="training benchmark")
    array, kept = load_cache(result.path)
    names = sorted({record.identity for record in kept})
    index = {name: i for i, name in enumerate(names)}
    labels = torch.tensor([index[record.identity] for record in kept])
    return torch.from_numpy(np.array(array)), labels


def time_variant(images: torch.Tensor, labels: torch.Tensor, variant: dict[str, Any],
                 steps: int, threads: int) -> dict[str, float]:
    """Train a fresh model for one warm-up step, then `steps` timed steps; return images/s."""
    from edgeface.config import ModelConfig, TrainConfig
    from edgeface.model import ModelSpec
    from edgeface.training import build_face_model, train_local

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    classes = int(labels.max()) + 1
    model = build_face_model(ModelSpec(), ModelConfig(), classes)
    batch = 128
    per_epoch = len(labels) / batch
    warmup = TrainConfig(local_epochs=1 / per_epoch, batch_size=batch, **variant)
    train_local(model, images, labels, warmup, lr=0.05, seed=0)
    config = TrainConfig(local_epochs=steps / per_epoch, batch_size=batch, **variant)
    result = train_local(model, images, labels, config, lr=0.05, seed=1)
    return {"images_per_second": round(result.images_per_second, 1), "steps": result.steps,
            "seconds": round(result.seconds, 2), "threads": threads}


def accuracy_check(data: Path, out: Path, rounds: int) -> dict[str, Any]:
    """Train `edgeface run --nodes 1` for `rounds` rounds in fp32 and bf16; compare accuracy."""
    results: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        run_dir = out / f"accuracy-{precision}"
        command = edgeface_command("run", "--data", str(data), "--out", str(run_dir),
                                   "--nodes", "1", "--rounds", str(rounds), "--eval-every", "0",
                                   "--precision", precision, "--tracking-uri",
                                   f"sqlite:///{out / 'mlflow.db'}", "--no-progress")
        measured = run_measured(command, cwd=out, log_path=out / f"accuracy-{precision}.log")
        summary = json.loads((run_dir / "summary.json").read_text())
        results[precision] = {**summary["metrics"], **measured,
                              "train_seconds": summary["timings"].get("train"),
                              "command": " ".join(command[1:])}
    delta = results["bf16"]["verification_accuracy"] - results["fp32"]["verification_accuracy"]
    results["accuracy_delta_points"] = round(100 * delta, 2)
    return results


def run(data: Path, out: Path, *, quick: bool, accuracy_rounds: int) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cores = len(__import__("os").sched_getaffinity(0))
    steps = 4 if quick else 12
    images, labels = load_faces(data, 1024 if quick else 4096, 64, out / "cache")
    flops = training_flops_per_image(64, 128)
    record: dict[str, Any] = {"benchmark": "training", "date": utc_now(), "machine": machine(),
                              "model": "mobilefacenet", "image_size": 64, "batch_size": 128,
                              "training_gflops_per_image": round(flops / 1e9, 4),
                              "by_threads": {}}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        size = 2048 if quick else 4096
        peak = {"fp32": matmul_gflops(torch.float32, size, 3),
                "bf16": matmul_gflops(torch.bfloat16, size, 3)}
        variants = {}
        for name, variant in VARIANTS.items():
            measured = time_variant(images, labels, variant, steps, threads)
            dtype = variant["precision"]
            achieved = measured["images_per_second"] * flops / 1e9
            measured["achieved_gflops"] = round(achieved, 2)
            measured["mfu_vs_same_dtype_peak"] = round(achieved / peak[dtype], 4)
            variants[name] = measured
        baseline = variants["baseline"]["images_per_second"]
        for measured in variants.values():
            measured["speedup_vs_baseline"] = round(measured["images_per_second"] / baseline, 2)
        record["by_threads"][str(threads)] = {
            "matmul_peak_gflops": {k: round(v, 1) for k, v in peak.items()},
            "matmul_size": size, "variants": variants}
    if accuracy_rounds:
        record["accuracy"] = accuracy_check(data, out, accuracy_rounds)
    write_json(record, out / "training.json")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="LFW folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="fewer steps and images")
    parser.add_argument("--accuracy-rounds", type=int, default=0,
                        help="rounds of the fp32/bf16 LFW accuracy check; 0 skips it")
    args = parser.parse_args(argv)
    record = run(args.data, args.out, quick=args.quick, accuracy_rounds=args.accuracy_rounds)
    print(json.dumps(record["by_threads"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
