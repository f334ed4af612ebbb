"""Helpers of the speed benchmarks, and one real quick run of two benchmarks (marked benchmark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_compile import fleet_file
from benchmarks.bench_flower import compare, median_run, run as run_flower_benchmark
from benchmarks.bench_scaling import lfw_subset
from benchmarks.common import MemorySampler, percentile, process_tree, tree_memory_mib
from benchmarks.profile_training import group_of
from benchmarks.summarize import flower_section

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.95, 1.0])
def test_percentile_matches_numpy(fraction: float) -> None:
    values = list(np.random.default_rng(0).exponential(size=37))
    assert percentile(values, fraction) == pytest.approx(np.percentile(values, 100 * fraction))


def test_percentile_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentile([], 0.5)


@pytest.fixture
def sleeping_child():
    """A child process that allocates about 100 MB and sleeps for up to 30 s."""
    code = "import time; block = bytearray(100 * 2**20); time.sleep(30)"
    process = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(1.0)
    yield process
    process.kill()
    process.wait()


def test_tree_memory_includes_children(sleeping_child) -> None:
    assert sleeping_child.pid in process_tree(os.getpid())
    alone_rss, _, _ = tree_memory_mib(sleeping_child.pid)
    rss, pss, count = tree_memory_mib(os.getpid())
    assert count >= 2
    assert alone_rss > 90
    assert rss > alone_rss
    assert 0 < pss <= rss


def test_memory_sampler_records_peak(sleeping_child) -> None:
    sampler = MemorySampler(sleeping_child.pid, interval=0.05).start()
    time.sleep(0.3)
    result = sampler.stop()
    assert result["samples"] >= 2
    assert result["peak_rss_mib"] > 90
    assert result["peak_processes"] == 1


def _side(accuracy: float, std: float) -> dict:
    return {"metrics": {"verification_accuracy": accuracy, "verification_std": std},
            "wall_seconds": 10.0, "wall_seconds_to_final_evaluation": 6.0}


def test_compare_accepts_accuracy_within_spread() -> None:
    result = compare(_side(0.80, 0.03), {**_side(0.78, 0.02), "wall_seconds": 20.0})
    assert result["accuracies_match"] is True
    assert result["edgeface_over_flower_wall"] == 0.5
    assert result["edgeface_to_final_evaluation_over_flower_wall"] == 0.3


def test_compare_voids_accuracy_gap() -> None:
    result = compare(_side(0.80, 0.01), _side(0.70, 0.02))
    assert result["accuracies_match"] is False
    assert result["accuracy_delta"] == pytest.approx(0.10)


def test_flower_section_shows_both_exporters() -> None:
    def side(wall: float, to_eval: float) -> dict:
        return {**_side(0.74, 0.04), "wall_seconds": wall, "wall_seconds_to_final_evaluation":
                to_eval, "peak_rss_mib": 2500, "peak_pss_mib": 1800}

    ours, fast, theirs = side(17.5, 9.6), side(12.1, 9.5), {**side(18.6, 18.6), "flwr": "1.42.0"}
    record = {"edgeface": ours, "edgeface_torchscript_export": fast, "flower": theirs,
              "comparison": compare(ours, theirs),
              "comparison_torchscript_export": compare(fast, theirs)}
    text = flower_section(record)
    assert "| edgeface run | 17.5 | 9.6 |" in text
    assert "| edgeface run --exporter torchscript | 12.1 | 9.5 |" in text
    assert "With `--exporter torchscript`: 0.651 (whole run)" in text
    # Records written before the second edgeface run have one edgeface row.
    del record["edgeface_torchscript_export"], record["comparison_torchscript_export"]
    assert "torchscript" not in flower_section(record)


def test_lfw_subset_links_people(lfw_dir: Path, tmp_path: Path) -> None:
    folder, images = lfw_subset(lfw_dir, 60, tmp_path / "subset")
    people = sorted(folder.iterdir())
    assert images >= 60
    assert all(person.is_symlink() for person in people)
    counts = [len(list(person.glob("*.jpg"))) for person in people]
    assert sum(counts) == images
    assert min(counts) >= 2


def test_fleet_file_has_requested_nodes(tmp_path: Path) -> None:
    from edgeface.fleet import load_fleet

    fleet = load_fleet(fleet_file(6, tmp_path))
    assert [node.name for node in fleet.nodes] == [f"edge-{k}" for k in range(6)]
    assert len({node.label for node in fleet.nodes}) == 6


@pytest.mark.benchmark
def test_run_all_quick_ingest_and_compile(lfw_dir: Path, orl_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.run_all", "--quick", "--out", str(tmp_path),
               "--lfw", str(lfw_dir), "--orl", str(orl_dir), "--only", "ingest", "compile"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "all.json").read_text())
    ingest = summary["records"]["ingest"]
    assert ingest["runs"]["first"]["cache_hit"] is False
    assert ingest["runs"]["cached"]["cache_hit"] is True
    assert ingest["runs"]["first"]["checksum"] == ingest["runs"]["cached"]["checksum"]
    points = summary["records"]["compile"]["points"]
    assert {(p["nodes"], p["rounds"]) for p in points} == {(n, r) for n in (2, 4, 8)
                                                           for r in (2, 8)}
    assert all(p["bytes"] > 0 for p in points)
    assert (tmp_path / "ingest" / "ingest.json").is_file()


@pytest.mark.parametrize(("name", "group"), [
    ("aten::mkldnn_convolution", "convolution forward"),
    ("aten::convolution_backward", "convolution backward"),
    ("aten::native_batch_norm", "BatchNorm forward"),
    ("aten::native_batch_norm_backward", "BatchNorm backward"),
    ("aten::lerp", "elementwise (PReLU, its gradients, optimizer)"),
    ("aten::mm", "other"),
])
def test_profile_groups_operators(name: str, group: str) -> None:
    assert group_of(name) == group


@pytest.mark.benchmark
def test_profile_training_one_step(lfw_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.profile_training", "--data", str(lfw_dir),
               "--out", str(tmp_path), "--steps", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "profile.json").read_text())
    groups = record["groups"]
    assert groups["convolution forward"]["ms"] > 0
    assert groups["BatchNorm backward"]["ms"] > 0
    assert sum(group["share"] for group in groups.values()) == pytest.approx(1.0, abs=0.01)
    assert record["images_per_second"] > 0


def test_median_run_picks_middle_run() -> None:
    runs = [{"wall_seconds": wall, "wall_seconds_to_final_evaluation": wall - 3, "run": index}
            for index, wall in enumerate([14.0, 12.5, 15.2])]
    chosen = median_run(runs)
    assert chosen["run"] == 0
    assert chosen["wall_seconds_runs"] == [14.0, 12.5, 15.2]
    assert chosen["wall_seconds_to_final_evaluation_runs"] == [11.0, 9.5, 12.2]
    # Of two middle runs, the faster; Flower's records have no time to the final evaluation.
    flower = median_run([{"wall_seconds": 20.0}, {"wall_seconds": 18.0}])
    assert flower == {"wall_seconds": 18.0, "wall_seconds_runs": [20.0, 18.0]}
    assert all("wall_seconds_runs" not in item for item in runs)  # the inputs stay as they were


def test_flower_benchmark_rejects_zero_repeats(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="repeats is 0"):
        run_flower_benchmark(tmp_path, tmp_path, quick=True, flower_python="python", repeats=0)


def test_flower_section_names_the_repeats() -> None:
    def side(walls: list[float]) -> dict:
        chosen = median_run([{**_side(0.74, 0.04), "wall_seconds": wall,
                              "wall_seconds_to_final_evaluation": wall - 4,
                              "peak_rss_mib": 2500, "peak_pss_mib": 1800} for wall in walls])
        return chosen

    ours, theirs = side([15.0, 14.0, 16.0]), {**side([19.0, 20.0, 18.5]), "flwr": "1.42.0"}
    record = {"edgeface": ours, "flower": theirs, "comparison": compare(ours, theirs),
              "repeats": 3}
    text = flower_section(record)
    assert "| edgeface run | 15.0 | 11.0 |" in text
    assert "middle one of 3 runs" in text
    assert "edgeface run: 15.0, 14.0, 16.0; Flower: 19.0, 20.0, 18.5." in text
