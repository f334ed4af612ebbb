"""The KFP components of the federated pipeline, built for one container image.

Every component is a lightweight Python component: KFP copies the function's source into the
container command and runs it with the image's Python, which already has edgeface, kfp and
this package installed (`install_kfp_package=False`, nothing is pip-installed at pod start).
So each function body imports what it needs, and does nothing but map its KFP inputs and
outputs to local paths for the matching function in `components.runtime`.

Models, manifests and reports travel as artifacts. Parameters are small: the run
configuration as JSON, names, indexes and run ids.
"""

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output
from kfp.dsl.base_component import BaseComponent

DEFAULT_IMAGE = "edgeface:0.1.0"
# Slots of `bundle_artifacts`. Fan-in of more artifacts uses a tree of bundle tasks.
MAX_FAN_IN = 8
# Output slots of `split_bundle`. Splitting into more artifacts uses several split tasks.
MAX_FAN_OUT = 8


def prepare_evaluation_set(config_json: str, dataset_dir: str, compiled_nodes: int,
                           compiled_rounds: int, compiled_eval_every: int,
                           compiled_calibration: bool, compiled_spreadout: bool,
                           evaluation_set: Output[Artifact], exclusions: Output[Artifact]):
    """Check the config against the compiled pipeline and preprocess the evaluation images."""
    from components import common, runtime

    common.configure_logging()
    shape = (compiled_nodes, compiled_rounds, compiled_eval_every, compiled_calibration,
             compiled_spreadout)
    metadata = runtime.prepare_evaluation_set(config_json, dataset_dir, shape,
                                              evaluation_set.path, exclusions.path)
    evaluation_set.metadata.update(metadata)


def partition_dataset(config_json: str, dataset_dir: str, partition: Output[Artifact]):
    """Simulation mode: split one dataset into per-node manifests (file names, no pixels)."""
    from components import common, runtime

    common.configure_logging()
    partition.metadata.update(runtime.partition_dataset(config_json, dataset_dir, partition.path))


def validate_and_cache(config_json: str, node_name: str, node_index: int, data_dir: str,
                       manifest: Output[Artifact], report: Output[Artifact],
                       partition: Optional[Input[Artifact]] = None,
                       exclusions: Optional[Input[Artifact]] = None):
    """Validate and cache one edge node's images on that node; write its manifest and report."""
    from components import common, runtime

    common.configure_logging()
    metadata = runtime.validate_and_cache(
        config_json, node_name, node_index, data_dir,
        partition.path if partition is not None else None,
        exclusions.path if exclusions is not None else None, manifest.path, report.path,
    )
    report.metadata.update(metadata)


def bundle_artifacts(names_json: str, merge: bool, bundle: Output[Artifact],
                     item_0: Optional[Input[Artifact]] = None,
                     item_1: Optional[Input[Artifact]] = None,
                     item_2: Optional[Input[Artifact]] = None,
                     item_3: Optional[Input[Artifact]] = None,
                     item_4: Optional[Input[Artifact]] = None,
                     item_5: Optional[Input[Artifact]] = None,
                     item_6: Optional[Input[Artifact]] = None,
                     item_7: Optional[Input[Artifact]] = None):
    """Copy up to 8 artifacts into one folder, named by `names_json`, or merge 8 bundles."""
    import json

    from components import common
    from edgeface.errors import DataError

    common.configure_logging()
    slots = [item_0, item_1, item_2, item_3, item_4, item_5, item_6, item_7]
    names = json.loads(names_json)
    missing = [name for name, item in zip(names, slots) if item is None]
    if missing:
        raise DataError(f"no artifact reached the bundle for {', '.join(missing)}: check the "
                        "logs of the tasks that produce them")
    entries = common.bundle([(n, item.path) for n, item in zip(names, slots)], merge,
                             bundle.path)
    bundle.metadata["entries"] = len(entries)


def split_bundle(names_json: str, bundle: Input[Artifact], item_0: Output[Artifact],
                 item_1: Output[Artifact], item_2: Output[Artifact], item_3: Output[Artifact],
                 item_4: Output[Artifact], item_5: Output[Artifact], item_6: Output[Artifact],
                 item_7: Output[Artifact]):
    """Copy the bundle entries named by `names_json` (up to 8) to their own artifacts, in order.

    Slots past the last name stay unwritten; the KFP launcher allows outputs without files.
    """
    import json

    from components import common
    from edgeface.errors import DataError

    common.configure_logging()
    slots = [item_0, item_1, item_2, item_3, item_4, item_5, item_6, item_7]
    names = json.loads(names_json)
    if len(names) > len(slots):
        raise DataError(f"cannot split {len(names)} entries with one task of {len(slots)} "
                        "slots: the pipeline builder groups them by 8")
    common.split_bundle(bundle.path, names, [slot.path for slot in slots[:len(names)]])
    for name, slot in zip(names, slots):
        slot.metadata["entry"] = name


def start_run(config_json: str, data_mode: str, kfp_run_id: str, run_name: str,
              reports: Input[Artifact], partition: Optional[Input[Artifact]] = None
              ) -> NamedTuple("Outputs", [("parent_run_id", str), ("dataset_fingerprint", str)]):
    """Check the nodes' validation reports and start the MLflow parent run."""
    from collections import namedtuple

    from components import common

    common.configure_logging()
    parent, fingerprint = common.start_run(
        config_json, reports.path, partition.path if partition is not None else None,
        kfp_run_id, run_name, data_mode,
    )
    return namedtuple("Outputs", ["parent_run_id", "dataset_fingerprint"])(parent, fingerprint)


def resolve_initial_model(config_json: str, warm_start_alias: str, parent_run_id: str,
                          initial_model: Output[Model]):
    """Start from the registry's model under `warm_start_alias` if it fits, else a seeded one."""
    from components import common, runtime

    common.configure_logging()
    source = runtime.resolve_initial_model(config_json, warm_start_alias, parent_run_id,
                                           initial_model.path)
    initial_model.metadata["source"] = source


def train_edge_node(config_json: str, node_name: str, round_index: int, data_dir: str,
                    manifest: Input[Artifact], global_model: Input[Model], update: Output[Model],
                    node_state: Output[Artifact], previous_node_state: Optional[Input[Artifact]] = None,
                    centres: Optional[Input[Artifact]] = None):
    """Train one edge node for one round, on that node, starting from the global model.

    With spreadout on, `centres` is this node's adjusted class centres of the previous round.
    """
    from components import common, runtime

    common.configure_logging()
    metadata = runtime.train_edge_node(
        config_json, node_name, round_index, data_dir, manifest.path, global_model.path,
        previous_node_state.path if previous_node_state is not None else None,
        node_state.path, update.path,
        centres_in=centres.path if centres is not None else None,
    )
    update.metadata.update(metadata)


def calibrate_batchnorm(config_json: str, node_name: str, round_index: int, data_dir: str,
                        manifest: Input[Artifact], fused_model: Input[Model],
                        stats: Output[Artifact]):
    """Recompute the fused model's BatchNorm statistics on one edge node's images, on it."""
    from components import common, runtime

    common.configure_logging()
    stats.metadata.update(runtime.calibrate_batchnorm(
        config_json, node_name, round_index, data_dir, manifest.path, fused_model.path,
        stats.path,
    ))


def merge_batchnorm(config_json: str, round_index: int, fused_model: Input[Model],
                    stats: Input[Artifact], merged_model: Output[Model]):
    """Pool the nodes' BatchNorm statistics into the fused model (central, statistics only)."""
    from components import common, runtime

    common.configure_logging()
    merged_model.metadata.update(runtime.merge_batchnorm(
        config_json, round_index, fused_model.path, stats.path, merged_model.path,
    ))


def aggregate(config_json: str, round_index: int, parent_run_id: str,
              global_model: Input[Model], updates: Input[Artifact], next_global_model: Output[Model],
              server_state: Output[Artifact], round_metrics: Output[Metrics],
              adjusted_centres: Output[Artifact],
              previous_server_state: Optional[Input[Artifact]] = None):
    """Fuse one round's node updates, if enough nodes reported, into the next global model.

    With spreadout on, it also spreads the nodes' class centres apart into `adjusted_centres`.
    """
    import math

    from components import common, runtime

    common.configure_logging()
    metrics = runtime.aggregate(
        config_json, round_index, parent_run_id, global_model.path, updates.path,
        previous_server_state.path if previous_server_state is not None else None,
        next_global_model.path, server_state.path, adjusted_centres.path,
    )
    # A spread-out metric is NaN in a round with fewer than two nodes. Standard JSON, the
    # format of the executor output, has no NaN, so non-finite values stay out of the KFP
    # metrics. MLflow gets them as run tags (see `Tracker.log_metrics`).
    for name, value in metrics.items():
        if math.isfinite(value):
            round_metrics.log_metric(name, value)


def evaluate(config_json: str, round_index: int, parent_run_id: str, global_model: Input[Model],
             evaluation_set: Input[Artifact], result: Output[Artifact], metrics: Output[Metrics]):
    """Score the global model on the evaluation set and log the metrics to the parent run."""
    from components import common, runtime

    common.configure_logging()
    values = runtime.evaluate(config_json, round_index, parent_run_id, global_model.path,
                              evaluation_set.path, result.path)
    for name, value in values.items():
        metrics.log_metric(name, value)


def export_onnx(config_json: str, global_model: Input[Model], evaluation_set: Input[Artifact],
                evaluation_result: Input[Artifact], onnx_model: Output[Model]):
    """Export the final model to ONNX and check onnxruntime against PyTorch on real faces."""
    from components import common, runtime

    common.configure_logging()
    onnx_model.metadata.update(runtime.export_onnx(
        config_json, global_model.path, evaluation_set.path, evaluation_result.path,
        onnx_model.path,
    ))


def register(config_json: str, parent_run_id: str, dataset_fingerprint: str,
             onnx_model: Input[Model], global_model: Input[Model],
             evaluation_result: Input[Artifact]) -> str:
    """Register the ONNX model in MLflow (once per parent run) and return its model URI."""
    from components import common, runtime

    common.configure_logging()
    return runtime.register(config_json, parent_run_id, dataset_fingerprint, onnx_model.path,
                            global_model.path, evaluation_result.path)


def finish_run(config_json: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """Mark the MLflow parent run FINISHED or FAILED after the pipeline ends."""
    from components import common

    common.configure_logging()
    return common.finish_run(config_json, kfp_run_id, status.state, status.error_message or "")


@dataclass(frozen=True)
class Components:
    """The pipeline's components, all built for one image."""

    image: str
    prepare_evaluation_set: BaseComponent
    partition_dataset: BaseComponent
    validate_and_cache: BaseComponent
    bundle_artifacts: BaseComponent
    split_bundle: BaseComponent
    start_run: BaseComponent
    resolve_initial_model: BaseComponent
    train_edge_node: BaseComponent
    aggregate: BaseComponent
    calibrate_batchnorm: BaseComponent
    merge_batchnorm: BaseComponent
    evaluate: BaseComponent
    export_onnx: BaseComponent
    register: BaseComponent
    finish_run: BaseComponent


_FUNCTIONS = (prepare_evaluation_set, partition_dataset, validate_and_cache, bundle_artifacts,
              split_bundle, start_run, resolve_initial_model, train_edge_node, aggregate, calibrate_batchnorm,
              merge_batchnorm, evaluate,
              export_onnx, register, finish_run)


@functools.lru_cache(maxsize=8)
def build_components(image: str = DEFAULT_IMAGE) -> Components:
    """Return every component as `@dsl.component(base_image=image, install_kfp_package=False)`.

    The image must contain edgeface with its `kfp` extra and this `components` package.
    """
    built = {func.__name__: dsl.component(func, base_image=image, install_kfp_package=False)
             for func in _FUNCTIONS}
    return Components(image=image, **built)
