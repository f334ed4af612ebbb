"""The compiled Kubeflow pipeline: golden files, per-task Kubernetes settings, secrets, scale.

Pipelines are compiled with the real KFP compiler. A compiled file has two YAML documents:
the pipeline spec, and the Kubernetes settings keyed by executor label. A task's settings are
found through task -> componentRef.name -> components[C].executorLabel. Tasks inside the exit
handler live in components["comp-exit-handler-1"].dag.tasks.

Set EDGEFACE_UPDATE_GOLDEN=1 to rewrite the golden files in pipelines/golden/.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeface.cli.main import main
from edgeface.errors import ConfigError
from edgeface.fleet import load_fleet
from pipelines.federated import (
    DATASET_MOUNT,
    MLFLOW_SECRET_KEYS,
    compile_pipeline,
    config_parameter,
    make_options,
    node_pvc_name,
    pipeline_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = REPO_ROOT / "pipelines" / "golden"
EDGE_TASKS = ("train-edge-node", "validate-and-cache", "calibrate-batchnorm")
# Tasks that must never mount an edge node's data.
CENTRAL_TASKS = ("aggregate", "evaluate", "export-onnx", "register", "bundle-artifacts",
                 "start-run", "resolve-initial-model", "finish-run", "merge-batchnorm")
# The config of the compiled test pipelines, so that changes to edgeface's defaults do not
# change their DAG.
TEST_CONFIG = {"train": {"rounds": 2}, "evaluation": {"eval-every": 1},
               "federation": {"bn-calibration-images": 256}}
SPREADOUT_CONFIG = {"federation": {"bn-calibration-images": 256, "spreadout": True}}


def write_fleet(folder: Path, nodes: int, *, name: str = "fleet-test",
                mlflow: str = "mlflow: {secret: test-mlflow-secret, config-map: test-mlflow-config}"
                ) -> Path:
    lines = [f"name: {name}", "image: edgeface:0.1.0", "node-label-key: edgeface.io/node",
             'edge-taint: {key: edgeface.io/edge, value: "true", effect: NoSchedule}', mlflow,
             "nodes:"]
    for index in range(nodes):
        lines.append(f"  - {{name: edge-{index}, label: site-{index}, "
                     f"host-data-path: ./data/edge-{index}, data-path: /data/edge-{index}, "
                     f'cpu: "{index + 1}", memory: {index + 1}Gi}}')
    path = folder / f"fleet-{nodes}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


class CompiledPipeline:
    """A compiled pipeline file with look-ups from task name to its component and settings."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = path.read_text()
        self.documents = [doc for doc in yaml.safe_load_all(self.text) if doc]
        self.spec = self.documents[0]
        self.kubernetes = self.documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
        self.tasks: dict[str, dict[str, Any]] = {}
        for component in [self.spec["root"], *self.spec["components"].values()]:
            self.tasks.update(component.get("dag", {}).get("tasks", {}))

    def tasks_of(self, component: str) -> dict[str, dict[str, Any]]:
        """Return the tasks whose key is `component` or `component-<n>`."""
        pattern = re.compile(rf"^{re.escape(component)}(-\d+)?$")
        return {name: task for name, task in self.tasks.items() if pattern.match(name)}

    def executor(self, task: dict[str, Any]) -> str:
        return self.spec["components"][task["componentRef"]["name"]]["executorLabel"]

    def settings(self, task: dict[str, Any]) -> dict[str, Any]:
        return self.kubernetes.get(self.executor(task), {})

    def resources(self, task: dict[str, Any]) -> dict[str, Any]:
        executor = self.spec["deploymentSpec"]["executors"][self.executor(task)]
        return executor["container"].get("resources", {})


def write_test_config(folder: Path, **sections: dict[str, Any]) -> Path:
    """Write TEST_CONFIG with `sections` replacing its sections of the same name."""
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({**TEST_CONFIG, **sections}))
    return path


def compile_for(fleet_path: Path, out: Path, mode: str, rounds: int = 2,
                config: Path | None = None) -> CompiledPipeline:
    fleet = load_fleet(fleet_path)
    config = config or write_test_config(out.parent)
    options = make_options(fleet, pipeline_config(fleet, config, rounds), mode)
    return CompiledPipeline(compile_pipeline(options, out))


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fleets")


@pytest.fixture(scope="module")
def simulation(fleet_dir: Path) -> CompiledPipeline:
    return compile_for(write_fleet(fleet_dir, 2), fleet_dir / "simulation.yaml", "simulation")


@pytest.fixture(scope="module")
def pre_placed(fleet_dir: Path) -> CompiledPipeline:
    return compile_for(write_fleet(fleet_dir, 4), fleet_dir / "pre-placed.yaml", "pre-placed")


@pytest.fixture(scope="module")
def spreadout(fleet_dir: Path) -> CompiledPipeline:
    folder = fleet_dir / "spreadout"
    folder.mkdir()
    return compile_for(write_fleet(fleet_dir, 2), folder / "spreadout.yaml", "simulation",
                       config=write_test_config(folder, **SPREADOUT_CONFIG))


def round_of(task: dict[str, Any]) -> int:
    return task["inputs"]["parameters"]["round_index"]["runtimeValue"]["constant"]


def producer(task: dict[str, Any], artifact: str) -> tuple[str, str]:
    """Return (producer task, output key) of the input artifact `artifact` of `task`."""
    source = task["inputs"]["artifacts"][artifact]["taskOutputArtifact"]
    return source["producerTask"], source["outputArtifactKey"]


def train_tasks_by_node(compiled: CompiledPipeline) -> dict[str, list[dict[str, Any]]]:
    by_node: dict[str, list[dict[str, Any]]] = {}
    for task in compiled.tasks_of("train-edge-node").values():
        node = task["inputs"]["parameters"]["node_name"]["runtimeValue"]["constant"]
        by_node.setdefault(node, []).append(task)
    return by_node


# --- golden files ---------------------------------------------------------------------------


def normalized(text: str, config_json: str) -> str:
    """Replace the KFP version, and the default config, which changes with edgeface's defaults.

    The default config's content is checked by `test_config_default_carries_fleet_shape`.
    """
    text = text.replace(config_json, "CONFIG_JSON")
    return re.sub(r"(?m)^sdkVersion: .*$", "sdkVersion: kfp-NORMALIZED", text)


# Golden file -> (fixture that compiles it, nodes, config sections that replace TEST_CONFIG's).
GOLDEN_FILES = {
    "fleet-2-simulation.yaml": ("simulation", 2, {}),
    "fleet-4-pre-placed.yaml": ("pre_placed", 4, {}),
    "fleet-2-simulation-spreadout.yaml": ("spreadout", 2, SPREADOUT_CONFIG),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_FILES))
def test_compiled_matches_golden(request: pytest.FixtureRequest, fleet_dir: Path,
                                 tmp_path: Path, name: str) -> None:
    fixture, nodes, sections = GOLDEN_FILES[name]
    compiled = request.getfixturevalue(fixture)
    config_json = config_parameter(pipeline_config(load_fleet(write_fleet(fleet_dir, nodes)),
                                                   write_test_config(tmp_path, **sections), 2))
    assert config_json in compiled.text
    text = normalized(compiled.text, config_json)
    golden = GOLDEN_DIR / name
    if os.environ.get("EDGEFACE_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.is_file(), f"{golden} missing: run with EDGEFACE_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), (
        f"{name} differs from the compiled pipeline; if the change is intended, regenerate "
        "with EDGEFACE_UPDATE_GOLDEN=1 pytest tests/test_pipeline_compile.py")


# --- structure ------------------------------------------------------------------------------


def test_compiled_file_has_two_documents(simulation: CompiledPipeline) -> None:
    assert len(simulation.documents) == 2
    assert simulation.spec["pipelineInfo"]["name"] == "edgeface-federated"
    assert set(simulation.spec["root"]["inputDefinitions"]["parameters"]) == {
        "config_json", "dataset_dir", "dataset_pvc", "warm_start_alias"}


def test_rounds_are_unrolled_per_node(simulation: CompiledPipeline,
                                      pre_placed: CompiledPipeline) -> None:
    for compiled, nodes in ((simulation, 2), (pre_placed, 4)):
        by_node = train_tasks_by_node(compiled)
        assert sorted(by_node) == [f"edge-{i}" for i in range(nodes)]
        for tasks in by_node.values():
            rounds = sorted(t["inputs"]["parameters"]["round_index"]["runtimeValue"]["constant"]
                            for t in tasks)
            assert rounds == [0, 1]
        assert len(compiled.tasks_of("aggregate")) == 2
        assert len(compiled.tasks_of("evaluate")) == 2
        assert len(compiled.tasks_of("merge-batchnorm")) == 2
        assert len(compiled.tasks_of("calibrate-batchnorm")) == 2 * nodes
        assert len(compiled.tasks_of("validate-and-cache")) == nodes


def test_partition_only_in_simulation(simulation: CompiledPipeline,
                                      pre_placed: CompiledPipeline) -> None:
    assert len(simulation.tasks_of("partition-dataset")) == 1
    assert pre_placed.tasks_of("partition-dataset") == {}


def test_finish_run_is_exit_task(simulation: CompiledPipeline) -> None:
    finish = simulation.spec["root"]["dag"]["tasks"]["finish-run"]
    assert finish["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert "taskFinalStatus" in finish["inputs"]["parameters"]["status"]


def test_calibration_left_out_when_off(fleet_dir: Path, tmp_path: Path) -> None:
    config = write_test_config(tmp_path, federation={"bn-calibration-images": 0})
    compiled = compile_for(write_fleet(fleet_dir, 2), tmp_path / "p.yaml", "simulation",
                           config=config)
    assert compiled.tasks_of("calibrate-batchnorm") == {}
    assert compiled.tasks_of("merge-batchnorm") == {}
    [second] = [t for t in train_tasks_by_node(compiled)["edge-0"]
                if t["inputs"]["parameters"]["round_index"]["runtimeValue"]["constant"] == 1]
    source = second["inputs"]["artifacts"]["global_model"]["taskOutputArtifact"]
    assert source["producerTask"].startswith("aggregate")


def test_second_round_starts_from_merged_model(simulation: CompiledPipeline) -> None:
    merges = simulation.tasks_of("merge-batchnorm")
    first = next(name for name, task in merges.items()
                 if task["inputs"]["parameters"]["round_index"]["runtimeValue"]["constant"] == 0)
    for task in train_tasks_by_node(simulation)["edge-0"]:
        source = task["inputs"]["artifacts"]["global_model"]["taskOutputArtifact"]
        expected = "resolve-initial-model" if task["inputs"]["parameters"]["round_index"][
            "runtimeValue"]["constant"] == 0 else first
        assert source["producerTask"] == expected


def test_spreadout_left_out_when_off(simulation: CompiledPipeline) -> None:
    assert simulation.tasks_of("split-bundle") == {}
    for task in simulation.tasks_of("train-edge-node").values():
        assert "centres" not in task["inputs"]["artifacts"]
    [prepare] = simulation.tasks_of("prepare-evaluation-set").values()
    assert prepare["inputs"]["parameters"]["compiled_spreadout"]["runtimeValue"][
        "constant"] is False


def leaf_producers(compiled: CompiledPipeline, task: dict[str, Any],
                   artifact: str) -> set[tuple[str, str]]:
    """Follow `artifact` of `task` through bundle tasks to the (task, output) pairs it holds."""
    name, key = producer(task, artifact)
    source = compiled.tasks[name]
    if not source["componentRef"]["name"].startswith("comp-bundle-artifacts"):
        return {(name, key)}
    return set().union(*(leaf_producers(compiled, source, slot)
                         for slot in source["inputs"]["artifacts"]))


def check_centres_edges(compiled: CompiledPipeline, nodes: int, rounds: int) -> None:
    """Check the class centres' path: each node's training task of round r, the aggregation of
    round r, a split task, and the same node's training task of round r + 1, and no other."""
    aggregates = {round_of(task): name for name, task in compiled.tasks_of("aggregate").items()}
    train = {}
    for name, task in compiled.tasks_of("train-edge-node").items():
        node = task["inputs"]["parameters"]["node_name"]["runtimeValue"]["constant"]
        train[node, round_of(task)] = name
    assert len(train) == nodes * rounds
    assert sorted(aggregates) == list(range(rounds))
    for round_index, aggregate in aggregates.items():
        # The centres travel inside the update artifact of every node of this round.
        expected = {(train[f"edge-{i}", round_index], "update") for i in range(nodes)}
        assert leaf_producers(compiled, compiled.tasks[aggregate], "updates") == expected
    for (node, round_index), name in train.items():
        task = compiled.tasks[name]
        if round_index == 0:
            assert "centres" not in task["inputs"]["artifacts"], name
            continue
        split_name, slot = producer(task, "centres")
        split = compiled.tasks[split_name]
        assert split["componentRef"]["name"].startswith("comp-split-bundle"), split_name
        names = json.loads(split["inputs"]["parameters"]["names_json"]["runtimeValue"]["constant"])
        assert names[int(slot.removeprefix("item_"))] == node, (name, split_name, slot)
        assert producer(split, "bundle") == (aggregates[round_index - 1], "adjusted_centres")


def test_spreadout_routes_centres_per_node(spreadout: CompiledPipeline) -> None:
    check_centres_edges(spreadout, nodes=2, rounds=2)
    assert len(spreadout.tasks_of("split-bundle")) == 1
    [prepare] = spreadout.tasks_of("prepare-evaluation-set").values()
    assert prepare["inputs"]["parameters"]["compiled_spreadout"]["runtimeValue"][
        "constant"] is True


def test_spreadout_splits_large_fleet(fleet_dir: Path, tmp_path: Path) -> None:
    config = write_test_config(tmp_path, federation={"bn-calibration-images": 0,
                                                     "spreadout": True})
    compiled = compile_for(write_fleet(fleet_dir, 9), tmp_path / "p.yaml", "pre-placed",
                           rounds=3, config=config)
    check_centres_edges(compiled, nodes=9, rounds=3)
    # 9 nodes need two split tasks of up to 8 slots, after every round but the last.
    splits = compiled.tasks_of("split-bundle")
    assert len(splits) == 4
    for name, task in splits.items():
        settings = compiled.settings(task)
        assert settings["nodeAffinity"] == [{"matchExpressions": [
            {"key": "edgeface.io/role", "operator": "NotIn", "values": ["edge"]}]}], name
        assert "tolerations" not in settings, name
        assert "pvcMount" not in settings, name


# --- Kubernetes settings --------------------------------------------------------------------


def test_training_affinity_matches_node(pre_placed: CompiledPipeline, fleet_dir: Path) -> None:
    fleet = load_fleet(write_fleet(fleet_dir, 4))
    for node_name, tasks in train_tasks_by_node(pre_placed).items():
        node = fleet.node(node_name)
        for task in tasks:
            affinity = pre_placed.settings(task)["nodeAffinity"]
            assert len(affinity) == 1, "separate required terms would be OR-ed"
            assert {"key": "edgeface.io/node", "operator": "In",
                    "values": [node.label]} in affinity[0]["matchExpressions"]
            assert {"key": "edgeface.io/role", "operator": "In",
                    "values": ["edge"]} in affinity[0]["matchExpressions"]


def test_edge_tasks_tolerate_taint(pre_placed: CompiledPipeline) -> None:
    expected = {"key": "edgeface.io/edge", "operator": "Equal", "value": "true",
                "effect": "NoSchedule"}
    for component in EDGE_TASKS:
        for task in pre_placed.tasks_of(component).values():
            assert pre_placed.settings(task)["tolerations"] == [expected]
    for component in CENTRAL_TASKS:
        for task in pre_placed.tasks_of(component).values():
            assert "tolerations" not in pre_placed.settings(task)


def test_central_tasks_avoid_edge_agents(pre_placed: CompiledPipeline) -> None:
    for component in CENTRAL_TASKS + ("prepare-evaluation-set",):
        for task in pre_placed.tasks_of(component).values():
            terms = pre_placed.settings(task)["nodeAffinity"]
            assert terms == [{"matchExpressions": [
                {"key": "edgeface.io/role", "operator": "NotIn", "values": ["edge"]}]}]


def test_training_resources_follow_fleet(pre_placed: CompiledPipeline) -> None:
    for node_name, tasks in train_tasks_by_node(pre_placed).items():
        index = int(node_name.rsplit("-", 1)[1])
        for task in tasks:
            resources = pre_placed.resources(task)
            assert resources["resourceCpuLimit"] == f"{(index + 1) * 1000}m"
            assert resources["resourceMemoryLimit"] == f"{(index + 1) * 1024}Mi"
            assert resources["resourceCpuRequest"] == f"{(index + 1) * 800}m"
            assert resources["resourceMemoryRequest"] == f"{(index + 1) * 1024 * 8 // 10}Mi"


def test_edge_tasks_retry_and_time_out(pre_placed: CompiledPipeline) -> None:
    for component in EDGE_TASKS:
        for task in pre_placed.tasks_of(component).values():
            assert task["retryPolicy"]["maxRetryCount"] == 2
            assert task["retryPolicy"]["backoffDuration"] == "30s"
            assert int(pre_placed.settings(task)["activeDeadlineSeconds"]) == 4 * 3600


def test_caching_off_everywhere(simulation: CompiledPipeline) -> None:
    assert simulation.tasks, "no tasks found"
    for name, task in simulation.tasks.items():
        if "componentRef" in task and name != "exit-handler-1":
            assert not task.get("cachingOptions", {}).get("enableCache", False), name


def test_training_pods_labelled_and_record_node(simulation: CompiledPipeline) -> None:
    for component in EDGE_TASKS:
        for task in simulation.tasks_of(component).values():
            settings = simulation.settings(task)
            assert settings["podMetadata"]["labels"] == {"edgeface.io/component": "edge-training"}
            assert settings["fieldPathAsEnv"] == [{"name": "NODE_NAME",
                                                   "fieldPath": "spec.nodeName"}]


def test_pre_placed_mounts_node_volume(pre_placed: CompiledPipeline, fleet_dir: Path) -> None:
    fleet = load_fleet(write_fleet(fleet_dir, 4))
    for component in EDGE_TASKS:
        for task in pre_placed.tasks_of(component).values():
            node = fleet.node(task["inputs"]["parameters"]["node_name"]["runtimeValue"]["constant"])
            mounts = pre_placed.settings(task)["pvcMount"]
            assert len(mounts) == 1
            assert mounts[0]["mountPath"] == node.data_path
            assert mounts[0]["pvcNameParameter"]["runtimeValue"]["constant"] == node_pvc_name(node)


def test_simulation_mounts_dataset_volume(simulation: CompiledPipeline) -> None:
    for component in EDGE_TASKS + ("partition-dataset", "prepare-evaluation-set"):
        for task in simulation.tasks_of(component).values():
            mounts = simulation.settings(task)["pvcMount"]
            assert [m["mountPath"] for m in mounts] == [DATASET_MOUNT]
            assert mounts[0]["pvcNameParameter"] == {"componentInputParameter":
                                                     "pipelinechannel--dataset_pvc"}


def test_central_tasks_mount_no_data(simulation: CompiledPipeline,
                                     pre_placed: CompiledPipeline) -> None:
    for compiled in (simulation, pre_placed):
        for component in CENTRAL_TASKS:
            tasks = compiled.tasks_of(component)
            assert tasks, component
            for name, task in tasks.items():
                assert "pvcMount" not in compiled.settings(task), name


def test_mlflow_settings_from_fleet_names(simulation: CompiledPipeline) -> None:
    for component in ("aggregate", "evaluate", "register", "start-run", "finish-run",
                      "resolve-initial-model"):
        for task in simulation.tasks_of(component).values():
            settings = simulation.settings(task)
            assert {c["configMapName"] for c in settings["configMapAsEnv"]} == {
                "test-mlflow-config"}
            required = [c for c in settings["configMapAsEnv"] if not c.get("optional")]
            assert [k["envVar"] for c in required for k in c["keyToEnv"]] == [
                "MLFLOW_TRACKING_URI"]
            [secret] = settings["secretAsEnv"]
            assert secret["secretName"] == "test-mlflow-secret"
            assert secret["optional"] is True
            assert {k["envVar"] for k in secret["keyToEnv"]} == set(MLFLOW_SECRET_KEYS)


def test_edge_tasks_get_no_mlflow_settings(simulation: CompiledPipeline) -> None:
    for component in EDGE_TASKS:
        for task in simulation.tasks_of(component).values():
            settings = simulation.settings(task)
            assert "configMapAsEnv" not in settings
            assert "secretAsEnv" not in settings


def test_no_secret_values_in_file(fleet_dir: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    password = "pw-Zq81-never-in-yaml"
    token = "tok-4471-never-in-yaml"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{password}@mlflow.test:5000")
    config = write_test_config(
        tmp_path, tracking={"tracking-uri": f"http://alice:{password}@mlflow.test:5000"})
    compiled = compile_for(write_fleet(fleet_dir, 2), tmp_path / "p.yaml", "simulation",
                           config=config)
    for value in (password, token, "alice", "mlflow.test"):
        assert value not in compiled.text
    assert "test-mlflow-secret" in compiled.text


def test_config_default_carries_fleet_shape(simulation: CompiledPipeline) -> None:
    import json

    default = simulation.spec["root"]["inputDefinitions"]["parameters"]["config_json"]
    config = json.loads(default["defaultValue"])
    assert config["partition"]["nodes"] == 2
    assert config["train"]["rounds"] == 2
    assert config["tracking"]["tracking-uri"] is None
    assert len(default["defaultValue"]) < 10_000


# --- errors ---------------------------------------------------------------------------------


def test_unknown_mode_rejected(fleet_dir: Path) -> None:
    fleet = load_fleet(write_fleet(fleet_dir, 2))
    with pytest.raises(ConfigError, match="--mode simulation or --mode pre-placed"):
        make_options(fleet, pipeline_config(fleet), "hybrid")


def test_node_count_mismatch_rejected(fleet_dir: Path) -> None:
    fleet = load_fleet(write_fleet(fleet_dir, 2))
    four = load_fleet(write_fleet(fleet_dir, 4))
    with pytest.raises(ConfigError, match="has 2 nodes"):
        make_options(fleet, pipeline_config(four), "simulation")


def test_min_nodes_above_fleet_rejected(fleet_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("federation: {min-nodes: 3}\n")
    with pytest.raises(ConfigError, match="min-nodes 3"):
        pipeline_config(load_fleet(write_fleet(fleet_dir, 2)), config)


# --- CLI ------------------------------------------------------------------------------------


def test_cli_compile_writes_file(fleet_dir: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out" / "pipeline.yaml"
    code = main(["pipeline", "compile", "--fleet", str(write_fleet(fleet_dir, 2)),
                 "--rounds", "1", "--mode", "pre-placed", "-o", str(out)])
    assert code == 0
    compiled = CompiledPipeline(out)
    assert len(compiled.tasks_of("train-edge-node")) == 2
    assert str(out) in capsys.readouterr().out


def test_cli_compile_rejects_zero_rounds(fleet_dir: Path, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    code = main(["pipeline", "compile", "--fleet", str(write_fleet(fleet_dir, 2)),
                 "--rounds", "0", "-o", str(tmp_path / "p.yaml")])
    assert code == 2
    assert "invalid --rounds 0" in caplog.text
    assert not (tmp_path / "p.yaml").exists()


def test_cli_compile_missing_fleet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = main(["pipeline", "compile", "--fleet", str(tmp_path / "none.yaml"),
                 "-o", str(tmp_path / "p.yaml")])
    assert code == 2
    assert "fleet file not found" in caplog.text


# --- scale ----------------------------------------------------------------------------------


@pytest.mark.benchmark
def test_large_fleet_compiles_quickly(fleet_dir: Path, tmp_path: Path) -> None:
    started = time.perf_counter()
    compiled = compile_for(write_fleet(fleet_dir, 32), tmp_path / "large.yaml", "pre-placed",
                           rounds=5)
    elapsed = time.perf_counter() - started
    size = compiled.path.stat().st_size
    print(f"32 nodes x 5 rounds: {len(compiled.tasks)} tasks, {size / 2**20:.2f} MiB, "
          f"compiled in {elapsed:.1f} s")
    assert len(compiled.tasks_of("train-edge-node")) == 160
    # About 10 s on an idle 2-core machine, most of it PyYAML writing the file; the bound
    # leaves room for a loaded one.
    assert elapsed < 120.0
