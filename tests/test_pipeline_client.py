"""`edgeface pipeline submit/schedule/runs/unschedule` against a recording fake of the KFP API.

The real `kfp.Client` talks to `FakeKfpServer` (tests/kfp_fake_server.py), a recording fake of
the KFP API server on 127.0.0.1, and the tests check the requests it sent: paths, query
parameters and JSON bodies. The run watchdog calls a recording fake of `kubectl`
(tests/fakes/kubectl) put first on PATH; no cluster is involved.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp_fake_server import FakeKfpServer

from edgeface.cli.main import build_parser, main
from edgeface.errors import ConfigError
from pipelines.client import PipelineClient, PipelineError, PodWatchdog, validate_cron

FAKES = Path(__file__).resolve().parent / "fakes"


def write_fleet(folder: Path) -> Path:
    path = folder / "fleet.yaml"
    path.write_text(
        "name: fleet-test\nimage: edgeface:0.1.0\nnodes:\n"
        "  - {name: edge-0, label: edge-0, host-data-path: ./d0, data-path: /data/edge, "
        "cpu: '1', memory: 2Gi}\n"
        "  - {name: edge-1, label: edge-1, host-data-path: ./d1, data-path: /data/edge, "
        "cpu: '1', memory: 2Gi}\n")
    return path


@pytest.fixture
def kfp_server() -> Iterator[FakeKfpServer]:
    server = FakeKfpServer().start()
    yield server
    server.stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    return write_fleet(tmp_path)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline of `write_fleet`'s fleet with 1 round, compiled once for the module."""
    folder = tmp_path_factory.mktemp("package")
    path = folder / "pipeline.yaml"
    assert main(["pipeline", "compile", "--fleet", str(write_fleet(folder)), "--rounds", "1",
                 "-o", str(path)]) == 0
    return path


class FakeKubectl:
    """The recording fake `kubectl` of tests/fakes in a temporary folder first on PATH."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bin, self.state = root / "bin", root / "state"
        self.bin.mkdir()
        self.state.mkdir()
        shutil.copyfile(FAKES / "fake_tool.py", self.bin / "fake_tool.py")
        shutil.copyfile(FAKES / "kubectl", self.bin / "kubectl")
        (self.bin / "kubectl").chmod(stat.S_IRWXU)
        monkeypatch.setenv("PATH", f"{self.bin}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("EDGEFACE_FAKE_STATE", str(self.state))

    def pods(self, *pods: dict[str, Any]) -> None:
        rule = {"tool": "kubectl", "match": ["get", "pods"],
                "responses": [{"stdout": json.dumps({"items": list(pods)})}]}
        (self.state / "rules.json").write_text(json.dumps([rule]))

    def calls(self) -> list[list[str]]:
        log = self.state / "calls.jsonl"
        return [json.loads(line)["args"] for line in log.read_text().splitlines()] \
            if log.exists() else []


@pytest.fixture
def kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeKubectl:
    return FakeKubectl(tmp_path, monkeypatch)


def image_pull_pod(name: str = "train-pod") -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": "Pending", "containerStatuses": [
        {"name": "main", "image": "edgeface:0.1.0", "state": {"waiting": {
            "reason": "ImagePullBackOff", "message": "pull access denied"}}}]}}


def unschedulable_pod(name: str = "train-pod") -> dict[str, Any]:
    message = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "edgeface.io/node", "operator": "In", "values": ["edge-9"]}]}]}}}
    return {"metadata": {"name": name}, "spec": {"affinity": affinity},
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": message}]}}


def submit_args(package: Path, server: FakeKfpServer, *extra: str) -> list[str]:
    return ["pipeline", "submit", "--package", str(package), "--host", server.url,
            "--pipeline-name", "edgeface-fleet-test-simulation", *extra]


def schedule_args(package: Path, server: FakeKfpServer, cron: str, *extra: str) -> list[str]:
    return ["pipeline", "schedule", "--package", str(package), "--host", server.url,
            "--pipeline-name", "edgeface-fleet-test-simulation", "--cron", cron, *extra]


# --- submit ---------------------------------------------------------------------------------


def test_submit_uploads_and_starts_run(kfp_server: FakeKfpServer, fleet: Path,
                                       kubectl: FakeKubectl,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    kubectl.pods()
    code = main(["pipeline", "submit", "--fleet", str(fleet), "--rounds", "1",
                 "--host", kfp_server.url, "--param", "dataset_dir=/data/dataset/orl",
                 "--wait", "--poll-interval", "0.01", "--format", "json"])
    assert code == 0
    output = json.loads(capsys.readouterr().out)
    assert output["state"] == "SUCCEEDED"

    [upload] = kfp_server.requests_to("POST", "/pipelines/upload")
    assert upload.query["name"] == "edgeface-fleet-test-simulation"
    assert b"edgeface-federated" in upload.body
    [version_upload] = kfp_server.requests_to("POST", "/pipelines/upload_version")
    assert version_upload.query["pipelineid"] == output["pipeline_id"]
    assert version_upload.query["name"].startswith("edgeface-fleet-test-simulation-")
    [experiment] = kfp_server.requests_to("POST", "/experiments")
    assert experiment.json()["display_name"] == "edgeface"
    [run] = kfp_server.requests_to("POST", "/runs")
    body = run.json()
    assert body["service_account"] == "edgeface-pipeline-runner"
    assert body["experiment_id"] == experiment.json().get("experiment_id", body["experiment_id"])
    assert body["pipeline_version_reference"] == {"pipeline_id": output["pipeline_id"],
                                                  "pipeline_version_id": output["version_id"]}
    assert body["runtime_config"]["parameters"] == {"dataset_dir": "/data/dataset/orl"}
    assert output["run_id"] in kfp_server.state.runs
    assert kfp_server.requests[0].path == "/apis/v2beta1/healthz"
    # The watchdog's kubectl context comes from the fleet's cluster name.
    assert kubectl.calls()[0][:2] == ["--context", "k3d-fleet-test"]


def test_resubmit_reuses_version_and_experiment(kfp_server: FakeKfpServer,
                                                package: Path) -> None:
    assert main(submit_args(package, kfp_server)) == 0
    assert main(submit_args(package, kfp_server, "--run-name", "second")) == 0
    assert len(kfp_server.requests_to("POST", "/pipelines/upload")) == 1
    assert len(kfp_server.requests_to("POST", "/pipelines/upload_version")) == 1
    assert len(kfp_server.requests_to("POST", "/experiments")) == 1
    runs = kfp_server.requests_to("POST", "/runs")
    assert len(runs) == 2
    assert runs[1].json()["display_name"] == "second"
    assert runs[0].json()["pipeline_version_reference"] == \
        runs[1].json()["pipeline_version_reference"]


def test_submit_package_default_name(kfp_server: FakeKfpServer, package: Path) -> None:
    assert main(["pipeline", "submit", "--package", str(package), "--host", kfp_server.url]) == 0
    [upload] = kfp_server.requests_to("POST", "/pipelines/upload")
    assert upload.query["name"] == "edgeface-federated"


def test_package_excludes_fleet(kfp_server: FakeKfpServer, fleet: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    package = tmp_path / "pipeline.yaml"
    for command in ("submit", "schedule"):
        with pytest.raises(SystemExit) as exit_info:
            main(["pipeline", command, "--fleet", str(fleet), "--package", str(package),
                  "--host", kfp_server.url, "--cron", "0 0 3 * * *"])
        assert exit_info.value.code == 2
        assert "argument --package: not allowed with argument --fleet" in capsys.readouterr().err
    assert kfp_server.requests == []


@pytest.mark.parametrize("option", [["--rounds", "2"], ["--mode", "pre-placed"],
                                    ["--config", "run.yaml"], ["--task-timeout", "60"]])
def test_package_rejects_compile_options(kfp_server: FakeKfpServer, tmp_path: Path,
                                         option: list[str],
                                         caplog: pytest.LogCaptureFixture) -> None:
    code = main(["pipeline", "submit", "--package", str(tmp_path / "pipeline.yaml"),
                 "--host", kfp_server.url, *option])
    assert code == 2
    assert f"{option[0]} cannot change a compiled --package" in caplog.text
    assert kfp_server.requests == []


def test_unknown_param_rejected(kfp_server: FakeKfpServer, package: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    code = main(submit_args(package, kfp_server, "--param", "dataset=/data"))
    assert code == 2
    assert "unknown pipeline parameter 'dataset'" in caplog.text
    assert "dataset_dir" in caplog.text
    assert kfp_server.requests == []


@pytest.mark.parametrize(("value", "message"), [
    ("notjson", "pipeline parameter config_json is not valid JSON"),
    ('{"train":{"rounds":5}}', "rounds 5 (compiled with 1)"),
    ('{"train":{"rounds":0}}', "train.rounds: Input should be greater than or equal to 1"),
])
def test_invalid_config_json_rejected(kfp_server: FakeKfpServer, package: Path, value: str,
                                      message: str, caplog: pytest.LogCaptureFixture,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = main(submit_args(package, kfp_server, "--param", f"config_json={value}"))
    assert code == 2
    assert f"invalid --param config_json={value!r}" in caplog.text
    assert message in caplog.text
    assert "Traceback" not in capsys.readouterr().err
    # The recording fake received no request, not even the health check.
    assert kfp_server.requests == []


def test_config_json_mismatch_names_fix(kfp_server: FakeKfpServer, package: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    code = main(schedule_args(package, kfp_server, "0 0 3 * * *",
                              "--param", 'config_json={"train":{"rounds":5}}'))
    assert code == 2
    assert "config_json does not match the compiled pipeline" in caplog.text
    assert "edgeface pipeline compile --config FILE --rounds R" in caplog.text
    assert kfp_server.requests == []


def test_compiled_config_json_accepted(kfp_server: FakeKfpServer, package: Path) -> None:
    spec = next(yaml.safe_load_all(package.read_text()))
    config = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]
                        ["defaultValue"])
    config["train"]["lr"] = 0.05
    value = json.dumps(config)
    assert main(submit_args(package, kfp_server, "--param", f"config_json={value}")) == 0
    [run] = kfp_server.requests_to("POST", "/runs")
    assert run.json()["runtime_config"]["parameters"] == {"config_json": value}


def test_config_json_without_compiled_shape(kfp_server: FakeKfpServer, package: Path,
                                            tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    documents = list(yaml.safe_load_all(package.read_text()))
    for component in documents[0]["components"].values():
        for task in component.get("dag", {}).get("tasks", {}).values():
            task.get("inputs", {}).get("parameters", {}).pop("compiled_rounds", None)
    stripped = tmp_path / "stripped.yaml"
    stripped.write_text(yaml.safe_dump_all(documents))
    code = main(submit_args(stripped, kfp_server, "--param", "config_json={}"))
    assert code == 2
    assert "cannot check --param config_json='{}'" in caplog.text
    assert "compiled_rounds" in caplog.text
    assert kfp_server.requests == []


@pytest.mark.parametrize(("text", "message"), [
    ("train:\n  rounds: 2\nseed: 1\n",
     "is not a compiled Kubeflow pipeline: its top-level keys are seed, train"),
    ("", "is not a compiled Kubeflow pipeline: it is not a mapping"),
    ("train: [2,\n", "invalid pipeline package"),
])
@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_package_not_pipeline_rejected(kfp_server: FakeKfpServer, tmp_path: Path, command: str,
                                       text: str, message: str,
                                       caplog: pytest.LogCaptureFixture,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    args = submit_args(path, kfp_server) if command == "submit" else \
        schedule_args(path, kfp_server, "0 0 3 * * *")
    assert main(args) == 2
    assert message in caplog.text
    assert str(path) in caplog.text
    assert "edgeface pipeline compile -o FILE" in caplog.text
    assert "Traceback" not in capsys.readouterr().err
    assert kfp_server.requests == []


def pipeline_command_options(command: str) -> set[str]:
    """Return the option strings that `edgeface pipeline COMMAND` accepts."""
    parser = build_parser()
    for name in ("pipeline", command):
        [subparsers] = [action for action in parser._actions
                        if isinstance(action, argparse._SubParsersAction)]
        parser = subparsers.choices[name]
    return {option for action in parser._actions for option in action.option_strings}


@pytest.mark.parametrize(("command", "extra"), [
    ("compile", ["-o", "pipeline.yaml"]),
    ("submit", []),
    ("schedule", ["--cron", "0 0 3 * * *"]),
])
def test_missing_fleet_hint_flags_exist(kfp_server: FakeKfpServer, command: str,
                                        extra: list[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    code = main(["pipeline", command, "--host", kfp_server.url, *extra] if command != "compile"
                else ["pipeline", command, *extra])
    assert code == 2
    assert "no fleet file given: pass --fleet FLEET.yaml" in caplog.text
    suggested = set(re.findall(r"--[a-z][a-z-]*", caplog.text))
    assert suggested
    assert suggested <= pipeline_command_options(command)
    assert ("--package" in suggested) == (command != "compile")
    assert kfp_server.requests == []


def test_kfp_host_from_environment(kfp_server: FakeKfpServer,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KFP_HOST", kfp_server.url)
    assert main(["pipeline", "runs"]) == 0
    assert kfp_server.requests_to("GET", "/runs")


def test_unreachable_host_fails_fast(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    code = main(["pipeline", "runs", "--host", f"http://127.0.0.1:{port}"])
    assert code == 2
    assert time.monotonic() - started < 5.0
    assert f"KFP API server at http://127.0.0.1:{port} is unreachable" in caplog.text
    assert "port-forward" in caplog.text


def test_rejected_request_names_status(kfp_server: FakeKfpServer) -> None:
    client = PipelineClient(kfp_server.url)
    with pytest.raises(PipelineError, match=r"rejected get run missing-run: HTTP 404"):
        client.run_state("missing-run")


# --- wait and watchdog ----------------------------------------------------------------------


def test_submit_wait_succeeds(kfp_server: FakeKfpServer, package: Path,
                              kubectl: FakeKubectl, capsys: pytest.CaptureFixture[str]) -> None:
    kubectl.pods()
    kfp_server.state.run_states = ["PENDING", "RUNNING", "SUCCEEDED"]
    code = main(submit_args(package, kfp_server, "--wait", "--poll-interval", "0.01",
                            "--context", "k3d-fleet-test", "--format", "json"))
    assert code == 0
    output = json.loads(capsys.readouterr().out)
    assert output["state"] == "SUCCEEDED"
    assert len(kfp_server.requests_to("GET", f"/runs/{output['run_id']}")) == 3
    assert kubectl.calls()[0] == ["--context", "k3d-fleet-test", "-n", "kubeflow", "get", "pods",
                                  "-l", f"pipeline/runid={output['run_id']}", "-o", "json"]


def test_submit_wait_stops_on_image_pull(kfp_server: FakeKfpServer, package: Path,
                                         kubectl: FakeKubectl,
                                         caplog: pytest.LogCaptureFixture) -> None:
    kubectl.pods(image_pull_pod())
    code = main(submit_args(package, kfp_server, "--wait", "--poll-interval", "0.01",
                            "--pull-timeout", "0"))
    assert code == 2
    [run_id] = kfp_server.state.runs
    assert kfp_server.requests_to("POST", f"/runs/{run_id}:terminate")
    assert "cannot pull image edgeface:0.1.0 (ImagePullBackOff" in caplog.text
    assert "k3d image import" in caplog.text


def test_submit_wait_reports_failed_run(kfp_server: FakeKfpServer, package: Path,
                                        kubectl: FakeKubectl,
                                        caplog: pytest.LogCaptureFixture) -> None:
    kubectl.pods()
    kfp_server.state.run_states = ["RUNNING", "FAILED"]
    kfp_server.state.run_error = "task train-edge-node failed"
    code = main(submit_args(package, kfp_server, "--wait", "--poll-interval", "0.01"))
    assert code == 2
    assert "ended FAILED: task train-edge-node failed" in caplog.text


def test_wait_times_out_without_stopping(kfp_server: FakeKfpServer, package: Path) -> None:
    assert main(submit_args(package, kfp_server)) == 0
    [run_id] = kfp_server.state.runs
    kfp_server.state.run_states = ["RUNNING"]
    client = PipelineClient(kfp_server.url)
    with pytest.raises(PipelineError, match="still RUNNING after 0 s; it keeps running"):
        client.wait_for_run(run_id, timeout_s=0, sleep=lambda seconds: None)
    assert not kfp_server.requests_to("POST", f"/runs/{run_id}:terminate")


def test_watchdog_waits_for_pending_timeout(kubectl: FakeKubectl) -> None:
    kubectl.pods(unschedulable_pod())
    now = [0.0]
    watchdog = PodWatchdog("run-1", pending_timeout_s=120, clock=lambda: now[0])
    assert watchdog.check() is None
    now[0] = 119.0
    assert watchdog.check() is None
    now[0] = 120.0
    problem = watchdog.check()
    assert problem is not None
    assert "pod train-pod no node can run it: 0/3 nodes are available" in problem
    assert "edgeface.io/node In ['edge-9']" in problem


def test_watchdog_forgets_pods_that_start(kubectl: FakeKubectl) -> None:
    now = [0.0]
    watchdog = PodWatchdog("run-1", pending_timeout_s=60, clock=lambda: now[0])
    kubectl.pods(unschedulable_pod())
    assert watchdog.check() is None
    kubectl.pods()
    now[0] = 50.0
    assert watchdog.check() is None
    kubectl.pods(unschedulable_pod())
    now[0] = 100.0
    assert watchdog.check() is None


def test_watchdog_ignores_kubectl_failure(kubectl: FakeKubectl,
                                          caplog: pytest.LogCaptureFixture) -> None:
    rule = {"tool": "kubectl", "match": ["get", "pods"],
            "responses": [{"stderr": "connection refused", "exit": 1}]}
    (kubectl.state / "rules.json").write_text(json.dumps([rule]))
    assert PodWatchdog("run-1", pull_timeout_s=0).check() is None
    assert "watchdog cannot list the pods of run run-1" in caplog.text


# --- schedule, runs, unschedule -------------------------------------------------------------


def test_schedule_sends_cron_and_limits(kfp_server: FakeKfpServer, package: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(schedule_args(package, kfp_server, "0 0 3 * * *", "--format", "json"))
    assert code == 0
    output = json.loads(capsys.readouterr().out)
    [request] = kfp_server.requests_to("POST", "/recurringruns")
    body = request.json()
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["service_account"] == "edgeface-pipeline-runner"
    assert body["display_name"] == "edgeface-fleet-test-simulation-schedule"
    assert body["pipeline_version_reference"]["pipeline_version_id"] == output["version_id"]
    assert output["recurring_run_id"] in kfp_server.state.recurring_runs


def test_five_field_cron_rejected(kfp_server: FakeKfpServer, package: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    code = main(schedule_args(package, kfp_server, "0 3 * * *"))
    assert code == 2
    assert "has 5 fields" in caplog.text
    assert "use '0 0 3 * * *'" in caplog.text
    assert kfp_server.requests == []


@pytest.mark.parametrize("expression", [
    "0 0 3 * * *", "*/30 * * * * *", "0 0 3 * * MON-FRI", "0 0 0 1 JAN ?", "0 15,45 8-18 * * 1-5",
    "@daily", "@every 6h", "@every 1h30m",
])
def test_valid_cron_accepted(expression: str) -> None:
    assert validate_cron(f"  {expression} ") == expression


@pytest.mark.parametrize(("expression", "message"), [
    ("0 3 * * *", "has 5 fields"),
    ("0 0 3 * * * 2027", "has 7 fields"),
    ("60 0 3 * * *", "invalid second field.*outside 0-59"),
    ("0 0 24 * * *", "invalid hour field.*outside 0-23"),
    ("0 0 3 0 * *", "invalid day of month field.*outside 1-31"),
    ("0 0 3 * * 7", "invalid day of week field.*outside 0-6"),
    ("0 0 3 * * FUN", "invalid day of week field.*not a number"),
    ("*/0 * * * * *", "step '0' is not a positive number"),
    ("@every day", "has 2 fields"),
])
def test_invalid_cron_rejected(expression: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_cron(expression)


def test_runs_lists_runs_and_schedules(kfp_server: FakeKfpServer, package: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(submit_args(package, kfp_server, "--run-name", "nightly-check")) == 0
    assert main(schedule_args(package, kfp_server, "0 30 2 * * *")) == 0
    capsys.readouterr()
    assert main(["pipeline", "runs", "--host", kfp_server.url, "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [run["name"] for run in listed["runs"]] == ["nightly-check"]
    assert [r["cron"] for r in listed["recurring_runs"]] == ["0 30 2 * * *"]
    [request] = kfp_server.requests_to("GET", "/runs")
    assert request.query == {"page_size": "20", "sort_by": "created_at desc"}

    assert main(["pipeline", "runs", "--host", kfp_server.url]) == 0
    text = capsys.readouterr().out
    assert "nightly-check" in text
    assert "0 30 2 * * *" in text
    assert "RECURRING RUN ID" in text


def test_unschedule_disables_or_deletes(kfp_server: FakeKfpServer, package: Path) -> None:
    assert main(schedule_args(package, kfp_server, "0 0 3 * * *")) == 0
    [recurring_run_id] = kfp_server.state.recurring_runs
    assert main(["pipeline", "unschedule", recurring_run_id, "--host", kfp_server.url]) == 0
    assert kfp_server.requests_to("POST", f"/recurringruns/{recurring_run_id}:disable")
    assert kfp_server.state.recurring_runs[recurring_run_id]["status"] == "DISABLED"
    assert main(["pipeline", "unschedule", recurring_run_id, "--delete",
                 "--host", kfp_server.url]) == 0
    assert kfp_server.requests_to("DELETE", f"/recurringruns/{recurring_run_id}")
    assert kfp_server.state.recurring_runs == {}


def test_unschedule_unknown_id(kfp_server: FakeKfpServer,
                               caplog: pytest.LogCaptureFixture) -> None:
    code = main(["pipeline", "unschedule", "no-such-id", "--host", kfp_server.url])
    assert code == 2
    assert "rejected disable recurring run no-such-id: HTTP 404" in caplog.text
