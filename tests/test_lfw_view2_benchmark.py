"""LFW View 2 benchmark: resumable fold state, with a fake trainer and with a real short run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("lfw_view2", REPO / "benchmarks" / "lfw_view2.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lfw_view2"] = module
    spec.loader.exec_module(module)
    return module


view2 = load_benchmark()


class FakeTrainer:
    """Fake trainer in place of `edgeface run`: records its calls and fails on request."""

    def __init__(self, fail_on: tuple[int, str] | None = None) -> None:
        self.calls: list[tuple[int, str]] = []
        self.fail_on = fail_on

    def __call__(self, fold: int, setting: str, flags: list[str], run_dir: Path) -> dict:
        self.calls.append((fold, setting))
        run_dir.mkdir(parents=True)
        (run_dir / "partial.txt").write_text("started")
        if (fold, setting) == self.fail_on:
            raise RuntimeError(f"fake crash in fold {fold} {setting}")
        accuracy = 0.8 + fold / 100 + (0.02 if setting == "centralized" else 0.0)
        return {"accuracy": accuracy, "wall_seconds": 1.0, "flags": flags}


def test_view2_resume_skips_finished_runs(tmp_path: Path) -> None:
    settings = ["federated", "centralized"]
    crashing = FakeTrainer(fail_on=(1, "centralized"))
    with pytest.raises(RuntimeError, match="fake crash"):
        view2.run_benchmark([0, 1, 2], settings, ["--rounds", "2"], tmp_path, crashing)
    assert crashing.calls == [(0, "federated"), (0, "centralized"), (1, "federated"),
                              (1, "centralized")]
    saved = json.loads((tmp_path / "view2-state.json").read_text())
    assert sorted(saved["runs"]) == ["fold-0/centralized", "fold-0/federated", "fold-1/federated"]

    resumed = FakeTrainer()
    state = view2.run_benchmark([0, 1, 2], settings, ["--rounds", "2"], tmp_path, resumed)
    assert resumed.calls == [(1, "centralized"), (2, "federated"), (2, "centralized")]
    assert len(state.runs) == 6

    again = FakeTrainer()
    view2.run_benchmark([0, 1, 2], settings, ["--rounds", "2"], tmp_path, again)
    assert again.calls == []


def test_view2_passes_setting_flags(tmp_path: Path) -> None:
    trainer = FakeTrainer()
    state = view2.run_benchmark([4], ["federated", "centralized"], ["--rounds", "2"], tmp_path,
                                trainer)
    federated = state.runs["fold-4/federated"]["flags"]
    centralized = state.runs["fold-4/centralized"]["flags"]
    assert federated == ["--nodes", "4", "--partition", "identity", "--rounds", "2"]
    assert centralized == ["--nodes", "1", "--rounds", "2"]


def test_view2_rejects_changed_flags(tmp_path: Path) -> None:
    view2.run_benchmark([0], ["federated"], ["--rounds", "2"], tmp_path, FakeTrainer())
    with pytest.raises(SystemExit, match="--out"):
        view2.run_benchmark([0], ["federated"], ["--rounds", "3"], tmp_path, FakeTrainer())


def test_view2_summary_mean_and_std(tmp_path: Path) -> None:
    state = view2.run_benchmark([0, 2], ["federated", "centralized"], [], tmp_path, FakeTrainer())
    table = view2.summarize(state, [0, 2], ["federated", "centralized"])
    assert table["federated"]["mean"] == pytest.approx(0.81)
    assert table["federated"]["std"] == pytest.approx(0.01)
    assert table["centralized"]["mean"] == pytest.approx(0.83)
    assert table["centralized"]["folds"] == 2


def test_view2_gap_pairs_folds(tmp_path: Path) -> None:
    state = view2.run_benchmark([0, 2], ["federated", "centralized"], [], tmp_path, FakeTrainer())
    view2.run_benchmark([5], ["federated"], [], tmp_path, FakeTrainer())
    # Fold 5 has no centralized run yet, so the gap leaves it out: federated 0.80 and 0.82,
    # centralized 0.82 and 0.84. The difference of the means (0.830 - 0.823) would be smaller.
    gap, folds = view2.paired_gap(view2.BenchmarkState(tmp_path / "view2-state.json", []),
                                  [0, 2, 5])
    assert folds == 2
    assert gap == pytest.approx(0.02)
    assert view2.paired_gap(state, [7]) is None


def test_view2_report_only_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    view2.run_benchmark([1, 3], ["federated", "centralized"], ["--rounds", "2"], tmp_path,
                        FakeTrainer())
    before = (tmp_path / "view2-state.json").read_bytes()

    assert view2.main(["--out", str(tmp_path), "--folds", "0-9", "--report-only",
                       "--", "--rounds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "fold 3 centralized: accuracy 0.8500" in printed
    assert "federated: accuracy 0.8200 +- 0.0100 over 2 fold(s)" in printed
    assert "2.00 points over the 2 fold(s)" in printed
    assert (tmp_path / "view2-state.json").read_bytes() == before
    assert not (tmp_path / "lfw_view2.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fold-1", "fold-3", "view2-state.json"]


def test_view2_report_only_needs_state(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no state file"):
        view2.main(["--out", str(tmp_path / "missing"), "--report-only"])


def test_view2_training_needs_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        view2.main(["--out", str(tmp_path)])
    assert "--data is required" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "folds"), [("3", [3]), ("0,2,5", [0, 2, 5]),
                                             ("0-9", list(range(10))), ("7-8,1", [1, 7, 8])])
def test_view2_parses_folds(text: str, folds: list[int]) -> None:
    assert view2.parse_folds(text) == folds


@pytest.mark.parametrize("text", ["10", "a", "", "3-x"])
def test_view2_rejects_bad_folds(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid --folds"):
        view2.parse_folds(text)


@pytest.mark.slow
def test_view2_one_fold_reduced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                lfw_dir: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    out = tmp_path / "bench"
    assert view2.main(["--data", str(lfw_dir), "--out", str(out), "--folds", "0",
                       "--budget", "reduced"]) == 0
    result = json.loads((out / "lfw_view2.json").read_text())
    for setting in ("federated", "centralized"):
        run = result["runs"][f"fold-0/{setting}"]
        assert 0.5 <= run["accuracy"] <= 1.0
        assert "--fold 0" in run["command"]
    assert result["summary"]["federated"]["folds"] == 1.0
