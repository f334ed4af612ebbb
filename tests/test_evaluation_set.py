"""The evaluation image cache on a folder dataset with an unreadable file, and on LFW pairs."""

import shutil
from pathlib import Path

import pytest

from edgeface import steps
from edgeface.config import load_config
from edgeface.data.protocol import EvaluationPlan, Pair
from edgeface.errors import DataError

BAD_IMAGE = "s1/corrupt.pgm"


@pytest.fixture(scope="module")
def orl_with_bad_image(orl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ORL's 400 images plus one file of random bytes in s1/, in a temporary folder."""
    folder = tmp_path_factory.mktemp("orl-bad") / "att_faces"
    shutil.copytree(orl_dir, folder, ignore=shutil.ignore_patterns("*.md", "MANIFEST*"))
    (folder / BAD_IMAGE).write_bytes(bytes(range(256)) * 8)
    return folder


def holdout_config(**overrides):
    return load_config(None, {"image-size": 32, "nodes": 2, "holdout-identities": 0.25,
                              "train-images-per-identity": 5, **overrides})


def plan_paths(plan: EvaluationPlan) -> set[str]:
    pairs = [pair for fold in plan.test_folds for pair in fold]
    return ({p.a.path for p in pairs} | {p.b.path for p in pairs}
            | {r.path for r in plan.gallery} | {r.path for r in plan.probes})


def test_holdout_leaves_out_bad_image(orl_with_bad_image: Path, tmp_path: Path) -> None:
    config = holdout_config()
    images_root, _, plan = steps.plan_step(orl_with_bad_image, config)
    assert BAD_IMAGE in plan_paths(plan)

    evaluation = steps.prepare_evaluation(images_root, plan, config, tmp_path / "cache")

    assert BAD_IMAGE not in plan_paths(evaluation.plan)
    assert BAD_IMAGE not in evaluation.index
    assert all(evaluation.plan.test_folds)
    # Only the bad image's pairs went: every other evaluation image is still used.
    assert plan_paths(evaluation.plan) == plan_paths(plan) - {BAD_IMAGE}
    assert len(evaluation.images) == len(evaluation.index)


def test_holdout_bad_image_over_limit(orl_with_bad_image: Path, tmp_path: Path) -> None:
    config = holdout_config(**{"max-bad-fraction": 0.0})
    images_root, _, plan = steps.plan_step(orl_with_bad_image, config)

    with pytest.raises(DataError, match=r"more than max-bad-fraction 0.*s1/corrupt\.pgm"):
        steps.prepare_evaluation(images_root, plan, config, tmp_path / "cache")


def test_lfw_protocol_bad_image_fails(orl_with_bad_image: Path, tmp_path: Path) -> None:
    config = holdout_config()
    images_root, _, holdout = steps.plan_step(orl_with_bad_image, config)
    [bad] = [r for r in holdout.eval_records() if r.path == BAD_IMAGE]
    good = next(r for r in holdout.eval_records() if r.identity == "s1" and r is not bad)
    other = next(r for r in holdout.eval_records() if r.identity != "s1")
    pairs = [Pair(bad, good, True), Pair(good, other, False)]
    plan = EvaluationPlan(name="lfw-view1", train_records=holdout.train_records,
                          test_folds=[pairs], threshold_pairs=pairs)

    with pytest.raises(DataError, match=r"lfw-view1 protocol's pairs.*s1/corrupt\.pgm.*restore"):
        steps.prepare_evaluation(images_root, plan, config, tmp_path / "cache")
