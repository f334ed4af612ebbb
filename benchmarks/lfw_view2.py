"""Benchmark LFW View 2: federated and centralized training over the 10 folds.

For each fold k of `people.txt`, `edgeface run --protocol lfw-view2 --fold k` trains on the
people of the other nine folds, chooses the threshold on the other nine folds' pairs and tests
on fold k's 600 pairs of `pairs.txt`. Each fold runs twice with the same budget: federated
(`--nodes 4 --partition identity`) and centralized (`--nodes 1`). The table gives the mean and
standard deviation over folds of each setting, and the gap between them.

The folds run one after the other. After each finished run the result goes to a JSON state
file (`OUT/view2-state.json`). Rerunning the same command skips the finished runs and starts
a crashed or interrupted run again from scratch.

    python benchmarks/lfw_view2.py --data ../shared/data/lfw --out bench-view2
    python benchmarks/lfw_view2.py --data ../shared/data/lfw --out quick --folds 0 \\
        --budget reduced
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Run as `python benchmarks/NAME.py`, so the repository root is not on sys.path yet.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import machine  # noqa: E402

logger = logging.getLogger("lfw_view2")

SETTINGS: dict[str, list[str]] = {
    "federated": ["--nodes", "4", "--partition", "identity"],
    "centralized": ["--nodes", "1"],
}

# Extra `edgeface run` flags per budget. `full` is the built-in default config. `reduced` is
# for smoke tests: one short round at 32 px, so its accuracy does not measure the method.
BUDGETS: dict[str, list[str]] = {
    "full": [],
    "reduced": ["--image-size", "32", "--rounds", "1", "--local-epochs", "0.05",
                "--eval-every", "0", "--bn-calibration-images", "128"],
}

STATE_VERSION = 1

Trainer = Callable[[int, str, list[str], Path], dict[str, Any]]
"""Train and evaluate one (fold, setting): (fold, setting name, flags, run dir) -> record."""


def edgeface_trainer(data: Path) -> Trainer:
    """Return a trainer that runs `edgeface run` in a subprocess and reads its summary."""

    def train(fold: int, setting: str, flags: list[str], run_dir: Path) -> dict[str, Any]:
        command = [sys.executable, "-m", "edgeface.cli.main", "run", "--data", str(data),
                   "--out", str(run_dir), "--protocol", "lfw-view2", "--fold", str(fold),
                   "--no-progress", *flags]
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=run_dir.parent)
        wall = time.perf_counter() - started
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = summary["metrics"]
        return {"accuracy": metrics["verification_accuracy"], "auc": metrics["verification_auc"],
                "threshold": metrics["threshold"], "wall_seconds": round(wall, 1),
                "command": " ".join(["edgeface", *command[3:]])}

    return train


class BenchmarkState:
    """Finished runs of one benchmark, kept in a JSON file that is rewritten after each run."""

    def __init__(self, path: Path, flags: list[str]) -> None:
        self.path = Path(path)
        self.flags = list(flags)
        self.runs: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            saved = json.loads(self.path.read_text())
        except json.JSONDecodeError as error:
            raise SystemExit(f"state file {self.path} is not valid JSON ({error}): delete it "
                             "to start the benchmark over") from None
        if saved.get("version") != STATE_VERSION or saved.get("flags") != self.flags:
            raise SystemExit(
                f"state file {self.path} was written with the flags {saved.get('flags')}, but "
                f"this command uses {self.flags}: rerun with the same flags, or choose another "
                "--out to start a new benchmark"
            )
        self.runs = saved.get("runs", {})

    @staticmethod
    def key(fold: int, setting: str) -> str:
        return f"fold-{fold}/{setting}"

    def done(self, fold: int, setting: str) -> bool:
        return self.key(fold, setting) in self.runs

    def record(self, fold: int, setting: str, result: dict[str, Any]) -> None:
        self.runs[self.key(fold, setting)] = {"fold": fold, "setting": setting, **result}
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.tmp")
        payload = {"version": STATE_VERSION, "flags": self.flags, "runs": self.runs}
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        os.replace(temporary, self.path)


def run_benchmark(folds: Sequence[int], settings: Sequence[str], flags: list[str], out: Path,
                  trainer: Trainer) -> BenchmarkState:
    """Run every unfinished (fold, setting) in sequence and return the state with all results.

    A run counts as finished once its result is in the state file. A run folder without a
    result (a crash or an interrupt) is deleted and the run starts over.
    """
    state = BenchmarkState(out / "view2-state.json", flags)
    for fold in folds:
        for setting in settings:
            if state.done(fold, setting):
                logger.info("fold %d %s: finished earlier, skipped", fold, setting)
                continue
            run_dir = out / f"fold-{fold}" / setting
            if run_dir.exists():
                logger.info("fold %d %s: removing the unfinished run in %s", fold, setting,
                            run_dir)
                shutil.rmtree(run_dir)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            logger.info("fold %d %s: training", fold, setting)
            result = trainer(fold, setting, [*SETTINGS[setting], *flags], run_dir)
            state.record(fold, setting, result)
            logger.info("fold %d %s: accuracy %.4f in %.0f s", fold, setting,
                        result["accuracy"], result.get("wall_seconds", float("nan")))
    return state


def summarize(state: BenchmarkState, folds: Sequence[int],
              settings: Sequence[str]) -> dict[str, dict[str, float]]:
    """Return the mean and standard deviation (over folds) of each setting's accuracy."""
    table: dict[str, dict[str, float]] = {}
    for setting in settings:
        accuracies = [state.runs[state.key(fold, setting)]["accuracy"] for fold in folds
                      if state.done(fold, setting)]
        if not accuracies:
            continue
        table[setting] = {
            "folds": float(len(accuracies)),
            "mean": statistics.fmean(accuracies),
            "std": statistics.pstdev(accuracies) if len(accuracies) > 1 else 0.0,
        }
    return table


def paired_gap(state: BenchmarkState, folds: Sequence[int]) -> tuple[float, int] | None:
    """Return the mean gap (centralized minus federated) over folds where both settings
    finished, and the number of such folds; None when there is no such fold.

    The difference of the two settings' means would compare different folds while one
    setting of a fold is still missing.
    """
    gaps = [state.runs[state.key(fold, "centralized")]["accuracy"]
            - state.runs[state.key(fold, "federated")]["accuracy"]
            for fold in folds
            if state.done(fold, "federated") and state.done(fold, "centralized")]
    return (statistics.fmean(gaps), len(gaps)) if gaps else None


def parse_folds(text: str) -> list[int]:
    """Parse `0-9`, `3` or `0,2,5` into fold numbers."""
    folds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            span = range(int(first), int(last or first) + 1)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid --folds {text!r}: expected fold numbers 0-9 as 3, 0,2,5 or 0-9"
            ) from None
        folds.extend(span)
    if not folds or any(not 0 <= fold <= 9 for fold in folds):
        raise argparse.ArgumentTypeError(f"invalid --folds {text!r}: folds are 0 to 9")
    return sorted(set(folds))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        help="LFW folder with protocol files; required unless --report-only")
    parser.add_argument("--out", type=Path, default=Path("bench-view2"),
                        help="output folder; contains the state file and one run per fold")
    parser.add_argument("--folds", type=parse_folds, default=list(range(10)),
                        help="folds to run: 0-9 (default), 3 or 0,2,5")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS),
                        default=["federated", "centralized"], help="settings to run per fold")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                        help="full: the default config; reduced: a smoke test of a few minutes")
    parser.add_argument("--report-only", action="store_true",
                        help="print the results in the state file for --folds; train nothing")
    parser.add_argument("extra", nargs="*", help="extra flags for `edgeface run`, after --")
    args = parser.parse_args(argv)
    if args.data is None and not args.report_only:
        parser.error("--data is required to train: pass the LFW folder, as --data "
                     "../shared/data/lfw, or add --report-only to print earlier results")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")

    out = args.out.resolve()
    flags = [*BUDGETS[args.budget], *args.extra]
    if args.report_only:
        if not (out / "view2-state.json").exists():
            raise SystemExit(f"no state file {out / 'view2-state.json'}: run the benchmark "
                             "with this --out first, or pass the --out of an earlier run")
        state = BenchmarkState(out / "view2-state.json", flags)
    else:
        state = run_benchmark(args.folds, args.settings, flags, out,
                              edgeface_trainer(args.data.resolve()))
    for fold in args.folds:
        for setting in args.settings:
            if state.done(fold, setting):
                run = state.runs[state.key(fold, setting)]
                print(f"fold {fold} {setting}: accuracy {run['accuracy']:.4f}, "
                      f"AUC {run.get('auc', float('nan')):.4f}")
    table = summarize(state, args.folds, args.settings)
    for setting, row in table.items():
        print(f"{setting}: accuracy {row['mean']:.4f} +- {row['std']:.4f} over "
              f"{int(row['folds'])} fold(s)")
    gap = paired_gap(state, args.folds)
    if gap is not None and {"federated", "centralized"} <= set(args.settings):
        print(f"gap (centralized - federated): {100 * gap[0]:.2f} points over the {gap[1]} "
              "fold(s) with both settings")
    if not args.report_only:
        result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine(), "budget": args.budget, "flags": flags,
                  "folds": args.folds, "summary": table, "runs": state.runs,
                  "gap": None if gap is None else {"points": 100 * gap[0], "folds": gap[1]}}
        (out / "lfw_view2.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out / 'lfw_view2.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
