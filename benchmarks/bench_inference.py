"""Inference latency: onnxruntime fp32 and int8 against PyTorch eager, batch 1 and 32.

All three run the same network, `edgeface.model.InferenceModel` around a MobileFaceNet
backbone (64 px), on uint8 LFW crops. The ONNX file is written by `edgeface.export.export_onnx`
and the int8 file by `edgeface.quantize.quantize_static_int8` (QDQ, calibrated on real faces),
as `edgeface run` makes them. Each measurement warms up first, then times every call and
reports p50, p95 and images per second, with the same number of intra-op threads for PyTorch
and onnxruntime. The weights are the seeded initial ones, because the run time of a
convolutional network does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.common import machine, percentile, utc_now, write_json
from benchmarks.bench_training import load_faces


def time_calls(call: Callable[[], object], warmup: int, runs: int, batch: int) -> dict[str, float]:
    for _ in range(warmup):
        call()
    durations = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        durations.append(time.perf_counter() - started)
    p50 = percentile(durations, 0.5)
    return {"p50_ms": round(p50 * 1000, 3), "p95_ms": round(percentile(durations, 0.95) * 1000, 3),
            "images_per_second": round(batch * len(durations) / sum(durations), 1),
            "runs": runs}


def run(data: Path, out: Path, *, quick: bool) -> dict[str, Any]:
    from edgeface.export import export_onnx
    from edgeface.inference import open_session
    from edgeface.model import InferenceModel, ModelSpec, build_backbone
    from edgeface.quantize import quantize_static_int8

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    backbone = build_backbone(ModelSpec(image_size=64)).eval()
    fp32_path = export_onnx(backbone, 64, out / "model" / "edgeface.onnx")
    faces, _ = load_faces(data, 256, 64, out / "cache")
    faces_np = faces.numpy()
    int8_path = quantize_static_int8(fp32_path, out / "model" / "edgeface-int8.onnx",
                                     faces_np[:64])
    eager = InferenceModel(backbone).eval()
    cores = len(os.sched_getaffinity(0))
    runs = {1: 100 if quick else 500, 32: 10 if quick else 50}
    record: dict[str, Any] = {"benchmark": "inference", "date": utc_now(), "machine": machine(),
                              "image_size": 64, "by_threads": {}}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        sessions = {"onnxruntime-fp32": open_session(fp32_path, threads=threads),
                    "onnxruntime-int8": open_session(int8_path, threads=threads)}
        results: dict[str, Any] = {}
        for batch, count in runs.items():
            images = np.ascontiguousarray(faces_np[:batch])
            tensor = torch.from_numpy(images)
            with torch.inference_mode():
                results[f"pytorch-eager/batch-{batch}"] = time_calls(
                    lambda: eager(tensor), 5, count, batch)
            for name, session in sessions.items():
                input_name = session.get_inputs()[0].name
                results[f"{name}/batch-{batch}"] = time_calls(
                    lambda: session.run(None, {input_name: images}), 5, count, batch)
            base = results[f"pytorch-eager/batch-{batch}"]["p50_ms"]
            for name in sessions:
                entry = results[f"{name}/batch-{batch}"]
                entry["speedup_p50_vs_eager"] = round(base / entry["p50_ms"], 2)
        record["by_threads"][str(threads)] = results
    record["model_bytes"] = {"fp32": fp32_path.stat().st_size, "int8": int8_path.stat().st_size}
    write_json(record, out / "inference.json")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="LFW folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--quick", action="store_true", help="fewer timed calls")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.data, args.out, quick=args.quick)["by_threads"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
