"""Talk to a Kubeflow Pipelines API server: upload, run, schedule, list, and watch runs.

`PipelineClient` wraps `kfp.Client` and turns its failures into `PipelineError` messages
that name the host and the fix. `validate_cron` checks the 6-field cron expressions that KFP
schedules use. `PodWatchdog` looks at a run's pods with `kubectl get pods -o json` and
reports pods that cannot start, which KFP itself leaves waiting forever.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from edgeface.errors import ConfigError, EdgefaceError
from edgeface.fleet import PIPELINE_NAMESPACE, RUNNER_SERVICE_ACCOUNT

logger = logging.getLogger(__name__)

DEFAULT_HOST = "http://localhost:8080"
HOST_ENV = "KFP_HOST"
HEALTHZ_PATH = "/apis/v2beta1/healthz"
HEALTHZ_TIMEOUT_S = 5.0
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")
# Label that the KFP backend puts on every pod of a run, with the run id as its value.
RUN_ID_POD_LABEL = "pipeline/runid"


class PipelineError(EdgefaceError):
    """KFP API server unreachable, a request it rejected, or a run that failed."""


def resolve_host(host: str | None) -> str:
    """Return `host`, else $KFP_HOST, else http://localhost:8080, without a trailing slash."""
    chosen = host or os.environ.get(HOST_ENV) or DEFAULT_HOST
    if not chosen.startswith(("http://", "https://")):
        raise ConfigError(f"invalid KFP host {chosen!r}: include the scheme, e.g. {DEFAULT_HOST}")
    return chosen.rstrip("/")


def _unreachable(host: str, reason: object) -> PipelineError:
    return PipelineError(
        f"KFP API server at {host} is unreachable ({reason}). Start a port-forward with "
        f"`kubectl -n {PIPELINE_NAMESPACE} port-forward svc/ml-pipeline-ui 8080:80`, or pass "
        f"--host or set {HOST_ENV} to a running server"
    )


def check_reachable(host: str, timeout_s: float = HEALTHZ_TIMEOUT_S) -> None:
    """GET the health endpoint of `host` once, failing within `timeout_s` seconds.

    `kfp.Client` sends no timeout, so an address that drops packets would block it for
    minutes; this check fails fast instead.

    Raises:
        PipelineError: connection refused or timed out, or the response is an HTTP error.
    """
    try:
        with urllib.request.urlopen(host + HEALTHZ_PATH, timeout=timeout_s) as response:
            response.read()
    except urllib.error.HTTPError as error:
        raise PipelineError(f"{host}{HEALTHZ_PATH} returned HTTP {error.code}: is {host} a "
                            "Kubeflow Pipelines API server? Check --host or KFP_HOST") from None
    except (urllib.error.URLError, OSError) as error:
        raise _unreachable(host, getattr(error, "reason", error)) from None


# --- cron -----------------------------------------------------------------------------------


_CRON_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23),
                ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 6))
_CRON_NAMES = {
    "month": ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"],
    "day of week": ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
}
_CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                     "@hourly")
_EVERY = re.compile(r"^@every (\d+(\.\d+)?(h|m|s|ms))+$")


def validate_cron(expression: str) -> str:
    """Check a KFP cron expression and return it with single spaces.

    KFP schedules use 6 fields with seconds first (`0 0 3 * * *` is 03:00 every day), or a
    descriptor such as `@daily` or `@every 6h`. The API server does not reject the usual
    5-field form, but reads its fields shifted by one, so it is rejected here.

    Raises:
        ConfigError: wrong field count or an invalid field, with the corrected form for a
            5-field expression.
    """
    text = " ".join(expression.split())
    if text in _CRON_DESCRIPTORS or _EVERY.match(text):
        return text
    fields = text.split(" ")
    if len(fields) == 5:
        raise ConfigError(
            f"cron expression {expression!r} has 5 fields, but Kubeflow Pipelines reads 6 with "
            f"seconds first and would misread it: use {'0 ' + text!r}"
        )
    if len(fields) != 6:
        raise ConfigError(
            f"cron expression {expression!r} has {len(fields)} fields: expected 6 (second "
            "minute hour day-of-month month day-of-week), e.g. '0 0 3 * * *' for 03:00 daily"
        )
    for field, (name, low, high) in zip(fields, _CRON_FIELDS):
        for item in field.split(","):
            _check_cron_item(expression, item, name, low, high)
    return text


def _check_cron_item(expression: str, item: str, name: str, low: int, high: int) -> None:
    base, _, step = item.partition("/")
    problem = ""
    if step and not (step.isdigit() and int(step) > 0):
        problem = f"step {step!r} is not a positive number"
    elif base not in ("*", "?"):
        bounds = base.split("-")
        values = [_cron_value(part, name) for part in bounds]
        if len(bounds) > 2 or None in values:
            problem = f"{base!r} is not a number, a name or a range"
        elif any(not low <= value <= high for value in values):
            problem = f"{base!r} is outside {low}-{high}"
    if problem:
        raise ConfigError(f"invalid {name} field in cron expression {expression!r}: {problem}")


def _cron_value(text: str, name: str) -> int | None:
    if text.isdigit():
        return int(text)
    names = _CRON_NAMES.get(name, [])
    if text.upper() in names:
        return names.index(text.upper()) + (1 if name == "month" else 0)
    return None


# --- the client -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineVersion:
    """An uploaded pipeline version."""

    pipeline_id: str
    version_id: str
    version_name: str


class PipelineClient:
    """A Kubeflow Pipelines API server at one host, through `kfp.Client`.

    Construction checks that the server responds (see `check_reachable`), so a wrong host
    fails at once.

    Raises:
        PipelineError: the server is unreachable or not a KFP API server.
    """

    def __init__(self, host: str | None = None) -> None:
        import kfp

        self.host = resolve_host(host)
        check_reachable(self.host)
        with self._call("connect"), warnings.catch_warnings():
            # kfp.Client warns on every construction that it needs a v2 backend.
            warnings.simplefilter("ignore", FutureWarning)
            self.kfp = kfp.Client(host=self.host)

    @contextlib.contextmanager
    def _call(self, action: str) -> Iterator[None]:
        """Turn kfp and HTTP errors into PipelineError, and log what kfp prints."""
        import kfp_server_api
        import urllib3

        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                yield
        except urllib3.exceptions.MaxRetryError as error:
            raise _unreachable(self.host, error.reason) from None
        except kfp_server_api.ApiException as error:
            body = (error.body or "").strip()[:500]
            raise PipelineError(f"KFP API server at {self.host} rejected {action}: HTTP "
                                f"{error.status} {error.reason}: {body}") from None
        except ValueError as error:
            raise PipelineError(f"failed to {action} on {self.host}: {error}") from None
        finally:
            for line in printed.getvalue().splitlines():
                logger.info("%s", line)

    def experiment_id(self, name: str) -> str:
        """Return the id of experiment `name`, creating the experiment if it does not exist."""
        with self._call(f"get or create experiment {name!r}"):
            return self.kfp.create_experiment(name).experiment_id

    def upload(self, package_path: str, pipeline_name: str, version_name: str) -> PipelineVersion:
        """Upload `package_path` as version `version_name` of pipeline `pipeline_name`.

        The pipeline is created on first upload. A version of that name that exists already
        is reused, so submitting the same package twice uploads it once.
        """
        with self._call(f"upload pipeline {pipeline_name!r}"):
            pipeline_id = self.kfp.get_pipeline_id(pipeline_name)
            if pipeline_id is None:
                pipeline_id = self.kfp.upload_pipeline(package_path, pipeline_name).pipeline_id
                logger.info("created pipeline %s (%s)", pipeline_name, pipeline_id)
            existing = self._find_version(pipeline_id, version_name)
            if existing is not None:
                logger.info("pipeline version %s exists: reusing it", version_name)
                return PipelineVersion(pipeline_id, existing, version_name)
            version = self.kfp.upload_pipeline_version(
                package_path, version_name, pipeline_id=pipeline_id)
        logger.info("uploaded %s as version %s of pipeline %s", package_path, version_name,
                    pipeline_name)
        return PipelineVersion(pipeline_id, version.pipeline_version_id, version_name)

    def _find_version(self, pipeline_id: str, version_name: str) -> str | None:
        versions = self.kfp.list_pipeline_versions(
            pipeline_id, page_size=1, filter=_name_filter(version_name)).pipeline_versions
        return versions[0].pipeline_version_id if versions else None

    def start_run(self, version: PipelineVersion, experiment: str, run_name: str,
                  params: dict[str, str]) -> str:
        """Start a run of `version` in `experiment` and return the run id."""
        experiment_id = self.experiment_id(experiment)
        with self._call(f"start run {run_name!r}"):
            run = self.kfp.run_pipeline(
                experiment_id, run_name, params=params, pipeline_id=version.pipeline_id,
                version_id=version.version_id, service_account=RUNNER_SERVICE_ACCOUNT)
        logger.info("started run %s (%s): %s/#/runs/details/%s", run_name, run.run_id,
                    self.host, run.run_id)
        return run.run_id

    def schedule(self, version: PipelineVersion, experiment: str, name: str, cron: str,
                 params: dict[str, str]) -> str:
        """Create an enabled recurring run and return its id.

        At most one run of it is active at a time, and runs missed while it was paused or the
        scheduler was down are skipped rather than started together.

        Raises:
            ConfigError: `cron` is not a valid 6-field cron expression.
        """
        cron = validate_cron(cron)
        experiment_id = self.experiment_id(experiment)
        with self._call(f"create recurring run {name!r}"):
            recurring = self.kfp.create_recurring_run(
                experiment_id, name, cron_expression=cron, max_concurrency=1, no_catchup=True,
                params=params, pipeline_id=version.pipeline_id, version_id=version.version_id,
                enabled=True, service_account=RUNNER_SERVICE_ACCOUNT)
        logger.info("scheduled %s (%s) at %r", name, recurring.recurring_run_id, cron)
        return recurring.recurring_run_id

    def list_runs(self, experiment: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """Return the newest `limit` runs, newest first, as dicts of id, name, state, created."""
        experiment_id = self.experiment_id(experiment) if experiment else None
        with self._call("list runs"):
            response = self.kfp.list_runs(page_size=limit, sort_by="created_at desc",
                                          experiment_id=experiment_id)
        return [{"run_id": run.run_id, "name": run.display_name, "state": run.state,
                 "created_at": _timestamp(run.created_at),
                 "recurring_run_id": run.recurring_run_id or ""}
                for run in response.runs or []]

    def list_recurring_runs(self, experiment: str | None = None,
                            limit: int = 20) -> list[dict[str, Any]]:
        """Return the newest `limit` recurring runs with their schedule and status."""
        experiment_id = self.experiment_id(experiment) if experiment else None
        with self._call("list recurring runs"):
            response = self.kfp.list_recurring_runs(page_size=limit, sort_by="created_at desc",
                                                    experiment_id=experiment_id)
        return [{"recurring_run_id": item.recurring_run_id, "name": item.display_name,
                 "cron": _cron_of(item), "status": item.status or item.mode or "",
                 "created_at": _timestamp(item.created_at)}
                for item in response.recurring_runs or []]

    def unschedule(self, recurring_run_id: str, delete: bool = False) -> None:
        """Disable a recurring run, or delete it when `delete` is True."""
        action = "delete" if delete else "disable"
        with self._call(f"{action} recurring run {recurring_run_id}"):
            if delete:
                self.kfp.delete_recurring_run(recurring_run_id)
            else:
                self.kfp.disable_recurring_run(recurring_run_id)
        logger.info("%sd recurring run %s", action, recurring_run_id)

    def run_state(self, run_id: str) -> tuple[str, str]:
        """Return (state, error message) of a run; the message is empty without an error."""
        with self._call(f"get run {run_id}"):
            run = self.kfp.get_run(run_id)
        message = getattr(run.error, "message", "") if run.error else ""
        return str(run.state or "RUNTIME_STATE_UNSPECIFIED"), message or ""

    def terminate(self, run_id: str) -> None:
        with self._call(f"terminate run {run_id}"):
            self.kfp.terminate_run(run_id)
        logger.warning("terminated run %s", run_id)

    def wait_for_run(self, run_id: str, *, timeout_s: float, poll_interval_s: float = 10.0,
                     watchdog: PodWatchdog | None = None,
                     sleep: Callable[[float], None] = time.sleep,
                     clock: Callable[[], float] = time.monotonic) -> str:
        """Poll a run until it ends; return "SUCCEEDED" or raise.

        After each poll, `watchdog` (if given) checks the run's pods. A pod that cannot
        start makes this terminate the run and raise with the pod's reason.

        Raises:
            PipelineError: the run ended in another state, the watchdog stopped it, or it
                was still running after `timeout_s` seconds (it keeps running then).
        """
        deadline = clock() + timeout_s
        last_state = None
        while True:
            state, error = self.run_state(run_id)
            if state != last_state:
                logger.info("run %s is %s", run_id, state)
                last_state = state
            if state in TERMINAL_STATES:
                if state == "SUCCEEDED":
                    return state
                raise PipelineError(f"run {run_id} ended {state}: {error or 'no error message'}."
                                    f" See its task logs at {self.host}/#/runs/details/{run_id}")
            problem = watchdog.check() if watchdog is not None else None
            if problem:
                self.terminate(run_id)
                raise PipelineError(f"stopped run {run_id}: {problem}")
            if clock() >= deadline:
                raise PipelineError(f"run {run_id} is still {state} after {timeout_s:g} s; it "
                                    "keeps running. Follow it with `edgeface pipeline runs`")
            sleep(max(0.0, min(poll_interval_s, deadline - clock())))


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [
        {"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _timestamp(value: Any) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value or "")


def _cron_of(recurring_run: Any) -> str:
    trigger = recurring_run.trigger
    schedule = getattr(trigger, "cron_schedule", None) if trigger else None
    return getattr(schedule, "cron", "") or ""


# --- watchdog -------------------------------------------------------------------------------


IMAGE_PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                      "ErrImageNeverPull")


def image_pull_problem(pod: dict[str, Any]) -> str | None:
    """Return why a container of `pod` cannot get its image, or None."""
    status = pod.get("status", {})
    for container in (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or []):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in IMAGE_PULL_REASONS:
            image = container.get("image", "?")
            return (f"container {container.get('name')} cannot pull image {image} "
                    f"({waiting['reason']}: {waiting.get('message', 'no message')})")
    return None


def scheduling_problem(pod: dict[str, Any]) -> str | None:
    """Return the scheduler's message for a Pending pod that no node accepts, or None."""
    status = pod.get("status", {})
    if status.get("phase") != "Pending":
        return None
    for condition in status.get("conditions") or []:
        if (condition.get("type") == "PodScheduled" and condition.get("status") == "False"
                and condition.get("reason") == "Unschedulable"):
            required = _required_node_labels(pod)
            needs = f"; it requires {required}" if required else ""
            return f"no node can run it: {condition.get('message', 'no message')}{needs}"
    return None


def _required_node_labels(pod: dict[str, Any]) -> str:
    affinity = (pod.get("spec", {}).get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    expressions = [f"{e.get('key')} {e.get('operator')} {e.get('values', [])}"
                   for term in required.get("nodeSelectorTerms") or []
                   for e in term.get("matchExpressions") or []]
    return " and ".join(expressions)


_HINTS = {
    "image": "import the image into the cluster, e.g. `k3d image import IMAGE -c CLUSTER`",
    "unschedulable": "check that an agent has the node labels and free CPU and memory, with "
                     "`edgeface cluster status --fleet FLEET`",
}


class PodWatchdog:
    """Finds the pods of one pipeline run that cannot start.

    KFP leaves such runs waiting forever: a pod whose image cannot be pulled stays in
    ImagePullBackOff, and a pod that no node accepts (for example a training task whose
    node affinity matches no agent) stays Pending. `check` reports a pod once it has been in
    either state for `pull_timeout_s` or `pending_timeout_s` seconds.

    The pods come from `kubectl get pods -l pipeline/runid=RUN -o json`. When kubectl fails,
    the watchdog logs a warning and reports nothing, so the wait goes on without it.
    """

    def __init__(self, run_id: str, *, namespace: str = PIPELINE_NAMESPACE,
                 context: str | None = None, pending_timeout_s: float = 300.0,
                 pull_timeout_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.run_id = run_id
        self.namespace = namespace
        self.context = context
        self.timeouts = {"image": pull_timeout_s, "unschedulable": pending_timeout_s}
        self.clock = clock
        self._first_seen: dict[tuple[str, str], float] = {}

    def list_pods(self) -> list[dict[str, Any]]:
        """Return the run's pods, parsed from `kubectl get pods -o json`.

        Raises:
            CommandError: kubectl is missing, fails, times out or prints something else.
        """
        from edgeface.cluster import CommandError, run_command

        command = ["kubectl"] + (["--context", self.context] if self.context else [])
        command += ["-n", self.namespace, "get", "pods", "-l",
                    f"{RUN_ID_POD_LABEL}={self.run_id}", "-o", "json"]
        output = run_command(command, timeout=30).stdout
        try:
            return list(json.loads(output).get("items", []))
        except (json.JSONDecodeError, AttributeError):
            raise CommandError(f"`{' '.join(command)}` printed no pod list: {output[:200]!r}") \
                from None

    def check(self) -> str | None:
        """Return why the run cannot proceed, or None while every pod can still start."""
        from edgeface.cluster import CommandError

        try:
            pods = self.list_pods()
        except CommandError as error:
            logger.warning("watchdog cannot list the pods of run %s: %s", self.run_id, error)
            return None
        now = self.clock()
        seen: set[tuple[str, str]] = set()
        for pod in pods:
            name = pod.get("metadata", {}).get("name", "?")
            for kind, problem in (("image", image_pull_problem(pod)),
                                  ("unschedulable", scheduling_problem(pod))):
                if problem is None:
                    continue
                key = (name, kind)
                seen.add(key)
                since = self._first_seen.setdefault(key, now)
                if now - since >= self.timeouts[kind]:
                    return f"pod {name} {problem}. Fix: {_HINTS[kind]}"
        self._first_seen = {key: t for key, t in self._first_seen.items() if key in seen}
        return None
