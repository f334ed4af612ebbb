"""The component image: it builds, runs as a non-root user and runs a data step offline.

Opt-in, because it needs a running Docker engine: ``python3 -m pytest tests/test_image.py -m
docker``. The image named by ``EDGEFACE_IMAGE`` (default ``edgeface:dev``) is reused when it
contains this checkout's edgeface sources. Otherwise, or with ``EDGEFACE_IMAGE_REBUILD=1``,
``scripts/build-image.sh`` builds it first, with the extra options in
``EDGEFACE_IMAGE_BUILD_ARGS`` (for example ``--local-base --wheels DIR`` on a machine without
registry access, see docs/image.md). A build from scratch took about 15 minutes on 2 cores; with
an up-to-date image the tests take about half a minute.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgeface
from edgeface.data.ingest import list_images
from edgeface.data.partition import partition

pytestmark = pytest.mark.docker

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE = os.environ.get("EDGEFACE_IMAGE", "edgeface:dev")
BUILD_TIMEOUT_S = 3600
RUN_TIMEOUT_S = 180
COMPONENT_UID = 10001

# Three images for each of four people: small enough to write in milliseconds.
IDENTITIES = ("Ada_Lovelace", "Alan_Turing", "Grace_Hopper", "Edsger_Dijkstra")
IMAGES_PER_IDENTITY = 3

# Prints one sha256 over the edgeface sources installed in the image, computed the same way as
# `source_digest` below.
IMAGE_DIGEST_SCRIPT = """
import hashlib, pathlib, edgeface
root = pathlib.Path(edgeface.__file__).parent
digest = hashlib.sha256()
for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml")):
    digest.update(path.relative_to(root).as_posix().encode() + b"\\0" + path.read_bytes())
print(digest.hexdigest())
"""

# Partitions the tiny dataset inside the container and prints the report and the manifests
# as one JSON object on stdout. Logging goes to stderr.
PARTITION_SCRIPT = """
import json, sys
from pathlib import Path
from edgeface.data.ingest import list_images, resolve_images_root
from edgeface.data.partition import partition
records = list_images(resolve_images_root(Path("/data")))
result = partition(records, 2, "identity", seed=7)
paths = result.write_manifests(Path("/tmp/manifests"))
manifests = {p.stem: json.loads(p.read_text()) for p in paths}
json.dump({"report": result.report(), "manifests": manifests}, sys.stdout)
"""


def docker(*args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def run_in_image(*args: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run a command in a throw-away container of the image, without network access."""
    return docker("run", "--rm", "--network", "none", *options, IMAGE, *args)


def ensure_docker_engine() -> None:
    if shutil.which("docker") is None:
        pytest.fail("the docker command was not found: install Docker to run the -m docker tests")
    info = docker("info", "--format", "{{.ServerVersion}}", timeout=30)
    if info.returncode != 0:
        pytest.fail(f"cannot reach the Docker engine: start dockerd first ({info.stderr.strip()})")


def build_image() -> None:
    extra = shlex.split(os.environ.get("EDGEFACE_IMAGE_BUILD_ARGS", ""))
    command = [str(REPO_ROOT / "scripts" / "build-image.sh"), "--tag", IMAGE, *extra]
    # A session of its own, so that a timeout stops the script together with its wheel server.
    build = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        output, _ = build.communicate(timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(build.pid, signal.SIGTERM)
        output, _ = build.communicate()
        pytest.fail(f"{shlex.join(command)} timed out after {BUILD_TIMEOUT_S} s:\n{output[-4000:]}")
    if build.returncode != 0:
        pytest.fail(
            f"{shlex.join(command)} failed with exit code {build.returncode}:\n{output[-4000:]}"
        )


def source_digest() -> str:
    """sha256 over the .py and .yaml files of this checkout's edgeface package."""
    root = REPO_ROOT / "edgeface"
    digest = hashlib.sha256()
    files = (p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and p.is_file())
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def image_digest() -> str | None:
    """The same digest over the package installed in the image, or None without the image."""
    if docker("image", "inspect", IMAGE, timeout=30).returncode != 0:
        return None
    result = run_in_image("python3", "-c", IMAGE_DIGEST_SCRIPT)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture(scope="module")
def image() -> str:
    """Name of the image under test, with this checkout's edgeface sources installed.

    The image is built when it is missing, when its sources differ from the checkout, or when
    EDGEFACE_IMAGE_REBUILD=1. Docker's layer cache limits a rebuild after a source change to
    the package layers, which took one to two minutes on 2 cores.
    """
    ensure_docker_engine()
    expected = source_digest()
    if os.environ.get("EDGEFACE_IMAGE_REBUILD") == "1" or image_digest() != expected:
        build_image()
        if image_digest() != expected:
            pytest.fail(f"{IMAGE} was built but its edgeface sources differ from {REPO_ROOT}")
    return IMAGE


@pytest.fixture(scope="module")
def image_config(image: str) -> dict:
    inspect = docker("image", "inspect", "--format", "{{json .Config}}", image, timeout=30)
    assert inspect.returncode == 0, inspect.stderr
    return json.loads(inspect.stdout)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """Folder of generated JPEG faces, `<identity>/<identity>_NNNN.jpg`, readable by any user."""
    root = tmp_path / "tiny"
    rng = np.random.default_rng(0)
    for identity in IDENTITIES:
        folder = root / identity
        folder.mkdir(parents=True)
        for number in range(1, IMAGES_PER_IDENTITY + 1):
            pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            path = folder / f"{identity}_{number:04d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            path.chmod(0o644)
        folder.chmod(0o755)
    root.chmod(0o755)
    return root


def test_version_matches_package(image: str) -> None:
    result = run_in_image("edgeface", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"edgeface {edgeface.__version__}"


def test_runs_as_non_root_user(image: str) -> None:
    uid = run_in_image("id", "-u")
    gid = run_in_image("id", "-g")
    assert uid.returncode == 0, uid.stderr
    assert int(uid.stdout) != 0
    assert int(uid.stdout) == COMPONENT_UID
    assert int(gid.stdout) == COMPONENT_UID


def test_config_fits_kfp(image_config: dict) -> None:
    env = dict(entry.split("=", 1) for entry in image_config["Env"])
    assert image_config["User"] == f"{COMPONENT_UID}:{COMPONENT_UID}"
    # KFP replaces the command, and `docker run IMAGE edgeface ...` would pass "edgeface" to
    # an ENTRYPOINT as its first argument.
    assert not image_config.get("Entrypoint")
    assert image_config["Cmd"] == ["edgeface", "--help"]
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith("/opt/venv/bin:")


def test_default_command_prints_help(image: str) -> None:
    result = run_in_image()
    assert result.returncode == 0, result.stderr
    assert "usage: edgeface" in result.stdout


def test_home_cache_and_artifact_dirs_writable(image: str) -> None:
    probe = 'for d in "$HOME" "$XDG_CACHE_HOME" /gcs /minio /s3 /tmp; do touch "$d/probe" || exit 1; done'
    result = run_in_image("sh", "-c", probe)
    assert result.returncode == 0, result.stderr


def test_stack_imports_without_network(image: str) -> None:
    modules = "edgeface.steps, kfp, kfp.kubernetes, mlflow, onnx, onnxruntime, torch, torchvision"
    result = run_in_image("python3", "-c", f"import {modules}; print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_partition_step_in_container(image: str, tiny_dataset: Path) -> None:
    result = run_in_image(
        "python3", "-c", PARTITION_SCRIPT, options=("--volume", f"{tiny_dataset}:/data:ro")
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    totals = output["report"]["totals"]
    assert totals["images"] == len(IDENTITIES) * IMAGES_PER_IDENTITY
    assert totals["identities"] == len(IDENTITIES)
    assert totals["nodes"] == 2
    assert totals["identities_on_several_nodes"] == 0
    assert [node["images"] for node in output["report"]["nodes"]] == [6, 6]

    # The same call on the host, with the same seed, is the oracle for the node manifests.
    expected = partition(list_images(tiny_dataset), 2, "identity", seed=7)
    for shard in expected.nodes:
        records = output["manifests"][shard.name]["records"]
        assert [(r["identity"], r["path"]) for r in records] == [
            (r.identity, r.path) for r in shard.records
        ]


def test_data_inspect_decodes_images(image: str, tiny_dataset: Path) -> None:
    result = run_in_image(
        "edgeface", "data", "inspect", "/data", "--format", "json", "--no-progress",
        options=("--volume", f"{tiny_dataset}:/data:ro"),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["identities"] == len(IDENTITIES)
    assert summary["images"] == len(IDENTITIES) * IMAGES_PER_IDENTITY
    assert summary["validation"]["checked"] == len(IDENTITIES) * IMAGES_PER_IDENTITY
    assert summary["validation"]["bad_count"] == 0
