"""Run report: ROC operating point, plots, the HTML page in headless Chromium, MLflow logging.

The Chromium test serves the report folder with http.server on 127.0.0.1 and loads a copy of
the page with a script that lists the images that decoded. It needs the Debian `chromium`
package and is skipped without it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from mlflow_server import MlflowServer
from PIL import Image
from test_inference import CROP, IMAGE_SIZE, TinyModel, export_tiny_model

from edgeface.config import load_config
from edgeface.data.cache import PreprocessSpec, build_cache, load_cache
from edgeface.data.ingest import list_images, resolve_images_root
from edgeface.data.partition import partition
from edgeface.data.protocol import make_plan
from edgeface.evaluation import roc_curve
from edgeface.report import (
    ReportData,
    roc_with_threshold,
    summary_key_numbers,
    score_test_pairs,
    write_report,
)
from edgeface.runner import LocalRunner
from edgeface.steps import EvaluationSet
from edgeface.tracking import Tracker

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=10000", "--dump-dom",
]
# Appended to a copy of the page: lists the images that finished loading with real pixels.
IMAGE_CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter(image => image.complete && image.naturalWidth > 0);
  const output = document.createElement("pre");
  output.id = "image-check";
  output.textContent = JSON.stringify({total: images.length,
                                       loaded: loaded.map(image => image.getAttribute("src"))});
  document.body.appendChild(output);
});
</script>
"""
SUMMARY = {
    "edgeface_version": "0.1.0", "protocol": "holdout", "rounds_completed": 3,
    "metrics": {"verification_accuracy": 0.8125, "verification_std": 0.02,
                "verification_auc": 0.88, "threshold": 0.41},
    "nodes": [{"name": "node-0"}, {"name": "node-1"}, {"name": "node-2"}],
    "partition": "dirichlet", "dataset_fingerprint": "ab" * 32, "config_hash": "cfg0123",
    "onnx": {"parity_ok": True, "max_abs_diff": 2.4e-7},
    "mlflow": {"model_name": "edgeface", "model_version": 4, "alias": "challenger",
               "run_id": "0123abcd"},
    "int8": {"chosen": {"method": "static", "accuracy_delta": -0.0025,
                        "latency_p50_ms": 1.25}},
}


@pytest.fixture(scope="module")
def orl_partition(orl_dir: Path) -> dict:
    records = list_images(resolve_images_root(orl_dir))
    return partition(records, 3, "dirichlet", seed=0, alpha=0.5).report()


def report_data(partition_report: dict, title: str = "edgeface run <demo> & co") -> ReportData:
    rng = np.random.default_rng(7)
    labels = np.arange(400) % 2 == 0
    scores = rng.normal(0.2, 0.15, 400) + 0.3 * labels
    rounds = [{"round": 0.0, "verification_accuracy_mean": 0.70, "verification_accuracy_std": 0.03},
              {"round": 1.0, "total_samples": 150.0},
              {"round": 2.0, "verification_accuracy_mean": 0.81, "verification_accuracy_std": 0.02}]
    nodes = {f"node-{k}": {"loss": [(r, 9.0 - r - k) for r in range(3)],
                           "accuracy": [(r, 0.1 * (r + 1 + k)) for r in range(3)]}
             for k in range(3)}
    return ReportData(title=title, key_numbers=summary_key_numbers(SUMMARY), rounds=rounds,
                      node_metrics=nodes, roc=roc_with_threshold(scores, labels, 0.35),
                      partition=partition_report)


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def test_roc_point_matches_counts() -> None:
    rng = np.random.default_rng(3)
    labels = rng.random(500) < 0.5
    scores = np.round(rng.normal(0.0, 1.0, 500) + labels, 2)  # rounding makes ties
    roc = roc_with_threshold(scores, labels, 0.5)
    false_positives = sum(1 for s, y in zip(scores, labels) if s > 0.5 and not y)
    true_positives = sum(1 for s, y in zip(scores, labels) if s > 0.5 and y)
    assert roc.point == (false_positives / (~labels).sum(), true_positives / labels.sum())
    fpr, tpr, auc = roc_curve(scores, labels)
    np.testing.assert_array_equal(roc.fpr, fpr)
    np.testing.assert_array_equal(roc.tpr, tpr)
    assert roc.auc == auc
    assert roc.pairs == 500


def test_roc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="matched and mismatched"):
        roc_with_threshold(np.array([0.1, 0.2]), np.array([True, True]), 0.1)


def test_score_test_pairs_follow_plan(orl_dir: Path) -> None:
    root = resolve_images_root(orl_dir)
    plan = make_plan(orl_dir, root, list_images(root), "holdout", seed=0)
    paths = [record.path for record in plan.eval_records()]
    index = {path: row for row, path in enumerate(paths)}
    embeddings = np.random.default_rng(0).normal(size=(len(paths), 8))

    scores, labels = score_test_pairs(plan, embeddings, index)

    pairs = [pair for fold in plan.test_folds for pair in fold]
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    expected = [float(unit[index[p.a.path]] @ unit[index[p.b.path]]) for p in pairs]
    np.testing.assert_allclose(scores, expected, atol=1e-12)
    assert labels.tolist() == [pair.same for pair in pairs]


def test_key_numbers_from_summary() -> None:
    rows = dict(summary_key_numbers(SUMMARY))
    assert rows["verification accuracy"] == "0.8125 +- 0.0200"
    assert rows["int8 variant"] == "static: accuracy delta -0.0025, p50 latency 1.25 ms"
    assert rows["model"] == "edgeface version 4 @challenger"
    assert rows["ONNX parity"].startswith("ok")
    assert rows["dataset fingerprint"] == "ab" * 8


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def test_write_report_files(orl_partition: dict, tmp_path: Path) -> None:
    page = write_report(report_data(orl_partition), tmp_path)
    text = page.read_text(encoding="utf-8")
    for name, size in (("accuracy.png", (640, 360)), ("nodes.png", (960, 360)),
                       ("roc.png", (480, 460)), ("partition.png", (960, 360))):
        with Image.open(tmp_path / name) as image:
            image.load()
            assert image.format == "PNG"
            assert image.size == size
        assert f'<img src="{name}"' in text
    assert "<title>edgeface run &lt;demo&gt; &amp; co</title>" in text
    assert "<th>verification accuracy</th><td>0.8125 +- 0.0200</td>" in text
    assert "no data" not in text
    assert not re.search(r'src="(/|https?:)', text), "images must be linked relatively"


def test_report_notes_missing_plots(tmp_path: Path) -> None:
    data = ReportData(title="empty run", rounds=[{"round": 0.0, "total_samples": 10.0}])
    page = write_report(data, tmp_path)
    text = page.read_text(encoding="utf-8")
    assert "Fused model: verification accuracy per round: no data in this run." in text
    assert "<img" not in text
    assert not list(tmp_path.glob("*.png"))


@pytest.fixture
def served_folder(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """Serve `tmp_path/report` over HTTP on 127.0.0.1; yield the folder and its base URL."""
    folder = tmp_path / "report"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (base signature)
        pass


def loaded_images(url: str, profile: Path) -> dict:
    """Load `url` in headless Chromium and return the image-check result the page wrote."""
    chromium = shutil.which("chromium")
    assert chromium is not None
    completed = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
        capture_output=True, text=True, timeout=120,
    )
    match = re.search(r'<pre id="image-check">(.*?)</pre>', completed.stdout)
    assert match, f"no image check in the DOM; stderr: {completed.stderr[-2000:]}"
    return json.loads(match.group(1))


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="needs the Debian chromium package (apt-get install -y chromium)")
def test_report_loads_in_chromium(orl_partition: dict, served_folder: tuple[Path, str],
                                  tmp_path: Path) -> None:
    folder, base_url = served_folder
    page = write_report(report_data(orl_partition), folder)
    html = page.read_text(encoding="utf-8")
    (folder / "check.html").write_text(html.replace("</body>", IMAGE_CHECK_SCRIPT + "</body>"))
    broken = html.replace("</body>", '<img src="missing.png">' + IMAGE_CHECK_SCRIPT + "</body>")
    (folder / "broken.html").write_text(broken)

    result = loaded_images(f"{base_url}/check.html", tmp_path / "profile-a")
    assert result["total"] == 4
    assert sorted(result["loaded"]) == ["accuracy.png", "nodes.png", "partition.png", "roc.png"]

    # The check itself notices an image that does not load.
    result = loaded_images(f"{base_url}/broken.html", tmp_path / "profile-b")
    assert result["total"] == 5
    assert "missing.png" not in result["loaded"]


# ---------------------------------------------------------------------------------------------
# The runner's report step
# ---------------------------------------------------------------------------------------------


def test_runner_publishes_report(
    orl_dir: Path, mlflow_server: MlflowServer, tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    tiny: TinyModel = export_tiny_model(tmp_path_factory.getbasetemp())
    root = resolve_images_root(orl_dir)
    records = list_images(root)
    plan = make_plan(orl_dir, root, records, "holdout", seed=0)
    cache = build_cache(root, plan.eval_records(), PreprocessSpec(IMAGE_SIZE, CROP),
                        tmp_path / "cache", progress=False)
    images, cached = load_cache(cache.path)
    evaluation = EvaluationSet(plan, np.asarray(images),
                               {r.path: i for i, r in enumerate(cached)})

    run_dir = tmp_path / "run"
    partition(plan.train_records, 2, "identity", seed=0).write_report(run_dir / "partition.json")
    tracker = Tracker(mlflow_server.url, "report-tests")
    parent = tracker.start_parent("report-run", {"seed": 0})
    for node in ("node-0", "node-1"):
        child = tracker.start_child(node, parent_run_id=parent)
        for step in range(2):
            tracker.log_metrics(child, {"loss": 5.0 - step, "accuracy": 0.2 * step}, step=step)
    runner = LocalRunner(load_config(None, {"rounds": 2}), orl_dir, run_dir)
    runner.history = [{"round": 0.0, "verification_accuracy_mean": 0.6},
                      {"round": 1.0, "verification_accuracy_mean": 0.7}]

    page = runner._publish_report(tracker, parent, SUMMARY, evaluation, None, tiny.onnx_path,
                                  threshold=0.3)

    assert page == str((run_dir / "report" / "index.html").resolve())
    assert sorted(p.name for p in (run_dir / "report").iterdir()) == [
        "accuracy.png", "index.html", "nodes.png", "partition.png", "roc.png"]
    logged = {item.path for item in tracker.client.list_artifacts(parent, "report")}
    assert logged == {f"report/{name}" for name in
                      ("accuracy.png", "index.html", "nodes.png", "partition.png", "roc.png")}


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_edgeface_run_writes_report_and_int8(orl_dir: Path, tmp_path: Path) -> None:
    """A short real run registers the crop and int8 tags and logs the report (minutes)."""
    env = {**os.environ, "EDGEFACE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    completed = subprocess.run(
        [sys.executable, "-m", "edgeface.cli.main", "run", "--data", str(orl_dir),
         "--out", str(tmp_path / "run"), "--rounds", "2", "--nodes", "2", "--image-size", "64",
         "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["report"].endswith("report/index.html")
    assert summary["int8"]["chosen"]["method"] == "static"
    assert (tmp_path / "run" / "model" / "edgeface.int8.onnx").is_file()

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "edgeface")
    version = tracker.registry.get_version("edgeface", "challenger")
    assert json.loads(version.tags["edgeface.crop"]) == [0.33, 0.31, 0.67, 0.70]
    assert version.tags["edgeface.int8.method"] == "static"
    assert version.tags["edgeface.onnx_exporter"] == "dynamo"
    assert version.tags["edgeface.onnx_opset"] == "18"
    logged = {item.path for item in tracker.client.list_artifacts(summary["mlflow"]["run_id"],
                                                                  "report")}
    assert "report/index.html" in logged
    assert "report/roc.png" in logged
