"""LFW protocol parsers and evaluation plans, on the real LFW protocol files and ORL folders."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from edgeface.data.ingest import ImageRecord, list_images, resolve_images_root
from edgeface.data.protocol import (
    EvaluationPlan,
    Pair,
    lfw_record,
    make_plan,
    read_pairs,
    read_people,
    split_pairs_into_folds,
)
from edgeface.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def lfw_records(lfw_dir: Path) -> list[ImageRecord]:
    return list_images(resolve_images_root(lfw_dir))


@pytest.fixture(scope="module")
def orl_records(orl_dir: Path) -> list[ImageRecord]:
    return list_images(resolve_images_root(orl_dir))


def lfw_plan(lfw_dir: Path, records: list[ImageRecord], protocol: str, **options) -> EvaluationPlan:
    return make_plan(lfw_dir, resolve_images_root(lfw_dir), records, protocol, **options)


def orl_plan(orl_dir: Path, records: list[ImageRecord], **options) -> EvaluationPlan:
    return make_plan(orl_dir, resolve_images_root(orl_dir), records, "holdout", **options)


def pair_identities(pairs: list[Pair]) -> set[str]:
    return {record.identity for pair in pairs for record in (pair.a, pair.b)}


def pair_paths(pairs: list[Pair]) -> set[str]:
    return {record.path for pair in pairs for record in (pair.a, pair.b)}


# --- parsers on the real files ----------------------------------------------------------------


def test_read_people_view1(lfw_dir: Path) -> None:
    (train,) = read_people(lfw_dir / "peopleDevTrain.txt")
    (test,) = read_people(lfw_dir / "peopleDevTest.txt")
    assert len(train) == 4038
    assert sum(count for _, count in train) == 9525
    assert len(test) == 1711
    assert sum(count for _, count in test) == 3708
    assert train[0] == ("AJ_Cook", 1)


def test_read_people_view2_folds(lfw_dir: Path) -> None:
    folds = read_people(lfw_dir / "people.txt")
    assert len(folds) == 10
    assert [len(fold) for fold in folds[:2]] == [601, 555]
    assert sum(len(fold) for fold in folds) == 5749
    assert sum(count for fold in folds for _, count in fold) == 13233


def test_read_pairs_view2(lfw_dir: Path) -> None:
    folds = read_pairs(lfw_dir / "pairs.txt")
    assert len(folds) == 10
    for fold in folds:
        assert len(fold) == 600
        assert all(pair.same for pair in fold[:300])
        assert not any(pair.same for pair in fold[300:])
    first = folds[0][0]
    assert first == Pair(lfw_record("Abel_Pacheco", 1), lfw_record("Abel_Pacheco", 4), True)
    assert first.b.path == "Abel_Pacheco/Abel_Pacheco_0004.jpg"


def test_read_pairs_view1(lfw_dir: Path) -> None:
    (train,) = read_pairs(lfw_dir / "pairsDevTrain.txt")
    (test,) = read_pairs(lfw_dir / "pairsDevTest.txt")
    assert Counter(pair.same for pair in train) == {True: 1100, False: 1100}
    assert Counter(pair.same for pair in test) == {True: 500, False: 500}
    assert len(pair_paths(train)) == 3443
    assert len(pair_paths(test)) == 1549


# --- malformed files --------------------------------------------------------------------------

MALFORMED_PAIRS = [
    ("wrong field count", "2\nA\t1\t2\nB\t1\nA\t1\tB\t1\nC\t1\tD\t2\n", 3),
    ("matched line in mismatched part", "1\nA\t1\t2\nB\t1\t2\n", 3),
    ("image number not an integer", "1\nA\t1\tx\nA\t1\tB\t1\n", 2),
    ("image number zero", "1\nA\t0\t2\nA\t1\tB\t1\n", 2),
    ("same name in mismatched pair", "1\nA\t1\t2\nA\t1\tA\t3\n", 3),
    ("invalid header", "ten\nA\t1\t2\nA\t1\tB\t1\n", 1),
    ("header with three fields", "1\t1\t1\nA\t1\t2\nA\t1\tB\t1\n", 1),
    ("line after the announced pairs", "1\nA\t1\t2\nA\t1\tB\t1\nC\t1\t2\n", 4),
]


@pytest.mark.parametrize(("case", "text", "line"), MALFORMED_PAIRS,
                         ids=[case for case, _, _ in MALFORMED_PAIRS])
def test_read_pairs_malformed(tmp_path: Path, case: str, text: str, line: int) -> None:
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    with pytest.raises(DataError) as raised:
        read_pairs(path)
    assert str(path) in str(raised.value)
    assert f"line {line}:" in str(raised.value)


def test_read_pairs_truncated(tmp_path: Path) -> None:
    path = tmp_path / "pairsDevTest.txt"
    path.write_text("2\nA\t1\t2\nB\t1\t2\nA\t1\tB\t1\n")
    with pytest.raises(DataError, match=r"ends after line 4, expected a mismatched pair"):
        read_pairs(path)


MALFORMED_PEOPLE = [
    ("count not an integer", "2\nA\t1\nB\tmany\n", 3),
    ("zero images", "2\nA\t1\nB\t0\n", 3),
    ("fold header with a name", "2\n1\nA\t1\nB\t1\n", 4),
    ("extra field", "1\nA\t1\textra\n", 2),
]


@pytest.mark.parametrize(("case", "text", "line"), MALFORMED_PEOPLE,
                         ids=[case for case, _, _ in MALFORMED_PEOPLE])
def test_read_people_malformed(tmp_path: Path, case: str, text: str, line: int) -> None:
    path = tmp_path / "people.txt"
    path.write_text(text)
    with pytest.raises(DataError) as raised:
        read_people(path)
    assert str(path) in str(raised.value)
    assert f"line {line}:" in str(raised.value)


def test_read_people_duplicate_person(tmp_path: Path) -> None:
    path = tmp_path / "people.txt"
    path.write_text("2\n1\nA\t3\n1\nA\t3\n")
    with pytest.raises(DataError, match="'A' is listed twice"):
        read_people(path)


def test_protocol_file_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="edgeface data fetch lfw"):
        read_pairs(tmp_path / "pairs.txt")


def test_split_pairs_into_folds_order() -> None:
    matched = [Pair(lfw_record("A", i), lfw_record("A", i + 1), True) for i in range(1, 8)]
    mismatched = [Pair(lfw_record("A", i), lfw_record("B", i), False) for i in range(1, 8)]
    folds = split_pairs_into_folds(matched + mismatched, 3)
    assert [sum(p.same for p in fold) for fold in folds] == [3, 2, 2]
    assert [sum(not p.same for p in fold) for fold in folds] == [3, 2, 2]
    assert [p for fold in folds for p in fold if p.same] == matched
    assert [p for fold in folds for p in fold if not p.same] == mismatched


# --- LFW View 1 -------------------------------------------------------------------------------


def test_view1_plan_counts(lfw_dir: Path, lfw_records: list[ImageRecord]) -> None:
    plan = lfw_plan(lfw_dir, lfw_records, "lfw-view1")
    assert plan.name == "lfw-view1"
    assert len(plan.train_records) == 9525
    assert len({record.identity for record in plan.train_records}) == 4038
    assert plan.threshold_pairs is not None
    assert Counter(pair.same for pair in plan.threshold_pairs) == {True: 1100, False: 1100}
    assert len(plan.test_folds) == 10
    for fold in plan.test_folds:
        assert Counter(pair.same for pair in fold) == {True: 50, False: 50}
    assert plan.gallery == []
    assert plan.probes == []


def test_view1_test_people_never_trained(lfw_dir: Path, lfw_records: list[ImageRecord]) -> None:
    plan = lfw_plan(lfw_dir, lfw_records, "lfw-view1")
    trained = {record.identity for record in plan.train_records}
    tested = pair_identities([pair for fold in plan.test_folds for pair in fold])
    assert len(tested) > 900
    assert trained.isdisjoint(tested)


def test_view1_folds_keep_file_order(lfw_dir: Path, lfw_records: list[ImageRecord]) -> None:
    plan = lfw_plan(lfw_dir, lfw_records, "lfw-view1")
    (test_pairs,) = read_pairs(lfw_dir / "pairsDevTest.txt")
    flattened = [pair for fold in plan.test_folds for pair in fold]
    assert [p for p in flattened if p.same] == [p for p in test_pairs if p.same]
    assert [p for p in flattened if not p.same] == [p for p in test_pairs if not p.same]


def test_view1_eval_records_unique(lfw_dir: Path, lfw_records: list[ImageRecord]) -> None:
    plan = lfw_plan(lfw_dir, lfw_records, "lfw-view1")
    paths = [record.path for record in plan.eval_records()]
    assert len(paths) == len(set(paths))
    expected = pair_paths(plan.threshold_pairs or [])
    expected |= pair_paths([pair for fold in plan.test_folds for pair in fold])
    assert set(paths) == expected


def test_auto_protocol_choice(lfw_dir: Path, orl_dir: Path, lfw_records: list[ImageRecord],
                              orl_records: list[ImageRecord]) -> None:
    assert lfw_plan(lfw_dir, lfw_records, "auto").name == "lfw-view1"
    assert make_plan(orl_dir, orl_dir, orl_records, "auto").name == "holdout"


def test_missing_pair_images_listed(lfw_dir: Path, lfw_records: list[ImageRecord]) -> None:
    removed = {"Abdullah_Gul/Abdullah_Gul_0013.jpg", "Abdullah_Gul/Abdullah_Gul_0014.jpg"}
    partial = [record for record in lfw_records if record.path not in removed]
    with pytest.raises(DataError) as raised:
        lfw_plan(lfw_dir, partial, "lfw-view1")
    message = str(raised.value)
    assert message.startswith("2 image(s)")
    for path in removed:
        assert str(resolve_images_root(lfw_dir) / path) in message


def test_unknown_protocol(lfw_dir: Path, lfw_records: list[ImageRecord]) -> None:
    with pytest.raises(ConfigError, match="'lfw-view3'.*lfw-view2"):
        lfw_plan(lfw_dir, lfw_records, "lfw-view3")


# --- LFW View 2 -------------------------------------------------------------------------------


@pytest.mark.parametrize("fold", [0, 4, 9])
def test_view2_fold_plan(lfw_dir: Path, lfw_records: list[ImageRecord], fold: int) -> None:
    plan = lfw_plan(lfw_dir, lfw_records, "lfw-view2", fold=fold)
    people_folds = read_people(lfw_dir / "people.txt")
    assert plan.name == f"lfw-view2-fold{fold}"
    assert len(plan.test_folds) == 1
    assert Counter(pair.same for pair in plan.test_folds[0]) == {True: 300, False: 300}
    assert plan.threshold_pairs is not None
    assert len(plan.threshold_pairs) == 9 * 600

    trained = {record.identity for record in plan.train_records}
    fold_people = {name for name, _ in people_folds[fold]}
    assert trained.isdisjoint(fold_people)
    assert trained.isdisjoint(pair_identities(plan.test_folds[0]))
    expected_images = sum(count for k, block in enumerate(people_folds) if k != fold
                          for _, count in block)
    assert len(plan.train_records) == expected_images


def test_view2_fold_out_of_range(lfw_dir: Path, lfw_records: list[ImageRecord]) -> None:
    with pytest.raises(ConfigError, match="invalid fold 10.*from 0 to 9"):
        lfw_plan(lfw_dir, lfw_records, "lfw-view2", fold=10)


def test_view2_inconsistent_files(tmp_path: Path, lfw_dir: Path,
                                  lfw_records: list[ImageRecord]) -> None:
    # people.txt that puts a fold-0 test person into fold 1, which fold 0 trains on.
    (tmp_path / "pairs.txt").write_text("2\t1\nA\t1\t2\nA\t1\tB\t1\nC\t1\t2\nC\t1\tD\t1\n")
    (tmp_path / "people.txt").write_text("2\n1\nB\t1\n3\nA\t2\nC\t2\nD\t1\n")
    records = [lfw_record("A", 1), lfw_record("A", 2), lfw_record("B", 1),
               lfw_record("C", 1), lfw_record("C", 2), lfw_record("D", 1)]
    with pytest.raises(DataError, match="puts 1 test people in the training split.*'A'"):
        make_plan(tmp_path, tmp_path, records, "lfw-view2", fold=0)


# --- holdout on ORL ---------------------------------------------------------------------------


def test_holdout_orl_split_sizes(orl_dir: Path, orl_records: list[ImageRecord]) -> None:
    plan = orl_plan(orl_dir, orl_records)
    trained = {record.identity for record in plan.train_records}
    probe_people = {record.identity for record in plan.probes}
    assert len(trained) == 30
    assert len(plan.train_records) == 30 * 5
    assert plan.gallery == plan.train_records
    assert len(plan.probes) == 30 * 5
    assert probe_people == trained
    assert plan.threshold_pairs is None
    # 10 unseen people give 10 * C(10, 2) matched pairs, 30 seen people 30 * C(5, 2).
    matched = 10 * 45 + 30 * 10
    assert len(plan.test_folds) == 10
    for fold in plan.test_folds:
        assert Counter(pair.same for pair in fold) == {True: matched // 10, False: matched // 10}


def test_holdout_unseen_never_trained(orl_dir: Path, orl_records: list[ImageRecord]) -> None:
    plan = orl_plan(orl_dir, orl_records)
    trained_paths = {record.path for record in plan.train_records}
    trained = {record.identity for record in plan.train_records}
    pairs = [pair for fold in plan.test_folds for pair in fold]
    unseen = pair_identities(pairs) - trained
    assert len(unseen) == 10
    assert trained_paths.isdisjoint(pair_paths(pairs))
    assert trained_paths.isdisjoint(record.path for record in plan.probes)
    assert all(pair.same == (pair.a.identity == pair.b.identity) for pair in pairs)
    assert len({(pair.a.path, pair.b.path) for pair in pairs}) == len(pairs)


def test_holdout_deterministic(orl_dir: Path, orl_records: list[ImageRecord]) -> None:
    shuffled = list(orl_records)
    random.Random(3).shuffle(shuffled)
    first = orl_plan(orl_dir, orl_records, seed=7)
    again = orl_plan(orl_dir, shuffled, seed=7)
    other = orl_plan(orl_dir, orl_records, seed=8)
    assert first == again
    assert first.train_records != other.train_records


def test_holdout_small_identities(orl_dir: Path, orl_records: list[ImageRecord]) -> None:
    # Trim s1..s9 to 3 images: those seen identities keep all 3 for training and get no probes.
    small = {f"s{i}" for i in range(1, 10)}
    records = [r for r in orl_records
               if r.identity not in small or r.path.split("/")[1] in ("1.pgm", "2.pgm", "3.pgm")]
    plan = orl_plan(orl_dir, records, train_images_per_identity=5, seed=1)
    trained = Counter(record.identity for record in plan.train_records)
    for identity in small & set(trained):
        assert trained[identity] == 3
    assert small.isdisjoint({record.identity for record in plan.probes})
    assert len(plan.train_records) + len(plan.probes) + sum(
        1 for r in records if r.identity not in trained) == len(records)


def test_holdout_too_small(orl_dir: Path, orl_records: list[ImageRecord]) -> None:
    # Two people with two images each: one held out gives 1 matched pair, not 10.
    records = [r for r in orl_records if r.identity in ("s1", "s2")
               and r.path.split("/")[1] in ("1.pgm", "2.pgm")]
    with pytest.raises(DataError, match="raise holdout-identities .*train-images-per-identity"):
        orl_plan(orl_dir, records)


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_holdout_fraction_invalid(orl_dir: Path, orl_records: list[ImageRecord],
                                  fraction: float) -> None:
    with pytest.raises(ConfigError, match=f"invalid holdout-identities {fraction}"):
        orl_plan(orl_dir, orl_records, holdout_identities=fraction)


def test_holdout_all_held_out(orl_dir: Path, orl_records: list[ImageRecord]) -> None:
    records = [r for r in orl_records if r.identity == "s1"]
    with pytest.raises(DataError, match="leaves none to train on: lower holdout-identities"):
        orl_plan(orl_dir, records, holdout_identities=0.5)


# --- holdout on synthetic folders -------------------------------------------------------------


def _write_dataset(
    root: Path, identities: int, images: int, *, readable: bool
) -> list[ImageRecord]:
    """Write `identities` folders of `images` small PNGs, or of text files named .jpg."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(identities):
        folder = root / f"person{i}"
        folder.mkdir(parents=True)
        for j in range(images):
            if readable:
                pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{j}.png")
            else:
                (folder / f"{j}.jpg").write_text("text, not a JPEG\n")
    return list_images(root)


def test_holdout_all_corrupt_names_unreadable(tmp_path: Path) -> None:
    records = _write_dataset(tmp_path, 3, 3, readable=False)

    with pytest.raises(DataError) as error:
        make_plan(tmp_path, tmp_path, records, "holdout")

    message = str(error.value)
    assert "no evaluation plan can be made because 9 of 9 images checked are unreadable" in message
    assert "person0/0.jpg (not an image)" in message
    assert f"edgeface data inspect {tmp_path}" in message
    assert "holdout-identities" not in message


def test_holdout_some_corrupt_points_to_inspect(tmp_path: Path) -> None:
    records = _write_dataset(tmp_path, 3, 3, readable=True)
    (tmp_path / "person1" / "0.png").write_text("text, not a PNG\n")

    with pytest.raises(DataError) as error:
        make_plan(tmp_path, tmp_path, records, "holdout")

    message = str(error.value)
    assert "raise holdout-identities" in message
    assert "Also, 1 of 9 images checked is unreadable, for example person1/0.png" in message
    assert f"edgeface data inspect {tmp_path}" in message


def test_holdout_too_small_singular_counts(tmp_path: Path) -> None:
    records = _write_dataset(tmp_path, 3, 3, readable=True)

    with pytest.raises(DataError) as error:
        make_plan(tmp_path, tmp_path, records, "holdout")

    message = str(error.value)
    assert "3 matched pairs" in message
    assert "3 evaluation images of 1 identity," in message
    assert "unreadable" not in message


def test_holdout_all_held_out_singular(tmp_path: Path) -> None:
    records = _write_dataset(tmp_path, 1, 2, readable=True)

    with pytest.raises(DataError, match="holds out all 1 identity and leaves none"):
        make_plan(tmp_path, tmp_path, records, "holdout")


def test_holdout_large_corrupt_set_decodes_sample(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeface.data import protocol

    records = _write_dataset(tmp_path, 3, 3, readable=False)
    monkeypatch.setattr(protocol, "UNREADABLE_SAMPLE_SIZE", 4)

    with pytest.raises(DataError) as error:
        make_plan(tmp_path, tmp_path, records, "holdout")

    assert "4 of 4 sampled images checked are unreadable" in str(error.value)
