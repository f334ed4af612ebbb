"""Shared fixtures: locations of the real face datasets that tests read in place."""

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

# Tests share two cores with each other and with worker processes; one thread each keeps
# timings predictable.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]

# Fixtures that start a real `mlflow server` on 127.0.0.1.
pytest_plugins = ["conftest_mlflow"]


def _shared_data_dir() -> Path:
    configured = os.environ.get("EDGEFACE_SHARED_DATA")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.fail(
            f"real face data not found at {path}: place the shared data folder beside the "
            "repository or set EDGEFACE_SHARED_DATA to its path"
        )
    return path


@pytest.fixture(scope="session")
def lfw_dir(shared_data_dir: Path) -> Path:
    """LFW folder with `lfw-deepfunneled/` and the official protocol files."""
    return shared_data_dir / "lfw"


@pytest.fixture(scope="session")
def orl_dir(shared_data_dir: Path) -> Path:
    """AT&T/ORL folder: `s1/` ... `s40/`, ten PGM images each."""
    return shared_data_dir / "att_faces"


@contextmanager
def run_workdir(path: Path) -> Iterator[Path]:
    """Make `path` the working directory of local runs: ./mlflow.db, ./cache, run folders.

    It also clears the tracking URI and the fault injection of the environment.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        patch.setenv("EDGEFACE_CACHE_DIR", str(path / "cache"))
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("EDGEFACE_FAULTS", raising=False)
        yield path


def restore_default_sigint() -> None:
    """Reset SIGINT to its default action in a child process (Popen's `preexec_fn`).

    A shell without job control starts background commands with SIGINT ignored, and children
    inherit that. Python then installs no KeyboardInterrupt handler, so without this reset a
    test that sends SIGINT times out whenever the suite runs in the background.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
