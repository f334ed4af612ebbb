"""`edgeface cluster` against recording fakes of docker, k3d and kubectl.

No Docker engine or cluster is involved: tests/fakes contains small scripts named docker, k3d
and kubectl that log their arguments and print canned output. They are put first on PATH, so
every external command the CLI runs is recorded and none reaches a real tool.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeface.cli import cluster as cluster_cli
from edgeface.cli.main import main
from edgeface.cluster import (
    SHARE_MARKER,
    CommandError,
    k3d_config_yaml,
    render_k3d_config,
    run_command,
)
from edgeface.fleet import load_fleet

REPO_ROOT = Path(__file__).resolve().parents[1]
FAKES = Path(__file__).resolve().parent / "fakes"
CONTEXT = "k3d-fleet-test"
KFP_API = "ghcr.io/kubeflow/kfp-api-server:2.17.1"


class FakeTools:
    """Recording fakes of docker, k3d and kubectl in a temporary bin folder first on PATH."""

    def __init__(self, root: Path, tools: tuple[str, ...]) -> None:
        self.bin = root / "bin"
        self.state = root / "state"
        self.bin.mkdir()
        self.state.mkdir()
        shutil.copyfile(FAKES / "fake_tool.py", self.bin / "fake_tool.py")
        for tool in tools:
            shutil.copyfile(FAKES / tool, self.bin / tool)
            (self.bin / tool).chmod(stat.S_IRWXU)
        self.rules: list[dict[str, Any]] = []

    def respond(self, tool: str, match: list[str], *responses: dict[str, Any]) -> None:
        self.rules.append({"tool": tool, "match": match, "responses": list(responses)})
        (self.state / "rules.json").write_text(json.dumps(self.rules))

    def calls(self) -> list[list[str]]:
        log = self.state / "calls.jsonl"
        if not log.exists():
            return []
        return [[entry["tool"], *entry["args"]]
                for entry in map(json.loads, log.read_text().splitlines())]

    def stdin_of(self, *args: str) -> list[str]:
        """Return the standard input of every recorded call whose arguments end in `args`."""
        entries = map(json.loads, (self.state / "calls.jsonl").read_text().splitlines())
        return [entry["stdin"] for entry in entries if entry["args"][-len(args):] == list(args)]


def make_fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               tools: tuple[str, ...] = ("docker", "k3d", "kubectl"),
               keep_path: bool = True) -> FakeTools:
    fakes = FakeTools(tmp_path, tools)
    path = str(fakes.bin)
    if keep_path:
        path += os.pathsep + os.environ.get("PATH", "")
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("EDGEFACE_FAKE_STATE", str(fakes.state))
    return fakes


@pytest.fixture
def fakes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeTools:
    return make_fakes(tmp_path, monkeypatch)


@pytest.fixture
def fleet_file(tmp_path: Path) -> Path:
    nodes = "".join(
        f"  - {{name: edge-{i}, label: edge-{i}, host-data-path: data/edge-{i}, "
        f"data-path: /data/edge, cpu: '1', memory: 1Gi}}\n" for i in range(2)
    )
    path = tmp_path / "fleet.yaml"
    path.write_text("name: fleet-test\nimage: edgeface:0.1.0\n"
                    "edge-taint: {key: edgeface.io/edge, value: 'true', effect: NoSchedule}\n"
                    f"nodes:\n{nodes}")
    return path


@pytest.fixture
def ready_fleet(fleet_file: Path) -> Path:
    """`fleet_file` with its node folders created, as `up` requires."""
    for node in load_fleet(fleet_file).nodes:
        node.host_data_path.mkdir(parents=True)
    return fleet_file


def with_dataset(fleet_file: Path, dataset: Path) -> None:
    """Add `dataset-host-path: DATASET` to the fleet file."""
    fleet_file.write_text(f"dataset-host-path: {dataset}\n" + fleet_file.read_text())


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    """A copy of k8s/ without secret env files, so `up` cannot write into the repository."""
    target = tmp_path / "k8s"
    shutil.copytree(REPO_ROOT / "k8s", target, ignore=shutil.ignore_patterns("*.env"))
    return target


def pod(namespace: str, name: str, labels: dict[str, str], ready: bool = True,
        waiting: tuple[str, str] | None = None, unschedulable: str | None = None,
        terminated: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": "Running" if ready else "Pending",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"name": "main", "state": {}}],
    }
    if waiting:
        status["containerStatuses"][0]["state"] = {
            "waiting": {"reason": waiting[0], "message": waiting[1]}}
    if terminated:
        status["containerStatuses"][0]["lastState"] = {
            "terminated": {"reason": terminated, "exitCode": 137}}
    if unschedulable:
        status["conditions"].append({"type": "PodScheduled", "status": "False",
                                     "reason": "Unschedulable", "message": unschedulable})
    return {"metadata": {"namespace": namespace, "name": name, "labels": labels},
            "status": status}


def healthy_pods() -> list[dict[str, Any]]:
    return [
        pod("kubeflow", "mysql-5d8f-x1", {"app": "mysql"}),
        pod("kubeflow", "metadata-grpc-deployment-7c-x2", {"component": "metadata-grpc-server"}),
        pod("kubeflow", "ml-pipeline-6b-x3", {"app": "ml-pipeline"}),
        pod("kubeflow", "workflow-controller-55-x4", {"app": "workflow-controller"}),
        pod("kubeflow", "seaweedfs-88-x5", {"app": "seaweedfs"}),
        pod("edgeface", "postgres-0", {"app.kubernetes.io/name": "postgres"}),
        pod("edgeface", "mlflow-7d9f-x6", {"app.kubernetes.io/name": "mlflow"}),
    ]


def pod_list(pods: list[dict[str, Any]]) -> dict[str, Any]:
    return {"stdout": json.dumps({"kind": "List", "items": pods})}


def answer_up(fakes: FakeTools, pods: list[dict[str, Any]] | None = None,
              clusters: str = "[]") -> None:
    fakes.respond("docker", ["info"], {"stdout": "8\n"})
    fakes.respond("k3d", ["cluster", "list"], {"stdout": clusters})
    fakes.respond("docker", ["images"], {"stdout": "\n".join(
        ["edgeface:0.1.0", "edgeface-mlflow:3.17.2", KFP_API, "mysql:8.4", "<none>:<none>"])})
    fakes.respond("kubectl", ["get", "pods"], pod_list(healthy_pods() if pods is None else pods))


def up_args(fleet_file: Path, manifests: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["cluster", "up", "--fleet", str(fleet_file), "--manifests", str(manifests),
            "--build-context", str(tmp_path), "--config-out", str(tmp_path / "k3d.yaml"),
            *extra]


# --------------------------------------------------------------------------- up


def test_up_runs_exact_command_sequence(fakes: FakeTools, ready_fleet: Path, manifests: Path,
                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    answer_up(fakes)

    code = main(up_args(ready_fleet, manifests, tmp_path))

    assert code == 0
    kubectl = ["kubectl", "--context", CONTEXT]
    assert fakes.calls() == [
        ["docker", "info", "--format", "{{.NCPU}}"],
        ["k3d", "cluster", "list", "-o", "json"],
        ["k3d", "cluster", "create", "--config", str(tmp_path / "k3d.yaml")],
        ["docker", "build", "-t", "edgeface:0.1.0", str(tmp_path)],
        ["docker", "build", "-t", "edgeface-mlflow:3.17.2", str(manifests / "mlflow")],
        ["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
        ["k3d", "image", "import", "edgeface:0.1.0", "edgeface-mlflow:3.17.2", KFP_API,
         "docker.io/library/mysql:8.4", "-c", "fleet-test"],
        [*kubectl, "apply", "-k", str(manifests / "kfp" / "cluster-scoped")],
        [*kubectl, "wait", "--for", "condition=established", "--timeout=180s", "crd", "--all"],
        [*kubectl, "apply", "-k", str(manifests / "kfp" / "platform-agnostic")],
        [*kubectl, "apply", "-k", str(manifests / "base")],
        [*kubectl, "apply", "-f", "-"],
        [*kubectl, "get", "pods", "--all-namespaces", "-o", "json"],
    ]
    output = capsys.readouterr().out
    assert (f"kubectl --context {CONTEXT} -n kubeflow port-forward svc/ml-pipeline-ui 8080:80"
            in output)
    assert f"kubectl --context {CONTEXT} -n edgeface port-forward svc/mlflow 5000:5000" in output


def test_up_creates_node_volumes(fakes: FakeTools, ready_fleet: Path, manifests: Path,
                                 tmp_path: Path) -> None:
    answer_up(fakes)

    assert main(up_args(ready_fleet, manifests, tmp_path)) == 0

    [applied] = fakes.stdin_of("apply", "-f", "-")
    objects = list(yaml.safe_load_all(applied))
    claims = sorted(o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim")
    assert claims == ["edgeface-data-edge-0", "edgeface-data-edge-1"]


def test_up_writes_config_and_secrets(fakes: FakeTools, ready_fleet: Path, manifests: Path,
                                      tmp_path: Path) -> None:
    answer_up(fakes)

    assert main(up_args(ready_fleet, manifests, tmp_path)) == 0

    written = yaml.safe_load((tmp_path / "k3d.yaml").read_text())
    assert written == render_k3d_config(load_fleet(ready_fleet), host_cpus=8)
    postgres_env = manifests / "base" / "secrets" / "postgres.env"
    values = dict(line.split("=", 1) for line in postgres_env.read_text().splitlines())
    assert values["POSTGRES_USER"] == "mlflow"
    assert len(values["POSTGRES_PASSWORD"]) == 48
    assert values["POSTGRES_PASSWORD"].isalnum()
    assert stat.S_IMODE(postgres_env.stat().st_mode) == 0o600
    assert (manifests / "base" / "secrets" / "mlflow.env").is_file()


def test_up_keeps_existing_password(fakes: FakeTools, ready_fleet: Path, manifests: Path,
                                    tmp_path: Path) -> None:
    answer_up(fakes)
    postgres_env = manifests / "base" / "secrets" / "postgres.env"
    postgres_env.write_text("POSTGRES_USER=mlflow\nPOSTGRES_PASSWORD=kept\n")

    assert main(up_args(ready_fleet, manifests, tmp_path)) == 0

    assert postgres_env.read_text() == "POSTGRES_USER=mlflow\nPOSTGRES_PASSWORD=kept\n"


def test_up_skip_build_and_existing_cluster(fakes: FakeTools, ready_fleet: Path,
                                            manifests: Path, tmp_path: Path) -> None:
    answer_up(fakes, clusters=json.dumps([{"name": "fleet-test"}]))

    assert main(up_args(ready_fleet, manifests, tmp_path, "--skip-build")) == 0

    commands = [call[:3] for call in fakes.calls()]
    assert ["k3d", "cluster", "create"] not in commands
    assert not any(call[:2] == ["docker", "build"] for call in fakes.calls())
    assert ["k3d", "image", "import"] in commands


def test_up_missing_tool_names_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       ready_fleet: Path, manifests: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    fakes = make_fakes(tmp_path, monkeypatch, tools=("docker", "kubectl"), keep_path=False)

    with caplog.at_level(logging.ERROR):
        code = main(up_args(ready_fleet, manifests, tmp_path))

    assert code == 2
    assert "required command(s) not found on PATH: k3d" in caplog.text
    assert "install k3d" in caplog.text
    assert fakes.calls() == []


def test_up_failed_step_reports_command(fakes: FakeTools, ready_fleet: Path, manifests: Path,
                                        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    answer_up(fakes)
    fakes.respond("k3d", ["cluster", "create"],
                  {"exit": 1, "stderr": "Failed to create cluster: port 6550 already in use\n"})

    with caplog.at_level(logging.ERROR):
        code = main(up_args(ready_fleet, manifests, tmp_path))

    assert code == 2
    assert f"`k3d cluster create --config {tmp_path / 'k3d.yaml'}` failed with exit code 1" in (
        caplog.text)
    assert "port 6550 already in use" in caplog.text
    assert not any(call[0] == "kubectl" for call in fakes.calls())


def test_up_missing_local_image(fakes: FakeTools, ready_fleet: Path, manifests: Path,
                                tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fakes.respond("docker", ["images"], {"stdout": "edgeface-mlflow:3.17.2\n"})
    answer_up(fakes, clusters=json.dumps([{"name": "fleet-test"}]))

    with caplog.at_level(logging.ERROR):
        code = main(up_args(ready_fleet, manifests, tmp_path, "--skip-build"))

    assert code == 2
    assert "image(s) edgeface:0.1.0 not in the local Docker engine" in caplog.text


def test_up_waits_until_pods_ready(fakes: FakeTools, ready_fleet: Path, manifests: Path,
                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster_cli, "POLL_INTERVAL_S", 0.01)
    starting = healthy_pods()[:5] + [
        pod("edgeface", "postgres-0", {"app.kubernetes.io/name": "postgres"}, ready=False,
            waiting=("ContainerCreating", ""))]
    fakes.respond("kubectl", ["get", "pods"], pod_list(starting), pod_list(healthy_pods()))
    answer_up(fakes)

    assert main(up_args(ready_fleet, manifests, tmp_path, "--timeout", "30")) == 0

    polls = [call for call in fakes.calls() if call[3:5] == ["get", "pods"]]
    assert len(polls) == 2


def test_up_retries_failed_pod_listing(fakes: FakeTools, ready_fleet: Path, manifests: Path,
                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(cluster_cli, "POLL_INTERVAL_S", 0.01)
    refused = {"exit": 1, "stderr": "The connection to the server 0.0.0.0:6550 was refused\n"}
    fakes.respond("kubectl", ["get", "pods"], refused, pod_list(healthy_pods()))
    answer_up(fakes)

    with caplog.at_level(logging.WARNING):
        assert main(up_args(ready_fleet, manifests, tmp_path, "--timeout", "30")) == 0

    assert "listing pods failed, retrying until the timeout" in caplog.text
    assert "was refused" in caplog.text
    polls = [call for call in fakes.calls() if call[3:5] == ["get", "pods"]]
    assert len(polls) == 2


def test_up_readiness_timeout_lists_pods(fakes: FakeTools, ready_fleet: Path, manifests: Path,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(cluster_cli, "POLL_INTERVAL_S", 0.05)
    pods = healthy_pods()[:4] + [
        pod("edgeface", "postgres-0", {"app.kubernetes.io/name": "postgres"}, ready=False,
            unschedulable="0/3 nodes are available: 3 Insufficient memory.")]
    answer_up(fakes, pods=pods)

    started = time.monotonic()
    with caplog.at_level(logging.ERROR):
        # Each fake kubectl call starts a Python process, which can take a second on a busy
        # machine, so the timeout leaves room for at least two polls.
        code = main(up_args(ready_fleet, manifests, tmp_path, "--timeout", "4"))

    assert code == 2
    assert time.monotonic() - started < 40
    assert "pods not ready after 4 s" in caplog.text
    assert "KFP artifact store (SeaweedFS) (kubeflow, app=seaweedfs): no pod exists yet" in (
        caplog.text)
    assert "MLflow tracking server (edgeface, app.kubernetes.io/name=mlflow): no pod" in (
        caplog.text)
    assert ("pod postgres-0: not scheduled, Unschedulable: 0/3 nodes are available: "
            "3 Insufficient memory.") in caplog.text
    assert "KFP MySQL" not in caplog.text
    polls = [call for call in fakes.calls() if call[3:5] == ["get", "pods"]]
    assert len(polls) >= 2


def test_up_reports_crash_and_pull_errors(fakes: FakeTools, ready_fleet: Path, manifests: Path,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(cluster_cli, "POLL_INTERVAL_S", 0.05)
    pods = healthy_pods()
    pods[6] = pod("edgeface", "mlflow-7d9f-abcde", {"app.kubernetes.io/name": "mlflow"},
                  ready=False, waiting=("CrashLoopBackOff", "back-off 40s restarting failed "
                                        "container=mlflow"), terminated="OOMKilled")
    pods[4] = pod("kubeflow", "seaweedfs-6c7b-fghij", {"app": "seaweedfs"}, ready=False,
                  waiting=("ImagePullBackOff", 'Back-off pulling image '
                           '"ghcr.io/chrislusf/seaweedfs:4.30"'))
    answer_up(fakes, pods=pods)

    with caplog.at_level(logging.ERROR):
        code = main(up_args(ready_fleet, manifests, tmp_path, "--timeout", "0.2"))

    assert code == 2
    text = caplog.text
    assert "pod mlflow-7d9f-abcde: container main CrashLoopBackOff: back-off 40s" in text
    assert "container main last exited OOMKilled (exit code 137)" in text
    assert "kubectl logs -n NAMESPACE POD --previous" in text
    assert ("pod seaweedfs-6c7b-fghij: container main ImagePullBackOff: Back-off pulling "
            "image") in text
    assert "k3d image import IMAGE -c CLUSTER" in text


def test_up_warns_about_unimported_kfp_images(fakes: FakeTools, ready_fleet: Path,
                                              manifests: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    answer_up(fakes)

    with caplog.at_level(logging.WARNING):
        assert main(up_args(ready_fleet, manifests, tmp_path)) == 0

    assert "KFP image(s) are not in the local Docker engine" in caplog.text
    assert "ghcr.io/kubeflow/kfp-launcher:2.17.1" in caplog.text


def test_up_rejects_wrong_manifest_folder(fakes: FakeTools, ready_fleet: Path, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        code = main(up_args(ready_fleet, tmp_path / "nowhere", tmp_path))

    assert code == 2
    assert "lacks kfp/cluster-scoped" in caplog.text
    assert "--manifests" in caplog.text
    assert fakes.calls() == []


def test_up_rejects_missing_node_folder(fakes: FakeTools, fleet_file: Path, manifests: Path,
                                        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "data" / "edge-0").mkdir(parents=True)
    missing = tmp_path / "data" / "edge-1"

    with caplog.at_level(logging.ERROR):
        code = main(up_args(fleet_file, manifests, tmp_path))

    assert code == 2
    assert "1 data folder(s) not ready, so no cluster was created" in caplog.text
    assert f"host-data-path {missing} of node edge-1 does not exist" in caplog.text
    assert f"edgeface cluster load-data --fleet {fleet_file} --data DATASET_DIR" in caplog.text
    assert "edge-0 does not exist" not in caplog.text
    assert not missing.exists()
    assert fakes.calls() == []
    assert not (tmp_path / "k3d.yaml").exists()


@pytest.mark.parametrize("state", ["missing", "empty", "file"])
def test_up_rejects_unusable_dataset_folder(fakes: FakeTools, ready_fleet: Path,
                                            manifests: Path, tmp_path: Path, state: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    dataset = tmp_path / "dataset"
    if state == "empty":
        dataset.mkdir()
    elif state == "file":
        dataset.write_text("not a folder")
    with_dataset(ready_fleet, dataset)

    with caplog.at_level(logging.ERROR):
        code = main(up_args(ready_fleet, manifests, tmp_path))

    assert code == 2
    reason = {"missing": "does not exist", "empty": "is empty", "file": "is not a folder"}
    assert f"dataset-host-path {dataset} {reason[state]}" in caplog.text
    assert f"cp -r /path/to/lfw {dataset}/lfw" in caplog.text
    assert fakes.calls() == []


def test_up_accepts_filled_dataset_folder(fakes: FakeTools, ready_fleet: Path, manifests: Path,
                                          tmp_path: Path) -> None:
    dataset = tmp_path / "dataset"
    (dataset / "lfw").mkdir(parents=True)
    with_dataset(ready_fleet, dataset)
    answer_up(fakes)

    assert main(up_args(ready_fleet, manifests, tmp_path)) == 0

    [applied] = fakes.stdin_of("apply", "-f", "-")
    claims = [o["metadata"]["name"] for o in yaml.safe_load_all(applied)
              if o["kind"] == "PersistentVolumeClaim"]
    assert "edgeface-dataset" in claims


# --------------------------------------------------------------------------- other actions


def test_help_summary_lists_every_action() -> None:
    parser = argparse.ArgumentParser()
    cluster_cli.add_parser(parser.add_subparsers())
    [cluster] = parser._subparsers._group_actions[0].choices.values()
    [actions] = [action for action in cluster._actions
                 if isinstance(action, argparse._SubParsersAction)]

    assert set(actions.choices) == {"config", "up", "volumes", "status", "down", "load-data"}
    for name in actions.choices:
        assert f"edgeface cluster {name} --fleet F" in cluster.description, name


def test_config_prints_k3d_yaml(fleet_file: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["cluster", "config", "--fleet", str(fleet_file), "--host-cpus", "4"]) == 0

    expected = render_k3d_config(load_fleet(fleet_file), host_cpus=4)
    output = capsys.readouterr().out
    assert output == k3d_config_yaml(expected)
    assert not re.search(r"[&*]id\d+", output), "YAML anchors make the config hard to read"
    assert yaml.safe_load(output)["agents"] == 2


def test_config_invalid_fleet_exit_code(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("name: x\nimage: edgeface\nnodes: []\n")

    with caplog.at_level(logging.ERROR):
        code = main(["cluster", "config", "--fleet", str(path)])

    assert code == 2
    assert "2 problem(s)" in caplog.text


def test_down_deletes_cluster(fakes: FakeTools, fleet_file: Path) -> None:
    assert main(["cluster", "down", "--fleet", str(fleet_file)]) == 0

    assert fakes.calls() == [["k3d", "cluster", "delete", "fleet-test"]]


def test_status_lists_nodes_and_pods(fakes: FakeTools, fleet_file: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    nodes = {"items": [{
        "metadata": {"name": "k3d-fleet-test-agent-0",
                     "labels": {"edgeface.io/node": "edge-0", "edgeface.io/role": "edge",
                                "kubernetes.io/os": "linux"}},
        "spec": {"taints": [{"key": "edgeface.io/edge", "value": "true",
                             "effect": "NoSchedule"}]},
        "status": {"allocatable": {"cpu": "1", "memory": "1048576Ki"},
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }]}
    fakes.respond("kubectl", ["get", "nodes"], {"stdout": json.dumps(nodes)})
    fakes.respond("kubectl", ["get", "pods"], pod_list(healthy_pods()))

    code = main(["cluster", "status", "--fleet", str(fleet_file), "--format", "json"])

    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["not_ready"] == []
    assert report["nodes"] == [{
        "name": "k3d-fleet-test-agent-0", "ready": True,
        "labels": {"edgeface.io/node": "edge-0", "edgeface.io/role": "edge"},
        "taints": ["edgeface.io/edge=true:NoSchedule"], "cpu": "1", "memory": "1048576Ki",
    }]
    assert fakes.calls()[0] == ["kubectl", "--context", CONTEXT, "get", "nodes", "-o", "json"]


def test_status_names_missing_cluster(fakes: FakeTools, fleet_file: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    fakes.respond("kubectl", ["get", "nodes"], {
        "exit": 1, "stderr": f"error: context was not found for specified context: {CONTEXT}\n"})

    with caplog.at_level(logging.ERROR):
        code = main(["cluster", "status", "--fleet", str(fleet_file)])

    assert code == 2
    assert (f"cluster fleet-test not found (kubectl has no context {CONTEXT}): create it with "
            f"`edgeface cluster up --fleet {fleet_file}`") in caplog.text
    assert "error: context was not found" not in caplog.text


def test_status_exit_code_when_not_ready(fakes: FakeTools, fleet_file: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    fakes.respond("kubectl", ["get", "nodes"], {"stdout": json.dumps({"items": []})})
    fakes.respond("kubectl", ["get", "pods"], pod_list(healthy_pods()[:6]))

    assert main(["cluster", "status", "--fleet", str(fleet_file)]) == 1

    assert "MLflow tracking server (edgeface, app.kubernetes.io/name=mlflow): no pod" in (
        capsys.readouterr().out)


def test_run_command_timeout(fakes: FakeTools) -> None:
    fakes.respond("docker", ["info"], {"sleep": 10, "stdout": "8\n"})

    started = time.monotonic()
    with pytest.raises(CommandError, match=r"`docker info` timed out after 0.5 s"):
        run_command(["docker", "info"], timeout=0.5)
    assert time.monotonic() - started < 5


def test_run_command_missing_program(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(CommandError, match="kubectl not found: install kubectl"):
        run_command(["kubectl", "version"], timeout=10)


# --------------------------------------------------------------------------- load-data


def load_data_args(fleet_file: Path, data: Path, *extra: str) -> list[str]:
    return ["cluster", "load-data", "--fleet", str(fleet_file), "--data", str(data), *extra]


def test_load_data_copies_disjoint_shares(fleet_file: Path, orl_dir: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    assert main(load_data_args(fleet_file, orl_dir, "--seed", "3")) == 0

    fleet = load_fleet(fleet_file)
    identities = []
    copied = []
    for node in fleet.nodes:
        files = sorted(p.relative_to(node.host_data_path).as_posix()
                       for p in node.host_data_path.rglob("*.pgm"))
        assert files, node.name
        copied += files
        identities.append({name.split("/")[0] for name in files})
        marker = json.loads((node.host_data_path / SHARE_MARKER).read_text())
        assert marker["node"] == node.name
        assert marker["strategy"] == "identity"
        assert marker["seed"] == 3
        assert marker["images"] == len(files)
        assert (node.host_data_path / files[0]).read_bytes() == (orl_dir / files[0]).read_bytes()
    source = sorted(p.relative_to(orl_dir).as_posix() for p in orl_dir.rglob("*.pgm"))
    assert sorted(copied) == source
    assert not identities[0] & identities[1]
    output = capsys.readouterr().out
    assert f"edge-0: {len(identities[0]) * 10} images of {len(identities[0])} identities" in output


def test_load_data_refuses_to_overwrite(fleet_file: Path, orl_dir: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    assert main(load_data_args(fleet_file, orl_dir)) == 0

    with caplog.at_level(logging.ERROR):
        assert main(load_data_args(fleet_file, orl_dir, "--seed", "1")) == 2
    assert "already contains a share: pass --replace" in caplog.text

    assert main(load_data_args(fleet_file, orl_dir, "--seed", "1", "--replace")) == 0
    marker = load_fleet(fleet_file).nodes[0].host_data_path / SHARE_MARKER
    assert json.loads(marker.read_text())["seed"] == 1


def test_load_data_keeps_foreign_folder(fleet_file: Path, orl_dir: Path, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    foreign = tmp_path / "data" / "edge-1"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")

    with caplog.at_level(logging.ERROR):
        code = main(load_data_args(fleet_file, orl_dir, "--replace"))

    assert code == 2
    assert "was not filled by `edgeface cluster load-data`" in caplog.text
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "data" / "edge-0").exists()


def synthetic_dataset(root: Path) -> Path:
    """Four identities of three small PNGs, plus a notes file and one text file named .jpg."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for identity in ("a", "b", "c", "d"):
        (root / identity).mkdir(parents=True)
        for index in range(3):
            pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / identity / f"{index}.png")
    (root / "a" / "notes.txt").write_text("not an image\n")
    (root / "b" / "broken.jpg").write_text("text, not a JPEG\n")
    return root


def test_load_data_copies_only_readable_images(fleet_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture,
                                               caplog: pytest.LogCaptureFixture) -> None:
    data = synthetic_dataset(tmp_path / "faces")

    with caplog.at_level(logging.WARNING):
        code = main(load_data_args(fleet_file, data, "--max-bad-fraction", "0.2",
                                   "--no-progress"))

    assert code == 0
    copied = []
    for node in load_fleet(fleet_file).nodes:
        files = sorted(p.relative_to(node.host_data_path).as_posix()
                       for p in node.host_data_path.rglob("*") if p.is_file()
                       and p.name != SHARE_MARKER)
        marker = json.loads((node.host_data_path / SHARE_MARKER).read_text())
        assert marker["images"] == len(files)
        copied += files
    assert len(copied) == 12
    assert all(path.endswith(".png") for path in copied)
    output = capsys.readouterr().out
    assert "edge-0: 6 images of 2 identities" in output
    assert "left out 1 unreadable image and 1 file without an image extension" in caplog.text


def test_load_data_too_many_unreadable_fails(fleet_file: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    data = synthetic_dataset(tmp_path / "faces")

    with caplog.at_level(logging.ERROR):
        code = main(load_data_args(fleet_file, data, "--no-progress"))

    assert code == 2
    assert "1 of 13 images is unreadable" in caplog.text
    assert "b/broken.jpg (not an image)" in caplog.text
    assert "`edgeface cluster load-data --max-bad-fraction`" in caplog.text
    assert not (tmp_path / "data" / "edge-0").exists()


def test_load_data_rejects_invalid_limit(fleet_file: Path, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    data = synthetic_dataset(tmp_path / "faces")

    with caplog.at_level(logging.ERROR):
        code = main(load_data_args(fleet_file, data, "--max-bad-fraction", "5"))

    assert code == 2
    assert "invalid max-bad-fraction 5.0: use a fraction from 0 to 1" in caplog.text
