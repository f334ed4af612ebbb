"""LFW protocol files and the evaluation plans built from them.

An `EvaluationPlan` fixes which images edge nodes may train on and which pairs (and, for
identification, which gallery and probe images) measure the fused model. Three protocols exist:

- ``lfw-view1``: the LFW development split. Training uses the people of ``peopleDevTrain.txt``,
  the decision threshold is chosen on ``pairsDevTrain.txt`` and accuracy is measured on
  ``pairsDevTest.txt``, cut into 10 folds so that a mean and a standard deviation can be reported.
- ``lfw-view2``: one fold of the 10-fold LFW benchmark. Training uses the people of the other nine
  folds of ``people.txt`` (the unrestricted setting), and the threshold is chosen on the other nine
  folds' pairs of ``pairs.txt``.
- ``holdout``: a seeded split for any dataset stored as one folder per identity, such as ORL.

The file formats are described in the README.txt that ships with LFW. Image ``i`` of ``Name`` is
``Name/Name_%04d.jpg`` under the images root.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeface.data.ingest import BadImageError, ImageRecord, count_noun, load_rgb
from edgeface.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

PROTOCOLS = ("auto", "lfw-view1", "lfw-view2", "holdout")

# Number of folds that test pairs are cut into when a protocol file does not fix the folds.
TEST_FOLDS = 10

# How many missing files a DataError lists before it only gives the count.
_MISSING_SHOWN = 10

# Images decoded when a dataset is too small for its protocol, to tell unreadable files apart
# from a dataset that really has too few images. Spread evenly over the sorted records.
UNREADABLE_SAMPLE_SIZE = 20


class DatasetTooSmallError(DataError):
    """Dataset with too few images or pairs for the protocol, judged by file names alone."""


@dataclass(frozen=True)
class Pair:
    """Two images and whether they show the same person."""

    a: ImageRecord
    b: ImageRecord
    same: bool


@dataclass
class EvaluationPlan:
    """Training images and evaluation pairs of one protocol.

    Attributes:
        name: protocol name, with the fold for ``lfw-view2`` (for example ``lfw-view2-fold3``).
        train_records: the only images that edge nodes may train on.
        test_folds: verification pairs; accuracy is reported as mean and standard deviation over
            these folds.
        threshold_pairs: pairs on which the decision threshold is chosen. None means that the
            threshold for each test fold is chosen on the other test folds, as in LFW View 2.
        gallery: identification gallery images (empty for the LFW protocols).
        probes: identification probe images, never trained on (empty for the LFW protocols).
    """

    name: str
    train_records: list[ImageRecord]
    test_folds: list[list[Pair]]
    threshold_pairs: list[Pair] | None
    gallery: list[ImageRecord] = field(default_factory=list)
    probes: list[ImageRecord] = field(default_factory=list)

    def eval_records(self) -> list[ImageRecord]:
        """Return every image that evaluation embeds, once each, in first-use order.

        The order is gallery, probes, then the images of the test pairs and the threshold pairs.
        """
        pairs = list(itertools.chain.from_iterable(self.test_folds))
        pairs.extend(self.threshold_pairs or [])
        candidates = itertools.chain(
            self.gallery,
            self.probes,
            itertools.chain.from_iterable((pair.a, pair.b) for pair in pairs),
        )
        unique: dict[str, ImageRecord] = {}
        for record in candidates:
            unique.setdefault(record.path, record)
        return list(unique.values())

    def without_images(self, paths: set[str]) -> EvaluationPlan:
        """Return a copy without the pairs, gallery images and probes that use `paths`.

        The training images stay: a node skips an unreadable one when it validates its share.
        """
        def keep(pairs: list[Pair]) -> list[Pair]:
            return [pair for pair in pairs if pair.a.path not in paths and pair.b.path not in paths]

        return EvaluationPlan(
            name=self.name,
            train_records=list(self.train_records),
            test_folds=[keep(fold) for fold in self.test_folds],
            threshold_pairs=None if self.threshold_pairs is None else keep(self.threshold_pairs),
            gallery=[record for record in self.gallery if record.path not in paths],
            probes=[record for record in self.probes if record.path not in paths],
        )


def lfw_record(name: str, index: int) -> ImageRecord:
    """Return the record of image ``index`` (1-based) of LFW person ``name``."""
    return ImageRecord(identity=name, path=f"{name}/{name}_{index:04d}.jpg")


# --- parsers ----------------------------------------------------------------------------------


def _read_fields(path: Path) -> list[tuple[int, list[str]]]:
    """Return (1-based line number, whitespace-separated fields) of every non-blank line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"LFW protocol file not found: {path}. Fetch LFW with `edgeface data fetch lfw` "
            "or use the holdout protocol for a dataset without protocol files"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read LFW protocol file {path}: {error}") from error
    lines = [(number, line.split()) for number, line in enumerate(text.splitlines(), start=1)]
    return [(number, fields) for number, fields in lines if fields]


def _parse_count(path: Path, number: int, text: str, what: str, minimum: int = 0) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise DataError(f"{path}, line {number}: invalid {what} {text!r}, expected an integer "
                        f">= {minimum}")
    return value


class _LineReader:
    """Sequential access to the fields of a protocol file, for error messages with line numbers."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lines = _read_fields(self.path)
        self._next = 0

    def peek_fields(self, offset: int = 0) -> list[str]:
        """Return the fields of the line ``offset`` lines ahead, or [] past the end."""
        index = self._next + offset
        return self._lines[index][1] if index < len(self._lines) else []

    def take(self, what: str) -> tuple[int, list[str]]:
        if self._next >= len(self._lines):
            last = self._lines[-1][0] if self._lines else 0
            raise DataError(f"{self.path}: file ends after line {last}, expected {what}. The "
                            "file is truncated: fetch it again")
        line = self._lines[self._next]
        self._next += 1
        return line

    def finish(self, what: str) -> None:
        if self._next < len(self._lines):
            number, fields = self._lines[self._next]
            raise DataError(f"{self.path}, line {number}: unexpected line {' '.join(fields)!r} "
                            f"after the {what} announced in the header")

    def fail(self, number: int, message: str) -> DataError:
        return DataError(f"{self.path}, line {number}: {message}")


def read_people(path: Path) -> list[list[tuple[str, int]]]:
    """Read an LFW people file and return its folds of (name, image count).

    ``people.txt`` starts with the number of folds, and each fold with its number of people.
    ``peopleDevTrain.txt`` and ``peopleDevTest.txt`` contain one block: the number of people,
    then the people. Only in ``people.txt`` is the second line a single number, and that is how
    the two forms are told apart.

    Raises:
        DataError: the file is missing or malformed; the message names the file and line.
    """
    reader = _LineReader(path)
    number, header = reader.take("the header line")
    if len(header) != 1:
        raise reader.fail(number, f"invalid header {' '.join(header)!r}, expected one number")
    if len(reader.peek_fields()) == 1:
        folds = _parse_count(reader.path, number, header[0], "number of folds", minimum=1)
        blocks = [_read_people_block(reader, None) for _ in range(folds)]
    else:
        blocks = [_read_people_block(reader, (number, header))]
    reader.finish(f"{len(blocks)} fold(s) of people")
    _check_unique_people(reader, blocks)
    return blocks


def _read_people_block(
    reader: _LineReader, header: tuple[int, list[str]] | None
) -> list[tuple[str, int]]:
    number, fields = header or reader.take("the number of people of a fold")
    if len(fields) != 1:
        raise reader.fail(number, f"expected the number of people of a fold, got "
                                  f"{' '.join(fields)!r}")
    count = _parse_count(reader.path, number, fields[0], "number of people")
    people = []
    for _ in range(count):
        number, fields = reader.take(f"{count} lines 'Name<TAB>count'")
        if len(fields) != 2:
            raise reader.fail(number, f"expected 'Name<TAB>count', got {' '.join(fields)!r}")
        images = _parse_count(reader.path, number, fields[1], "image count", minimum=1)
        people.append((fields[0], images))
    return people


def _check_unique_people(reader: _LineReader, blocks: list[list[tuple[str, int]]]) -> None:
    seen: set[str] = set()
    for block in blocks:
        for name, _ in block:
            if name in seen:
                raise DataError(f"{reader.path}: person {name!r} is listed twice, but the folds "
                                "of a people file must be disjoint; fetch the file again")
            seen.add(name)


def read_pairs(path: Path) -> list[list[Pair]]:
    """Read an LFW pairs file and return its folds of pairs.

    ``pairs.txt`` starts with ``folds<TAB>N``; each fold then has N matched lines
    ``Name<TAB>i<TAB>j`` followed by N mismatched lines ``Name1<TAB>i<TAB>Name2<TAB>j``.
    ``pairsDevTrain.txt`` and ``pairsDevTest.txt`` start with ``N`` alone and hold one fold.
    Within each fold, matched pairs come first, in file order.

    Raises:
        DataError: the file is missing or malformed; the message names the file and line.
    """
    reader = _LineReader(path)
    number, header = reader.take("the header line")
    if len(header) not in (1, 2):
        raise reader.fail(number, f"invalid header {' '.join(header)!r}, expected 'N' or "
                                  "'folds<TAB>N'")
    folds = 1
    if len(header) == 2:
        folds = _parse_count(reader.path, number, header[0], "number of folds", minimum=1)
    per_kind = _parse_count(reader.path, number, header[-1], "number of pairs", minimum=1)
    result = []
    for _ in range(folds):
        matched = [_read_pair(reader, same=True) for _ in range(per_kind)]
        mismatched = [_read_pair(reader, same=False) for _ in range(per_kind)]
        result.append(matched + mismatched)
    reader.finish(f"{folds} fold(s) of {per_kind} matched and {per_kind} mismatched pairs")
    return result


def _read_pair(reader: _LineReader, *, same: bool) -> Pair:
    expected = "'Name<TAB>i<TAB>j'" if same else "'Name1<TAB>i<TAB>Name2<TAB>j'"
    kind = "matched" if same else "mismatched"
    number, fields = reader.take(f"a {kind} pair {expected}")
    if len(fields) != (3 if same else 4):
        raise reader.fail(number, f"expected a {kind} pair {expected}, got {' '.join(fields)!r}")
    names = [fields[0], fields[0]] if same else [fields[0], fields[2]]
    indices = [fields[1], fields[2]] if same else [fields[1], fields[3]]
    a, b = (
        lfw_record(name, _parse_count(reader.path, number, index, "image number", minimum=1))
        for name, index in zip(names, indices)
    )
    if not same and a.identity == b.identity:
        raise reader.fail(number, f"mismatched pair names the same person {a.identity!r} twice")
    return Pair(a, b, same)


def split_pairs_into_folds(pairs: Sequence[Pair], folds: int) -> list[list[Pair]]:
    """Cut pairs into ``folds`` folds, each with a contiguous run of matched and mismatched pairs.

    Matched and mismatched pairs are cut separately in their given order, so each fold gets the
    same share of both. When a count does not divide evenly, the first folds get one more.

    Raises:
        DataError: fewer matched or mismatched pairs than folds.
    """
    matched = [pair for pair in pairs if pair.same]
    mismatched = [pair for pair in pairs if not pair.same]
    if min(len(matched), len(mismatched)) < folds:
        raise DataError(f"cannot cut {len(matched)} matched and {len(mismatched)} mismatched "
                        f"pairs into {folds} folds: each fold needs at least one of each")
    cut_matched = np.array_split(np.arange(len(matched)), folds)
    cut_mismatched = np.array_split(np.arange(len(mismatched)), folds)
    return [
        [matched[i] for i in same_part] + [mismatched[i] for i in other_part]
        for same_part, other_part in zip(cut_matched, cut_mismatched)
    ]


# --- plans ------------------------------------------------------------------------------------


def make_plan(
    data_dir: Path,
    images_root: Path,
    records: list[ImageRecord],
    protocol: str,
    *,
    fold: int = 0,
    holdout_identities: float = 0.25,
    train_images_per_identity: int = 5,
    seed: int = 0,
) -> EvaluationPlan:
    """Build the evaluation plan of ``protocol`` for a scanned dataset.

    Args:
        data_dir: dataset folder; the LFW protocol files are read from it.
        images_root: folder that the record paths are relative to; used in error messages.
        records: every image of the dataset, as listed by `edgeface.data.ingest.list_images`.
        protocol: ``auto``, ``lfw-view1``, ``lfw-view2`` or ``holdout``. ``auto`` picks
            ``lfw-view1`` when ``data_dir`` has ``peopleDevTrain.txt`` and ``pairsDevTest.txt``,
            and ``holdout`` otherwise.
        fold: test fold of ``lfw-view2``, 0 to 9 (default 0).
        holdout_identities: ``holdout`` only, fraction of identities never trained on, in
            [0, 1) (default 0.25).
        train_images_per_identity: ``holdout`` only, training images kept per trained identity
            (default 5); the others become identification probes.
        seed: ``holdout`` only, seed of every random choice (default 0).

    Raises:
        ConfigError: unknown protocol or an option out of range.
        DataError: missing or malformed protocol files, images that the pairs refer to but
            ``records`` lacks, or a dataset too small for the protocol.
    """
    data_dir = Path(data_dir)
    resolved = _resolve_protocol(data_dir, protocol)
    if resolved == "lfw-view1":
        plan = _lfw_view1_plan(data_dir, records)
    elif resolved == "lfw-view2":
        plan = _lfw_view2_plan(data_dir, records, fold)
    else:
        try:
            plan = _holdout_plan(records, holdout_identities=holdout_identities,
                                 train_images_per_identity=train_images_per_identity, seed=seed)
        except DatasetTooSmallError as error:
            # Planning reads only names, so a folder of corrupt files fails here first.
            _raise_if_unreadable(data_dir, Path(images_root), records, error)
            raise
    _check_pair_images_present(plan, records, Path(images_root))
    _check_no_training_image_evaluated(plan)
    _log_plan(plan)
    return plan


def _raise_if_unreadable(
    data_dir: Path, images_root: Path, records: list[ImageRecord], error: DataError
) -> None:
    """Decode a sample of `records` and raise a DataError naming the unreadable files, if any.

    At most `UNREADABLE_SAMPLE_SIZE` images are decoded, so a large dataset is not read here.
    When every sampled image is unreadable, that is the error. When only some are, `error`
    gets a pointer to `edgeface data inspect`. Returns when the sample decodes cleanly.
    """
    if len(records) <= UNREADABLE_SAMPLE_SIZE:
        sample = list(records)
    else:
        indices = np.linspace(0, len(records) - 1, UNREADABLE_SAMPLE_SIZE).round().astype(int)
        sample = [records[i] for i in sorted(set(indices.tolist()))]
    bad: list[tuple[str, str]] = []
    for record in sample:
        try:
            load_rgb(images_root / record.path)
        except BadImageError as bad_image:
            bad.append((record.path, bad_image.reason))
    if not bad:
        return
    examples = "; ".join(f"{path} ({reason})" for path, reason in bad[:5])
    noun = "image" if len(sample) == len(records) else "sampled image"
    counted = (f"{len(bad)} of {count_noun(len(sample), noun)} checked "
               f"{'is' if len(bad) == 1 else 'are'} unreadable")
    inspect = f"`edgeface data inspect {data_dir}` lists every unreadable image"
    if len(bad) == len(sample):
        raise DataError(
            f"{images_root}: no evaluation plan can be made because {counted}, for example "
            f"{examples}. Replace or remove those files; {inspect}"
        ) from error
    raise DataError(
        f"{error}. Also, {counted}, for example {examples}, which may be why: {inspect}"
    ) from error


def _resolve_protocol(data_dir: Path, protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown evaluation protocol {protocol!r}: use one of "
                          f"{', '.join(PROTOCOLS)}")
    if protocol != "auto":
        return protocol
    has_view1 = all((data_dir / name).is_file()
                    for name in ("peopleDevTrain.txt", "pairsDevTest.txt"))
    resolved = "lfw-view1" if has_view1 else "holdout"
    logger.info("evaluation protocol auto: using %s for %s", resolved, data_dir)
    return resolved


def _select_people(records: Iterable[ImageRecord], names: set[str]) -> list[ImageRecord]:
    return sorted((r for r in records if r.identity in names), key=lambda r: r.path)


def _lfw_view1_plan(data_dir: Path, records: list[ImageRecord]) -> EvaluationPlan:
    (train_people,) = read_people(data_dir / "peopleDevTrain.txt")
    (threshold_pairs,) = read_pairs(data_dir / "pairsDevTrain.txt")
    (test_pairs,) = read_pairs(data_dir / "pairsDevTest.txt")
    names = {name for name, _ in train_people}
    plan = EvaluationPlan(
        name="lfw-view1",
        train_records=_select_people(records, names),
        test_folds=split_pairs_into_folds(test_pairs, TEST_FOLDS),
        threshold_pairs=threshold_pairs,
    )
    _check_people_disjoint(plan, data_dir / "peopleDevTrain.txt")
    return plan


def _lfw_view2_plan(data_dir: Path, records: list[ImageRecord], fold: int) -> EvaluationPlan:
    people_folds = read_people(data_dir / "people.txt")
    pair_folds = read_pairs(data_dir / "pairs.txt")
    if len(people_folds) != len(pair_folds):
        raise DataError(f"{data_dir}: people.txt has {len(people_folds)} folds but pairs.txt "
                        f"has {len(pair_folds)}; fetch both files again")
    if not 0 <= fold < len(pair_folds):
        raise ConfigError(f"invalid fold {fold} for lfw-view2: choose a fold from 0 to "
                          f"{len(pair_folds) - 1}")
    names = {name for k, block in enumerate(people_folds) if k != fold for name, _ in block}
    threshold_pairs = [pair for k, pairs in enumerate(pair_folds) if k != fold for pair in pairs]
    plan = EvaluationPlan(
        name=f"lfw-view2-fold{fold}",
        train_records=_select_people(records, names),
        test_folds=[pair_folds[fold]],
        threshold_pairs=threshold_pairs,
    )
    _check_people_disjoint(plan, data_dir / "people.txt")
    return plan


def _check_people_disjoint(plan: EvaluationPlan, people_file: Path) -> None:
    """Raise DataError if a test pair shows a person whose images are used for training."""
    if not plan.train_records:
        raise DataError(f"none of the people in {people_file} has an image in the scanned "
                        "dataset: check that the images root is the LFW image folder")
    trained = {record.identity for record in plan.train_records}
    tested = {record.identity for fold in plan.test_folds for pair in fold
              for record in (pair.a, pair.b)}
    overlap = sorted(trained & tested)
    if overlap:
        raise DataError(f"{people_file} puts {len(overlap)} test people in the training split "
                        f"(for example {overlap[0]!r}); the protocol files do not match, fetch "
                        "them again")


def _check_pair_images_present(
    plan: EvaluationPlan, records: list[ImageRecord], images_root: Path
) -> None:
    available = {record.path for record in records}
    missing = sorted({record.path for record in plan.eval_records()} - available)
    if not missing:
        return
    shown = ", ".join(str(images_root / path) for path in missing[:_MISSING_SHOWN])
    more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
    raise DataError(f"{len(missing)} image(s) that plan {plan.name} evaluates on are missing "
                    f"from {images_root}: {shown}{more}. The dataset copy is incomplete: fetch "
                    "it again, or choose the holdout protocol")


def _check_no_training_image_evaluated(plan: EvaluationPlan) -> None:
    """Raise DataError if a probe or a test pair uses a training image.

    Gallery images are left out of the check, because the holdout gallery is the training set
    by design.
    """
    trained = {record.path for record in plan.train_records}
    evaluated = itertools.chain(
        plan.probes,
        (record for fold in plan.test_folds for pair in fold for record in (pair.a, pair.b)),
    )
    leaked = [record.path for record in evaluated if record.path in trained]
    if leaked:
        raise DataError(f"plan {plan.name} evaluates on {len(leaked)} training image(s), for "
                        f"example {leaked[0]}; the protocol files do not match, fetch them again")


def _log_plan(plan: EvaluationPlan) -> None:
    test_pairs = sum(len(fold) for fold in plan.test_folds)
    threshold = ("cross-validated over the test folds" if plan.threshold_pairs is None
                 else f"chosen on {count_noun(len(plan.threshold_pairs), 'pair')}")
    people = len({r.identity for r in plan.train_records})
    logger.info(
        "evaluation plan %s: %s of %s, %s in %s, threshold %s, %d gallery and %s",
        plan.name, count_noun(len(plan.train_records), "training image"),
        count_noun(people, "person", "people"), count_noun(test_pairs, "test pair"),
        count_noun(len(plan.test_folds), "fold"), threshold, len(plan.gallery),
        count_noun(len(plan.probes), "probe image"),
    )


# --- holdout ----------------------------------------------------------------------------------


def _holdout_plan(
    records: list[ImageRecord], *, holdout_identities: float, train_images_per_identity: int,
    seed: int,
) -> EvaluationPlan:
    """Build the seeded holdout plan for a dataset with one folder per identity.

    Rules for small identities: a trained identity with at most ``train_images_per_identity``
    images keeps all of them for training and has no probes. A held-out identity with a single
    image appears only in mismatched pairs.
    """
    _check_holdout_options(holdout_identities, train_images_per_identity)
    by_identity = _group_by_identity(records)
    rng = np.random.default_rng(seed)
    unseen, seen = _choose_unseen(sorted(by_identity), holdout_identities, rng)
    train: list[ImageRecord] = []
    probes_by_identity: dict[str, list[ImageRecord]] = {}
    for identity in seen:
        images = by_identity[identity]
        order = rng.permutation(len(images))
        train.extend(images[i] for i in sorted(order[:train_images_per_identity]))
        rest = sorted(order[train_images_per_identity:])
        probes_by_identity[identity] = [images[i] for i in rest]
    groups = {identity: by_identity[identity] for identity in unseen}
    groups.update((identity, probes) for identity, probes in probes_by_identity.items() if probes)
    test_folds = _holdout_folds(groups, rng, holdout_identities, train_images_per_identity)
    return EvaluationPlan(
        name="holdout",
        train_records=train,
        test_folds=test_folds,
        threshold_pairs=None,
        gallery=list(train),
        probes=[record for identity in seen for record in probes_by_identity[identity]],
    )


def _check_holdout_options(holdout_identities: float, train_images_per_identity: int) -> None:
    if not 0.0 <= holdout_identities < 1.0:
        raise ConfigError(f"invalid holdout-identities {holdout_identities}: expected a fraction "
                          "of identities in [0, 1), for example 0.25")
    if train_images_per_identity < 1:
        raise ConfigError(f"invalid train-images-per-identity {train_images_per_identity}: "
                          "expected an integer >= 1, for example 5")


def _group_by_identity(records: Iterable[ImageRecord]) -> dict[str, list[ImageRecord]]:
    """Group records by identity; identities and images are sorted so input order is irrelevant."""
    groups: dict[str, list[ImageRecord]] = {}
    for record in sorted(records, key=lambda r: (r.identity, r.path)):
        groups.setdefault(record.identity, []).append(record)
    return groups


def _choose_unseen(
    identities: list[str], fraction: float, rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    """Split sorted identities into (held out, trained), both sorted.

    round(fraction * N) identities are held out, and at least one when the fraction is positive.
    """
    if not identities:
        raise DataError("the dataset has no images: check the data directory")
    count = round(fraction * len(identities))
    if fraction > 0:
        count = max(count, 1)
    if count >= len(identities):
        raise DatasetTooSmallError(
            f"holdout-identities {fraction} holds out all "
            f"{count_noun(len(identities), 'identity', 'identities')} and leaves none to train "
            "on: lower holdout-identities, or add identity folders"
        )
    order = rng.permutation(len(identities))
    unseen = sorted(identities[i] for i in order[:count])
    seen = sorted(identities[i] for i in order[count:])
    return unseen, seen


def _holdout_folds(
    groups: dict[str, list[ImageRecord]], rng: np.random.Generator,
    holdout_identities: float, train_images_per_identity: int,
) -> list[list[Pair]]:
    """Form every matched pair within each group plus as many sampled mismatched pairs, in folds.

    NOTE: matched pairs grow with the square of the images per identity (an identity with 500
    evaluation images gives about 125,000 pairs); the LFW protocols avoid this for LFW itself.
    """
    matched = [Pair(a, b, True) for images in groups.values()
               for a, b in itertools.combinations(images, 2)]
    images = [record for group in groups.values() for record in group]
    labels = np.array([i for i, group in enumerate(groups.values()) for _ in group])
    possible_mismatched = len(images) * (len(images) - 1) // 2 - len(matched)
    if len(matched) < TEST_FOLDS or possible_mismatched < len(matched):
        raise DatasetTooSmallError(
            f"the holdout protocol found {count_noun(len(matched), 'matched pair')} and room "
            f"for {count_noun(possible_mismatched, 'mismatched pair')} among "
            f"{count_noun(len(images), 'evaluation image')} of "
            f"{count_noun(len(groups), 'identity', 'identities')}, but {TEST_FOLDS} folds need "
            f"at least {TEST_FOLDS} matched pairs and as many mismatched ones: raise "
            f"holdout-identities (now "
            f"{holdout_identities}) or lower train-images-per-identity (now "
            f"{train_images_per_identity})"
        )
    first, second = _sample_mismatched(labels, len(matched), possible_mismatched, rng)
    mismatched = [Pair(images[i], images[j], False) for i, j in zip(first, second)]
    matched = [matched[i] for i in rng.permutation(len(matched))]
    return split_pairs_into_folds(matched + mismatched, TEST_FOLDS)


def _sample_mismatched(
    labels: np.ndarray, count: int, possible: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``count`` distinct index pairs (i < j) with different labels, without replacement."""
    if possible <= 4 * count:
        # Few candidates: enumerate all of them rather than rejection-sample.
        first, second = np.triu_indices(len(labels), k=1)
        keep = labels[first] != labels[second]
        chosen = rng.choice(possible, size=count, replace=False)
        return first[keep][chosen], second[keep][chosen]
    chosen: dict[tuple[int, int], None] = {}
    while len(chosen) < count:
        draws = rng.integers(0, len(labels), size=(2 * count, 2))
        for i, j in draws.tolist():
            if labels[i] != labels[j] and len(chosen) < count:
                chosen.setdefault((min(i, j), max(i, j)), None)
    pairs = np.array(list(chosen), dtype=np.int64)
    return pairs[:, 0], pairs[:, 1]


# --- serialisation --------------------------------------------------------------------------


def _record(record: ImageRecord) -> list[str]:
    return [record.identity, record.path]


def _pair(pair: Pair) -> list[Any]:
    return [*_record(pair.a), *_record(pair.b), pair.same]


def plan_to_dict(plan: EvaluationPlan) -> dict[str, Any]:
    """Return `plan` as JSON-ready lists, for a pipeline artifact; `plan_from_dict` reverses it."""
    return {
        "name": plan.name,
        "train_records": [_record(r) for r in plan.train_records],
        "test_folds": [[_pair(p) for p in fold] for fold in plan.test_folds],
        "threshold_pairs": (None if plan.threshold_pairs is None
                            else [_pair(p) for p in plan.threshold_pairs]),
        "gallery": [_record(r) for r in plan.gallery],
        "probes": [_record(r) for r in plan.probes],
    }


def plan_from_dict(data: dict[str, Any]) -> EvaluationPlan:
    def records(items: list[list[str]]) -> list[ImageRecord]:
        return [ImageRecord(identity, path) for identity, path in items]

    def pairs(items: list[list[Any]]) -> list[Pair]:
        return [Pair(ImageRecord(a_id, a_path), ImageRecord(b_id, b_path), bool(same))
                for a_id, a_path, b_id, b_path, same in items]

    threshold = data["threshold_pairs"]
    return EvaluationPlan(
        name=data["name"], train_records=records(data["train_records"]),
        test_folds=[pairs(fold) for fold in data["test_folds"]],
        threshold_pairs=None if threshold is None else pairs(threshold),
        gallery=records(data["gallery"]), probes=records(data["probes"]),
    )
