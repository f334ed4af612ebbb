"""Print the records of `benchmarks.run_all` as Markdown tables, for docs/benchmarks.md.

    python -m benchmarks.summarize bench-out/all.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def training_section(record: dict[str, Any]) -> str:
    rows = []
    for threads, entry in record["by_threads"].items():
        peak = entry["peak_gflops"]
        for name, variant in entry["variants"].items():
            dtype = "bf16" if name == "optimised" else "fp32"
            rows.append([threads, name, variant["images_per_second"],
                         variant["median_images_per_second"], variant["speedup_vs_baseline"],
                         variant["achieved_gflops"],
                         f"{peak['matmul'][dtype]} / {peak['conv1x1'][dtype]} ({dtype})",
                         f"{100 * variant['mfu']:.0f}%"])
    text = table(["threads", "variant", "best images/s", "median images/s", "x baseline",
                  "model GFLOP/s", "peak GFLOP/s matmul / 1x1 conv", "MFU"], rows)
    text += f"\n\nTraining FLOPs per image: {record['training_gflops_per_image']} GFLOP."
    accuracy = record.get("accuracy")
    if accuracy:
        rows = [[precision, f"{accuracy[precision]['verification_accuracy']:.4f}",
                 f"{accuracy[precision]['verification_std']:.4f}",
                 accuracy[precision]["train_seconds"]] for precision in ("fp32", "bf16")]
        text += "\n\n" + table(["precision", "View 1 accuracy", "std", "train s"], rows)
        text += f"\n\nbf16 minus fp32: {accuracy['accuracy_delta_points']} points."
    return text


def flower_section(record: dict[str, Any]) -> str:
    if "skipped" in record:
        return f"skipped: {record['skipped']}"
    ours, theirs, comparison = record["edgeface"], record["flower"], record["comparison"]
    sides = [("edgeface run", ours)]
    if "edgeface_torchscript_export" in record:
        sides.append(("edgeface run --exporter torchscript", record["edgeface_torchscript_export"]))
    rows = [
        [label, side["wall_seconds"], side["wall_seconds_to_final_evaluation"],
         f"{side['metrics']['verification_accuracy']:.4f} +- "
         f"{side['metrics']['verification_std']:.4f}",
         side["peak_rss_mib"], side["peak_pss_mib"]]
        for label, side in sides
    ] + [
        [f"Flower {theirs['flwr']} simulation", theirs["wall_seconds"], "",
         f"{theirs['metrics']['verification_accuracy']:.4f} +- "
         f"{theirs['metrics']['verification_std']:.4f}",
         theirs["peak_rss_mib"], theirs["peak_pss_mib"]],
    ]
    text = table(["system", "wall s", "wall s to final evaluation", "accuracy",
                  "peak RSS MiB", "peak PSS MiB"], rows)
    if record.get("repeats", 1) > 1:
        text += (f"\n\nEach row is the middle one of {record['repeats']} runs by wall time "
                 "(of two middle runs, the faster), and its time to the final evaluation is "
                 "that run's. All runs' wall seconds: " + "; ".join(
                     f"{label}: {', '.join(str(wall) for wall in side['wall_seconds_runs'])}"
                     for label, side in sides + [("Flower", theirs)]) + ".")
    text += (f"\n\nRatio edgeface / Flower: {comparison['edgeface_over_flower_wall']} "
             f"(whole run), {comparison['edgeface_to_final_evaluation_over_flower_wall']} "
             f"(to the final evaluation). Accuracies match within the fold spread: "
             f"{comparison['accuracies_match']} (delta {comparison['accuracy_delta']}, "
             f"spread {comparison['accuracy_noise']}).")
    if "comparison_torchscript_export" in record:
        fast = record["comparison_torchscript_export"]
        text += (f" With `--exporter torchscript`: {fast['edgeface_over_flower_wall']} (whole "
                 f"run), {fast['edgeface_to_final_evaluation_over_flower_wall']} (to the final "
                 f"evaluation), accuracies match: {fast['accuracies_match']}.")
    return text


def scaling_section(record: dict[str, Any]) -> str:
    def row(point: dict[str, Any]) -> list[Any]:
        timings = point["timings"]
        return [point["name"], point["nodes"], point["training_images"], point["rounds"],
                point["wall_seconds"], round(timings.get("rounds", 0.0), 1),
                point["round_overhead_seconds"], point["bn_calibration_seconds_per_round"],
                point["aggregate_seconds_per_round"], point["peak_rss_mib"],
                point["peak_pss_mib"], point["peak_processes"],
                f"{point['verification_accuracy']:.3f}"]

    header = ["point", "nodes", "train images", "rounds", "wall s", "rounds s",
              "overhead s/round", "BN recal s/round", "aggregate s/round", "peak RSS MiB",
              "peak PSS MiB", "processes", "accuracy"]
    points = record["by_nodes"] + record["by_size"] + [record["default_run"]]
    return table(header, [row(point) for point in points])


def simple_sections(records: dict[str, Any]) -> str:
    parts = []
    ingest = records.get("ingest")
    if ingest:
        rows = [[label, run["seconds"], run["images_per_second"]]
                for label, run in ingest["runs"].items()]
        parts.append(f"Ingest ({ingest['images']} LFW images, 64 px):\n\n"
                     + table(["run", "seconds", "images/s"], rows))
    inference = records.get("inference")
    if inference:
        rows = [[threads, name, m["p50_ms"], m["p95_ms"], m["images_per_second"],
                 m.get("speedup_p50_vs_eager", "")]
                for threads, entry in inference["by_threads"].items()
                for name, m in entry.items()]
        parts.append("Inference:\n\n" + table(["threads", "runtime/batch", "p50 ms", "p95 ms",
                                               "images/s", "p50 speed-up vs eager"], rows))
    aggregation = records.get("aggregation")
    if aggregation:
        rows = [[p["nodes"], p["parameters"], p["p50_ms"], p["p95_ms"]]
                for p in aggregation["points"]]
        parts.append("Aggregation (FedAvg, `Strategy.aggregate`):\n\n"
                     + table(["nodes", "parameters", "p50 ms", "p95 ms"], rows))
    compile_record = records.get("compile")
    if compile_record:
        rows = [[p["nodes"], p["rounds"], p["seconds"], f"{p['bytes'] / 1024:.0f}"]
                for p in compile_record["points"]]
        parts.append(f"Pipeline compile (kfp import {compile_record['kfp_import_seconds']} s):"
                     "\n\n" + table(["nodes", "rounds", "seconds", "KiB"], rows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("all_json", type=Path, help="all.json written by benchmarks.run_all")
    args = parser.parse_args(argv)
    summary = json.loads(args.all_json.read_text())
    records = summary["records"]
    print(f"date {summary['date']}, quick {summary['quick']}, {summary['seconds']} s, "
          f"machine {json.dumps(summary['machine'])}\n")
    for name, render in (("training", training_section), ("flower", flower_section),
                         ("scaling", scaling_section)):
        if name in records:
            print(f"### {name}\n\n{render(records[name])}\n")
    print(simple_sections(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
