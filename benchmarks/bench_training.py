"""Training throughput of one edge worker against the machine's measured matmul peak.

Times `edgeface.training.train_local`, the loop an edge worker runs, on real LFW crops with
the default model (MobileFaceNet, 64 px, batch 128) in three variants:

    baseline       fp32, contiguous (NCHW) tensors, BatchNorm and PReLU as the plain modules:
                   plain eager PyTorch
    channels-last  fp32, channels-last tensors, BatchNorm and PReLU fused in training (the
                   default path, `edgeface.batchnorm_prelu`)
    optimised      channels-last with bf16 autocast (the `precision: bf16` setting), where
                   BatchNorm and PReLU run as the plain modules under autocast

In the same process it times a large matmul and a large 1x1 convolution in fp32 and in bf16
as the peak. It counts the model's FLOPs per training image with `torch.utils.flop_counter`,
and reports model FLOP utilisation (MFU): achieved model FLOP/s over the higher of the two peaks
of the variant's dtype. With `--accuracy-rounds R` it also trains `edgeface run --nodes 1` for R
rounds on LFW View 1 in fp32 and in bf16 and compares their verification accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
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
PLAIN_VARIANTS = {"baseline"}  # trained with `edgeface.batchnorm_prelu.plain_modules`


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


def conv1x1_gflops(dtype: torch.dtype, channels: int, repeats: int) -> float:
    """Return the best-of-`repeats` GFLOP/s of a 1x1 convolution, a GEMM run by oneDNN.

    torch.matmul goes to the BLAS library (MKL here), the convolutions of the model to oneDNN,
    and the two can reach different peaks on the same CPU.
    """
    weight = torch.randn(channels, channels, 1, 1).to(dtype)
    images = torch.randn(32, channels, 32, 32).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = weight.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        F.conv2d(images, weight)
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            F.conv2d(images, weight)
            best = min(best, time.perf_counter() - started)
    return 2 * 32 * 32 * 32 * channels * channels / best / 1e9


def measure_peak(threads: int, quick: bool) -> dict[str, dict[str, float]]:
    """Return the best GFLOP/s of a large matmul and a 1x1 convolution, in fp32 and bf16."""
    torch.set_num_threads(threads)
    size = 2048 if quick else 4096
    repeats = 5
    return {
        "matmul": {"fp32": round(matmul_gflops(torch.float32, size, repeats), 1),
                   "bf16": round(matmul_gflops(torch.bfloat16, size, repeats), 1),
                   "size": size},
        "conv1x1": {"fp32": round(conv1x1_gflops(torch.float32, 1024, repeats), 1),
                    "bf16": round(conv1x1_gflops(torch.bfloat16, 1024, repeats), 1),
                    "channels": 1024},
    }


def time_variants(images: torch.Tensor, labels: torch.Tensor, steps: int, trials: int,
                  threads: int) -> dict[str, dict[str, Any]]:
    """Time every variant in `trials` interleaved trials of `steps` training steps each.

    Each variant trains its own model, warmed up by one step first. Interleaving the trials
    spreads load from other processes over all variants, and the best trial is the least
    disturbed one, so it is the figure compared.
    """
    from edgeface.batchnorm_prelu import plain_modules
    from edgeface.config import ModelConfig, TrainConfig
    from edgeface.model import ModelSpec
    from edgeface.training import build_face_model, train_local

    def train(name: str, *args: Any, **kwargs: Any) -> Any:
        context = plain_modules() if name in PLAIN_VARIANTS else contextlib.nullcontext()
        with context:
            return train_local(*args, **kwargs)

    torch.set_num_threads(threads)
    classes = int(labels.max()) + 1
    batch = 128
    per_epoch = len(labels) / batch
    models = {}
    for name, variant in VARIANTS.items():
        torch.manual_seed(0)
        models[name] = build_face_model(ModelSpec(), ModelConfig(), classes)
        warmup = TrainConfig(local_epochs=1 / per_epoch, batch_size=batch, **variant)
        train(name, models[name], images, labels, warmup, lr=0.05, seed=0)
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for trial in range(trials):
        for name, variant in VARIANTS.items():
            config = TrainConfig(local_epochs=steps / per_epoch, batch_size=batch, **variant)
            result = train(name, models[name], images, labels, config, lr=0.05,
                           seed=trial + 1)
            rates[name].append(result.images_per_second)
    return {name: {"images_per_second": round(max(values), 1),
                   "median_images_per_second": round(float(np.median(values)), 1),
                   "trials": trials, "steps_per_trial": steps, "threads": threads}
            for name, values in rates.items()}


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
    steps = 3 if quick else 8
    images, labels = load_faces(data, 1024 if quick else 4096, 64, out / "cache")
    flops = training_flops_per_image(64, 128)
    record: dict[str, Any] = {"benchmark": "training", "date": utc_now(), "machine": machine(),
                              "model": "mobilefacenet", "image_size": 64, "batch_size": 128,
                              "training_gflops_per_image": round(flops / 1e9, 4),
                              "by_threads": {}}
    for threads in sorted({1, cores}):
        peak = measure_peak(threads, quick)
        variants = time_variants(images, labels, steps, 3, threads)
        for name, measured in variants.items():
            dtype = VARIANTS[name]["precision"]
            best_peak = max(peak["matmul"][dtype], peak["conv1x1"][dtype])
            achieved = measured["images_per_second"] * flops / 1e9
            measured["achieved_gflops"] = round(achieved, 2)
            measured["mfu"] = round(achieved / best_peak, 4)
        baseline = variants["baseline"]["images_per_second"]
        for measured in variants.values():
            measured["speedup_vs_baseline"] = round(measured["images_per_second"] / baseline, 2)
        record["by_threads"][str(threads)] = {"peak_gflops": peak, "variants": variants}
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
