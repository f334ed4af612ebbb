"""The spread-out step inside `edgeface run`: metrics, kept centres, and resume, on real ORL faces."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from edgeface.config import RunConfig, load_config
from edgeface.errors import QuorumError
from edgeface.runner import LocalRunner, TrainingResult
from conftest import run_workdir

OVERRIDES = {"nodes": 2, "rounds": 3, "image-size": 32, "batch-size": 16, "local-epochs": 1,
             "min-fraction": 1.0, "eval-every": 0, "spreadout": True, "spreadout-lr": 0.5}


def spreadout_config() -> RunConfig:
    return load_config(overrides=OVERRIDES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("spreadout-run")
    with run_workdir(path):
        yield path


@pytest.fixture(scope="module")
def reference(workdir: Path, orl_dir: Path) -> TrainingResult:
    return LocalRunner(spreadout_config(), orl_dir, workdir / "reference", progress=False).train()


def test_spreadout_run_logs_round_metrics(reference: TrainingResult) -> None:
    assert len(reference.history) == 3
    for entry in reference.history:
        assert entry["spreadout_max_cosine_after"] < entry["spreadout_max_cosine_before"]
        assert entry["download_bytes"] > entry["upload_bytes"] > 0


def test_spreadout_run_keeps_last_centres(reference: TrainingResult, workdir: Path) -> None:
    folders = sorted(p.name for p in (workdir / "reference" / "server" / "centres").iterdir())
    assert folders == ["round-0001", "round-0002"]
    for folder in folders:
        files = sorted(p.name for p in (workdir / "reference" / "server" / "centres" / folder)
                       .glob("*.pt"))
        assert files == ["node-0.pt", "node-1.pt"]


@pytest.mark.slow
def test_spreadout_resume_matches_reference(reference: TrainingResult, workdir: Path,
                                            orl_dir: Path) -> None:
    run_dir = workdir / "interrupted"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFACE_FAULTS", "node-1:nan@2")
        with pytest.raises(QuorumError):
            LocalRunner(spreadout_config(), orl_dir, run_dir, progress=False).train()
    resumed = LocalRunner(spreadout_config(), orl_dir, run_dir, resume=True,
                          progress=False).train()

    for key, expected in reference.global_state.items():
        torch.testing.assert_close(resumed.global_state[key], expected, atol=1e-5, rtol=0)
    final = resumed.history[-1]
    assert final["spreadout_max_cosine_after"] == pytest.approx(
        reference.history[-1]["spreadout_max_cosine_after"], abs=1e-5)
