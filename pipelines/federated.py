"""The Kubeflow Pipelines v2 pipeline of a federated run, generated for one fleet.

`build_pipeline` unrolls the rounds statically: for R rounds and N edge nodes the DAG has
R x N training tasks, each pinned to its node. One run does what `edgeface run` does:

    prepare-evaluation-set   check the config, preprocess the evaluation images (central)
    partition-dataset        simulation mode only: per-node manifests of one dataset
    validate-and-cache       per node, on the node: its images, manifest and report
    start-run                check the reports, start the MLflow parent run
    resolve-initial-model    warm start from the registry's champion, else a seeded model
    train-edge-node          per node and round, on the node
    aggregate                per round: quorum check and fusion (central, no edge data), and
                             with spreadout on the spread-out step on the class centres
    split-bundle             spreadout only, per round but the last: hands each node its own
                             adjusted class centres for the next round
    calibrate-batchnorm      per node and round, on the node, unless bn-calibration-images
                             is 0: the fused model's BatchNorm statistics on its images
    merge-batchnorm          per round: pools those statistics into the fused model
    evaluate                 per evaluated round (central, no edge data)
    export-onnx, register    ONNX with a parity check, then the MLflow model registry
    finish-run               exit task: marks the MLflow parent run FINISHED or FAILED

Per-node artifacts reach a central task through `bundle-artifacts` tasks, each collecting up
to `MAX_FAN_IN` artifacts (a tree of them for larger fleets), because a component has a fixed
number of inputs. For the same reason `split-bundle` tasks hand a central bundle back out, up
to `MAX_FAN_OUT` artifacts each.

Data modes:

- `simulation`: one dataset on the PVC `dataset_pvc`, mounted at `DATASET_MOUNT` in the data
  tasks and every training task; `partition-dataset` assigns each node its share.
- `pre-placed`: each node's images are already on that node. Its tasks mount the PVC
  `edgeface-data-<node name>` at the node's `data-path` and train on every image there, less
  the evaluation protocol's people and images. The dataset PVC then holds only the
  evaluation dataset, and only `prepare-evaluation-set` mounts it.
"""


import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kfp import compiler, dsl, kubernetes
from kfp.dsl.base_component import BaseComponent

from components.definitions import MAX_FAN_IN, MAX_FAN_OUT, Components, build_components
from edgeface.config import RunConfig, load_config
from edgeface.errors import ConfigError
from edgeface.fleet import (
    DATASET_PVC,
    EDGE_ROLE_LABEL,
    EDGE_ROLE_VALUE,
    TRAINING_POD_LABEL,
    TRAINING_POD_VALUE,
    EdgeNode,
    Fleet,
)
from edgeface.fleet import node_pvc_name as fleet_node_pvc_name

logger = logging.getLogger(__name__)

PIPELINE_NAME = "edgeface-federated"
Mode = Literal["simulation", "pre-placed"]
MODES: tuple[str, ...] = ("simulation", "pre-placed")
DATASET_MOUNT = "/data/dataset"
DEFAULT_DATASET_PVC = DATASET_PVC
DEFAULT_WARM_START_ALIAS = "champion"
# Hard limit on an edge task's pod, on top of the config's round-timeout, which the training
# task enforces itself and reports as a node failure.
DEFAULT_TASK_TIMEOUT_S = 4 * 3600
EDGE_RETRIES = 2
# Requests below the node's cap leave room for the KFP launcher and Argo's wait container in
# the same pod, because an edge agent's allocatable CPU and memory equal the cap exactly.
# NOTE: 0.8 is an estimate, because those containers' requests were not measured on a cluster.
EDGE_REQUEST_FRACTION = 0.8
CENTRAL_CPU_REQUEST, CENTRAL_CPU_LIMIT = "500m", "2"
CENTRAL_MEMORY_REQUEST, CENTRAL_MEMORY_LIMIT = "1024Mi", "4096Mi"
# Environment that tasks calling MLflow get from the fleet's ConfigMap and Secret.
MLFLOW_REQUIRED_CONFIG_KEYS = ("MLFLOW_TRACKING_URI",)
MLFLOW_OPTIONAL_CONFIG_KEYS = ("MLFLOW_DISABLE_TELEMETRY", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                               "MLFLOW_HTTP_REQUEST_TIMEOUT")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                      "MLFLOW_TRACKING_TOKEN")
# The backend turns a pipeline into one Argo Workflow object, and etcd accepts requests of at
# most 1.5 MiB by default. NOTE: k3s's default SQLite store may have another limit.
LARGE_PIPELINE_BYTES = 1024 * 1024


def node_pvc_name(node: EdgeNode) -> str:
    """Return the PVC with a pre-placed node's images (see `edgeface.fleet.node_pvc_name`)."""
    return fleet_node_pvc_name(node.name)


@dataclass(frozen=True)
class PipelineOptions:
    """Inputs of the generated pipeline, checked by `make_options`."""

    fleet: Fleet
    config: RunConfig
    mode: Mode = "simulation"
    task_timeout_s: int = DEFAULT_TASK_TIMEOUT_S

    @property
    def rounds(self) -> int:
        return self.config.train.rounds

    @property
    def calibrates_batchnorm(self) -> bool:
        """Whether each round recomputes the fused model's BatchNorm statistics on the nodes."""
        return self.config.federation.bn_calibration_images > 0

    @property
    def spreads_out(self) -> bool:
        """Whether the class centres travel between rounds for the spread-out server step."""
        return self.config.federation.spreadout

    def evaluated_rounds(self) -> list[int]:
        """Return the 0-based rounds after which the fused model is evaluated, as the runner does."""
        every = self.config.evaluation.eval_every
        return [r for r in range(self.rounds)
                if r == self.rounds - 1 or (every and (r + 1) % every == 0)]

    def display_name(self) -> str:
        """Return the KFP pipeline name: `<fleet name>-<mode>`, starting with `edgeface-`."""
        base = self.fleet.name
        if not base.startswith("edgeface"):
            base = f"edgeface-{base}"
        return f"{base}-{self.mode}"


def pipeline_config(fleet: Fleet, config_path: Path | None = None,
                    rounds: int | None = None) -> RunConfig:
    """Load the run config for `fleet`: nodes = the fleet's node count, rounds from `rounds`.

    `tracking-uri` is dropped, so no URI (which may carry credentials) ends up in the
    compiled file; components read MLFLOW_TRACKING_URI from the fleet's ConfigMap instead.

    Raises:
        ConfigError: invalid config file or values, for example min-nodes above the node count.
    """
    overrides: dict[str, Any] = {"nodes": len(fleet.nodes)}
    if rounds is not None:
        overrides["rounds"] = rounds
    config = load_config(config_path, overrides)
    if config.tracking.tracking_uri is not None:
        logger.warning("leaving tracking-uri out of the pipeline: components read "
                       "MLFLOW_TRACKING_URI from the ConfigMap %r", fleet.mlflow.config_map)
        config = config.model_copy(update={
            "tracking": config.tracking.model_copy(update={"tracking_uri": None})})
    return config


def make_options(fleet: Fleet, config: RunConfig, mode: str = "simulation",
                 task_timeout_s: int = DEFAULT_TASK_TIMEOUT_S) -> PipelineOptions:
    """Check that `config` fits `fleet` and `mode`, and return the build options.

    Raises:
        ConfigError: unknown mode, a node count that differs from the fleet's, or a
            non-positive task timeout.
    """
    if mode not in MODES:
        raise ConfigError(f"invalid data mode {mode!r}: use --mode simulation or --mode pre-placed")
    if config.partition.nodes != len(fleet.nodes):
        raise ConfigError(f"config has nodes {config.partition.nodes} but fleet {fleet.name!r} "
                          f"has {len(fleet.nodes)} nodes: load the config with pipeline_config")
    if task_timeout_s <= 0:
        raise ConfigError(f"invalid task timeout {task_timeout_s}: expected seconds > 0")
    return PipelineOptions(fleet=fleet, config=config, mode=mode,  # type: ignore[arg-type]
                           task_timeout_s=task_timeout_s)


def config_parameter(config: RunConfig) -> str:
    """Return the config as the compact JSON text of the `config_json` pipeline parameter."""
    return json.dumps(config.to_dict(), sort_keys=True, separators=(",", ":"))


# --- Kubernetes settings of one task --------------------------------------------------------


def _millicores(node: EdgeNode, fraction: float = 1.0) -> str:
    return f"{int(node.cpu_millicores * fraction)}m"


def _mebibytes(node: EdgeNode, fraction: float = 1.0) -> str:
    return f"{int(node.memory_bytes * fraction) // 2**20}Mi"


def place_on_edge_node(task: dsl.PipelineTask, fleet: Fleet, node: EdgeNode) -> None:
    """Pin `task` to `node`'s agent with its caps, and mark its pod as holding edge data.

    All expressions go into one required node affinity term, because the backend ORs
    separate terms.
    """
    kubernetes.add_node_affinity(task, match_expressions=[
        {"key": fleet.node_label_key, "operator": "In", "values": [node.label]},
        {"key": EDGE_ROLE_LABEL, "operator": "In", "values": [EDGE_ROLE_VALUE]},
    ])
    if fleet.edge_taint is not None:
        kubernetes.add_toleration(task, key=fleet.edge_taint.key, operator="Equal",
                                  value=fleet.edge_taint.value, effect=fleet.edge_taint.effect)
    task.set_cpu_request(_millicores(node, EDGE_REQUEST_FRACTION))
    task.set_cpu_limit(_millicores(node))
    task.set_memory_request(_mebibytes(node, EDGE_REQUEST_FRACTION))
    task.set_memory_limit(_mebibytes(node))
    kubernetes.add_pod_label(task, TRAINING_POD_LABEL, TRAINING_POD_VALUE)
    kubernetes.use_field_path_as_env(task, "NODE_NAME", "spec.nodeName")


def place_centrally(task: dsl.PipelineTask) -> None:
    """Keep `task` off the edge agents and give it the central CPU and memory."""
    kubernetes.add_node_affinity(task, match_expressions=[
        {"key": EDGE_ROLE_LABEL, "operator": "NotIn", "values": [EDGE_ROLE_VALUE]},
    ])
    task.set_cpu_request(CENTRAL_CPU_REQUEST).set_cpu_limit(CENTRAL_CPU_LIMIT)
    task.set_memory_request(CENTRAL_MEMORY_REQUEST).set_memory_limit(CENTRAL_MEMORY_LIMIT)


def use_mlflow_settings(task: dsl.PipelineTask, fleet: Fleet) -> None:
    """Give `task` the MLflow environment from the fleet's ConfigMap and optional Secret."""
    config_map = fleet.mlflow.config_map
    kubernetes.use_config_map_as_env(task, config_map, {k: k for k in MLFLOW_REQUIRED_CONFIG_KEYS})
    kubernetes.use_config_map_as_env(task, config_map, {k: k for k in MLFLOW_OPTIONAL_CONFIG_KEYS},
                                     optional=True)
    kubernetes.use_secret_as_env(task, fleet.mlflow.secret, {k: k for k in MLFLOW_SECRET_KEYS},
                                 optional=True)


def make_edge_task_reliable(task: dsl.PipelineTask, timeout_s: int) -> None:
    """Retry `task` with backoff, bound its pod's run time, and never reuse a cached result."""
    task.set_retry(num_retries=EDGE_RETRIES, backoff_duration="30s", backoff_factor=2.0,
                   backoff_max_duration="300s")
    kubernetes.set_timeout(task, timeout_s)
    task.set_caching_options(False)


# --- the DAG --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineParameters:
    """The pipeline function's runtime parameters, as channels inside the pipeline."""

    config_json: Any
    dataset_dir: Any
    dataset_pvc: Any
    warm_start_alias: Any


class DagBuilder:
    """Builder of the tasks of one federated run, called inside a pipeline function."""

    def __init__(self, options: PipelineOptions, components: Components,
                 params: PipelineParameters) -> None:
        self.options = options
        self.fleet = options.fleet
        self.components = components
        self.params = params

    def central(self, task: dsl.PipelineTask, *, mlflow: bool = False,
                dataset: bool = False) -> dsl.PipelineTask:
        place_centrally(task)
        task.set_caching_options(False)
        if mlflow:
            use_mlflow_settings(task, self.fleet)
        if dataset:
            kubernetes.mount_pvc(task, pvc_name=self.params.dataset_pvc, mount_path=DATASET_MOUNT)
        return task

    def on_node(self, task: dsl.PipelineTask, node: EdgeNode) -> dsl.PipelineTask:
        place_on_edge_node(task, self.fleet, node)
        make_edge_task_reliable(task, self.options.task_timeout_s)
        if self.options.mode == "simulation":
            kubernetes.mount_pvc(task, pvc_name=self.params.dataset_pvc, mount_path=DATASET_MOUNT)
        else:
            kubernetes.mount_pvc(task, pvc_name=node_pvc_name(node), mount_path=node.data_path)
        return task

    def node_data_dir(self, node: EdgeNode) -> Any:
        return self.params.dataset_dir if self.options.mode == "simulation" else node.data_path

    def build(self) -> None:
        evaluation = self.prepare_evaluation()
        partition = self.partition(evaluation)
        validations = self.validate_nodes(evaluation, partition)
        start = self.start_run(validations, partition)
        parent = start.outputs["parent_run_id"]
        initial = self.central(self.components.resolve_initial_model(
            config_json=self.params.config_json, warm_start_alias=self.params.warm_start_alias,
            parent_run_id=parent), mlflow=True).set_display_name("resolve initial model")
        manifests = {node.name: task.outputs["manifest"] for node, task in validations}
        final_model, result = self.train_rounds(initial.outputs["initial_model"], manifests,
                                                parent, evaluation)
        self.export_and_register(final_model, result, evaluation, start)

    def prepare_evaluation(self) -> dsl.PipelineTask:
        config = self.options.config
        task = self.components.prepare_evaluation_set(
            config_json=self.params.config_json, dataset_dir=self.params.dataset_dir,
            compiled_nodes=config.partition.nodes, compiled_rounds=config.train.rounds,
            compiled_eval_every=config.evaluation.eval_every,
            compiled_calibration=self.options.calibrates_batchnorm,
            compiled_spreadout=self.options.spreads_out)
        return self.central(task, dataset=True).set_display_name("prepare evaluation set")

    def partition(self, evaluation: dsl.PipelineTask) -> dsl.PipelineTask | None:
        if self.options.mode != "simulation":
            return None
        task = self.components.partition_dataset(config_json=self.params.config_json,
                                                 dataset_dir=self.params.dataset_dir)
        task.after(evaluation)
        return self.central(task, dataset=True).set_display_name("partition dataset")

    def validate_nodes(self, evaluation: dsl.PipelineTask, partition: dsl.PipelineTask | None
                       ) -> list[tuple[EdgeNode, dsl.PipelineTask]]:
        tasks = []
        for index, node in enumerate(self.fleet.nodes):
            inputs: dict[str, Any] = ({"partition": partition.outputs["partition"]}
                                      if partition is not None
                                      else {"exclusions": evaluation.outputs["exclusions"]})
            task = self.components.validate_and_cache(
                config_json=self.params.config_json, node_name=node.name, node_index=index,
                data_dir=self.node_data_dir(node), **inputs)
            task.after(evaluation)
            tasks.append((node, self.on_node(task, node).set_display_name(
                f"validate and cache {node.name}")))
        return tasks

    def start_run(self, validations: list[tuple[EdgeNode, dsl.PipelineTask]],
                  partition: dsl.PipelineTask | None) -> dsl.PipelineTask:
        reports = self.fan_in([(node.name, task.outputs["report"]) for node, task in validations],
                              "collect validation reports")
        extra = {"partition": partition.outputs["partition"]} if partition is not None else {}
        task = self.components.start_run(
            config_json=self.params.config_json, data_mode=self.options.mode,
            kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
            reports=reports, **extra)
        return self.central(task, mlflow=True).set_display_name("start run")

    def fan_in(self, items: list[tuple[str, Any]], label: str) -> Any:
        """Collect named artifacts into one bundle artifact with a tree of bundle tasks."""
        merge = False
        while True:
            groups = [items[i:i + MAX_FAN_IN] for i in range(0, len(items), MAX_FAN_IN)]
            tasks = []
            for number, group in enumerate(groups, start=1):
                slots = {f"item_{i}": channel for i, (_, channel) in enumerate(group)}
                task = self.components.bundle_artifacts(
                    names_json=json.dumps([name for name, _ in group]), merge=merge, **slots)
                suffix = f" ({number}/{len(groups)})" if len(groups) > 1 else ""
                tasks.append(self.central(task).set_display_name(label + suffix))
            if len(tasks) == 1:
                return tasks[0].outputs["bundle"]
            items = [(f"part-{i}", task.outputs["bundle"]) for i, task in enumerate(tasks)]
            merge = True

    def fan_out(self, bundle: Any, names: list[str], label: str) -> dict[str, Any]:
        """Split a bundle artifact into one artifact per entry name with `split-bundle` tasks."""
        groups = [names[i:i + MAX_FAN_OUT] for i in range(0, len(names), MAX_FAN_OUT)]
        outputs = {}
        for number, group in enumerate(groups, start=1):
            task = self.components.split_bundle(names_json=json.dumps(group), bundle=bundle)
            suffix = f" ({number}/{len(groups)})" if len(groups) > 1 else ""
            self.central(task).set_display_name(label + suffix)
            for slot, name in enumerate(group):
                outputs[name] = task.outputs[f"item_{slot}"]
        return outputs

    def train_rounds(self, global_model: Any, manifests: dict[str, Any], parent: Any,
                     evaluation: dsl.PipelineTask) -> tuple[Any, Any]:
        node_states: dict[str, Any] = {}
        centres: dict[str, Any] = {}
        server_state = None
        result = None
        for round_index in range(self.options.rounds):
            updates = []
            for node in self.fleet.nodes:
                task = self.train_task(node, round_index, global_model, manifests[node.name],
                                       node_states.get(node.name), centres.get(node.name))
                node_states[node.name] = task.outputs["node_state"]
                updates.append((node.name, task.outputs["update"]))
            bundle = self.fan_in(updates, f"collect updates round {round_index + 1}")
            aggregated = self.aggregate_task(round_index, global_model, bundle, server_state,
                                             parent)
            global_model = aggregated.outputs["next_global_model"]
            server_state = aggregated.outputs["server_state"]
            if self.options.spreads_out and round_index < self.options.rounds - 1:
                centres = self.fan_out(aggregated.outputs["adjusted_centres"],
                                       [node.name for node in self.fleet.nodes],
                                       f"split class centres round {round_index + 1}")
            if self.options.calibrates_batchnorm:
                global_model = self.calibrate_batchnorm(round_index, global_model, manifests)
            if round_index in self.options.evaluated_rounds():
                result = self.evaluate_task(round_index, global_model, parent, evaluation)
        return global_model, result

    def train_task(self, node: EdgeNode, round_index: int, global_model: Any, manifest: Any,
                   previous_state: Any, centres: Any) -> dsl.PipelineTask:
        extra = {"previous_node_state": previous_state} if previous_state is not None else {}
        if centres is not None:
            extra["centres"] = centres
        task = self.components.train_edge_node(
            config_json=self.params.config_json, node_name=node.name, round_index=round_index,
            data_dir=self.node_data_dir(node), manifest=manifest, global_model=global_model,
            **extra)
        return self.on_node(task, node).set_display_name(
            f"train {node.name} round {round_index + 1}")

    def calibrate_batchnorm(self, round_index: int, fused_model: Any,
                            manifests: dict[str, Any]) -> Any:
        """Add the tasks that recompute the fused model's BatchNorm statistics on every node."""
        stats = []
        for node in self.fleet.nodes:
            task = self.components.calibrate_batchnorm(
                config_json=self.params.config_json, node_name=node.name,
                round_index=round_index, data_dir=self.node_data_dir(node),
                manifest=manifests[node.name], fused_model=fused_model)
            self.on_node(task, node).set_display_name(
                f"calibrate BatchNorm {node.name} round {round_index + 1}")
            stats.append((node.name, task.outputs["stats"]))
        bundle = self.fan_in(stats, f"collect BatchNorm statistics round {round_index + 1}")
        merged = self.central(self.components.merge_batchnorm(
            config_json=self.params.config_json, round_index=round_index,
            fused_model=fused_model, stats=bundle))
        merged.set_display_name(f"merge BatchNorm statistics round {round_index + 1}")
        return merged.outputs["merged_model"]

    def aggregate_task(self, round_index: int, global_model: Any, updates: Any,
                       server_state: Any, parent: Any) -> dsl.PipelineTask:
        extra = {"previous_server_state": server_state} if server_state is not None else {}
        task = self.components.aggregate(
            config_json=self.params.config_json, round_index=round_index, parent_run_id=parent,
            global_model=global_model, updates=updates, **extra)
        return self.central(task, mlflow=True).set_display_name(
            f"aggregate round {round_index + 1}")

    def evaluate_task(self, round_index: int, global_model: Any, parent: Any,
                      evaluation: dsl.PipelineTask) -> dsl.PipelineTask:
        task = self.components.evaluate(
            config_json=self.params.config_json, round_index=round_index, parent_run_id=parent,
            global_model=global_model, evaluation_set=evaluation.outputs["evaluation_set"])
        return self.central(task, mlflow=True).set_display_name(
            f"evaluate round {round_index + 1}")

    def export_and_register(self, global_model: Any, result: dsl.PipelineTask,
                            evaluation: dsl.PipelineTask, start: dsl.PipelineTask) -> None:
        exported = self.central(self.components.export_onnx(
            config_json=self.params.config_json, global_model=global_model,
            evaluation_set=evaluation.outputs["evaluation_set"],
            evaluation_result=result.outputs["result"])).set_display_name("export ONNX")
        self.central(self.components.register(
            config_json=self.params.config_json, parent_run_id=start.outputs["parent_run_id"],
            dataset_fingerprint=start.outputs["dataset_fingerprint"],
            onnx_model=exported.outputs["onnx_model"], global_model=global_model,
            evaluation_result=result.outputs["result"]), mlflow=True).set_display_name("register")


def build_pipeline(options: PipelineOptions) -> BaseComponent:
    """Return the `@dsl.pipeline` of a federated run for `options`, ready to compile.

    The pipeline's parameters are `config_json` (default: `options.config`), `dataset_dir`,
    `dataset_pvc` and `warm_start_alias` (default champion; empty turns warm start off).
    """
    components = build_components(options.fleet.image)
    default_config = config_parameter(options.config)
    description = (f"Federated edgeface training on fleet {options.fleet.name}: "
                   f"{len(options.fleet.nodes)} nodes, {options.rounds} rounds, "
                   f"{options.mode} data")

    @dsl.pipeline(name=PIPELINE_NAME, description=description)
    def federated(config_json: str = default_config, dataset_dir: str = DATASET_MOUNT,
                  dataset_pvc: str = DEFAULT_DATASET_PVC,
                  warm_start_alias: str = DEFAULT_WARM_START_ALIAS) -> None:
        params = PipelineParameters(config_json, dataset_dir, dataset_pvc, warm_start_alias)
        builder = DagBuilder(options, components, params)
        finish = components.finish_run(config_json=config_json,
                                       kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        builder.central(finish, mlflow=True).set_display_name("finish run")
        with dsl.ExitHandler(finish, name="federated-training"):
            builder.build()

    return federated


def compile_pipeline(options: PipelineOptions, package_path: Path) -> Path:
    """Compile the pipeline of `options` to the YAML file `package_path` and return it.

    Logs a warning when the file is over 1 MiB: the Argo workflow that the backend makes
    from it may exceed what etcd stores (about 1.5 MiB per object).
    """
    package_path = Path(package_path)
    package_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(options), str(package_path))
    size = package_path.stat().st_size
    if size > LARGE_PIPELINE_BYTES:
        logger.warning("compiled pipeline %s is %.2f MiB: its Argo workflow may exceed etcd's "
                       "object size limit; use fewer rounds per run, or set "
                       "bn-calibration-images to 0, which halves the edge tasks",
                       package_path, size / 2**20)
    logger.info("compiled %s: %d nodes x %d rounds, %s data, %.0f KiB", package_path,
                len(options.fleet.nodes), options.rounds, options.mode, size / 1024)
    return package_path
