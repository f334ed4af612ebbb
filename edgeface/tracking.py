"""MLflow tracking and model registry calls for edgeface runs.

This is the only module that imports mlflow. It imports it lazily, inside the functions that
need it, because `import mlflow` takes seconds and `edgeface --help` must stay fast. Importing
this module configures nothing: every client is an `mlflow.MlflowClient` built with an explicit
tracking URI, and the registry URI is set to the same value.

A federated run is one parent run with one child run per edge node (linked by the
`mlflow.parentRunId` tag, which the MLflow UI uses to nest runs). The fused model is exported to
ONNX, logged as an MLflow LoggedModel in the parent run's experiment, registered as a new model
version and pointed at by an alias (`challenger` by default). Aliases and version tags replace the
deprecated registry stages.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from edgeface.errors import ConfigError, EdgefaceError, RegistryError

if TYPE_CHECKING:
    import onnx
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel
    from mlflow.entities.model_registry import ModelVersion

logger = logging.getLogger(__name__)

# Tag that MLflow reads to nest a child run under its parent.
MLFLOW_PARENT_RUN_TAG = "mlflow.parentRunId"
# Tags that edgeface sets on runs and model versions.
RUN_KIND_TAG = "edgeface.run_kind"
NODE_TAG = "edgeface.node"
PARENT_RUN_VERSION_TAG = "edgeface.parent_run_id"
# MLflow's SQL registry store drops a version's model_id, so the LoggedModel id is kept as a tag.
LOGGED_MODEL_VERSION_TAG = "edgeface.logged_model_id"
NONFINITE_TAG_PREFIX = "edgeface.nonfinite."

DEFAULT_ALIAS = "challenger"
INPUT_NAME = "image"
OUTPUT_NAME = "embedding"
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
RUN_STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED")

# MLflow rejects "latest" and v<digits>, in any case, as alias names.
_RESERVED_ALIAS = re.compile(r"^(?:latest|v\d+)$", re.IGNORECASE)
_VALID_ALIAS = re.compile(r"^[\w-]+$")
# Names that go into MLflow search filter strings, which have no documented escaping for quotes.
_FILTER_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")

# Applied when the tracking URI is http(s) and the variable is unset. MLflow 3.17.2 defaults to
# 7 retries with exponential backoff and a 120 s timeout, so a call to a dead server blocks for
# minutes. With 2 retries a refused connection fails after about 5 s (measured on 127.0.0.1).
HTTP_ENV_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}

_Return = TypeVar("_Return")


class TrackingError(EdgefaceError):
    """MLflow tracking server unreachable, or a tracking request it rejected."""


@dataclass(frozen=True)
class RegisteredModelInfo:
    """One registered model: its aliases (alias -> version number) and its tags."""

    name: str
    aliases: dict[str, int] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version: `model_uri` is `models:/<name>/<version>`."""

    name: str
    version: int
    model_uri: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


def _import_mlflow() -> Any:
    """Import mlflow with usage telemetry off unless the user set MLFLOW_DISABLE_TELEMETRY."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow


def resolve_tracking_uri(explicit: str | None, workdir: Path) -> str:
    """Choose the tracking URI: `explicit`, else MLFLOW_TRACKING_URI, else a SQLite file.

    The fallback is `sqlite:///<workdir>/mlflow.db` with `workdir` made absolute, so the store
    does not depend on the current directory. Its artifact root is `<workdir>/mlartifacts`
    (see `default_artifact_location`), set when the experiment is created.

    Raises:
        ConfigError: the chosen URI is empty or a bare path without a scheme.
    """
    if explicit is not None:
        source, uri = "the explicit tracking URI", explicit.strip()
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        source, uri = "MLFLOW_TRACKING_URI", os.environ["MLFLOW_TRACKING_URI"].strip()
    else:
        return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"

    if not uri:
        raise ConfigError(f"{source} is empty: give a URI such as sqlite:///PATH/mlflow.db")
    if "://" not in uri and uri != "databricks":
        raise ConfigError(
            f"{source} {uri!r} has no scheme: use sqlite:///ABSOLUTE/PATH/mlflow.db for a local "
            "store or http://HOST:PORT for a tracking server"
        )
    return uri


def redact_uri(uri: str) -> str:
    """Return `uri` with any user name and password replaced by `***`, for files and logs.

    MLflow takes credentials from MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, but a
    URI such as http://user:secret@host:5000 also works and must not be written out.
    """
    scheme, separator, rest = uri.partition("://")
    if not separator:
        return uri
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return uri
    return f"{scheme}://***@{authority.rsplit('@', 1)[1]}{slash}{path}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """Return `<database folder>/mlartifacts` for a SQLite file URI, else None.

    None leaves the choice to the backend: a tracking server proxies artifacts to its own
    artifact root. Without an explicit location, MLflow 3.17.2 puts the artifacts of a SQLite
    store under `./mlruns` relative to the current directory.
    """
    database = sqlite_database(tracking_uri)
    if database is None:
        return None
    return str(database.resolve().parent / "mlartifacts")


def sqlite_database(tracking_uri: str) -> Path | None:
    """Return the database file of a `sqlite:///` URI, or None for other stores."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = tracking_uri[len(prefix):].split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    return Path(database)


def apply_http_defaults(tracking_uri: str) -> None:
    """Lower MLflow's HTTP retry count and timeout for http(s) URIs, unless already set.

    MLflow reads these variables on every request, so setting them before the first call is
    enough. User settings always win.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    for name, value in HTTP_ENV_DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = value
            logger.debug("set %s=%s for tracking server %s", name, value, tracking_uri)


def _connection_failure(error: BaseException) -> BaseException | None:
    """Return the requests connection error or timeout behind an MlflowException, if any."""
    import requests

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return current
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def _translate_errors(tracking_uri: str, action: str) -> Iterator[None]:
    """Turn an unreachable tracking server into a TrackingError that names the URI."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as error:
        cause = _connection_failure(error)
        if cause is None:
            raise
        raise TrackingError(
            f"failed to {action}: the MLflow tracking server at {tracking_uri} is unreachable "
            f"or timed out ({type(cause).__name__}). Start the server, or set the tracking URI "
            "(MLFLOW_TRACKING_URI) to a running one. MLFLOW_HTTP_REQUEST_MAX_RETRIES and "
            "MLFLOW_HTTP_REQUEST_TIMEOUT set how long a request waits."
        ) from error


def _tracked(action: str) -> Callable[[Callable[..., _Return]], Callable[..., _Return]]:
    """Wrap a method of an object with `tracking_uri` in `_translate_errors`."""

    def decorate(method: Callable[..., _Return]) -> Callable[..., _Return]:
        @functools.wraps(method)
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> _Return:
            with _translate_errors(self.tracking_uri, action):
                return method(self, *args, **kwargs)

        return wrapper

    return decorate


def _error_code(error: BaseException) -> str | None:
    return getattr(error, "error_code", None)


def _make_client(tracking_uri: str) -> MlflowClient:
    mlflow = _import_mlflow()
    apply_http_defaults(tracking_uri)
    return mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# --------------------------------------------------------------------------------------------
# Parameters, metrics and tags
# --------------------------------------------------------------------------------------------


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return _param_value(value.value)
    # JSON spelling keeps booleans, None and lists readable and unambiguous in the UI.
    return json.dumps(value, default=str)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config mapping into dotted keys with string values.

    `{"train": {"lr": 0.1, "nodes": ["a", "b"]}}` becomes
    `{"train.lr": "0.1", "train.nodes": '["a", "b"]'}`. Strings are kept as they are, paths
    and enums become their string value, and everything else is JSON-encoded. An empty nested
    mapping becomes `"{}"` so the key still shows up.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{dotted}."))
        elif isinstance(value, Mapping):
            flat[dotted] = "{}"
        else:
            flat[dotted] = _param_value(value)
    return flat


def _truncate(kind: str, key: str, value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    marker = "...[truncated]"
    logger.warning(
        "%s %r is %d characters, over MLflow's limit of %d: logging the first %d",
        kind, key, len(value), limit, limit - len(marker),
    )
    return value[: limit - len(marker)] + marker


def _split_finite(
    metrics: Mapping[str, float],
) -> tuple[dict[str, float], dict[str, float]]:
    """Split metrics into finite and non-finite values, raising TypeError for non-numbers."""
    finite: dict[str, float] = {}
    nonfinite: dict[str, float] = {}
    for key, raw in metrics.items():
        try:
            value = float(raw)
        except (TypeError, ValueError) as error:
            raise TypeError(f"metric {key!r} has non-numeric value {raw!r}") from error
        (finite if math.isfinite(value) else nonfinite)[key] = value
    return finite, nonfinite


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


class Tracker:
    """Runs of one MLflow experiment, reached through an explicit tracking URI.

    Construction contacts the tracking backend: it gets or creates `experiment_name`, so an
    unreachable server fails here, before any training starts. For a SQLite URI a new
    experiment's artifact root is `default_artifact_location(tracking_uri)` unless
    `artifact_location` is given. An existing experiment keeps its artifact root.

    Raises:
        ConfigError: the experiment name is empty.
        TrackingError: the server is unreachable, or the experiment is deleted.
    """

    def __init__(
        self, tracking_uri: str, experiment_name: str, *, artifact_location: str | None = None
    ) -> None:
        if not experiment_name.strip():
            raise ConfigError("experiment name is empty: set a non-empty MLflow experiment name")
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.client = _make_client(tracking_uri)
        self.registry = ModelRegistry(tracking_uri, client=self.client)
        self.parent_run_id: str | None = None
        location = artifact_location or default_artifact_location(tracking_uri)
        self.experiment_id = self._get_or_create_experiment(location)

    @_tracked("get or create the MLflow experiment")
    def _get_or_create_experiment(self, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            try:
                experiment_id = self.client.create_experiment(
                    self.experiment_name, artifact_location=artifact_location
                )
            except MlflowException as error:
                # Another process created it between the lookup and the create.
                if _error_code(error) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = self.client.get_experiment_by_name(self.experiment_name)
            else:
                logger.info(
                    "created MLflow experiment %r (id %s) at %s, artifacts in %s",
                    self.experiment_name, experiment_id, self.tracking_uri,
                    artifact_location or "the server's artifact root",
                )
                return str(experiment_id)

        if experiment is None:
            raise TrackingError(
                f"MLflow experiment {self.experiment_name!r} at {self.tracking_uri} was reported "
                "as existing but cannot be read: check the tracking store, then retry"
            )
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {self.experiment_name!r} (id {experiment.experiment_id}) at "
                f"{self.tracking_uri} is deleted: restore it with `mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}` or choose another experiment name"
            )
        return str(experiment.experiment_id)

    @_tracked("start the parent run")
    def start_parent(
        self,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, Any] | None = None,
        *,
        resume_run_id: str | None = None,
    ) -> str:
        """Create the parent run of a federated run, or resume one, and return its run id.

        `params` may be nested; see `log_params`. With `resume_run_id` the existing run is set
        back to RUNNING and its params are checked against `params`, so a resumed run cannot
        silently change its configuration.

        Raises:
            TrackingError: `resume_run_id` is not found, belongs to another experiment, is a
                child run, or was logged with different params.
        """
        run_tags = {RUN_KIND_TAG: "parent", **(tags or {})}
        if resume_run_id is not None:
            self._resume_parent(resume_run_id, params)
            self.set_tags(resume_run_id, run_tags)
            self.parent_run_id = resume_run_id
            return resume_run_id

        run = self.client.create_run(
            self.experiment_id, run_name=run_name, tags=_string_tags(run_tags)
        )
        run_id = run.info.run_id
        logger.info(
            "started parent run %s (%r) in experiment %r", run_id, run_name, self.experiment_name
        )
        self.parent_run_id = run_id
        self.log_params(run_id, params)
        return run_id

    def _resume_parent(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Check that `run_id` can be resumed with `params`, log them, and set it RUNNING."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as error:
            if _error_code(error) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise TrackingError(
                f"cannot resume run {run_id!r}: it is not found at {self.tracking_uri}. "
                "Check the run id, or start a new run without resuming"
            ) from error
        if run.info.experiment_id != self.experiment_id:
            raise TrackingError(
                f"cannot resume run {run_id!r}: it belongs to experiment id "
                f"{run.info.experiment_id}, not {self.experiment_name!r} (id "
                f"{self.experiment_id}). Use the same experiment name as the original run"
            )
        if MLFLOW_PARENT_RUN_TAG in run.data.tags:
            raise TrackingError(
                f"cannot resume run {run_id!r}: it is a child run of "
                f"{run.data.tags[MLFLOW_PARENT_RUN_TAG]}. Resume the parent run instead"
            )
        # Params are checked before the status changes, so a rejected resume leaves the run
        # as it was.
        self.log_params(run_id, params)
        self.client.update_run(run_id, status="RUNNING")
        logger.info("resumed parent run %s (%r)", run_id, run.info.run_name)

    @_tracked("start a node's child run")
    def start_child(self, node_name: str, *, parent_run_id: str | None = None) -> str:
        """Return the child run of `node_name` under the parent run, creating it if needed.

        The parent is `parent_run_id`, else the run of the last `start_parent` call. An
        existing child for the same node (a resumed run or a retried step) is set back to
        RUNNING and reused, so each node has one child run per parent.

        Raises:
            ConfigError: `node_name` has characters other than letters, digits, `.`, `_`,
                `-` and spaces, or does not start with a letter or digit.
            ValueError: no parent run is known.
        """
        parent = parent_run_id or self.parent_run_id
        if parent is None:
            raise ValueError("start_child needs a parent run: call start_parent first")
        if not _FILTER_SAFE_NAME.match(node_name):
            raise ConfigError(
                f"invalid node name {node_name!r}: use letters, digits, '.', '_', '-' and "
                "spaces, starting with a letter or digit"
            )

        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.{MLFLOW_PARENT_RUN_TAG} = '{parent}' and tags.`{NODE_TAG}` = '{node_name}'"
            ),
            max_results=1,
        )
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            logger.info("reusing child run %s of node %s (parent %s)", run_id, node_name, parent)
            return run_id

        tags = {MLFLOW_PARENT_RUN_TAG: parent, NODE_TAG: node_name, RUN_KIND_TAG: "node"}
        run = self.client.create_run(self.experiment_id, run_name=node_name, tags=tags)
        logger.info(
            "started child run %s for node %s (parent %s)", run.info.run_id, node_name, parent
        )
        return run.info.run_id

    @_tracked("log metrics")
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log `metrics` at `step` in one batch request.

        NaN and infinite values are not logged as metrics. Each one is logged as the run tag
        `edgeface.nonfinite.<key>` with the value and step (later steps overwrite it) and
        named in a warning.

        Raises:
            TypeError: a value cannot be converted to float.
        """
        from mlflow.entities import Metric, RunTag

        finite, nonfinite = _split_finite(metrics)
        timestamp_ms = int(time.time() * 1000)
        entries = [Metric(key, value, timestamp_ms, step) for key, value in finite.items()]
        tags = [
            RunTag(f"{NONFINITE_TAG_PREFIX}{key}", f"{value} at step {step}")
            for key, value in nonfinite.items()
        ]
        if nonfinite:
            logger.warning(
                "run %s step %d: skipped non-finite metric values %s (recorded as %s* tags)",
                run_id, step, nonfinite, NONFINITE_TAG_PREFIX,
            )
        if entries or tags:
            self.client.log_batch(run_id, metrics=entries, tags=tags)

    @_tracked("log params")
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> dict[str, str]:
        """Log a possibly nested config mapping as params and return what was logged.

        Keys are flattened with `flatten_params`. Values longer than MLflow's limit (6,000
        characters in 3.17.2) are truncated with a warning. MLflow params are immutable, so
        keys already logged with the same value are accepted again.

        Raises:
            TrackingError: a key was already logged on this run with a different value.
        """
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        flat = {
            key: _truncate("param", key, value, MAX_PARAM_VAL_LENGTH)
            for key, value in flatten_params(params).items()
        }
        existing = self.client.get_run(run_id).data.params
        changed = sorted(key for key, value in flat.items() if existing.get(key, value) != value)
        if changed:
            details = ", ".join(f"{key}: {existing[key]!r} -> {flat[key]!r}" for key in changed[:5])
            raise TrackingError(
                f"run {run_id} already has {len(changed)} param(s) with other values ({details}). "
                "MLflow params cannot change: resume with the original configuration or start "
                "a new run"
            )
        new = [Param(key, value) for key, value in flat.items() if key not in existing]
        if new:
            self.client.log_batch(run_id, params=new)
        return flat

    @_tracked("log an artifact")
    def log_artifact(
        self, run_id: str, path: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        """Upload a file, or a folder's contents, to the run's artifacts under `artifact_path`.

        Raises:
            FileNotFoundError: `path` does not exist.
        """
        local = Path(path)
        if local.is_dir():
            self.client.log_artifacts(run_id, str(local), artifact_path)
        elif local.is_file():
            self.client.log_artifact(run_id, str(local), artifact_path)
        else:
            raise FileNotFoundError(f"artifact to log for run {run_id} not found: {local}")
        logger.debug("logged artifact %s to run %s under %r", local, run_id, artifact_path)

    @_tracked("set run tags")
    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set run tags in one batch request, converting values with `str`."""
        from mlflow.entities import RunTag

        entries = [RunTag(key, value) for key, value in _string_tags(tags).items()]
        if entries:
            self.client.log_batch(run_id, tags=entries)

    @_tracked("find child runs")
    def find_child_runs(self, parent_run_id: str) -> dict[str, str]:
        """Return node name -> run id of the child runs of `parent_run_id`."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{MLFLOW_PARENT_RUN_TAG} = '{parent_run_id}'",
            max_results=1000,
        )
        return {
            run.data.tags.get(NODE_TAG, run.info.run_name or run.info.run_id): run.info.run_id
            for run in runs
        }

    @_tracked("find a run by tag")
    def find_run_by_tag(self, key: str, value: str) -> str | None:
        """Return the id of a run of this experiment whose tag `key` equals `value`, or None.

        Raises:
            ValueError: `key` or `value` has characters that an MLflow search filter cannot hold.
        """
        if not re.match(r"^[\w.-]+$", value) or not re.match(r"^[\w.-]+$", key):
            raise ValueError(f"tag {key!r}={value!r} cannot be used in an MLflow search filter")
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{key}` = '{value}'", max_results=1
        )
        return runs[0].info.run_id if runs else None

    @_tracked("read a metric history")
    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """Return (step, value) of every logged value of metric `key`, ordered by step."""
        history = self.client.get_metric_history(run_id, key)
        return sorted((int(metric.step), float(metric.value)) for metric in history)

    @_tracked("end a run")
    def end_run(self, run_id: str, status: RunStatus = "FINISHED") -> None:
        """Mark a run terminated with `status`: FINISHED, FAILED or KILLED.

        Raises:
            ValueError: `status` is not one of those three.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"invalid run status {status!r}: use one of {', '.join(RUN_STATUSES)}")
        self.client.set_terminated(run_id, status=status)
        logger.info("ended run %s with status %s", run_id, status)


def _string_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    return {
        key: _truncate("tag", key, str(value), MAX_TAG_VAL_LENGTH) for key, value in tags.items()
    }


# --------------------------------------------------------------------------------------------
# Model registry
# --------------------------------------------------------------------------------------------


def check_alias(alias: str) -> None:
    """Reject alias names that MLflow reserves or cannot store.

    Raises:
        RegistryError: `alias` is `latest` or `v<digits>` (reserved for version lookups), or
            has characters other than letters, digits, `_` and `-`.
    """
    if _RESERVED_ALIAS.match(alias):
        raise RegistryError(
            f"alias {alias!r} is reserved by MLflow (`latest` and `v<digits>` refer to versions): "
            f"choose another alias such as {DEFAULT_ALIAS!r} or 'champion'"
        )
    if not _VALID_ALIAS.match(alias):
        raise RegistryError(
            f"invalid alias {alias!r}: use letters, digits, '_' and '-' only"
        )


def _check_model_name(name: str) -> None:
    if not _FILTER_SAFE_NAME.match(name):
        raise RegistryError(
            f"invalid registered model name {name!r}: use letters, digits, '.', '_', '-' and "
            "spaces, starting with a letter or digit"
        )


class ModelRegistry:
    """Thin wrapper over the MLflow model registry at one tracking URI.

    Versions are returned as `ModelVersionInfo` with `int` versions. MLflow returns `str`
    versions over REST and `int` versions from a SQL store.
    """

    def __init__(self, tracking_uri: str, *, client: MlflowClient | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client = client if client is not None else _make_client(tracking_uri)

    def _info(self, version: ModelVersion, aliases: Iterable[str] = ()) -> ModelVersionInfo:
        return ModelVersionInfo(
            name=version.name,
            version=int(version.version),
            model_uri=f"models:/{version.name}/{int(version.version)}",
            run_id=version.run_id or None,
            tags=dict(version.tags or {}),
            aliases=tuple(sorted(aliases)),
        )

    def _registered_model(self, name: str) -> Any:
        """Return MLflow's registered model `name`, or raise RegistryError when it is missing."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException as error:
            if _error_code(error) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise RegistryError(
                f"registered model {name!r} not found at {self.tracking_uri}: check the model "
                "name and the tracking URI"
            ) from error

    def _aliases(self, name: str) -> dict[str, int]:
        """Return alias -> version of a registered model, raising RegistryError if not found."""
        model = self._registered_model(name)
        return {alias: int(version) for alias, version in (model.aliases or {}).items()}

    @_tracked("list model versions")
    def list_versions(self, name: str) -> list[ModelVersionInfo]:
        """Return every version of `name`, oldest first, with its aliases.

        Raises:
            RegistryError: the registered model is not found.
        """
        _check_model_name(name)
        aliases = self._aliases(name)
        versions = self.client.search_model_versions(f"name = '{name}'")
        infos = [
            self._info(v, [a for a, target in aliases.items() if target == int(v.version)])
            for v in versions
        ]
        return sorted(infos, key=lambda info: info.version)

    @_tracked("get a model version")
    def get_version(self, name: str, alias_or_version: str | int) -> ModelVersionInfo:
        """Return a version by number (`3`, `"3"`), alias, or `"latest"` (highest number).

        Raises:
            RegistryError: the registered model, version or alias is not found.
        """
        _check_model_name(name)
        aliases = self._aliases(name)
        key = str(alias_or_version)
        if key.isdigit():
            number = int(key)
        elif key.lower() == "latest":
            versions = self.list_versions(name)
            if not versions:
                raise RegistryError(f"registered model {name!r} has no versions yet")
            return versions[-1]
        elif key in aliases:
            number = aliases[key]
        else:
            known = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(
                f"{key!r} is neither a version number nor an existing alias of registered "
                f"model {name!r} (aliases: {known}). Aliases are case-sensitive, so give a "
                "version number or one of those aliases"
            )
        return self._version(name, number, aliases)

    @_tracked("read model aliases")
    def get_aliases(self, name: str) -> dict[str, int]:
        """Return alias -> version number of registered model `name`.

        Raises:
            RegistryError: the registered model is not found.
        """
        _check_model_name(name)
        return self._aliases(name)

    def _version(self, name: str, number: int, aliases: Mapping[str, int]) -> ModelVersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version(name, str(number))
        except MlflowException as error:
            if _error_code(error) != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise RegistryError(
                f"registered model {name!r} has no version {number}: list its versions to "
                "choose one"
            ) from error
        return self._info(version, [a for a, target in aliases.items() if target == number])

    @_tracked("read a model alias")
    def get_alias_target(self, name: str, alias: str) -> int | None:
        """Return the version that `alias` points to, or None if the alias is not set.

        Raises:
            RegistryError: the registered model is not found.
        """
        return self._aliases(name).get(alias)

    @_tracked("set a model alias")
    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point `alias` at `version`, then read it back to confirm.

        MLflow has no compare-and-set for aliases, and concurrent moves are last-writer-wins.
        Callers that promote from several processes must serialise promotion themselves.

        Raises:
            RegistryError: the alias is reserved or invalid, or another writer moved it before
                the read-back.
        """
        check_alias(alias)
        self.client.set_registered_model_alias(name, alias, str(version))
        target = self.get_alias_target(name, alias)
        if target != int(version):
            raise RegistryError(
                f"alias {alias!r} of {name!r} points to version {target}, not {version}, right "
                "after it was set: another process moved it. Serialise promotions and retry"
            )
        logger.info("alias %s of model %r now points to version %d", alias, name, int(version))

    @_tracked("set model version tags")
    def set_version_tags(self, name: str, version: int, tags: Mapping[str, Any]) -> None:
        """Set tags on one model version, converting values with `str`."""
        for key, value in tags.items():
            self.client.set_model_version_tag(name, str(version), key, str(value))

    def find_version_by_tag(self, name: str, key: str, value: str) -> ModelVersionInfo | None:
        """Return the lowest version of `name` whose tag `key` equals `value`, or None."""
        if not re.match(r"^[\w.-]+$", value) or not re.match(r"^[\w.-]+$", key):
            raise ValueError(f"tag {key!r}={value!r} cannot be used in an MLflow search filter")
        versions = self.client.search_model_versions(
            f"name = '{name}' and tags.`{key}` = '{value}'"
        )
        if not versions:
            return None
        return self._info(min(versions, key=lambda v: int(v.version)))

    def ensure_registered_model(self, name: str) -> None:
        """Create the registered model `name` unless it exists."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as error:
            if _error_code(error) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        else:
            logger.info("created registered model %r", name)

    @_tracked("list registered models")
    def list_models(self) -> list[RegisteredModelInfo]:
        """Return every registered model of the store, sorted by name, with aliases and tags."""
        models = self.client.search_registered_models(max_results=1000)
        infos = [
            RegisteredModelInfo(
                name=model.name,
                aliases={alias: int(version) for alias, version in (model.aliases or {}).items()},
                tags=dict(model.tags or {}),
            )
            for model in models
        ]
        return sorted(infos, key=lambda info: info.name)

    @_tracked("read registered model tags")
    def get_model_tags(self, name: str) -> dict[str, str]:
        """Return the tags of the registered model `name`.

        Raises:
            RegistryError: the registered model is not found.
        """
        return dict(self._registered_model(name).tags or {})

    @_tracked("set a registered model tag")
    def set_model_tag(self, name: str, key: str, value: Any) -> None:
        """Set one tag on the registered model `name`, converting the value with `str`."""
        self.client.set_registered_model_tag(name, key, str(value))

    @_tracked("create a registered model")
    def create_model_if_absent(self, name: str, tags: Mapping[str, Any]) -> bool:
        """Create the registered model `name` with `tags`; return False if it already exists.

        The store checks name uniqueness in one transaction, so of several concurrent callers
        exactly one gets True. False also covers a model deleted while this call ran, so a
        caller that needs the model retries.
        """
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, tags=_string_tags(tags))
        except MlflowException as error:
            code = _error_code(error)
            if code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                return False
            if code == "RESOURCE_DOES_NOT_EXIST":
                # MLflow's SQL store reads the existing model back after a failed insert, to
                # word its error. If the holder deleted the model in between, that read fails
                # with RESOURCE_DOES_NOT_EXIST. The name was taken when the insert ran.
                logger.debug("registered model %r was deleted while creating it", name)
                return False
            raise
        return True

    @_tracked("delete a registered model")
    def delete_model(self, name: str) -> bool:
        """Delete the registered model `name` with its versions; return False if it is absent."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_registered_model(name)
        except MlflowException as error:
            if _error_code(error) != "RESOURCE_DOES_NOT_EXIST":
                raise
            return False
        return True


# --------------------------------------------------------------------------------------------
# ONNX model registration
# --------------------------------------------------------------------------------------------


def _tensor_type(value_info: onnx.ValueInfoProto) -> tuple[int, list[int | str]]:
    tensor = value_info.type.tensor_type
    dims: list[int | str] = [
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?")
        for dim in tensor.shape.dim
    ]
    return tensor.elem_type, dims


def check_onnx_io(model: onnx.ModelProto, image_size: int, embedding_dim: int) -> None:
    """Check that the graph takes uint8 `image` NHWC and returns float32 `embedding`.

    Dimensions given as numbers must equal (batch, S, S, 3) and (batch, D); named (dynamic)
    dimensions match anything.

    Raises:
        RegistryError: names, element types, ranks or sizes differ.
    """
    import onnx

    expected = {
        INPUT_NAME: (onnx.TensorProto.UINT8, [None, image_size, image_size, 3]),
        OUTPUT_NAME: (onnx.TensorProto.FLOAT, [None, embedding_dim]),
    }
    actual = {
        **{vi.name: _tensor_type(vi) for vi in model.graph.input},
        **{vi.name: _tensor_type(vi) for vi in model.graph.output},
    }
    for name, (elem_type, shape) in expected.items():
        expected_text = f"{onnx.TensorProto.DataType.Name(elem_type)} {shape}"
        expected_text = expected_text.replace("None", "batch")
        if name not in actual:
            raise RegistryError(
                f"ONNX model has no tensor named {name!r} (found {sorted(actual)}): export it "
                f"with input {INPUT_NAME!r} and output {OUTPUT_NAME!r}"
            )
        got_type, got_dims = actual[name]
        fits = got_type == elem_type and len(got_dims) == len(shape) and all(
            isinstance(got, str) or want is None or got == want
            for got, want in zip(got_dims, shape)
        )
        if not fits:
            got = f"{onnx.TensorProto.DataType.Name(got_type)} {got_dims}"
            raise RegistryError(
                f"ONNX tensor {name!r} is {got}, expected {expected_text}: check image_size "
                f"({image_size}) and embedding_dim ({embedding_dim}) against the exported model"
            )


def onnx_signature(image_size: int, embedding_dim: int) -> Any:
    """Return the MLflow signature: uint8 (-1, S, S, 3) `image` -> float32 (-1, D) `embedding`."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([
            TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3), INPUT_NAME)
        ]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embedding_dim), OUTPUT_NAME)]),
    )


def onnx_pip_requirements() -> list[str]:
    """Pin onnx, onnxruntime and numpy to the installed versions (MLflow adds its own pin)."""
    return [
        f"{package}=={importlib.metadata.version(package)}"
        for package in ("onnx", "onnxruntime", "numpy")
    ]


def _log_onnx_model(
    tracker: Tracker,
    run_id: str,
    onnx_model: onnx.ModelProto,
    model_name: str,
    *,
    image_size: int,
    embedding_dim: int,
    extra_files: list[str] | None,
) -> LoggedModel:
    """Log `onnx_model` as a READY LoggedModel of `run_id` and return it.

    This does what `mlflow.onnx.log_model(name=...)` does, through the tracker's own client.
    In MLflow 3.17.2, `log_model` reads the process-wide tracking URI, and without an active
    run or experiment it files the model under experiment "0" with artifacts in `./mlruns`.
    Setting those globals would also overwrite the user's MLFLOW_TRACKING_URI variable.
    """
    import mlflow.onnx
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    client = tracker.client
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=model_name, source_run_id=run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="edgeface-onnx-") as tmp:
            local = Path(tmp, "model")
            mlflow_model = Model(
                artifact_path=logged.artifact_location, model_uuid=logged.model_id,
                run_id=run_id, model_id=logged.model_id,
            )
            mlflow.onnx.save_model(
                onnx_model, str(local), mlflow_model=mlflow_model,
                signature=onnx_signature(image_size, embedding_dim),
                onnx_execution_providers=["CPUExecutionProvider"],
                pip_requirements=onnx_pip_requirements(),
                metadata={"image_size": image_size, "embedding_dim": embedding_dim},
                extra_files=extra_files,
            )
            client.log_model_artifacts(logged.model_id, str(local))
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def _create_version(
    tracker: Tracker, model_name: str, logged: LoggedModel, run_id: str, tags: Mapping[str, str]
) -> ModelVersionInfo:
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    registry = tracker.registry
    registry.ensure_registered_model(model_name)
    # The source is the artifact location, not `models:/<model id>`: for a `models:/` source
    # the SQL registry store of MLflow 3.17.2 looks the model up through the process-wide
    # tracking URI, which is not this tracker's store.
    version = tracker.client.create_model_version(
        model_name, source=logged.artifact_location, run_id=run_id, tags=dict(tags),
        model_id=logged.model_id,
    )
    # The MLflow UI lists a LoggedModel's registered versions from this tag.
    link = [{"name": model_name, "version": str(version.version)}]
    tracker.client.set_logged_model_tags(
        logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(link)}
    )
    return registry._info(version)


def _move_alias_after_retry(
    registry: ModelRegistry, info: ModelVersionInfo, alias: str
) -> None:
    """Point `alias` at a version found by a retried registration, unless a newer one has it."""
    target = registry.get_alias_target(info.name, alias)
    if target is not None and target > info.version:
        logger.warning(
            "alias %s of %r already points to newer version %d: leaving it there for the "
            "retried registration of version %d", alias, info.name, target, info.version,
        )
        return
    if target != info.version:
        registry.set_alias(info.name, alias, info.version)


def _check_registration_inputs(
    onnx_path: Path, model_name: str, image_size: int, embedding_dim: int,
    alias: str, extra_files: Iterable[str | os.PathLike[str]] | None,
) -> list[str] | None:
    check_alias(alias)
    _check_model_name(model_name)
    for label, value in (("image_size", image_size), ("embedding_dim", embedding_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise RegistryError(f"invalid {label} {value!r}: expected a positive integer")
    if not onnx_path.is_file():
        raise RegistryError(f"ONNX file to register not found: {onnx_path}. Export the model first")
    if extra_files is None:
        return None
    paths = [str(Path(p)) for p in extra_files]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise RegistryError(f"extra files to register with the model not found: {missing}")
    return paths


def register_onnx_model(
    tracker: Tracker,
    parent_run_id: str,
    onnx_path: str | os.PathLike[str],
    model_name: str,
    *,
    image_size: int,
    embedding_dim: int,
    tags: Mapping[str, Any],
    alias: str = DEFAULT_ALIAS,
    extra_files: Iterable[str | os.PathLike[str]] | None = None,
) -> ModelVersionInfo:
    """Log an ONNX embedding model in the parent run, register a version and set `alias`.

    The model is stored as an MLflow LoggedModel with the `onnx` flavor, the CPU execution
    provider, pinned pip requirements and an explicit signature: uint8 (-1, S, S, 3) `image`
    to float32 (-1, D) `embedding` with S = `image_size` pixels and D = `embedding_dim`. The
    version gets `tags` (for example dataset fingerprint, config hash, code version) plus
    `edgeface.parent_run_id`, `edgeface.image_size` and `edgeface.embedding_dim`.

    Registration is idempotent on `parent_run_id`: if a version with that parent run tag
    exists, it is returned instead of creating a duplicate, and the alias is pointed at it
    unless a newer version already has it. The alias is read back after it is set, because
    MLflow has no compare-and-set for aliases.

    Raises:
        RegistryError: reserved or invalid alias, invalid model name or sizes, missing files,
            ONNX inputs and outputs that do not match the signature, or an alias moved by
            another writer.
        TrackingError: the tracking server is unreachable.
    """
    onnx_file = Path(onnx_path)
    files = _check_registration_inputs(
        onnx_file, model_name, image_size, embedding_dim, alias, extra_files
    )
    with _translate_errors(tracker.tracking_uri, f"register model {model_name!r}"):
        return _register(
            tracker, parent_run_id, onnx_file, model_name, image_size=image_size,
            embedding_dim=embedding_dim, tags=tags, alias=alias, extra_files=files,
        )


def _register(
    tracker: Tracker, parent_run_id: str, onnx_file: Path, model_name: str, *,
    image_size: int, embedding_dim: int, tags: Mapping[str, Any], alias: str,
    extra_files: list[str] | None,
) -> ModelVersionInfo:
    import onnx

    registry = tracker.registry
    existing = registry.find_version_by_tag(model_name, PARENT_RUN_VERSION_TAG, parent_run_id)
    if existing is not None:
        logger.info(
            "model %r version %d is already registered for parent run %s: reusing it",
            model_name, existing.version, parent_run_id,
        )
        _move_alias_after_retry(registry, existing, alias)
        return registry.get_version(model_name, existing.version)

    # Load a fresh proto on every call: mlflow.onnx.save_model (3.17.2) moves the weights of
    # the proto it is given to external data, so saving the same object twice breaks the model.
    onnx_model = onnx.load(str(onnx_file))
    check_onnx_io(onnx_model, image_size, embedding_dim)
    started = time.monotonic()
    logged = _log_onnx_model(
        tracker, parent_run_id, onnx_model, model_name, image_size=image_size,
        embedding_dim=embedding_dim, extra_files=extra_files,
    )
    version_tags = {
        **_string_tags(tags),
        PARENT_RUN_VERSION_TAG: parent_run_id,
        LOGGED_MODEL_VERSION_TAG: logged.model_id,
        "edgeface.image_size": str(image_size),
        "edgeface.embedding_dim": str(embedding_dim),
    }
    # NOTE: idempotency covers sequential retries only. Two concurrent registrations for the
    # same parent run can both miss the lookup above and create two versions.
    info = _create_version(tracker, model_name, logged, parent_run_id, version_tags)
    registry.set_alias(model_name, alias, info.version)
    logger.info(
        "registered %s (logged model %s, parent run %s) in %.1f s; alias %s -> %d",
        info.model_uri, logged.model_id, parent_run_id, time.monotonic() - started, alias,
        info.version,
    )
    return registry.get_version(model_name, info.version)


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")


def download_model(tracking_uri: str, model_uri: str, destination: str | os.PathLike[str]) -> Path:
    """Download a registered model's files and return the local folder.

    `model_uri` is `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `models:/NAME/latest`. The
    ONNX graph is `<folder>/model.onnx`, with its external weight files beside it. The URI is
    resolved here, not by mlflow.artifacts, because MLflow 3.17.2 resolves `models:/` URIs
    through the process-wide registry URI even when another one is passed.

    Raises:
        RegistryError: the URI has another form, or the model, version or alias is not found.
        TrackingError: the tracking server is unreachable.
    """
    match = _MODEL_URI.match(model_uri)
    if match is None:
        raise RegistryError(
            f"invalid model URI {model_uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION"
        )
    registry = ModelRegistry(tracking_uri)
    info = registry.get_version(match["name"], match["alias"] or match["version"])
    mlflow = _import_mlflow()
    with _translate_errors(tracking_uri, f"download {model_uri}"):
        source = registry.client.get_model_version_download_uri(info.name, str(info.version))
        Path(destination).mkdir(parents=True, exist_ok=True)
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(destination), tracking_uri=tracking_uri
        )
    logger.info("downloaded %s (version %d) to %s", model_uri, info.version, path)
    return Path(path)


def download_run_artifact(
    tracking_uri: str, run_id: str, artifact_path: str, destination: str | os.PathLike[str]
) -> Path:
    """Download one artifact of run `run_id` into `destination` and return its local path.

    Raises:
        RegistryError: the run has no artifact at `artifact_path`.
        TrackingError: the tracking server is unreachable.
    """
    from mlflow.exceptions import MlflowException

    client = _make_client(tracking_uri)
    Path(destination).mkdir(parents=True, exist_ok=True)
    with _translate_errors(tracking_uri, f"download artifact {artifact_path} of run {run_id}"):
        try:
            path = client.download_artifacts(run_id, artifact_path, str(destination))
        except (MlflowException, OSError) as error:
            if isinstance(error, MlflowException) and _connection_failure(error) is not None:
                raise
            raise RegistryError(
                f"run {run_id} has no artifact {artifact_path!r} at {tracking_uri} ({error}): "
                "check that the run logged it"
            ) from error
    logger.info("downloaded artifact %s of run %s to %s", artifact_path, run_id, path)
    return Path(path)
