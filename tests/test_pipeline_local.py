"""The pipeline's components on real ORL faces: kfp.local runs and the code they call.

kfp.local's SubprocessRunner runs each task as a `python3` subprocess of this environment
(`use_venv=False`), so the components import the edgeface in this checkout. It drops every
Kubernetes setting, so volumes are not mounted: tasks read the dataset and node folders by
their paths on this machine. kfp.local deletes its workspace folder after each run, so each
run gets a temporary one.

A whole pipeline run takes one to two and a half minutes on 2 cores, mostly Python starting
and importing torch and MLflow in each of its 15-30 tasks. Three whole runs (simulation with a
failing node, pre-placed, a failed quorum) are in the default test run, about five minutes. A
fourth, with the spread-out step, is marked slow.
"""


import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kfp import dsl, local

from components import common, runtime
from components.definitions import build_components
from edgeface import steps
from edgeface.config import load_config
from edgeface.data.protocol import plan_from_dict, plan_to_dict
from edgeface.errors import ConfigError, DataError, QuorumError
from edgeface.fleet import load_fleet
from pipelines.federated import (
    DagBuilder,
    PipelineParameters,
    build_pipeline,
    config_parameter,
    make_options,
    pipeline_config,
)

# kfp.local warns that Kubernetes settings and resources have no effect, and that the image is
# not used by the subprocess runner; both are expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no effect in the current local runner:UserWarning"),
    pytest.mark.filterwarnings("ignore:You may be attemping to run a task:RuntimeWarning"),
]

SMALL_CONFIG = ("data: {image-size: 32}\n"
                "train: {batch-size: 32, local-epochs: 1}\n"
                "federation: {bn-calibration-images: 64}\n"
                "evaluation: {eval-every: 1}\n")
K8S_NODE = "kfp-local-host"


def write_fleet(folder: Path, data_paths: list[Path]) -> Path:
    lines = ["name: local-test", "image: edgeface:0.1.0", "nodes:"]
    for index, data_path in enumerate(data_paths):
        lines.append(f"  - {{name: edge-{index}, label: edge-{index}, "
                     f"host-data-path: {data_path}, data-path: {data_path}, cpu: '1', "
                     "memory: 2Gi}")
    path = folder / "fleet.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def small_options(tmp: Path, mode: str, rounds: int, data_paths: list[Path] | None = None,
                  config_text: str = SMALL_CONFIG):
    config_path = tmp / "config.yaml"
    config_path.write_text(config_text)
    paths = data_paths or [tmp / "unused-0", tmp / "unused-1"]
    fleet = load_fleet(write_fleet(tmp, paths))
    return make_options(fleet, pipeline_config(fleet, config_path, rounds), mode)


@pytest.fixture
def local_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Environment that the kfp.local subprocesses inherit: MLflow store, cache, node name."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("EDGEFACE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NODE_NAME", K8S_NODE)
    monkeypatch.delenv("EDGEFACE_FAULTS", raising=False)
    return tmp_path


def init_kfp_local(tmp: Path, raise_on_error: bool = True) -> None:
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(tmp / "pipeline-root"),
               workspace_root=str(tmp / "workspace"), raise_on_error=raise_on_error)


def task_outputs(root: Path, task: str) -> Path:
    """Return the output folder of `task` in the only run under `root`."""
    [run] = [p for p in (root / "pipeline-root").iterdir() if p.is_dir()]
    return run / task


# --- data stage under kfp.local -------------------------------------------------------------


def test_data_stage_runs_under_kfp_local(local_env: Path, orl_dir: Path) -> None:
    options = small_options(local_env, "simulation", rounds=1)
    components = build_components(options.fleet.image)

    @dsl.pipeline(name="edgeface-data-stage")
    def data_stage(config_json: str = config_parameter(options.config),
                   dataset_dir: str = str(orl_dir)) -> dsl.Artifact:
        builder = DagBuilder(options, components,
                             PipelineParameters(config_json, dataset_dir, "unused", ""))
        evaluation = builder.prepare_evaluation()
        partition = builder.partition(evaluation)
        validations = builder.validate_nodes(evaluation, partition)
        return builder.fan_in([(node.name, task.outputs["report"])
                               for node, task in validations], "collect validation reports")

    init_kfp_local(local_env)
    bundle = Path(data_stage().output.path)

    reports = common.read_node_reports(str(bundle))
    assert sorted(reports) == ["edge-0", "edge-1"]
    # ORL holdout protocol: 30 trained people with 5 images each, split by identity.
    assert sum(r["num_samples"] for r in reports.values()) == 150
    assert all(r["identities"] == 15 and r["bad"] == [] for r in reports.values())
    assert {r["k8s_node"] for r in reports.values()} == {K8S_NODE}
    partition = json.loads((task_outputs(local_env, "partition-dataset") / "partition" /
                            "partition.json").read_text())
    assert partition["totals"]["identities_on_several_nodes"] == 0
    manifest = task_outputs(local_env, "validate-and-cache") / "manifest" / "edge-0.json"
    assert json.loads(manifest.read_text())["node"] == "edge-0"


# --- component code in-process -------------------------------------------------------------


@pytest.fixture(scope="module")
def orl_plan(orl_dir: Path):
    config = load_config(None, {"image-size": 32, "nodes": 2})
    images_root, _, plan = steps.plan_step(orl_dir, config)
    return config, images_root, plan


def test_plan_round_trips_through_json(orl_plan) -> None:
    _, _, plan = orl_plan
    restored = plan_from_dict(json.loads(json.dumps(plan_to_dict(plan))))
    assert restored == plan


def test_exclusions_keep_trained_images(orl_plan) -> None:
    _, _, plan = orl_plan
    exclusions = runtime.evaluation_exclusions(plan)
    trained = {r.identity for r in plan.train_records}
    assert len(exclusions["identities"]) == 10
    assert not trained & set(exclusions["identities"])
    assert {r.path for r in plan.probes} <= set(exclusions["paths"])
    assert not {r.path for r in plan.train_records} & set(exclusions["paths"])


def test_pre_placed_node_skips_exclusions(orl_plan, tmp_path: Path) -> None:
    _, images_root, plan = orl_plan
    exclusions = runtime.evaluation_exclusions(plan)
    exclusions_path = common.write_json(exclusions, tmp_path / "exclusions.json")
    records = runtime.node_records("edge-0", 0, images_root, None, str(exclusions_path))
    assert len(records) == 150
    assert sorted(records, key=lambda r: r.path) == sorted(plan.train_records,
                                                           key=lambda r: r.path)


def test_pre_placed_node_without_training_images(orl_plan, orl_dir: Path,
                                                 tmp_path: Path) -> None:
    _, _, plan = orl_plan
    unseen = runtime.evaluation_exclusions(plan)["identities"][0]
    node_dir = tmp_path / "node"
    shutil.copytree(orl_dir / unseen, node_dir / unseen)
    exclusions_path = common.write_json(runtime.evaluation_exclusions(plan),
                                        tmp_path / "exclusions.json")
    with pytest.raises(DataError, match="no training images left"):
        runtime.node_records("edge-0", 0, node_dir, None, str(exclusions_path))


def test_bundle_copies_and_merges(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "update.json").write_text("{}")
    (tmp_path / "b.json").write_text("[]")
    first = tmp_path / "first"
    assert common.bundle([("edge-0", str(tmp_path / "a")), ("edge-1", str(tmp_path / "b.json"))],
                         False, str(first)) == ["edge-0", "edge-1"]
    second = tmp_path / "second"
    common.bundle([("edge-2", str(tmp_path / "b.json"))], False, str(second))
    merged = tmp_path / "merged"
    assert common.bundle([("x", str(first)), ("y", str(second))], True,
                         str(merged)) == ["edge-0", "edge-1", "edge-2"]
    assert (merged / "edge-0" / "update.json").read_text() == "{}"
    with pytest.raises(DataError, match="two artifacts named 'edge-0'"):
        common.bundle([("x", str(first)), ("y", str(first))], True, str(tmp_path / "clash"))


def test_quorum_error_names_failures() -> None:
    updates = {"edge-0": (Path("state.pt"), 10, {})}
    runtime.check_quorum(0, 3, updates, {"edge-1": "timed out"}, min_nodes=1)
    with pytest.raises(QuorumError, match=r"round 3/3: only 1 of 2 nodes.*edge-1: timed out"):
        runtime.check_quorum(2, 3, updates, {"edge-1": "timed out"}, min_nodes=2)


def test_unusable_update_dropped(orl_plan, tmp_path: Path) -> None:
    config, _, _ = orl_plan
    global_state = steps.initial_state(config)
    for node, poison in (("edge-0", False), ("edge-1", True), ("edge-2", None)):
        folder = tmp_path / "updates" / node
        folder.mkdir(parents=True)
        info = {"node": node, "round": 0, "ok": poison is not None, "num_samples": 10,
                "metrics": {}, "error": None if poison is not None else "process exited",
                "k8s_node": K8S_NODE}
        (folder / runtime.UPDATE_INFO_FILE).write_text(json.dumps(info))
        if poison is not None:
            state = {k: v.clone() for k, v in global_state.items()}
            if poison:
                first = next(k for k, v in state.items() if v.is_floating_point())
                state[first].fill_(float("nan"))
            torch.save(state, folder / runtime.UPDATE_STATE_FILE)
    infos = {i["node"]: i for i in runtime.read_updates(str(tmp_path / "updates"), global_state)}
    assert infos["edge-0"]["reason"] is None
    assert infos["edge-1"]["reason"].startswith("update rejected:")
    assert "non-finite" in infos["edge-1"]["reason"]
    assert infos["edge-2"]["reason"] == "process exited"


def test_compiled_shape_mismatch_rejected() -> None:
    config = load_config(None, {"nodes": 2, "rounds": 3, "eval-every": 1,
                                "bn-calibration-images": 0})
    common.check_compiled_shape(config, 2, 3, 1, False, False)
    with pytest.raises(ConfigError, match=r"rounds 3 \(compiled with 2\)"):
        common.check_compiled_shape(config, 2, 2, 1, False, False)
    with pytest.raises(ConfigError, match=r"bn-calibration on False \(compiled with True\)"):
        common.check_compiled_shape(config, 2, 3, 1, True, False)


@pytest.mark.parametrize("spreadout", [True, False])
def test_compiled_spreadout_mismatch_rejected(spreadout: bool) -> None:
    config = load_config(None, {"nodes": 2, "spreadout": spreadout})
    shape = (2, config.train.rounds, config.evaluation.eval_every, True)
    common.check_compiled_shape(config, *shape, spreadout)
    with pytest.raises(ConfigError) as caught:
        common.check_compiled_shape(config, *shape, not spreadout)
    message = str(caught.value)
    assert f"spreadout {spreadout} (compiled with {not spreadout})" in message
    assert "edgeface pipeline compile --config" in message


def test_config_parameter_errors() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        common.load_run_config("{nodes: 2")
    with pytest.raises(ConfigError, match="train.rounds"):
        common.load_run_config(json.dumps({"train": {"rounds": 0}}))
    config = load_config(None, {"nodes": 3})
    assert common.load_run_config(config_parameter(config)) == config


def test_config_parameter_accepts_spreadout() -> None:
    config = load_config(None, {"spreadout": True})
    assert common.load_run_config(config_parameter(config)).federation.spreadout is True


def test_split_bundle_copies_named_entries(tmp_path: Path) -> None:
    for node in ("edge-0", "edge-1"):
        common.write_json({"node": node}, tmp_path / "bundle" / node / "centres.json")
    outputs = [str(tmp_path / "slot-0"), str(tmp_path / "slot-1")]
    common.split_bundle(str(tmp_path / "bundle"), ["edge-1", "edge-0"], outputs)
    assert common.read_json(tmp_path / "slot-0" / "centres.json") == {"node": "edge-1"}
    assert common.read_json(tmp_path / "slot-1" / "centres.json") == {"node": "edge-0"}
    with pytest.raises(DataError, match=r"no entry 'edge-2' \(it has \['edge-0', 'edge-1'\]\)"):
        common.split_bundle(str(tmp_path / "bundle"), ["edge-2"], [str(tmp_path / "slot-2")])


def test_cpu_quota_threads(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert runtime.cpu_quota_threads(cpu_max) == 2
    cpu_max.write_text("max 100000\n")
    assert runtime.cpu_quota_threads(cpu_max) is None
    assert runtime.cpu_quota_threads(tmp_path / "missing") is None


def test_missing_tracking_uri_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI is not set"):
        common.tracking_uri(load_config(None))


@pytest.fixture
def node_manifest(orl_plan, tmp_path: Path) -> Path:
    """Manifest folder of node edge-0 with 20 ORL training images."""
    from edgeface.data.partition import NodeShard, Partition

    _, _, plan = orl_plan
    shard = NodeShard("edge-0", sorted(plan.train_records, key=lambda r: r.path)[:20])
    Partition("identity", 0, [shard]).write_manifests(tmp_path / "manifest")
    return tmp_path / "manifest"


@pytest.mark.parametrize(("fault", "reason"), [
    ("crash", "process killed by SIGKILL"),
    ("error", "RuntimeError: injected failure"),
])
def test_worker_failure_becomes_failed_update(orl_plan, orl_dir: Path, node_manifest: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              fault: str, reason: str) -> None:
    config, _, _ = orl_plan
    monkeypatch.setenv("EDGEFACE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEFACE_FAULTS", f"edge-0:{fault}@1")
    monkeypatch.setenv("NODE_NAME", K8S_NODE)
    global_path = steps.save_atomic(steps.initial_state(config), tmp_path / "global.pt")
    metadata = runtime.train_edge_node(
        config_parameter(config), "edge-0", 1, str(orl_dir), str(node_manifest),
        str(global_path), None, str(tmp_path / "state"), str(tmp_path / "update"))
    assert metadata == {"ok": False, "num_samples": 0, "k8s_node": K8S_NODE}
    info = json.loads((tmp_path / "update" / runtime.UPDATE_INFO_FILE).read_text())
    assert reason in info["error"]
    assert not (tmp_path / "update" / runtime.UPDATE_STATE_FILE).exists()


def test_batchnorm_calibration_replaces_statistics(orl_plan, orl_dir: Path,
                                                   node_manifest: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    config, _, _ = orl_plan
    monkeypatch.setenv("EDGEFACE_CACHE_DIR", str(tmp_path / "cache"))
    fused = steps.initial_state(config)
    fused_path = steps.save_atomic(fused, tmp_path / "fused.pt")
    stats_dir = tmp_path / "stats"
    metadata = runtime.calibrate_batchnorm(config_parameter(config), "edge-0", 0, str(orl_dir),
                                           str(node_manifest), str(fused_path),
                                           str(stats_dir / "edge-0"))
    assert metadata == {"ok": True, "num_samples": 20}
    failed = stats_dir / "edge-1"
    common.write_json({"node": "edge-1", "ok": False, "num_samples": 0, "error": "timed out"},
                      failed / runtime.UPDATE_INFO_FILE)
    result = runtime.merge_batchnorm(config_parameter(config), 0, str(fused_path),
                                     str(stats_dir), str(tmp_path / "merged.pt"))
    assert result == {"nodes": 1, "images": 20}
    merged = torch.load(tmp_path / "merged.pt", weights_only=True)
    means = [key for key in fused if key.endswith("running_mean")]
    assert means
    assert not torch.equal(merged[means[0]], fused[means[0]])
    weights = [key for key in fused if key.endswith(".weight")]
    assert all(torch.equal(merged[key], fused[key]) for key in weights)


@pytest.fixture
def two_node_manifests(orl_plan, tmp_path: Path) -> dict[str, Path]:
    """Manifest folders of edge-0 and edge-1: 4 other ORL people each, 5 images per person.

    Both heads have 4 rows, so centres sent to the wrong node would still fit its head.
    """
    from edgeface.data.partition import NodeShard, Partition

    _, _, plan = orl_plan
    people = sorted({r.identity for r in plan.train_records})
    manifests = {}
    for index, node in enumerate(["edge-0", "edge-1"]):
        own = set(people[4 * index:4 * index + 4])
        records = sorted((r for r in plan.train_records if r.identity in own),
                         key=lambda r: r.path)
        manifests[node] = tmp_path / "manifests" / node
        Partition("identity", 0, [NodeShard(node, records)]).write_manifests(manifests[node])
    return manifests


def test_spreadout_components_route_centres(local_env: Path, orl_dir: Path,
                                            two_node_manifests: dict[str, Path]) -> None:
    """Round 0 on two nodes, aggregation with the spread-out step, then round 1 of edge-0."""
    tmp = local_env
    config = load_config(None, {"image-size": 32, "nodes": 2, "rounds": 2, "batch-size": 10,
                                "local-epochs": 1, "spreadout": True, "spreadout-lr": 0.5})
    config_json = config_parameter(config)
    nodes = sorted(two_node_manifests)
    global_path = steps.save_atomic(steps.initial_state(config), tmp / "global.pt")
    for node in nodes:
        metadata = runtime.train_edge_node(
            config_json, node, 0, str(orl_dir), str(two_node_manifests[node]), str(global_path),
            None, str(tmp / "state-0" / node), str(tmp / "round-0" / node))
        assert metadata["ok"], node
    common.bundle([(node, str(tmp / "round-0" / node)) for node in nodes], False,
                  str(tmp / "updates"))
    tracker = common.open_tracker(config)
    parent = tracker.start_parent("spreadout-components", config.to_dict())

    metrics = runtime.aggregate(config_json, 0, parent, str(global_path), str(tmp / "updates"),
                                None, str(tmp / "global-1.pt"), str(tmp / "server.pt"),
                                str(tmp / "adjusted"))

    # The local runner's step on the same centres files gives the same rows and metrics.
    update_files = {node: tmp / "updates" / node / runtime.UPDATE_STATE_FILE for node in nodes}
    expected, expected_metrics = steps.spreadout_round(steps.make_spreadout(config),
                                                       update_files, nodes, tmp / "reference")
    for key in ("spreadout_max_cosine_before", "spreadout_max_cosine_after"):
        assert metrics[key] == pytest.approx(expected_metrics[key], abs=1e-6)
        assert tracker.metric_history(parent, key) == [(0, pytest.approx(metrics[key]))]
    assert metrics["spreadout_max_cosine_after"] < metrics["spreadout_max_cosine_before"]
    adjusted = {}
    for node in nodes:
        entry = tmp / "adjusted" / node
        assert sorted(p.name for p in entry.iterdir()) == ["centres.json", "centres.pt"]
        assert common.read_json(entry / "centres.json") == {"node": node, "round": 0,
                                                            "adjusted": True}
        adjusted[node] = torch.load(entry / "centres.pt", weights_only=True)
        assert torch.equal(adjusted[node], torch.load(expected[node], weights_only=True))
    assert adjusted["edge-0"].shape == adjusted["edge-1"].shape == (4, 128)

    # Split in reverse order, so that a slot index taken for a node index shows.
    slots = {"edge-1": tmp / "slot-0", "edge-0": tmp / "slot-1"}
    common.split_bundle(str(tmp / "adjusted"), list(slots), [str(path) for path in slots.values()])
    # With a learning rate of ~0, the rows that edge-0 sends after round 1 are those it started
    # from: its own adjusted centres.
    frozen = config.model_copy(update={"train": config.train.model_copy(update={"lr": 1e-12})})
    metadata = runtime.train_edge_node(
        config_parameter(frozen), "edge-0", 1, str(orl_dir), str(two_node_manifests["edge-0"]),
        str(tmp / "global-1.pt"), str(tmp / "state-0" / "edge-0"), str(tmp / "state-1"),
        str(tmp / "round-1"), centres_in=str(slots["edge-0"]))
    assert metadata["ok"]
    sent = torch.load(tmp / "round-1" / "state.centres.pt", weights_only=True)
    torch.testing.assert_close(sent, adjusted["edge-0"], atol=1e-6, rtol=0)
    assert not torch.allclose(sent, adjusted["edge-1"], atol=1e-3)

    with pytest.raises(DataError, match="edge-0 round 2 received the adjusted class centres "
                                        "of edge-1 from round 1"):
        runtime.train_edge_node(
            config_json, "edge-0", 1, str(orl_dir), str(two_node_manifests["edge-0"]),
            str(tmp / "global-1.pt"), str(tmp / "state-0" / "edge-0"), str(tmp / "wrong-state"),
            str(tmp / "wrong-update"), centres_in=str(slots["edge-1"]))


def test_unaggregated_node_keeps_own_head(tmp_path: Path) -> None:
    entry = tmp_path / "edge-1"
    common.write_json({"node": "edge-1", "round": 2, "adjusted": False},
                      entry / runtime.CENTRES_INFO_FILE)
    assert runtime.adjusted_centres(str(entry), "edge-1", 3) is None
    with pytest.raises(DataError, match="from round 3, not its own from round 2"):
        runtime.adjusted_centres(str(entry), "edge-1", 2)


def test_warm_start_falls_back_to_seeded_state(orl_plan, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config, _, _ = orl_plan
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    seeded = steps.initial_state(config)
    for alias in ("", "champion"):
        state, source = runtime.resolve_initial_state(config, alias, tmp_path / alias)
        assert "seeded initial state" in source
        assert all(torch.equal(state[key], seeded[key]) for key in seeded)


# --- whole pipeline under kfp.local --------------------------------------------------


def run_pipeline(options, tmp: Path, dataset_dir: Path, faults: str = "",
                 raise_on_error: bool = True) -> None:
    init_kfp_local(tmp, raise_on_error=raise_on_error)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEFACE_FAULTS", faults)
        build_pipeline(options)(dataset_dir=str(dataset_dir), warm_start_alias="champion")


def mlflow_client(tmp: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_by_kind(tmp: Path) -> dict[str, list[Any]]:
    client = mlflow_client(tmp)
    experiment = client.get_experiment_by_name("edgeface")
    by_kind: dict[str, list[Any]] = {}
    for run in client.search_runs([experiment.experiment_id]):
        by_kind.setdefault(run.data.tags.get("edgeface.run_kind", "?"), []).append(run)
    return by_kind


@pytest.fixture(scope="module")
def simulation_run(orl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Two nodes, two rounds; edge-1 fails round 1 and the quorum of 1 node carries on."""
    tmp = tmp_path_factory.mktemp("simulation-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        patch.setenv("EDGEFACE_CACHE_DIR", str(tmp / "cache"))
        patch.setenv("NODE_NAME", K8S_NODE)
        options = small_options(tmp, "simulation", rounds=2)
        run_pipeline(options, tmp, orl_dir, faults="edge-1:error@0")
        yield tmp


def test_simulation_run_registers_model(simulation_run: Path) -> None:
    client = mlflow_client(simulation_run)
    model = client.get_registered_model("edgeface")
    # MLflow returns alias targets as int from a SQL store and as str over REST.
    assert int(model.aliases["challenger"]) == 1
    version = client.get_model_version("edgeface", "1")
    [parent] = runs_by_kind(simulation_run)["parent"]
    assert parent.info.status == "FINISHED"
    assert version.tags["edgeface.parent_run_id"] == parent.info.run_id
    assert version.tags["edgeface.dataset_fingerprint"] == parent.data.tags[
        "edgeface.dataset_fingerprint"]
    assert version.tags["edgeface.onnx_parity_ok"] == "True"
    assert version.tags["edgeface.rounds"] == "2"
    assert parent.data.tags["edgeface.data_mode"] == "simulation"
    assert "seeded initial state" in parent.data.tags["edgeface.warm_start"]


def test_simulation_run_survives_node_failure(simulation_run: Path) -> None:
    client = mlflow_client(simulation_run)
    runs = runs_by_kind(simulation_run)
    [parent] = runs["parent"]
    failed = [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id,
                                                                     "failed_nodes")]
    assert sorted(failed) == [(0, 1.0), (1, 0.0)]
    accuracy = client.get_metric_history(parent.info.run_id, "verification_accuracy_mean")
    assert sorted(m.step for m in accuracy) == [0, 1]
    children = {run.data.tags["edgeface.node"]: run for run in runs["node"]}
    assert sorted(children) == ["edge-0", "edge-1"]
    assert {run.data.tags["edgeface.k8s_node"] for run in children.values()} == {K8S_NODE}
    assert {run.data.tags["edgeface.machine.torch"] for run in children.values()} == {
        torch.__version__}
    edge_1 = [(m.step, m.value) for m in client.get_metric_history(
        children["edge-1"].info.run_id, "failed")]
    assert sorted(edge_1) == [(0, 1.0), (1, 0.0)]


def test_simulation_run_onnx_embeds_faces(simulation_run: Path, orl_dir: Path) -> None:
    from edgeface import export

    [onnx_path] = (simulation_run / "pipeline-root").rglob("export-onnx/onnx_model/edgeface.onnx")
    session = export.onnx_session(onnx_path)
    evaluation = runtime.load_evaluation_set(next(
        (simulation_run / "pipeline-root").rglob("prepare-evaluation-set/evaluation_set")))
    embeddings = session.run(None, {"image": np.ascontiguousarray(evaluation.images[:4])})[0]
    assert embeddings.shape == (4, 128)
    assert np.all(np.isfinite(embeddings))


def test_warm_start_uses_champion(simulation_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeface import tracking

    uri = f"sqlite:///{simulation_run / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracking.ModelRegistry(uri).set_alias("edgeface", "champion", 1)
    config = load_config(simulation_run / "config.yaml", {"nodes": 2, "rounds": 2})
    state, source = runtime.resolve_initial_state(config, "champion", simulation_run / "warm")
    assert source == "models:/edgeface/1"
    # The final model: the second round's fused model with merged BatchNorm statistics.
    [final] = list((simulation_run / "pipeline-root").rglob("merge-batchnorm-2/merged_model"))
    expected = torch.load(final, weights_only=True)
    assert all(torch.equal(state[key], expected[key]) for key in expected)


def test_pre_placed_run_trains_on_node_folders(local_env: Path, orl_dir: Path) -> None:
    from edgeface.cluster import load_fleet_data

    folders = [local_env / "edge-0-data", local_env / "edge-1-data"]
    options = small_options(local_env, "pre-placed", rounds=1, data_paths=folders)
    shares = load_fleet_data(options.fleet, orl_dir, "identity", seed=0)
    assert sum(share.images for share in shares) == 400
    run_pipeline(options, local_env, orl_dir)

    reports = common.read_node_reports(str(next(
        (local_env / "pipeline-root").rglob("bundle-artifacts/bundle"))))
    # Each node keeps only the trained people's gallery images: 30 people x 5 images.
    assert sum(r["num_samples"] for r in reports.values()) == 150
    [parent] = runs_by_kind(local_env)["parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["edgeface.data_mode"] == "pre-placed"
    aliases = mlflow_client(local_env).get_registered_model("edgeface").aliases
    assert {alias: int(version) for alias, version in aliases.items()} == {"challenger": 1}


SPREADOUT_CONFIG = ("data: {image-size: 32}\n"
                    "train: {batch-size: 32, local-epochs: 1}\n"
                    "federation: {bn-calibration-images: 0, spreadout: true, spreadout-lr: 0.5}\n"
                    "evaluation: {eval-every: 0}\n")


@pytest.mark.slow
def test_spreadout_run_passes_centres(local_env: Path, orl_dir: Path) -> None:
    """Two nodes and two rounds with the spread-out step, and edge-1 fails round 1."""
    options = small_options(local_env, "simulation", rounds=2, config_text=SPREADOUT_CONFIG)
    run_pipeline(options, local_env, orl_dir, faults="edge-1:error@0")

    [parent] = runs_by_kind(local_env)["parent"]
    assert parent.info.status == "FINISHED"
    client = mlflow_client(local_env)
    before = client.get_metric_history(parent.info.run_id, "spreadout_max_cosine_before")
    after = client.get_metric_history(parent.info.run_id, "spreadout_max_cosine_after")
    # Round 1 had one node, so its cosines are NaN and recorded as tags instead.
    assert [m.step for m in before] == [m.step for m in after] == [1]
    assert after[0].value < before[0].value
    assert "edgeface.nonfinite.spreadout_max_cosine_before" in parent.data.tags
    split = task_outputs(local_env, "split-bundle")
    assert common.read_json(split / "item_0" / "centres.json") == {
        "node": "edge-0", "round": 0, "adjusted": True}
    assert common.read_json(split / "item_1" / "centres.json") == {
        "node": "edge-1", "round": 0, "adjusted": False}
    assert not (split / "item_1" / "centres.pt").exists()


def test_failed_quorum_marks_run_failed(local_env: Path, orl_dir: Path) -> None:
    options = small_options(local_env, "simulation", rounds=1)
    run_pipeline(options, local_env, orl_dir, faults="edge-0:error@0,edge-1:error@0",
                 raise_on_error=False)
    [parent] = runs_by_kind(local_env)["parent"]
    assert parent.info.status == "FAILED"
    assert "edgeface.pipeline_error" in parent.data.tags
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        mlflow_client(local_env).get_registered_model("edgeface")
