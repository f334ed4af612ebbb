"""Recording fake of the KFP API server (REST API v2beta1), on 127.0.0.1, for the client tests.

The real API server needs a cluster, so `FakeKfpServer` responds to the requests that
`kfp.Client` sends for upload, experiments, runs and recurring runs with the JSON shapes of
v2beta1. It keeps what was created in memory and records every request (method, path, query
and body), and tests assert on those recorded requests. It implements only what edgeface's client calls; anything
else gets a 404 with a JSON error body, as the real server sends for an unknown path.

A run's state advances through `run_states` (set per test): each GET of the run returns the
next state, and the last one repeats.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PREFIX = "/apis/v2beta1"
CREATED_AT = "2026-12-01T03:00:00Z"


@dataclass
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeState:
    """Objects created through the fake, and the scripted run states."""

    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    recurring_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_states: list[str] = field(default_factory=lambda: ["RUNNING", "SUCCEEDED"])
    run_error: str = ""
    state_reads: dict[str, int] = field(default_factory=dict)


def _new_id() -> str:
    return str(uuid.uuid4())


def _display_name_filter(query: dict[str, str]) -> str | None:
    """Return the display_name that a v2beta1 `filter` query parameter selects, if any."""
    if "filter" not in query:
        return None
    for predicate in json.loads(query["filter"]).get("predicates", []):
        if predicate.get("key") == "display_name":
            return predicate.get("stringValue") or predicate.get("string_value")
    return None


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        pass

    def _handle(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.requests.append(RecordedRequest(method, parts.path, query, body))
            status, payload = self.server.route(method, parts.path, query, body)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: FakeState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state
        self.requests: list[RecordedRequest] = []
        self.lock = threading.Lock()

    def route(self, method: str, path: str, query: dict[str, str],
              body: bytes) -> tuple[int, Any]:
        if not path.startswith(PREFIX):
            return _not_found(path)
        resource = path[len(PREFIX):]
        for (route_method, prefix), handler in _ROUTES.items():
            if method == route_method and _matches(prefix, resource):
                return handler(self.state, resource, query, body)
        return _not_found(path)


def _matches(pattern: str, resource: str) -> bool:
    pattern_parts, parts = pattern.strip("/").split("/"), resource.strip("/").split("/")
    if len(pattern_parts) != len(parts):
        return False
    for expected, actual in zip(pattern_parts, parts):
        head, _, action = expected.partition(":")
        if head == "*":
            if action and not actual.endswith(":" + action):
                return False
        elif expected != actual:
            return False
    return True


def _not_found(path: str) -> tuple[int, Any]:
    return 404, {"error": f"no route for {path}", "code": 5, "message": f"no route for {path}"}


def _resource_id(resource: str, index: int) -> str:
    return resource.strip("/").split("/")[index].split(":")[0]


# --- handlers -------------------------------------------------------------------------------


def _healthz(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    return 200, {"commit_sha": "fake", "tag_name": "2.17.1", "multi_user": False}


def _list_pipelines(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    selected = _display_name_filter(query)
    found = [p for p in state.pipelines.values() if selected in (None, p["display_name"])]
    return 200, ({"pipelines": found, "total_size": len(found)} if found else {})


def _add_version(state: FakeState, pipeline_id: str, name: str) -> dict[str, Any]:
    version = {"pipeline_id": pipeline_id, "pipeline_version_id": _new_id(),
               "display_name": name, "created_at": CREATED_AT}
    state.versions.setdefault(pipeline_id, []).append(version)
    return version


def _upload_pipeline(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    pipeline = {"pipeline_id": _new_id(), "display_name": query["name"], "created_at": CREATED_AT}
    state.pipelines[pipeline["pipeline_id"]] = pipeline
    _add_version(state, pipeline["pipeline_id"], query["name"])
    return 200, pipeline


def _upload_version(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    if query.get("pipelineid") not in state.pipelines:
        return 404, {"code": 5, "message": f"pipeline {query.get('pipelineid')} not found"}
    return 200, _add_version(state, query["pipelineid"], query["name"])


def _list_versions(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    selected = _display_name_filter(query)
    found = [v for v in state.versions.get(_resource_id(resource, 1), [])
             if selected in (None, v["display_name"])]
    return 200, ({"pipeline_versions": found, "total_size": len(found)} if found else {})


def _list_experiments(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    selected = _display_name_filter(query)
    found = [e for e in state.experiments.values() if selected in (None, e["display_name"])]
    return 200, ({"experiments": found, "total_size": len(found)} if found else {})


def _create_experiment(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    experiment = {**json.loads(body), "experiment_id": _new_id(), "created_at": CREATED_AT}
    state.experiments[experiment["experiment_id"]] = experiment
    return 200, experiment


def _create_run(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    run = {**json.loads(body), "run_id": _new_id(), "state": "PENDING", "created_at": CREATED_AT}
    state.runs[run["run_id"]] = run
    return 200, run


def _get_run(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    run_id = _resource_id(resource, 1)
    if run_id not in state.runs:
        return 404, {"code": 5, "message": f"run {run_id} not found"}
    reads = state.state_reads.get(run_id, 0)
    state.state_reads[run_id] = reads + 1
    run = dict(state.runs[run_id])
    run["state"] = state.run_states[min(reads, len(state.run_states) - 1)]
    if run["state"] == "FAILED" and state.run_error:
        run["error"] = {"code": 2, "message": state.run_error}
    return 200, run


def _terminate_run(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    state.run_states = ["CANCELING", "CANCELED"]
    return 200, {}


def _list_runs(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    runs = list(state.runs.values())
    return 200, ({"runs": runs, "total_size": len(runs)} if runs else {})


def _create_recurring_run(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    recurring = {**json.loads(body), "recurring_run_id": _new_id(), "status": "ENABLED",
                 "created_at": CREATED_AT}
    state.recurring_runs[recurring["recurring_run_id"]] = recurring
    return 200, recurring


def _list_recurring_runs(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    items = list(state.recurring_runs.values())
    # The one camelCase key of the v2beta1 list responses, as the real server sends it.
    return 200, ({"recurringRuns": items, "total_size": len(items)} if items else {})


def _disable_recurring_run(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    recurring_run_id = _resource_id(resource, 1)
    if recurring_run_id not in state.recurring_runs:
        return 404, {"code": 5, "message": f"recurring run {recurring_run_id} not found"}
    state.recurring_runs[recurring_run_id]["status"] = "DISABLED"
    return 200, {}


def _delete_recurring_run(state: FakeState, resource: str, query: dict[str, str], body: bytes):
    if state.recurring_runs.pop(_resource_id(resource, 1), None) is None:
        return 404, {"code": 5, "message": "recurring run not found"}
    return 200, {}


_ROUTES = {
    ("GET", "/healthz"): _healthz,
    ("GET", "/pipelines"): _list_pipelines,
    ("POST", "/pipelines/upload"): _upload_pipeline,
    ("POST", "/pipelines/upload_version"): _upload_version,
    ("GET", "/pipelines/*/versions"): _list_versions,
    ("GET", "/experiments"): _list_experiments,
    ("POST", "/experiments"): _create_experiment,
    ("POST", "/runs/*:terminate"): _terminate_run,
    ("GET", "/runs/*"): _get_run,
    ("GET", "/runs"): _list_runs,
    ("POST", "/runs"): _create_run,
    ("POST", "/recurringruns/*:disable"): _disable_recurring_run,
    ("DELETE", "/recurringruns/*"): _delete_recurring_run,
    ("GET", "/recurringruns"): _list_recurring_runs,
    ("POST", "/recurringruns"): _create_recurring_run,
}


class FakeKfpServer:
    """Recording fake of the KFP API server, serving on 127.0.0.1 in a background thread."""

    def __init__(self) -> None:
        self.state = FakeState()
        self._server = _Server(self.state)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._server.lock:
            return list(self._server.requests)

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        """Return the recorded requests with this method and path (without the query)."""
        return [r for r in self.requests if r.method == method and r.path == PREFIX + path]

    def start(self) -> FakeKfpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
