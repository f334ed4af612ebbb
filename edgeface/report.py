"""Run report: PNG plots and one HTML page that shows them with the run's key numbers.

`write_report` draws four plots with matplotlib's object API (a `Figure` per plot, rendered by
the Agg canvas, so no GUI backend and no global pyplot state is touched):

- `accuracy.png`: verification accuracy of the fused model after each evaluated round;
- `nodes.png`: training loss and accuracy of each edge node per round;
- `roc.png`: the ROC curve on the evaluation pairs, with the decision threshold marked;
- `partition.png`: images and identities per node, and each node's images-per-identity
  histogram, from the partition report (`partition.json`).

`index.html` links the plots by relative file name, so the folder can be moved, served or
logged as MLflow artifacts as a whole.
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgeface.evaluation import l2_normalize, pair_labels, roc_curve

if TYPE_CHECKING:
    from edgeface.data.protocol import EvaluationPlan

logger = logging.getLogger(__name__)

FIGURE_DPI = 100
ACCURACY_KEY = "verification_accuracy_mean"
ACCURACY_STD_KEY = "verification_accuracy_std"
NODE_METRICS = ("loss", "accuracy")


@dataclass(frozen=True)
class RocCurve:
    """ROC curve of the evaluation pairs and the operating point of `threshold`.

    `point` is (false positive rate, true positive rate) of the rule score > threshold.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    threshold: float
    point: tuple[float, float]
    pairs: int


def roc_with_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> RocCurve:
    """Compute the ROC curve of pair scores and the rates at `threshold`.

    Raises:
        ValueError: scores and labels differ in length, contain non-finite scores, or lack
            either matched or mismatched pairs.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    fpr, tpr, auc = roc_curve(scores, labels)
    predicted = scores > threshold
    point = (float(np.mean(predicted[~labels])), float(np.mean(predicted[labels])))
    return RocCurve(fpr=fpr, tpr=tpr, auc=auc, threshold=float(threshold), point=point,
                    pairs=len(scores))


def score_test_pairs(plan: EvaluationPlan, embeddings: np.ndarray,
                     index: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Return the cosine similarity and the same-person label of every test pair of `plan`.

    `embeddings` has one row per evaluation image, located by `index[record path]`.
    """
    matrix = l2_normalize(embeddings)
    pairs = [pair for fold in plan.test_folds for pair in fold]
    first = matrix[[index[pair.a.path] for pair in pairs]]
    second = matrix[[index[pair.b.path] for pair in pairs]]
    return np.einsum("ij,ij->i", first, second), pair_labels(pairs)


def _fixed(value: Any, digits: int = 4) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def summary_key_numbers(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Pick the rows of the report's summary table from a run's `summary.json` content."""
    metrics = summary.get("metrics", {})
    onnx = summary.get("onnx", {})
    tracked = summary.get("mlflow", {})
    rows = [
        ("protocol", str(summary.get("protocol", "-"))),
        ("verification accuracy", f"{_fixed(metrics.get('verification_accuracy'))} +- "
                                  f"{_fixed(metrics.get('verification_std'))}"),
        ("ROC AUC", _fixed(metrics.get("verification_auc"))),
        ("decision threshold (cosine)", _fixed(metrics.get("threshold"))),
    ]
    if "identification_top1" in metrics:
        rows.append(("identification top-1", _fixed(metrics["identification_top1"])))
    rows += [
        ("rounds", str(summary.get("rounds_completed", "-"))),
        ("nodes", str(len(summary.get("nodes", [])))),
        ("partition", str(summary.get("partition", "-"))),
        ("ONNX parity", f"{'ok' if onnx.get('parity_ok') else 'FAILED'} (max abs diff "
                        f"{_fixed(onnx.get('max_abs_diff'), 8)})"),
    ]
    int8 = summary.get("int8", {}).get("chosen")
    if int8:
        rows.append(("int8 variant", f"{int8['method']}: accuracy delta "
                                     f"{int8['accuracy_delta']:+.4f}, p50 latency "
                                     f"{int8['latency_p50_ms']:.2f} ms"))
    rows += [
        ("model", f"{tracked.get('model_name', '-')} version {tracked.get('model_version', '-')}"
                  f" @{tracked.get('alias', '-')}"),
        ("MLflow run", str(tracked.get("run_id", "-"))),
        ("dataset fingerprint", str(summary.get("dataset_fingerprint", "-"))[:16]),
        ("config hash", str(summary.get("config_hash", "-"))),
        ("edgeface version", str(summary.get("edgeface_version", "-"))),
    ]
    return rows


@dataclass
class ReportData:
    """Everything the report shows.

    `rounds` is the runner's per-round history (dicts with a `round` index from 0 and the
    fused model's metrics). `node_metrics` maps node -> metric (`loss`, `accuracy`) -> a list
    of (round index, value). `key_numbers` are (label, formatted value) rows of the summary
    table. `partition` is the content of `partition.json`, or None.
    """

    title: str
    key_numbers: list[tuple[str, str]] = field(default_factory=list)
    rounds: list[dict[str, float]] = field(default_factory=list)
    node_metrics: dict[str, dict[str, list[tuple[int, float]]]] = field(default_factory=dict)
    roc: RocCurve | None = None
    partition: dict[str, Any] | None = None


def write_report(data: ReportData, out_dir: Path) -> Path:
    """Write the plots and `index.html` into `out_dir` and return the HTML file's path.

    A plot without data (for example no evaluated round) is left out, and the page notes it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn: list[tuple[str, str, str | None]] = [
        ("accuracy.png", "Fused model: verification accuracy per round",
         plot_round_accuracy(data.rounds, out_dir / "accuracy.png")),
        ("nodes.png", "Edge nodes: training loss and accuracy per round",
         plot_node_training(data.node_metrics, out_dir / "nodes.png")),
        ("roc.png", "ROC curve on the evaluation pairs",
         plot_roc(data.roc, out_dir / "roc.png") if data.roc is not None else None),
        ("partition.png", "Partition of the training images across nodes",
         plot_partition(data.partition, out_dir / "partition.png")
         if data.partition is not None else None),
    ]
    page = out_dir / "index.html"
    figures = [(name, caption, path is not None) for name, caption, path in drawn]
    page.write_text(render_html(data, figures), encoding="utf-8")
    logger.info("wrote the run report to %s", page)
    return page


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float, columns: int = 1) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")
    axes = figure.subplots(1, columns)
    return figure, axes


def plot_round_accuracy(rounds: Sequence[Mapping[str, float]], path: Path) -> str | None:
    """Plot accuracy and its standard deviation over folds per round, and return the path.

    Returns None, and writes nothing, when no round was evaluated.
    """
    points = [(int(entry["round"]) + 1, entry[ACCURACY_KEY], entry.get(ACCURACY_STD_KEY, 0.0))
              for entry in rounds if ACCURACY_KEY in entry and "round" in entry]
    points = [point for point in points if math.isfinite(point[1])]
    if not points:
        return None
    figure, axes = _figure(6.4, 3.6)
    x, mean, std = (np.array(values, dtype=float) for values in zip(*points))
    axes.errorbar(x, mean, yerr=std, marker="o", capsize=3, label="fused model")
    axes.set_xlabel("round")
    axes.set_ylabel("verification accuracy")
    axes.set_xticks(x)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path)
    return str(path)


def plot_node_training(
    node_metrics: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: Path
) -> str | None:
    """Plot each node's training loss and accuracy per round, and return the path.

    Returns None, and writes nothing, when no node logged a metric.
    """
    from matplotlib.ticker import MaxNLocator

    if not any(series for metrics in node_metrics.values() for series in metrics.values()):
        return None
    figure, axes = _figure(9.6, 3.6, columns=len(NODE_METRICS))
    for panel, metric in zip(axes, NODE_METRICS):
        for node, metrics in sorted(node_metrics.items()):
            series = metrics.get(metric, [])
            if series:
                steps, values = zip(*series)
                panel.plot(np.array(steps) + 1, values, marker="o", label=node)
        panel.xaxis.set_major_locator(MaxNLocator(integer=True))
        panel.set_xlabel("round")
        panel.set_ylabel(f"training {metric}")
        panel.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.savefig(path)
    return str(path)


def plot_roc(roc: RocCurve, path: Path) -> str:
    """Plot the ROC curve, the chance diagonal and the operating point of the threshold."""
    figure, axes = _figure(4.8, 4.6)
    axes.plot(roc.fpr, roc.tpr, label=f"AUC {roc.auc:.4f} ({roc.pairs} pairs)")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    axes.plot(*roc.point, marker="o", color="red", linestyle="none",
              label=f"threshold {roc.threshold:.4f}")
    axes.annotate(f"FPR {roc.point[0]:.3f}\nTPR {roc.point[1]:.3f}", roc.point,
                  textcoords="offset points", xytext=(10, -30))
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path)
    return str(path)


def plot_partition(partition: Mapping[str, Any], path: Path) -> str | None:
    """Plot images and identities per node, and each node's images-per-identity histogram."""
    nodes = partition.get("nodes") or []
    if not nodes:
        return None
    figure, (sizes, histogram) = _figure(9.6, 3.6, columns=2)
    names = [node["name"] for node in nodes]
    x = np.arange(len(names))
    sizes.bar(x - 0.2, [node["images"] for node in nodes], width=0.4, label="images")
    sizes.bar(x + 0.2, [node["identities"] for node in nodes], width=0.4, label="identities")
    sizes.set_xticks(x, names, rotation=45 if len(names) > 6 else 0)
    sizes.set_title(f"{partition.get('strategy', '?')} partition")
    sizes.legend(fontsize="small")
    bins = list(nodes[0]["images_per_identity"])
    width = 0.8 / len(nodes)
    for offset, node in enumerate(nodes):
        counts = [node["images_per_identity"].get(label, 0) for label in bins]
        histogram.bar(np.arange(len(bins)) + offset * width - 0.4 + width / 2, counts,
                      width=width, label=node["name"])
    histogram.set_xticks(np.arange(len(bins)), bins)
    histogram.set_xlabel("images per identity on the node")
    histogram.set_ylabel("identities")
    if len(nodes) <= 10:
        histogram.legend(fontsize="small")
    figure.savefig(path)
    return str(path)


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 62rem; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5rem; }
td, th { border: 1px solid #ccc; padding: 0.25rem 0.75rem; text-align: left; }
figure { margin: 1.5rem 0; }
img { max-width: 100%; border: 1px solid #eee; }
.missing { color: #a00; }
"""


def render_html(data: ReportData, figures: Sequence[tuple[str, str, bool]]) -> str:
    """Return the report page; `figures` are (file name, caption, whether it was drawn)."""
    escape = html.escape
    rows = "\n".join(f"<tr><th>{escape(label)}</th><td>{escape(value)}</td></tr>"
                     for label, value in data.key_numbers)
    blocks = []
    for name, caption, drawn in figures:
        if drawn:
            blocks.append(f'<figure><img src="{escape(name)}" alt="{escape(caption)}">'
                          f"<figcaption>{escape(caption)}</figcaption></figure>")
        else:
            blocks.append(f'<p class="missing">{escape(caption)}: no data in this run.</p>')
    body = "\n".join(blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>{escape(data.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
            f"<h1>{escape(data.title)}</h1>\n<table>\n{rows}\n</table>\n{body}\n"
            "</body>\n</html>\n")
