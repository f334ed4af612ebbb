"""Verification and identification metrics for face embeddings, in numpy.

Verification scores a pair by the cosine similarity of its two L2-normalized embeddings and
predicts "same person" when the score is strictly greater than a threshold. The threshold that
maximizes accuracy is chosen either on separate threshold pairs (LFW View 1) or, for each test
fold, on the other test folds (LFW View 2 cross-validation). Identification assigns each probe
to the identity whose gallery centroid is nearest in cosine similarity.

This module must stay importable without torch: the caller supplies embeddings as arrays, or as
a function from records to an (N, D) array that may run a model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgeface.data.ingest import ImageRecord
    from edgeface.data.protocol import EvaluationPlan, Pair

logger = logging.getLogger(__name__)

# Function that returns the embeddings of a list of images as an (N, D) array, one row per record.
EmbedFunction = Callable[[list["ImageRecord"]], np.ndarray]


@dataclass(frozen=True)
class VerificationResult:
    """Verification accuracy over test folds.

    Attributes:
        accuracy_mean: mean of ``fold_accuracies``, in [0, 1].
        accuracy_std: population standard deviation (ddof=0) of ``fold_accuracies``.
        fold_accuracies: accuracy of each test fold at that fold's threshold.
        thresholds: cosine-similarity threshold used for each test fold.
        threshold: the threshold to store with the model, chosen on all threshold pairs, or on all
            test folds combined when the thresholds were cross-validated.
        roc: (false positive rate, true positive rate) over all test pairs, both increasing.
        auc: area under ``roc``.
    """

    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: list[float]
    thresholds: list[float]
    threshold: float
    roc: tuple[np.ndarray, np.ndarray]
    auc: float


@dataclass(frozen=True)
class EvaluationResult:
    """Metrics of one model on one evaluation plan.

    ``identification_top1`` is None when the plan has no probes, as for the LFW protocols.
    """

    plan: str
    verification: VerificationResult
    identification_top1: float | None

    def metrics(self) -> dict[str, float]:
        """Return the scalar metrics, keyed by the names under which they are tracked."""
        result = {
            "verification_accuracy_mean": self.verification.accuracy_mean,
            "verification_accuracy_std": self.verification.accuracy_std,
            "verification_auc": self.verification.auc,
            "verification_threshold": self.verification.threshold,
        }
        if self.identification_top1 is not None:
            result["identification_top1"] = self.identification_top1
        return result


# --- embeddings and scores --------------------------------------------------------------------


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Return the rows of ``vectors`` scaled to unit L2 norm, as float64.

    An all-zero row stays zero, so its cosine similarity with anything is 0.

    Raises:
        ValueError: ``vectors`` is not 2-D or contains NaN or infinity.
    """
    matrix = np.asarray(vectors, dtype=np.float64)
    if matrix.ndim != 2:
        raise ValueError(f"expected embeddings of shape (N, D), got shape {matrix.shape}")
    bad = ~np.isfinite(matrix).all(axis=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} of {len(matrix)} embeddings contain NaN or "
                         f"infinity (first at row {int(np.argmax(bad))}); the model has "
                         "probably diverged, check the training loss and learning rate")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.where(norms > 0, norms, 1.0)


class _EmbeddingTable:
    """Normalized embeddings with a row index per record path."""

    def __init__(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) != len(paths):
            raise ValueError(f"expected {len(paths)} embeddings of shape ({len(paths)}, D), got "
                             f"shape {vectors.shape}")
        self.matrix = l2_normalize(vectors)
        self.row = {path: i for i, path in enumerate(paths)}

    @classmethod
    def from_function(cls, embed: EmbedFunction, records: list[ImageRecord]) -> _EmbeddingTable:
        return cls([record.path for record in records], embed(records))

    @classmethod
    def from_mapping(cls, embeddings: Mapping[str, np.ndarray], paths: list[str]
                     ) -> _EmbeddingTable:
        missing = [path for path in paths if path not in embeddings]
        if missing:
            raise KeyError(f"no embedding for {len(missing)} image(s), for example "
                           f"{missing[0]!r}; embed every record of the pairs")
        vectors = np.stack([np.asarray(embeddings[path]).reshape(-1) for path in paths])
        return cls(paths, vectors)

    def rows(self, records: Sequence[ImageRecord]) -> np.ndarray:
        return np.fromiter((self.row[record.path] for record in records), dtype=np.int64,
                           count=len(records))

    def pair_scores(self, pairs: Sequence[Pair]) -> np.ndarray:
        first = self.matrix[self.rows([pair.a for pair in pairs])]
        second = self.matrix[self.rows([pair.b for pair in pairs])]
        return np.einsum("ij,ij->i", first, second)


def _unique_pair_records(pairs: Sequence[Pair]) -> list[ImageRecord]:
    unique: dict[str, ImageRecord] = {}
    for pair in pairs:
        unique.setdefault(pair.a.path, pair.a)
        unique.setdefault(pair.b.path, pair.b)
    return list(unique.values())


def pair_scores(
    embeddings: Mapping[str, np.ndarray] | EmbedFunction, pairs: Sequence[Pair]
) -> np.ndarray:
    """Return the cosine similarity of each pair's L2-normalized embeddings, shape (len(pairs),).

    Args:
        embeddings: either a mapping from record path to a 1-D embedding, or a function that
            embeds a list of records into an (N, D) array. The function is called once, with
            every distinct image of the pairs.
        pairs: the pairs to score.

    Raises:
        KeyError: the mapping lacks an image of the pairs.
        ValueError: embeddings of the wrong shape, or holding NaN or infinity.
    """
    records = _unique_pair_records(pairs)
    if callable(embeddings):
        table = _EmbeddingTable.from_function(embeddings, records)
    else:
        table = _EmbeddingTable.from_mapping(embeddings, [record.path for record in records])
    return table.pair_scores(pairs)


def pair_labels(pairs: Sequence[Pair]) -> np.ndarray:
    """Return whether each pair shows the same person, as a bool array."""
    return np.fromiter((pair.same for pair in pairs), dtype=bool, count=len(pairs))


# --- thresholds and verification --------------------------------------------------------------


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if scores.ndim != 1 or scores.shape != labels.shape or len(scores) == 0:
        raise ValueError(f"expected non-empty 1-D scores and labels of equal length, got shapes "
                         f"{scores.shape} and {labels.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity; check the embeddings")
    return scores, labels


def accuracy(scores: np.ndarray, labels: np.ndarray, threshold: float) -> float:
    """Return the fraction of pairs where ``score > threshold`` equals the label."""
    scores, labels = _check_scores(scores, labels)
    return float(np.mean((scores > threshold) == labels))


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Return the threshold with the highest accuracy for the rule ``score > threshold``.

    The candidates are the midpoints between consecutive distinct scores, plus one threshold
    below all scores (every pair predicted same) and the largest score (every pair predicted
    different). Among equally accurate candidates the lowest wins, so the result is
    deterministic. Runs in O(n log n).

    Raises:
        ValueError: empty or mismatched inputs, or non-finite scores.
    """
    scores, labels = _check_scores(scores, labels)
    order = np.argsort(scores, kind="stable")
    ordered, truth = scores[order], labels[order]
    # A candidate between positions k-1 and k predicts "different" for the k lowest scores.
    cuts = np.concatenate(([0], np.flatnonzero(np.diff(ordered) > 0) + 1, [len(ordered)]))
    negatives_below = np.concatenate(([0], np.cumsum(~truth)))
    positives_below = np.concatenate(([0], np.cumsum(truth)))
    correct = negatives_below[cuts] + (positives_below[-1] - positives_below[cuts])
    k = int(cuts[int(np.argmax(correct))])
    if k == 0:
        return float(np.nextafter(ordered[0], -np.inf))
    if k == len(ordered):
        return float(ordered[-1])
    return float((ordered[k - 1] + ordered[k]) / 2)


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Return (false positive rates, true positive rates, area under the curve).

    The curve has one point per distinct score, from (0, 0) to (1, 1). Tied scores form one
    step, so the area counts a tie between a matched and a mismatched pair as one half.

    Raises:
        ValueError: the labels lack either matched or mismatched pairs.
    """
    scores, labels = _check_scores(scores, labels)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"an ROC curve needs matched and mismatched pairs, got {positives} "
                         f"matched and {negatives} mismatched")
    order = np.argsort(-scores, kind="stable")
    ordered, truth = scores[order], labels[order]
    last_of_value = np.concatenate((np.flatnonzero(np.diff(ordered) != 0), [len(ordered) - 1]))
    true_positives = np.cumsum(truth)[last_of_value]
    false_positives = last_of_value + 1 - true_positives
    tpr = np.concatenate(([0.0], true_positives / positives))
    fpr = np.concatenate(([0.0], false_positives / negatives))
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return fpr, tpr, auc


def verification(
    test_scores: Sequence[np.ndarray],
    test_labels: Sequence[np.ndarray],
    threshold_scores: np.ndarray | None = None,
    threshold_labels: np.ndarray | None = None,
) -> VerificationResult:
    """Measure verification accuracy on test folds.

    Args:
        test_scores, test_labels: one score array and one label array per test fold.
        threshold_scores, threshold_labels: pairs on which a single threshold is chosen for all
            folds. When both are None, the threshold of fold i is chosen on all other folds, so
            a fold never influences its own threshold.

    Raises:
        ValueError: fold counts differ, only one of the threshold arrays is given, or
            cross-validation is requested with fewer than two folds.
    """
    folds = [_check_scores(s, y) for s, y in zip(test_scores, test_labels, strict=True)]
    if (threshold_scores is None) != (threshold_labels is None):
        raise ValueError("pass both threshold_scores and threshold_labels, or neither")
    if not folds:
        raise ValueError("verification needs at least one test fold")
    all_scores = np.concatenate([s for s, _ in folds])
    all_labels = np.concatenate([y for _, y in folds])
    if threshold_scores is not None:
        threshold = best_threshold(threshold_scores, threshold_labels)
        thresholds = [threshold] * len(folds)
    else:
        thresholds = _cross_validated_thresholds(folds)
        threshold = best_threshold(all_scores, all_labels)
    fold_accuracies = [accuracy(s, y, t) for (s, y), t in zip(folds, thresholds)]
    fpr, tpr, auc = roc_curve(all_scores, all_labels)
    return VerificationResult(
        accuracy_mean=float(np.mean(fold_accuracies)),
        accuracy_std=float(np.std(fold_accuracies)),
        fold_accuracies=fold_accuracies,
        thresholds=thresholds,
        threshold=threshold,
        roc=(fpr, tpr),
        auc=auc,
    )


def _cross_validated_thresholds(folds: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    if len(folds) < 2:
        raise ValueError("cross-validated thresholds need at least two test folds; pass "
                         "threshold pairs for a single fold")
    thresholds = []
    for i in range(len(folds)):
        others = [fold for j, fold in enumerate(folds) if j != i]
        thresholds.append(best_threshold(np.concatenate([s for s, _ in others]),
                                         np.concatenate([y for _, y in others])))
    return thresholds


# --- identification ---------------------------------------------------------------------------


def identification_top1(
    gallery: np.ndarray,
    gallery_labels: Sequence[str],
    probes: np.ndarray,
    probe_labels: Sequence[str],
) -> float:
    """Return the top-1 accuracy of nearest-centroid identification.

    Each identity's centroid is the mean of its L2-normalized gallery embeddings, normalized
    again. A probe is assigned to the centroid with the highest cosine similarity; gallery
    identities without probes still compete as candidates.

    Raises:
        ValueError: no probes, mismatched lengths, or a probe identity missing from the gallery.
    """
    gallery_matrix, probe_matrix = l2_normalize(gallery), l2_normalize(probes)
    gallery_names, probe_names = np.asarray(gallery_labels), np.asarray(probe_labels)
    if len(gallery_names) != len(gallery_matrix) or len(probe_names) != len(probe_matrix):
        raise ValueError("expected one label per gallery and per probe embedding")
    if len(probe_matrix) == 0:
        raise ValueError("identification needs at least one probe")
    identities, members = np.unique(gallery_names, return_inverse=True)
    unknown = np.setdiff1d(probe_names, identities)
    if len(unknown):
        raise ValueError(f"{len(unknown)} probe identities have no gallery images, for example "
                         f"{unknown[0]!r}; identification is closed-set")
    centroids = np.zeros((len(identities), gallery_matrix.shape[1]))
    np.add.at(centroids, members, gallery_matrix)
    predicted = identities[np.argmax(probe_matrix @ l2_normalize(centroids).T, axis=1)]
    return float(np.mean(predicted == probe_names))


# --- plans ------------------------------------------------------------------------------------


def evaluate_plan(plan: EvaluationPlan, embed: EmbedFunction) -> EvaluationResult:
    """Embed every image of ``plan`` once and measure verification and identification.

    ``embed`` receives `EvaluationPlan.eval_records` in one call and must return one row per
    record. Identification runs only when the plan has probes.

    Raises:
        ValueError: ``embed`` returned the wrong shape or non-finite values.
    """
    table = _EmbeddingTable.from_function(embed, plan.eval_records())
    threshold_scores = threshold_labels = None
    if plan.threshold_pairs is not None:
        threshold_scores = table.pair_scores(plan.threshold_pairs)
        threshold_labels = pair_labels(plan.threshold_pairs)
    result = verification(
        [table.pair_scores(fold) for fold in plan.test_folds],
        [pair_labels(fold) for fold in plan.test_folds],
        threshold_scores,
        threshold_labels,
    )
    top1 = None
    if plan.probes:
        top1 = identification_top1(
            table.matrix[table.rows(plan.gallery)], [r.identity for r in plan.gallery],
            table.matrix[table.rows(plan.probes)], [r.identity for r in plan.probes],
        )
    logger.info("evaluation on %s: verification accuracy %.4f +- %.4f over %d folds, AUC %.4f, "
                "threshold %.4f, identification top-1 %s", plan.name, result.accuracy_mean,
                result.accuracy_std, len(result.fold_accuracies), result.auc, result.threshold,
                "n/a" if top1 is None else f"{top1:.4f}")
    return EvaluationResult(plan=plan.name, verification=result, identification_top1=top1)
