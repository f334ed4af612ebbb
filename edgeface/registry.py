"""Promotion workflow of registered face models: gates, alias moves, rollback, locking.

A run registers each fused model as a new version with the alias `challenger`. Promotion moves
another alias (`champion` by default) to that version only when it passes three gates:

- finite metrics: every `edgeface.metric.*` tag and `edgeface.threshold` is a finite number,
  and the verification accuracy is present;
- ONNX parity: the version tag `edgeface.onnx_parity_ok` is true;
- accuracy: the verification accuracy is at least the current champion's minus
  `max_regression` (in accuracy units, 0.01 = one percentage point). Accuracies measured with
  another evaluation protocol (`edgeface.protocol`) or on other data
  (`edgeface.dataset_fingerprint`) are not comparable, so such a pair fails this gate unless
  the caller skips it (`skip_accuracy_gate`).

Every decision is written to the candidate's version tags (`edgeface.promotion.*`). Each
promoted alias keeps a stack of the versions it pointed to in the registered-model tag
`edgeface.alias_stack.<alias>`, and a log of moves in `edgeface.alias_log.<alias>`, so
`rollback` can point it back at the previous target.

MLflow has no compare-and-set for aliases, so every alias move and every registration runs
under `registry_lock`. With a SQLite store that is an `fcntl` lock file beside the database.
With any other store (a tracking server) it is a lock registered model, which only one client
can create at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeface import tracking
from edgeface.errors import ConfigError, LockTimeoutError, RegistryError
from edgeface.tracking import ModelRegistry, ModelVersionInfo, sqlite_database

logger = logging.getLogger(__name__)

DEFAULT_TARGET_ALIAS = "champion"
# The backbone state dict file attached to a registered version, for warm starts.
BACKBONE_FILE = "backbone.pt"
ACCURACY_TAG = "edgeface.metric.verification_accuracy_mean"
METRIC_TAG_PREFIX = "edgeface.metric."
THRESHOLD_TAG = "edgeface.threshold"
PARITY_TAG = "edgeface.onnx_parity_ok"
# Tags that must be equal for two versions' accuracies to be comparable, with their names in
# messages.
EVALUATION_TAGS = {"edgeface.protocol": "protocol",
                   "edgeface.dataset_fingerprint": "dataset fingerprint"}
PROMOTION_TAG_PREFIX = "edgeface.promotion."
ROLLBACK_TAG_PREFIX = "edgeface.rollback."
ALIAS_STACK_TAG = "edgeface.alias_stack.{alias}"
ALIAS_LOG_TAG = "edgeface.alias_log.{alias}"
# Entries kept in an alias's stack and log. Registered-model tag values may hold 100,000
# characters in MLflow 3.17.2, far more than 200 short entries need.
MAX_HISTORY_ENTRIES = 200

# The lock registered model of `name` on a tracking server is `name` + this suffix.
LOCK_MODEL_SUFFIX = ".edgeface-lock"
LOCK_OWNER_TAG = "edgeface.lock.owner"
LOCK_EXPIRES_TAG = "edgeface.lock.expires"
DEFAULT_LOCK_TIMEOUT_S = 120.0
# Seconds after which a server lock counts as abandoned (its holder crashed). A registration
# uploads the model while it holds the lock, so this is well above an upload's duration.
DEFAULT_LOCK_TTL_S = 600.0
_LOCK_POLL_S = 0.1

_TRUE_TEXT = frozenset({"true", "1", "yes"})


def open_store(tracking_uri: str | None) -> ModelRegistry:
    """Return a `ModelRegistry` for `tracking_uri`, resolved by `tracking.resolve_tracking_uri`.

    Unlike MLflow, this does not create an empty database when a SQLite URI names a file that
    does not exist, because reading models from an empty store only hides a wrong path.

    Raises:
        RegistryError: the URI names a SQLite file that does not exist.
        ConfigError: the URI is empty or has no scheme.
    """
    uri = tracking.resolve_tracking_uri(tracking_uri, Path.cwd())
    database = sqlite_database(uri)
    if database is not None and not database.is_file():
        raise RegistryError(_missing_store_message(tracking_uri, uri, database))
    return ModelRegistry(uri)


def _missing_store_message(tracking_uri: str | None, uri: str, database: Path) -> str:
    """Describe a missing SQLite store, naming the setting it came from and not suggesting
    a setting that the user already gave."""
    if tracking_uri is not None:
        return (
            f"MLflow store not found: --tracking-uri {uri} names {database}, which does not "
            "exist. Check the path, or run `edgeface run` with this tracking URI first to "
            "create the store"
        )
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return (
            f"MLflow store not found: MLFLOW_TRACKING_URI={uri} names {database}, which does "
            "not exist. Check the path, or run `edgeface run` with this tracking URI first to "
            "create the store"
        )
    return (
        f"MLflow store not found at {database}: run `edgeface run` in this folder first, or "
        "pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store that contains your "
        "models"
    )


# --------------------------------------------------------------------------------------------
# Locking
# --------------------------------------------------------------------------------------------


def _lock_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{uuid.uuid4().hex[:8]}"


@contextmanager
def registry_lock(
    registry: ModelRegistry,
    model_name: str,
    *,
    timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    ttl_s: float = DEFAULT_LOCK_TTL_S,
) -> Iterator[str]:
    """Hold an exclusive lock on the aliases and registrations of `model_name`.

    Yields the owner id. With a SQLite store the lock is `fcntl.flock` on the file
    `<database>.registry.lock`, which the kernel releases if the process dies. It covers every
    model of the store, because promotions and registrations are short. With any other
    store it is the registered model `<model_name>.edgeface-lock`, which the store lets only one
    client create. That model carries its owner and expiry time (Unix seconds) as tags. A
    lock older than `ttl_s` seconds is taken over, on the assumption that its holder died.

    Raises:
        RegistryError: the lock was not acquired within `timeout_s` seconds.
    """
    database = sqlite_database(registry.tracking_uri)
    if database is not None:
        with _file_lock(database.with_name(database.name + ".registry.lock"), timeout_s) as owner:
            yield owner
    else:
        with _model_lock(registry, model_name + LOCK_MODEL_SUFFIX, timeout_s, ttl_s) as owner:
            yield owner


@contextmanager
def _file_lock(path: Path, timeout_s: float) -> Iterator[str]:
    import fcntl

    owner = _lock_owner()
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    # Each call opens its own file description, so threads of one process exclude each other.
    with open(path, "a+", encoding="utf-8") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise LockTimeoutError(
                        f"timed out after {timeout_s:g} s waiting for the registry lock {path} "
                        f"(held by {holder}): wait for the other promotion or registration to "
                        "finish, then retry"
                    ) from None
                time.sleep(_LOCK_POLL_S)
        handle.seek(0)
        handle.truncate()
        handle.write(owner + "\n")
        handle.flush()
        logger.debug("acquired registry lock %s as %s", path, owner)
        try:
            yield owner
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _model_lock(
    registry: ModelRegistry, lock_name: str, timeout_s: float, ttl_s: float
) -> Iterator[str]:
    owner = _lock_owner()
    deadline = time.monotonic() + timeout_s
    holder: dict[str, str] = {}
    waiting_logged = False
    while not _try_create_lock(registry, lock_name, owner, ttl_s, holder):
        if time.monotonic() > deadline:
            raise LockTimeoutError(
                f"timed out after {timeout_s:g} s waiting for the registry lock "
                f"{lock_name!r} at {registry.tracking_uri}, held by {_describe_holder(holder)}: "
                "wait for the other promotion or registration to finish, then retry. If its "
                "holder crashed, the lock is taken over once it expires, or delete the "
                f"registered model {lock_name!r} (MLflow UI or MlflowClient."
                "delete_registered_model) when sure that no client holds it"
            )
        if holder and not waiting_logged:
            logger.info("waiting up to %g s for the registry lock %r, held by %s", timeout_s,
                        lock_name, _describe_holder(holder))
            waiting_logged = True
        # Jitter keeps racing clients from retrying in lockstep.
        time.sleep(_LOCK_POLL_S * (1.0 + random.random()))
    logger.debug("acquired registry lock %r as %s", lock_name, owner)
    try:
        yield owner
    finally:
        _release_model_lock(registry, lock_name, owner)


def _describe_holder(holder: dict[str, str]) -> str:
    """Return "OWNER until TIME" for the tags of a lock model, as far as they are known."""
    owner = holder.get(LOCK_OWNER_TAG, "an unknown owner")
    try:
        return f"{owner} until {_iso(float(holder[LOCK_EXPIRES_TAG]))}"
    except (KeyError, ValueError):
        return f"{owner} with no valid expiry time"


def _try_create_lock(registry: ModelRegistry, lock_name: str, owner: str, ttl_s: float,
                     holder: dict[str, str] | None = None) -> bool:
    """Try once to take the lock; on failure copy the current holder's tags into `holder`."""
    tags = {LOCK_OWNER_TAG: owner, LOCK_EXPIRES_TAG: f"{time.time() + ttl_s:.3f}"}
    if registry.create_model_if_absent(lock_name, tags):
        return True
    try:
        existing = registry.get_model_tags(lock_name)
    except RegistryError:
        return False  # released between our create and this read: try again
    if holder is not None:
        holder.update({key: existing[key] for key in (LOCK_OWNER_TAG, LOCK_EXPIRES_TAG)
                       if key in existing})
    try:
        expires = float(existing.get(LOCK_EXPIRES_TAG, "inf"))
    except ValueError:
        expires = math.inf
    if time.time() > expires:
        # NOTE: two clients that both see the same expired lock can both delete it, and the
        # second delete may remove the first client's new lock. The read-back in
        # ModelRegistry.set_alias still detects a lost alias move.
        logger.warning(
            "taking over registry lock %r of %s, which expired at %s",
            lock_name, existing.get(LOCK_OWNER_TAG, "an unknown owner"), _iso(expires),
        )
        registry.delete_model(lock_name)
    return False


def _release_model_lock(registry: ModelRegistry, lock_name: str, owner: str) -> None:
    try:
        holder = registry.get_model_tags(lock_name).get(LOCK_OWNER_TAG)
    except RegistryError:
        logger.warning("registry lock %r was already gone at release", lock_name)
        return
    if holder != owner:
        logger.warning(
            "registry lock %r is now held by %s, not by this client: leaving it in place",
            lock_name, holder,
        )
        return
    registry.delete_model(lock_name)
    logger.debug("released registry lock %r", lock_name)


def is_lock_model(name: str) -> bool:
    """Return whether `name` is a lock registered model made by `registry_lock`."""
    return name.endswith(LOCK_MODEL_SUFFIX)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def register_version(
    tracker: tracking.Tracker,
    parent_run_id: str,
    onnx_path: str | os.PathLike[str],
    model_name: str,
    *,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    **options: Any,
) -> ModelVersionInfo:
    """Call `tracking.register_onnx_model` under `registry_lock`.

    The lookup of an existing version for `parent_run_id` and the creation of a new one then
    happen under one lock, so concurrent retries of the same registration create one version.
    `options` are the keyword arguments of `tracking.register_onnx_model`.

    Raises:
        RegistryError: see `tracking.register_onnx_model`, or the lock timed out.
    """
    tracking.check_alias(options.get("alias", tracking.DEFAULT_ALIAS))
    with registry_lock(tracker.registry, model_name, timeout_s=lock_timeout_s):
        return tracking.register_onnx_model(
            tracker, parent_run_id, onnx_path, model_name, **options
        )


def warm_start_state(tracking_uri: str, model_name: str, alias: str, seeded: dict,
                     workdir: Path) -> tuple[dict, str]:
    """Return the backbone state to start training from, and where it came from.

    The registered version `models:/<model_name>@<alias>` is used when it exists, carries the
    backbone state dict as the extra file `backbone.pt` (both `edgeface run` and the pipeline
    attach it) and has the keys and shapes of `seeded`. Otherwise `seeded` is returned, with
    the reason in the source text and the log.

    Raises:
        TrackingError: the tracking server is unreachable.
    """
    import torch

    try:
        version = ModelRegistry(tracking_uri).get_version(model_name, alias)
    except RegistryError as error:
        logger.info("no warm start from models:/%s@%s: %s", model_name, alias, error)
        return seeded, f"seeded initial state (models:/{model_name}@{alias} not found)"
    folder = tracking.download_model(tracking_uri, version.model_uri, workdir)
    state_path = folder / "extra_files" / BACKBONE_FILE
    if not state_path.is_file():
        logger.warning("%s has no %s extra file: starting from the seeded state",
                       version.model_uri, BACKBONE_FILE)
        return seeded, f"seeded initial state ({version.model_uri} has no backbone state)"
    state = torch.load(state_path, weights_only=True)
    mismatch = _state_mismatch(seeded, state)
    if mismatch:
        logger.warning("%s does not fit the configured model (%s): starting from the seeded "
                       "state", version.model_uri, mismatch)
        return seeded, f"seeded initial state ({version.model_uri} does not fit: {mismatch})"
    logger.info("warm start from %s (alias %s)", version.model_uri, alias)
    return state, version.model_uri


def _state_mismatch(expected: dict, actual: dict) -> str:
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    if missing or unexpected:
        return f"{len(missing)} missing and {len(unexpected)} unexpected keys"
    for key, tensor in expected.items():
        if tuple(actual[key].shape) != tuple(tensor.shape):
            return f"{key} has shape {tuple(actual[key].shape)}, expected {tuple(tensor.shape)}"
    return ""


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    """Outcome of one promotion gate.

    `shortfall` is how far the candidate missed the accuracy gate, in accuracy units, and
    None for the other gates and for passed gates.
    """

    name: str
    passed: bool
    detail: str
    shortfall: float | None = None


@dataclass(frozen=True)
class PromotionDecision:
    """What `promote` decided and the numbers it compared.

    `outcome` is `promoted`, `rejected` or `unchanged` (the alias already points to the
    candidate). A dry run reports the outcome that a real run would have, with `dry_run` True.
    """

    model_name: str
    alias: str
    source: str
    candidate_version: int
    previous_version: int | None
    outcome: str
    gates: tuple[GateResult, ...]
    candidate_accuracy: float | None
    champion_accuracy: float | None
    max_regression: float
    dry_run: bool
    decided_at: str

    @property
    def accepted(self) -> bool:
        """True when the alias points (or, in a dry run, would point) at the candidate."""
        return self.outcome in ("promoted", "unchanged")

    @property
    def failed_gates(self) -> list[GateResult]:
        return [gate for gate in self.gates if not gate.passed]

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["gates"] = [asdict(gate) for gate in self.gates]
        result["accepted"] = self.accepted
        return result


def _parse_float(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return math.nan


def is_true(text: str | None) -> bool:
    """Return whether a tag value spells true (`True`, `true`, `1`, `yes`)."""
    return text is not None and text.strip().lower() in _TRUE_TEXT


def _finite_gate(tags: Mapping[str, str]) -> GateResult:
    keys = sorted(key for key in tags if key.startswith(METRIC_TAG_PREFIX))
    keys += [THRESHOLD_TAG] if THRESHOLD_TAG in tags else []
    bad = [f"{key}={tags[key]}" for key in keys if not math.isfinite(_parse_float(tags[key]))]
    if ACCURACY_TAG not in tags:
        return GateResult("finite_metrics", False, f"the version has no {ACCURACY_TAG} tag")
    if bad:
        return GateResult("finite_metrics", False, "non-finite metrics: " + ", ".join(bad))
    return GateResult("finite_metrics", True, f"{len(keys)} metrics are finite")


def _parity_gate(tags: Mapping[str, str]) -> GateResult:
    value = tags.get(PARITY_TAG)
    if value is None:
        return GateResult("onnx_parity", False, f"the version has no {PARITY_TAG} tag")
    if not is_true(value):
        diff = tags.get("edgeface.onnx_max_abs_diff", "unknown")
        return GateResult(
            "onnx_parity", False, f"ONNX parity failed ({PARITY_TAG}={value}, max abs diff {diff})"
        )
    return GateResult("onnx_parity", True, "ONNX parity passed")


def _evaluation_mismatch(candidate: ModelVersionInfo, champion: ModelVersionInfo) -> str | None:
    """Return why the two versions' accuracies are not comparable, or None when they are.

    A version without the protocol or fingerprint tags (registered by an older edgeface) is
    compared as before, with a logged warning, because nothing shows that it differs.
    """
    differences, missing = [], []
    for tag, label in EVALUATION_TAGS.items():
        ours, theirs = candidate.tags.get(tag), champion.tags.get(tag)
        if ours is None or theirs is None:
            missing.append(tag)
        elif ours != theirs:
            differences.append(f"{label} {ours!r} versus {theirs!r}")
    if missing:
        logger.warning(
            "cannot check that versions %d and %d of %s were evaluated on the same data: %s "
            "missing on one of them, so their accuracies are compared as they are",
            candidate.version, champion.version, candidate.name, ", ".join(missing))
    if not differences:
        return None
    return (f"version {candidate.version} and current version {champion.version} were "
            f"evaluated differently ({'; '.join(differences)}), so their accuracies are not "
            "comparable: evaluate both on the same dataset and protocol, or skip this gate "
            "with --skip-accuracy-gate")


def _accuracy_gate(
    candidate: ModelVersionInfo, champion: ModelVersionInfo | None, max_regression: float,
    skip: bool = False,
) -> tuple[GateResult, float | None]:
    """Compare accuracies and return the gate with the champion's accuracy."""
    if champion is None:
        return GateResult("accuracy", True, "no current version to compare with"), None
    champion_accuracy = _parse_float(champion.tags.get(ACCURACY_TAG))
    if skip:
        detail = f"skipped (--skip-accuracy-gate), not compared with version {champion.version}"
        return GateResult("accuracy", True, detail), champion_accuracy
    if champion_accuracy is None or not math.isfinite(champion_accuracy):
        detail = (f"current version {champion.version} has no finite accuracy "
                  f"({ACCURACY_TAG}={champion.tags.get(ACCURACY_TAG)}): nothing to compare")
        return GateResult("accuracy", True, detail), None
    mismatch = _evaluation_mismatch(candidate, champion)
    if mismatch is not None:
        return GateResult("accuracy", False, mismatch), champion_accuracy
    return _compare_accuracy(_parse_float(candidate.tags.get(ACCURACY_TAG)), champion,
                             champion_accuracy, max_regression)


def _compare_accuracy(
    candidate: float | None, champion: ModelVersionInfo, champion_accuracy: float,
    max_regression: float,
) -> tuple[GateResult, float | None]:
    if candidate is None or not math.isfinite(candidate):
        failed = GateResult("accuracy", False, f"candidate accuracy is {candidate}")
        return failed, champion_accuracy
    required = champion_accuracy - max_regression
    # A tolerance of 1e-12 absorbs the rounding of `champion - max_regression`.
    if candidate >= required - 1e-12:
        detail = (f"accuracy {candidate:.4f} >= {required:.4f} (version {champion.version}: "
                  f"{champion_accuracy:.4f} minus max regression {max_regression:g})")
        return GateResult("accuracy", True, detail), champion_accuracy
    shortfall = required - candidate
    detail = (f"accuracy {candidate:.4f} is {shortfall:.4f} below the required {required:.4f} "
              f"(version {champion.version}: {champion_accuracy:.4f} minus max regression "
              f"{max_regression:g})")
    return GateResult("accuracy", False, detail, shortfall=shortfall), champion_accuracy


def evaluate_gates(
    candidate: ModelVersionInfo, champion: ModelVersionInfo | None, max_regression: float,
    skip_accuracy_gate: bool = False,
) -> tuple[tuple[GateResult, ...], float | None, float | None]:
    """Run the three gates and return them with the candidate's and the champion's accuracy.

    With `skip_accuracy_gate` the accuracy gate passes without comparing anything.
    """
    candidate_accuracy = _parse_float(candidate.tags.get(ACCURACY_TAG))
    accuracy, champion_accuracy = _accuracy_gate(candidate, champion, max_regression,
                                                 skip_accuracy_gate)
    gates = (_finite_gate(candidate.tags), _parity_gate(candidate.tags), accuracy)
    return gates, candidate_accuracy, champion_accuracy


# --------------------------------------------------------------------------------------------
# Promotion and rollback
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _iso(unix_seconds: float) -> str:
    if not math.isfinite(unix_seconds):
        return "never"
    return datetime.fromtimestamp(unix_seconds, timezone.utc).isoformat(timespec="seconds")


def _check_max_regression(max_regression: float) -> None:
    if not isinstance(max_regression, (int, float)) or isinstance(max_regression, bool) \
            or not math.isfinite(max_regression) or not 0.0 <= max_regression <= 1.0:
        raise ConfigError(
            f"invalid max regression {max_regression!r}: use an accuracy difference from 0 "
            "to 1, for example 0.01 for one percentage point"
        )


def _check_source(source: str | int) -> str:
    text = str(source).strip()
    if not text.isdigit():
        tracking.check_alias(text)
    return text


def promote(
    registry: ModelRegistry,
    model_name: str,
    *,
    source: str | int = tracking.DEFAULT_ALIAS,
    alias: str = DEFAULT_TARGET_ALIAS,
    max_regression: float = 0.0,
    skip_accuracy_gate: bool = False,
    dry_run: bool = False,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> PromotionDecision:
    """Point `alias` at the version that `source` (an alias or a version number) names.

    The alias moves only when every gate passes (see the module docstring), and with
    `skip_accuracy_gate` the accuracy gate always passes. When the alias
    already points to the candidate, nothing changes (outcome `unchanged`). Otherwise the
    decision and the compared numbers are written to the candidate's `edgeface.promotion.*`
    version tags, and a promotion pushes the version onto the alias's stack. A dry run takes
    no lock and writes nothing. A rejection is returned, not raised: check
    `decision.accepted`.

    Raises:
        ConfigError: `max_regression` is outside 0..1.
        RegistryError: reserved or invalid alias names, a model, version or alias that does not
            exist, the lock timed out, or another writer moved the alias.
    """
    tracking.check_alias(alias)
    source_text = _check_source(source)
    _check_max_regression(max_regression)
    if dry_run:
        return _decide(registry, model_name, source_text, alias, max_regression,
                       skip_accuracy_gate, dry_run=True)
    with registry_lock(registry, model_name, timeout_s=lock_timeout_s):
        decision = _decide(registry, model_name, source_text, alias, max_regression,
                           skip_accuracy_gate, dry_run=False)
        if decision.outcome == "unchanged":
            return decision
        # The alias moves first, so a move that fails its read-back records nothing.
        if decision.outcome == "promoted":
            registry.set_alias(model_name, alias, decision.candidate_version)
            _push_history(registry, decision)
        _record_decision(registry, decision)
    _log_decision(decision)
    return decision


def _decide(
    registry: ModelRegistry, model_name: str, source: str, alias: str, max_regression: float,
    skip_accuracy_gate: bool, *, dry_run: bool,
) -> PromotionDecision:
    _check_alias_case(registry.get_aliases(model_name), model_name, alias)
    candidate = registry.get_version(model_name, source)
    previous = registry.get_alias_target(model_name, alias)
    champion = registry.get_version(model_name, previous) if previous is not None else None
    gates, candidate_accuracy, champion_accuracy = evaluate_gates(
        candidate, champion, max_regression, skip_accuracy_gate
    )
    if previous == candidate.version:
        outcome = "unchanged"
    else:
        outcome = "promoted" if all(gate.passed for gate in gates) else "rejected"
    return PromotionDecision(
        model_name=model_name, alias=alias, source=source, candidate_version=candidate.version,
        previous_version=previous, outcome=outcome, gates=gates,
        candidate_accuracy=candidate_accuracy, champion_accuracy=champion_accuracy,
        max_regression=float(max_regression), dry_run=dry_run, decided_at=_now(),
    )


def _check_alias_case(aliases: Mapping[str, int], model_name: str, alias: str) -> None:
    """Raise RegistryError when `alias` differs only in letter case from an existing alias.

    MLflow aliases are case-sensitive, so promoting to `Champion` would create a second alias
    beside `champion` instead of moving it.
    """
    if alias in aliases:
        return
    for existing in sorted(aliases):
        if existing != alias and existing.lower() == alias.lower():
            raise RegistryError(
                f"alias {alias!r} differs only in case from the existing alias {existing!r} of "
                f"{model_name!r} (version {aliases[existing]}): aliases are case-sensitive, so "
                f"this would create a second alias. Use --to {existing} to move it"
            )


def _record_decision(registry: ModelRegistry, decision: PromotionDecision) -> None:
    failed = decision.failed_gates
    tags = {
        "decision": decision.outcome,
        "alias": decision.alias,
        "time": decision.decided_at,
        "candidate_accuracy": decision.candidate_accuracy,
        "compared_version": decision.previous_version if decision.previous_version else "none",
        "compared_accuracy": decision.champion_accuracy,
        "max_regression": decision.max_regression,
        "failed_gates": ",".join(gate.name for gate in failed) or "none",
        "detail": "; ".join(f"{gate.name}: {gate.detail}" for gate in decision.gates),
    }
    registry.set_version_tags(
        decision.model_name, decision.candidate_version,
        {PROMOTION_TAG_PREFIX + key: value for key, value in tags.items()},
    )


def _log_decision(decision: PromotionDecision) -> None:
    if decision.outcome == "promoted":
        logger.info(
            "promoted %s version %d to alias %s (was %s)", decision.model_name,
            decision.candidate_version, decision.alias, decision.previous_version or "unset",
        )
    elif decision.outcome == "rejected":
        logger.warning(
            "rejected promotion of %s version %d to alias %s: %s", decision.model_name,
            decision.candidate_version, decision.alias,
            "; ".join(gate.detail for gate in decision.failed_gates),
        )


@dataclass(frozen=True)
class AliasHistory:
    """The versions an alias pointed to, oldest first (`stack`), and its log of moves."""

    stack: list[int] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)


def read_alias_history(registry: ModelRegistry, model_name: str, alias: str) -> AliasHistory:
    """Read the stack and log of `alias` from the registered model's tags.

    Raises:
        RegistryError: the registered model is not found, or a history tag is not valid JSON.
    """
    tags = registry.get_model_tags(model_name)
    stack_key, log_key = ALIAS_STACK_TAG.format(alias=alias), ALIAS_LOG_TAG.format(alias=alias)
    try:
        stack = [int(v) for v in json.loads(tags.get(stack_key, "[]"))]
        log = list(json.loads(tags.get(log_key, "[]")))
    except (ValueError, TypeError) as error:
        raise RegistryError(
            f"registered model {model_name!r} has an unreadable history tag {stack_key} or "
            f"{log_key} ({error}): delete both tags to start a new history"
        ) from error
    return AliasHistory(stack=stack, log=log)


def _write_alias_history(
    registry: ModelRegistry, model_name: str, alias: str, history: AliasHistory
) -> None:
    registry.set_model_tag(
        model_name, ALIAS_STACK_TAG.format(alias=alias),
        json.dumps(history.stack[-MAX_HISTORY_ENTRIES:]),
    )
    registry.set_model_tag(
        model_name, ALIAS_LOG_TAG.format(alias=alias),
        json.dumps(history.log[-MAX_HISTORY_ENTRIES:], separators=(",", ":")),
    )


def _push_history(registry: ModelRegistry, decision: PromotionDecision) -> None:
    history = read_alias_history(registry, decision.model_name, decision.alias)
    stack = list(history.stack)
    previous = decision.previous_version
    if previous is not None and (not stack or stack[-1] != previous):
        # The alias was set outside edgeface: keep that version so rollback can return to it.
        stack.append(previous)
    stack.append(decision.candidate_version)
    entry = {"action": "promote", "version": decision.candidate_version, "previous": previous,
             "time": decision.decided_at}
    _write_alias_history(
        registry, decision.model_name, decision.alias,
        AliasHistory(stack=stack, log=[*history.log, entry]),
    )


@dataclass(frozen=True)
class RollbackResult:
    """An alias moved back from `from_version` to `to_version`, unless a dry run."""

    model_name: str
    alias: str
    from_version: int
    to_version: int
    dry_run: bool
    decided_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rollback(
    registry: ModelRegistry,
    model_name: str,
    *,
    alias: str = DEFAULT_TARGET_ALIAS,
    dry_run: bool = False,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> RollbackResult:
    """Point `alias` back at the version it pointed to before its current one.

    The previous version comes from the alias's stack (written by `promote`). The move is
    recorded in the alias's log and as `edgeface.rollback.*` tags on both versions. If the
    alias was moved outside edgeface, its current target counts as the top of the stack.

    Raises:
        RegistryError: the alias is reserved, invalid or not set, no earlier version is
            recorded, the earlier version no longer exists, or the lock timed out.
    """
    tracking.check_alias(alias)
    if dry_run:
        return _plan_rollback(registry, model_name, alias, dry_run=True)[0]
    with registry_lock(registry, model_name, timeout_s=lock_timeout_s):
        result, history = _plan_rollback(registry, model_name, alias, dry_run=False)
        registry.set_alias(model_name, alias, result.to_version)
        entry = {"action": "rollback", "version": result.to_version,
                 "previous": result.from_version, "time": result.decided_at}
        _write_alias_history(
            registry, model_name, alias,
            AliasHistory(stack=history.stack[:-1], log=[*history.log, entry]),
        )
        _record_rollback(registry, result)
    logger.info("rolled back alias %s of %s from version %d to version %d", alias, model_name,
                result.from_version, result.to_version)
    return result


def _plan_rollback(
    registry: ModelRegistry, model_name: str, alias: str, *, dry_run: bool
) -> tuple[RollbackResult, AliasHistory]:
    """Return the rollback to perform and the alias history with the current target on top."""
    current = registry.get_alias_target(model_name, alias)
    if current is None:
        raise RegistryError(
            f"alias {alias!r} of {model_name!r} is not set, so there is nothing to roll back: "
            f"point it at a version with `edgeface promote {model_name} --to {alias}`"
        )
    history = read_alias_history(registry, model_name, alias)
    stack = list(history.stack)
    if not stack or stack[-1] != current:
        logger.warning(
            "alias %s of %s points to version %d, which its history does not end with: it was "
            "moved outside edgeface", alias, model_name, current,
        )
        stack.append(current)
    if len(stack) < 2:
        raise RegistryError(
            f"no earlier version is recorded for alias {alias!r} of {model_name!r} (it points "
            f"to version {current}): promote a version explicitly with `edgeface promote "
            f"{model_name} --from VERSION --to {alias}`"
        )
    target = stack[-2]
    try:
        registry.get_version(model_name, target)
    except RegistryError as error:
        raise RegistryError(
            f"cannot roll back alias {alias!r} of {model_name!r} to version {target}: {error}. "
            f"Promote an existing version with `edgeface promote {model_name} --from VERSION "
            f"--to {alias}`"
        ) from error
    result = RollbackResult(model_name=model_name, alias=alias, from_version=current,
                            to_version=target, dry_run=dry_run, decided_at=_now())
    return result, AliasHistory(stack=stack, log=history.log)


def _record_rollback(registry: ModelRegistry, result: RollbackResult) -> None:
    registry.set_version_tags(result.model_name, result.to_version, {
        ROLLBACK_TAG_PREFIX + "restored_at": result.decided_at,
        ROLLBACK_TAG_PREFIX + "alias": result.alias,
        ROLLBACK_TAG_PREFIX + "replaced_version": result.from_version,
    })
    registry.set_version_tags(result.model_name, result.from_version, {
        ROLLBACK_TAG_PREFIX + "removed_at": result.decided_at,
        ROLLBACK_TAG_PREFIX + "alias": result.alias,
        ROLLBACK_TAG_PREFIX + "restored_version": result.to_version,
    })


# --------------------------------------------------------------------------------------------
# Descriptions for `edgeface models`
# --------------------------------------------------------------------------------------------

LINEAGE_TAGS = {
    "dataset_fingerprint": "edgeface.dataset_fingerprint",
    "config_hash": "edgeface.config_hash",
    "code_version": "edgeface.code_version",
    "partition": "edgeface.partition",
    "nodes": "edgeface.nodes",
    "rounds": "edgeface.rounds",
    "protocol": "edgeface.protocol",
    "parent_run_id": tracking.PARENT_RUN_VERSION_TAG,
}


# Tags that contain numbers, with their type. MLflow stores every tag as a string, so
# `describe_version` converts these back. Keys are relative to their group's prefix.
INT8_NUMBER_FIELDS = {"verification_accuracy": float, "accuracy_delta": float,
                      "latency_p50_ms": float, "threshold": float, "size_bytes": int,
                      "calibration_images": int}
FP32_NUMBER_FIELDS = {"verification_accuracy": float, "latency_p50_ms": float, "size_bytes": int}
LINEAGE_NUMBER_FIELDS = {"nodes": int, "rounds": int}
ONNX_NUMBER_FIELDS = {"image_size": int, "embedding_dim": int}


def _group(tags: Mapping[str, str], prefix: str) -> dict[str, str]:
    return {key[len(prefix):]: value for key, value in sorted(tags.items())
            if key.startswith(prefix)}


def _convert_numbers(values: dict[str, Any], fields: Mapping[str, type]) -> dict[str, Any]:
    """Convert the tag values named in `fields` to int or float.

    A value that does not parse as its type (an older or hand-written tag) stays the tag's
    string, so the description still shows what is stored.
    """
    converted = dict(values)
    for key, number_type in fields.items():
        text = values.get(key)
        if not isinstance(text, str):
            continue
        try:
            converted[key] = number_type(text)
        except ValueError:
            continue
    return converted


def describe_version(info: ModelVersionInfo) -> dict[str, Any]:
    """Group a version's tags into metrics, lineage, ONNX, int8 and fp32 measurements,
    promotion and rollback."""
    tags = info.tags
    metrics = {key: _parse_float(value) for key, value in _group(tags, METRIC_TAG_PREFIX).items()}
    return {
        "name": info.name,
        "version": info.version,
        "model_uri": info.model_uri,
        "aliases": list(info.aliases),
        "run_id": info.run_id,
        "metrics": metrics,
        "threshold": _parse_float(tags.get(THRESHOLD_TAG)),
        "lineage": _convert_numbers(
            {label: tags.get(key) for label, key in LINEAGE_TAGS.items()}, LINEAGE_NUMBER_FIELDS
        ),
        "onnx": _convert_numbers({
            "parity_ok": is_true(tags.get(PARITY_TAG)) if PARITY_TAG in tags else None,
            "max_abs_diff": _parse_float(tags.get("edgeface.onnx_max_abs_diff")),
            "image_size": tags.get("edgeface.image_size"),
            "embedding_dim": tags.get("edgeface.embedding_dim"),
            "crop": tags.get("edgeface.crop"),
        }, ONNX_NUMBER_FIELDS),
        "int8": _convert_numbers(_group(tags, "edgeface.int8."), INT8_NUMBER_FIELDS),
        "fp32": _convert_numbers(_group(tags, "edgeface.fp32."), FP32_NUMBER_FIELDS),
        "promotion": _group(tags, PROMOTION_TAG_PREFIX),
        "rollback": _group(tags, ROLLBACK_TAG_PREFIX),
    }
