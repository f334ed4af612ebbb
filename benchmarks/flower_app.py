"""The edgeface federated workload run through Flower's simulation engine (Ray backend).

Run by `benchmarks/bench_flower.py` with a Python that has `flwr[simulation]` installed; it
is not part of edgeface and edgeface does not depend on Flower. Each Flower client trains
with edgeface's own step function (`edgeface.steps.train_node`) on the same partition, seed,
rounds and local epochs as `edgeface run`, keeps its classification head locally as
`edgeface run` does, and returns the backbone weights. The server averages them with Flower's
FedAvg (weighted by sample count) and scores the final model with `edgeface.steps.evaluate_step`.
So the two runs differ only in orchestration: Ray actors and Flower messages against edgeface's
worker processes and weight files.

    python benchmarks/flower_app.py --data DATASET --out DIR --result RESULT.json \
        [--config-json '{"rounds": 2, ...}']
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Ray workers import this module by name, so the repository must be importable there too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeface import steps  # noqa: E402
from edgeface.config import RunConfig, load_config  # noqa: E402
from edgeface.workers import plan_parallelism  # noqa: E402

# Per Ray worker process: the node's loaded data, so that only the first round reads the cache.
_NODE_DATA: dict[str, steps.NodeData] = {}


def _node_data(images_root: Path, manifest: Path, config: RunConfig,
               cache_dir: Path) -> steps.NodeData:
    key = str(manifest)
    if key not in _NODE_DATA:
        shard = steps.load_node_shard(manifest)
        _NODE_DATA[key] = steps.prepare_node(images_root, shard, config, cache_dir)
    return _NODE_DATA[key]


def build_apps(config: RunConfig, images_root: Path, work_dir: Path, cache_dir: Path,
               evaluation: steps.EvaluationSet, threads: int, outcome: dict[str, Any]):
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg

    initial = steps.initial_state(config)
    keys = list(initial)
    dtypes = {key: value.dtype for key, value in initial.items()}
    nodes = config.partition.nodes
    rounds = config.train.rounds

    def to_state(arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
        # FedAvg returns float arrays; integer buffers (num_batches_tracked) go back to int.
        return {key: torch.from_numpy(np.asarray(array)).to(dtypes[key])
                for key, array in zip(keys, arrays)}

    class EdgefaceClient(NumPyClient):
        def __init__(self, node: str) -> None:
            self.node = node

        def fit(self, parameters, fit_config):
            torch.set_num_threads(threads)
            round_index = int(fit_config["server_round"]) - 1
            data = _node_data(images_root, work_dir / "manifests" / f"{self.node}.json", config,
                              cache_dir)
            node_dir = work_dir / "nodes" / self.node
            global_path = steps.save_atomic(to_state(parameters), node_dir / "global.pt")
            update_path = node_dir / "update.pt"
            metrics = steps.train_node(data, global_path, node_dir, update_path, config,
                                       round_index)
            update = torch.load(update_path, weights_only=True)
            arrays = [update[key].numpy() for key in keys]
            return arrays, int(len(data.labels)), {"loss": metrics["loss"]}

    def client_fn(context: Context):
        return EdgefaceClient(f"node-{context.node_config['partition-id']}").to_client()

    def evaluate_fn(server_round: int, parameters, _config):
        if server_round != rounds:
            return None
        started = time.perf_counter()
        result, _ = steps.evaluate_step(to_state(parameters), evaluation, config)
        outcome["evaluate_seconds"] = time.perf_counter() - started
        verification = result.verification
        # The same keys as the `metrics` of edgeface's summary.json.
        outcome["metrics"] = {"verification_accuracy": float(verification.accuracy_mean),
                              "verification_std": float(verification.accuracy_std),
                              "verification_auc": float(verification.auc),
                              "threshold": float(verification.threshold)}
        if result.identification_top1 is not None:
            outcome["metrics"]["identification_top1"] = float(result.identification_top1)
        return 0.0, {"verification_accuracy": float(result.verification.accuracy_mean)}

    def server_fn(_context: Context) -> ServerAppComponents:
        strategy = FedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=nodes,
            min_available_clients=nodes,
            initial_parameters=ndarrays_to_parameters([initial[k].numpy() for k in keys]),
            on_fit_config_fn=lambda server_round: {"server_round": server_round},
            evaluate_fn=evaluate_fn,
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    return ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset folder")
    parser.add_argument("--out", type=Path, required=True, help="work folder")
    parser.add_argument("--result", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--config-json", default="{}",
                        help="config overrides as a JSON object of flag names to values")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from flwr.simulation import run_simulation

    config = load_config(None, json.loads(args.config_json))
    cache_dir = steps.resolve_cache_dir(config)
    images_root, _, plan = steps.plan_step(args.data, config)
    steps.partition_step(plan.train_records, config, args.out)
    evaluation = steps.prepare_evaluation(images_root, plan, config, cache_dir)
    nodes = config.partition.nodes
    parallel, threads = plan_parallelism(nodes, config.train.max_parallel,
                                         config.train.threads_per_worker)
    outcome: dict[str, Any] = {}
    server_app, client_app = build_apps(config, images_root, args.out.resolve(), cache_dir,
                                        evaluation, threads, outcome)
    # Ray runs `parallel` clients at once, each on `threads` cores, as edgeface's workers do.
    backend_config = {"client_resources": {"num_cpus": threads, "num_gpus": 0.0},
                      "init_args": {"num_cpus": parallel * threads, "include_dashboard": False}}
    simulation_started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=nodes,
                   backend_config=backend_config)
    import flwr

    outcome.update({"flwr": flwr.__version__, "parallel": parallel, "threads": threads,
                    "simulation_seconds": time.perf_counter() - simulation_started,
                    "seconds_in_process": time.perf_counter() - started,
                    "pid": os.getpid()})
    args.result.write_text(json.dumps(outcome, indent=2) + "\n")
    return 0 if "metrics" in outcome else 1


if __name__ == "__main__":
    sys.exit(main())
