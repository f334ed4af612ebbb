"""Fusion of node models: FedAvg and server-optimizer strategies on backbone state dicts.

Aggregation is a pure function of the nodes' state dicts and sample counts, plus the server
optimizer state of the chosen strategy. It receives no images or labels.

Only the backbone travels. Each node's margin head stays on that node, because with identity
partitions the nodes share no people: their heads classify disjoint sets of identities, and
averaging their rows would mix unrelated classes. A `NodeUpdate.state` is therefore a backbone
state dict with keys relative to the backbone (`edgeface.model.backbone_state`).

How each tensor of the fused state is computed:

- Floating-point tensors, including BatchNorm `running_mean` and `running_var`: the mean
  weighted by sample count, computed in float64 and cast back to the tensor's dtype. Server
  optimizers (`fedavgm`, `fedadam`) then step from the previous global value towards it.
- Integer buffers such as BatchNorm `num_batches_tracked` (int64): the weighted mean rounded to
  the nearest integer (ties to even, as `torch.round`), in the original dtype. Server optimizers
  never touch them.
- Local keys (the `local_keys` pattern or predicate, and every BatchNorm tensor when
  `fedbn=True`, after FedBN by Li et al., ICLR 2021): not averaged. The fused state keeps the
  previous global value of these keys, so a node that loads the fused state must keep its own
  values for them.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import numbers
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from edgeface.errors import ConfigError, QuorumError

logger = logging.getLogger(__name__)

LocalKeys = str | re.Pattern[str] | Callable[[str], bool] | None
"""Keys kept out of averaging: a regular expression (matched with `re.search`), a predicate on
the key, or None for no local keys."""

# Suffixes of the tensors that `torch.nn.modules.batchnorm._BatchNorm` registers.
_BATCHNORM_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_KEYS_SHOWN = 3


@dataclass
class NodeUpdate:
    """Result of one node's local training in one round.

    `state` is the backbone state dict, `num_samples` the number of training images behind it
    (the aggregation weight), and `metrics` scalar training metrics such as the final loss.
    """

    node: str
    state: dict[str, torch.Tensor]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class AggregationResult:
    """Fused backbone state of one round and what went into it.

    `rejected` pairs each rejected node with the reason. `metrics` contains `accepted_nodes`,
    `rejected_nodes`, `total_samples`, `update_norm` (L2 norm of the change of the averaged
    float tensors), `clamped_running_var` (elements raised back to 0) and `aggregate_seconds`.
    """

    state: dict[str, torch.Tensor]
    accepted: list[str]
    rejected: list[tuple[str, str]]
    metrics: dict[str, float]


def batchnorm_keys(state: Mapping[str, torch.Tensor]) -> set[str]:
    """Return the keys of every BatchNorm tensor in a state dict.

    A module prefix counts as BatchNorm when it has a `running_mean` or `running_var` buffer.
    NOTE: BatchNorm layers built with `track_running_stats=False` have no such buffers and are
    not found.
    """
    prefixes = {
        key.rsplit(".", 1)[0]
        for key in state
        if key.endswith((".running_mean", ".running_var"))
    }
    return {
        f"{prefix}.{suffix}"
        for prefix in prefixes
        for suffix in _BATCHNORM_SUFFIXES
        if f"{prefix}.{suffix}" in state
    }


def validate_update(
    update: NodeUpdate, reference: Mapping[str, torch.Tensor]
) -> str | None:
    """Return the reason to reject `update`, or None when it can be aggregated.

    An update is rejected when num_samples is negative or not an integer, or when its keys
    differ from those of `reference`. It is also rejected when a value is not a tensor, has
    another shape or dtype than the reference, or contains NaN or infinity.
    """
    if not isinstance(update.state, Mapping):
        return f"state must be a dict of tensors, got {type(update.state).__name__}"
    count = update.num_samples
    if isinstance(count, bool) or not isinstance(count, numbers.Integral):
        return f"num_samples must be an integer, got {count!r}"
    if count < 0:
        return f"num_samples is negative ({count})"

    missing = sorted(reference.keys() - update.state.keys())
    unexpected = sorted(update.state.keys() - reference.keys())
    if missing or unexpected:
        return "state dict does not match the global model: " + _describe_key_mismatch(
            missing, unexpected
        )

    # Structure first (no tensor operations), then one finiteness check over all floating
    # tensors before the first structural problem. Only when that check fails does the slow
    # per-key loop run, which returns the reason of the first bad key in `reference` order.
    keys = list(reference)
    structural_reason = None
    checked = len(keys)
    for index, key in enumerate(keys):
        structural_reason = _structure_problem(key, update.state[key], reference[key])
        if structural_reason is not None:
            checked = index
            break
    floating = [update.state[key] for key in keys[:checked]
                if update.state[key].is_floating_point()]
    if not floating or _all_finite(floating):
        return structural_reason
    for key in keys:
        reason = _validate_tensor(key, update.state[key], reference[key])
        if reason is not None:
            return reason
    return None


def _structure_problem(key: str, tensor: object, expected: torch.Tensor) -> str | None:
    """Return why `tensor` cannot stand for `expected` (type, shape, dtype), or None."""
    if not isinstance(tensor, torch.Tensor):
        return f"{key!r} is a {type(tensor).__name__}, expected a tensor"
    if tensor.shape != expected.shape:
        return (
            f"shape mismatch for {key!r}: got {tuple(tensor.shape)}, "
            f"expected {tuple(expected.shape)}"
        )
    if tensor.dtype != expected.dtype:
        return f"dtype mismatch for {key!r}: got {tensor.dtype}, expected {expected.dtype}"
    return None


def _all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Return True when no tensor contains NaN or infinity, in one pass over all elements."""
    dtype = tensors[0].dtype
    if any(tensor.dtype != dtype for tensor in tensors):
        dtype = torch.float64
    flat = torch.cat([tensor.detach().reshape(-1).to(dtype) for tensor in tensors])
    return bool(torch.isfinite(flat).all())


def _validate_tensor(key: str, tensor: object, expected: torch.Tensor) -> str | None:
    reason = _structure_problem(key, tensor, expected)
    if reason is not None:
        return reason
    # A finite sum proves that every element is finite, because NaN and infinity propagate
    # through addition. Only a non-finite sum, possibly a float overflow, needs the count.
    if tensor.is_floating_point() and not torch.isfinite(tensor.sum()):
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            return f"{bad} non-finite values (NaN or infinity) in {key!r}"
    return None


def _describe_key_mismatch(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_first_keys(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_first_keys(unexpected)})")
    return ", ".join(parts)


def _first_keys(keys: list[str]) -> str:
    shown = ", ".join(repr(key) for key in keys[:_KEYS_SHOWN])
    return shown + (", ..." if len(keys) > _KEYS_SHOWN else "")


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread, then restore the previous count.

    Aggregation and update screening run a few small operations per state-dict key (about 150
    keys for MobileFaceNet). Each parallel operation pays an OpenMP fork and join, which
    costs more than the arithmetic: FedAvg of 4 MobileFaceNet updates took 17 ms on one thread
    and 450 ms on two threads of a loaded 2-core machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def fedavg(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    keys: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Average state dicts weighted by sample count (McMahan et al., AISTATS 2017).

    Floating-point tensors, BatchNorm running statistics included, are averaged in float64 and
    cast back to their dtype. Integer tensors get the weighted mean rounded to the nearest
    integer (ties to even), in their dtype. States with weight 0 are left out entirely, so even
    their NaNs cannot reach the result. `keys` limits the result to those keys (default: all
    keys of the first state).

    Raises:
        QuorumError: no state has a positive weight.
        ValueError: lengths differ, a weight is negative or not finite, or the states do not
            share the same keys.
    """
    kept_states, normalized = _positive_weights(states, weights)
    selected = list(kept_states[0]) if keys is None else list(keys)
    return {
        key: _cast_like(
            _weighted_mean([state[key] for state in kept_states], normalized),
            kept_states[0][key],
        )
        for key in selected
    }


def _positive_weights(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> tuple[list[Mapping[str, torch.Tensor]], torch.Tensor]:
    """Drop zero-weight states and return the rest with their weights normalized to sum 1."""
    if len(states) != len(weights):
        raise ValueError(f"got {len(states)} state dicts but {len(weights)} weights")
    for index, weight in enumerate(weights):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"invalid weight {weight!r} at position {index}: weights are sample counts, "
                "so each must be a finite number >= 0"
            )

    kept = [(state, float(weight)) for state, weight in zip(states, weights) if weight > 0]
    if not kept:
        raise QuorumError(
            f"nothing to average: none of the {len(states)} state dicts has a positive "
            f"weight (weights {list(weights)})"
        )

    reference_keys = kept[0][0].keys()
    for state, _ in kept[1:]:
        if state.keys() != reference_keys:
            missing = sorted(reference_keys - state.keys())
            unexpected = sorted(state.keys() - reference_keys)
            raise ValueError(
                "state dicts to average must share their keys, but one differs from the "
                f"first: {_describe_key_mismatch(missing, unexpected)}"
            )

    tensor = torch.tensor([weight for _, weight in kept], dtype=torch.float64)
    return [state for state, _ in kept], tensor / tensor.sum()


def _weighted_mean(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Return sum_i weights[i] * tensors[i] in float64, in one stacked operation per key."""
    stacked = torch.stack([tensor.detach() for tensor in tensors]).to(torch.float64)
    return torch.tensordot(weights, stacked, dims=1)


def _cast_like(value: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Cast a float64 result to the template's dtype, rounding for integer dtypes."""
    if template.is_floating_point():
        return value.to(template.dtype)
    return torch.round(value).to(template.dtype)


class Strategy(ABC):
    """Aggregation rule: screen the updates, average them, then take one server step.

    Subclasses implement `server_step`, which maps the previous global values and the
    weighted average of the accepted updates to the new global values. Its input and output
    are float64 and cover the floating-point keys that are not local. Server optimizer state
    is kept per key and saved with `state_dict()`.

    Options (all keyword-only):
        min_nodes: minimum number of accepted updates with samples (default 1); fewer raise
            QuorumError.
        local_keys: keys kept out of averaging, as a regular expression (`re.search`) or a
            predicate (default None).
        fedbn: also keep every BatchNorm tensor out of averaging (default False).
            NOTE: the fused state then keeps the BatchNorm values of the initial global
            model, so a central evaluation of it uses none of the nodes' statistics.
    """

    name: ClassVar[str]

    def __init__(self, *, min_nodes: int = 1, local_keys: LocalKeys = None,
                 fedbn: bool = False) -> None:
        errors: list[str] = []
        if isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or min_nodes < 1:
            errors.append(f"min_nodes must be an integer >= 1, got {min_nodes!r}")
        if not isinstance(fedbn, bool):
            errors.append(f"fedbn must be true or false, got {fedbn!r}")
        self._is_local_key = _compile_local_keys(local_keys, errors)
        # Subclasses set their own options before calling this constructor, so that one
        # ConfigError lists every invalid option.
        errors.extend(self._option_errors())
        if errors:
            raise ConfigError(f"invalid options for strategy {self.name!r}: " + "; ".join(errors))
        self.min_nodes = min_nodes
        self.fedbn = fedbn
        self.rounds = 0

    def _option_errors(self) -> list[str]:
        """Return a message for each invalid option of the subclass."""
        return []

    @classmethod
    def option_names(cls) -> set[str]:
        """Return the keyword options that the constructor accepts, base class options included."""
        names: set[str] = set()
        for klass in cls.__mro__:
            if "__init__" in klass.__dict__ and klass is not object:
                parameters = inspect.signature(klass.__dict__["__init__"]).parameters.values()
                names.update(p.name for p in parameters if p.kind is p.KEYWORD_ONLY)
        return names

    def local_keys(self, state: Mapping[str, torch.Tensor]) -> set[str]:
        """Return the keys of `state` that this strategy keeps out of averaging."""
        local = {key for key in state if self._is_local_key(key)}
        if self.fedbn:
            local |= batchnorm_keys(state)
        return local

    @abstractmethod
    def server_step(
        self, current: dict[str, torch.Tensor], average: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Return the new global values from the previous ones and the node average (float64)."""

    def state_dict(self) -> dict[str, Any]:
        """Return the server optimizer state: strategy name, round count and per-key buffers."""
        return {"strategy": self.name, "rounds": self.rounds, "buffers": self._buffers()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by `state_dict()` so that a resumed run continues identically.

        Raises:
            ConfigError: the state was saved by another strategy or is malformed.
        """
        saved = state.get("strategy")
        if saved != self.name:
            raise ConfigError(
                f"cannot resume strategy {self.name!r} from server state saved by {saved!r}: "
                f"set the strategy back to {saved!r} or start a new run"
            )
        buffers = state.get("buffers")
        if not isinstance(buffers, Mapping) or not isinstance(state.get("rounds"), int):
            raise ConfigError(
                f"malformed server state for strategy {self.name!r}: expected the keys "
                "'strategy', 'rounds' and 'buffers' as written by state_dict()"
            )
        self.rounds = state["rounds"]
        self._load_buffers(buffers)

    def _buffers(self) -> dict[str, dict[str, torch.Tensor]]:
        return {}

    def _load_buffers(self, buffers: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        del buffers

    def aggregate(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[NodeUpdate]
    ) -> AggregationResult:
        """Fuse the node updates of one round into a new global backbone state.

        `global_state` is the state the nodes started the round from. It is the reference for
        validation and the source of local keys. Rejected updates are logged at WARNING and
        never reach the result. An update with num_samples 0 is rejected too, because it
        carries no training.

        Raises:
            QuorumError: fewer than `min_nodes` updates are accepted. The message names every
                rejected node and why it was rejected.
        """
        started = time.perf_counter()
        with single_thread():
            accepted, rejected = self._screen(global_state, updates)
            if len(accepted) < self.min_nodes:
                raise QuorumError(self._quorum_message(accepted, rejected, len(updates)))

            with torch.no_grad():
                state, update_norm, clamped = self._fuse(global_state, accepted)
        self.rounds += 1

        seconds = time.perf_counter() - started
        total_samples = sum(update.num_samples for update in accepted)
        logger.info(
            "fused %d of %d node updates with %s (%d samples, update norm %.4g) in %.1f ms",
            len(accepted), len(updates), self.name, total_samples, update_norm, seconds * 1e3,
        )
        metrics = {
            "accepted_nodes": float(len(accepted)),
            "rejected_nodes": float(len(rejected)),
            "total_samples": float(total_samples),
            "update_norm": update_norm,
            "clamped_running_var": float(clamped),
            "aggregate_seconds": seconds,
        }
        return AggregationResult(state, [u.node for u in accepted], rejected, metrics)

    def _screen(
        self, global_state: Mapping[str, torch.Tensor], updates: Sequence[NodeUpdate]
    ) -> tuple[list[NodeUpdate], list[tuple[str, str]]]:
        """Split updates into accepted ones and (node, reason) pairs, logging each rejection."""
        accepted: list[NodeUpdate] = []
        rejected: list[tuple[str, str]] = []
        seen: set[str] = set()
        for update in updates:
            reason = validate_update(update, global_state)
            if reason is None and update.node in seen:
                reason = "duplicate update: this node already reported in this round"
            if reason is None and update.num_samples == 0:
                reason = "num_samples is 0, so the update carries no training"
            seen.add(update.node)
            if reason is None:
                accepted.append(update)
            else:
                logger.warning("rejected update from node %s: %s", update.node, reason)
                rejected.append((update.node, reason))
        return accepted, rejected

    def _quorum_message(
        self, accepted: list[NodeUpdate], rejected: list[tuple[str, str]], total: int
    ) -> str:
        details = "; ".join(f"{node}: {reason}" for node, reason in rejected) or "none"
        return (
            f"only {len(accepted)} of {total} node updates were accepted, but min_nodes is "
            f"{self.min_nodes}. Rejected nodes: {details}. Fix those nodes or lower min_nodes."
        )

    def _fuse(
        self, global_state: Mapping[str, torch.Tensor], accepted: list[NodeUpdate]
    ) -> tuple[dict[str, torch.Tensor], float, int]:
        """Return the fused state, the L2 norm of its change and the clamped variance count."""
        local = self.local_keys(global_state)
        float_keys = [
            key for key, value in global_state.items()
            if value.is_floating_point() and key not in local
        ]
        states, weights = _positive_weights(
            [update.state for update in accepted], [update.num_samples for update in accepted]
        )

        integer_keys = [
            key for key in global_state
            if key not in local and key not in float_keys
        ]
        # Each group of keys is averaged as one flat float64 vector per node: a handful of
        # large operations instead of several small ones per key.
        current_flat = _flatten([global_state[key] for key in float_keys])
        current = _unflatten(current_flat, float_keys, global_state)
        average = _unflatten(_flat_weighted_mean(states, float_keys, weights), float_keys,
                             global_state)
        stepped = self.server_step(current, average)
        clamped = _clamp_running_var(stepped)
        stepped_flat = _flatten([stepped[key] for key in float_keys])
        squared_change = float(((stepped_flat - current_flat) ** 2).sum()) if float_keys else 0.0

        fused: dict[str, torch.Tensor] = {}
        for key in local:
            fused[key] = global_state[key].detach().clone()
        fused.update(_cast_flat(stepped_flat, float_keys, global_state))
        # Integer buffers always follow the FedAvg rule, whatever the server step.
        integer_mean = _flat_weighted_mean(states, integer_keys, weights)
        for key, mean in _unflatten(integer_mean, integer_keys, global_state).items():
            fused[key] = _cast_like(mean, global_state[key])
        return {key: fused[key] for key in global_state}, math.sqrt(squared_change), clamped


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate `tensors` into one flat float64 vector (empty for no tensors)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([tensor.detach().reshape(-1).to(torch.float64) for tensor in tensors])


def _unflatten(flat: torch.Tensor, keys: Sequence[str],
               templates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into views shaped like `templates[key]`, in `keys` order."""
    sizes = [templates[key].numel() for key in keys]
    chunks = flat.split(sizes) if keys else []
    return {key: chunk.view(templates[key].shape) for key, chunk in zip(keys, chunks)}


def _flat_weighted_mean(states: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str],
                        weights: torch.Tensor) -> torch.Tensor:
    """Return the weighted mean of the states' `keys`, as one flat float64 vector."""
    total = sum(states[0][key].numel() for key in keys)
    mean = torch.zeros(total, dtype=torch.float64)
    # Accumulating node by node keeps one flat copy in memory, not a (nodes, parameters) stack.
    for state, weight in zip(states, weights.tolist()):
        mean.add_(_flatten([state[key] for key in keys]), alpha=weight)
    return mean


def _cast_flat(flat: torch.Tensor, keys: Sequence[str],
               templates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast a flat float64 vector to the templates' dtype and split it into shaped tensors.

    With one dtype among the keys (the usual fp32 model) that is a single cast. The tensors
    returned are then views into one buffer, which `torch.save` stores once.
    """
    dtypes = {templates[key].dtype for key in keys}
    if len(dtypes) == 1:
        return _unflatten(flat.to(dtypes.pop()), keys, templates)
    return {key: value.to(templates[key].dtype)
            for key, value in _unflatten(flat, keys, templates).items()}


def _clamp_running_var(state: dict[str, torch.Tensor]) -> int:
    """Raise negative BatchNorm running variances to 0 in place and return how many there were.

    A weighted mean of variances is never negative, but a server step with momentum or Adam
    can overshoot below 0, and BatchNorm divides by sqrt(running_var + eps).
    """
    clamped = 0
    for key, value in state.items():
        if key.rsplit(".", 1)[-1] == "running_var":
            negative = int((value < 0).sum())
            if negative:
                value.clamp_(min=0.0)
                clamped += negative
    if clamped:
        logger.warning("clamped %d negative BatchNorm running_var elements to 0", clamped)
    return clamped


def _compile_local_keys(local_keys: LocalKeys, errors: list[str]) -> Callable[[str], bool]:
    """Turn the `local_keys` option into a predicate, appending to `errors` when it is invalid."""
    if local_keys is None:
        return lambda key: False
    if isinstance(local_keys, str | re.Pattern):
        try:
            pattern = re.compile(local_keys)
        except re.error as error:
            errors.append(f"local_keys {local_keys!r} is not a valid regular expression: {error}")
            return lambda key: False
        return lambda key: pattern.search(key) is not None
    if callable(local_keys):
        return local_keys
    errors.append(
        f"local_keys must be a regular expression or a predicate on keys, got {local_keys!r}"
    )
    return lambda key: False


def _check_fraction(name: str, value: object, errors: list[str]) -> None:
    """Append an error unless 0 <= value < 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        errors.append(f"{name} must be a number in [0, 1), got {value!r}")


def _check_positive(name: str, value: object, errors: list[str]) -> None:
    """Append an error unless value is a finite number > 0."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value <= 0):
        errors.append(f"{name} must be a finite number > 0, got {value!r}")


def _copy_buffers(buffers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in buffers.items()}


class FedAvg(Strategy):
    """Federated averaging (McMahan et al., AISTATS 2017): the new global state is the average."""

    name = "fedavg"

    def server_step(
        self, current: dict[str, torch.Tensor], average: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return dict(average)


class FedAvgM(Strategy):
    """FedAvg with server momentum (Hsu et al., 2019, arXiv:1909.06335).

    Per key, with pseudo-gradient delta = global - average:
    v = momentum * v + delta, then global = global - server_lr * v. The velocity v starts at 0.
    With momentum 0 and server_lr 1 this is FedAvg. On a constant pseudo-gradient the step
    approaches server_lr / (1 - momentum) times delta, so the defaults (server_lr 0.1,
    momentum 0.9) settle at FedAvg-sized steps.
    """

    name = "fedavgm"

    def __init__(self, *, server_lr: float = 0.1, momentum: float = 0.9, **options: Any) -> None:
        self.server_lr = server_lr
        self.momentum = momentum
        self._velocity: dict[str, torch.Tensor] = {}
        super().__init__(**options)

    def _option_errors(self) -> list[str]:
        errors: list[str] = []
        _check_positive("server_lr", self.server_lr, errors)
        _check_fraction("momentum", self.momentum, errors)
        return errors

    def server_step(
        self, current: dict[str, torch.Tensor], average: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        stepped = {}
        for key, mean in average.items():
            pseudo_gradient = current[key] - mean
            previous = self._velocity.get(key)
            velocity = pseudo_gradient if previous is None else self.momentum * previous + pseudo_gradient
            self._velocity[key] = velocity
            stepped[key] = current[key] - self.server_lr * velocity
        return stepped

    def _buffers(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"velocity": _copy_buffers(self._velocity)}

    def _load_buffers(self, buffers: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self._velocity = _copy_buffers(buffers.get("velocity", {}))


class FedAdam(Strategy):
    """Server-side Adam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

    Per key, with delta = average - global:
    m = beta1 * m + (1 - beta1) * delta, v = beta2 * v + (1 - beta2) * delta**2,
    global = global + server_lr * m / (sqrt(v) + tau). There is no bias correction. m starts
    at 0 and v at tau**2. The defaults (server_lr 0.01, beta1 0.9, beta2 0.99, tau 1e-3) are
    starting points for tuning, not tuned values.
    """

    name = "fedadam"

    def __init__(self, *, server_lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, **options: Any) -> None:
        self.server_lr = server_lr
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self._first_moment: dict[str, torch.Tensor] = {}
        self._second_moment: dict[str, torch.Tensor] = {}
        super().__init__(**options)

    def _option_errors(self) -> list[str]:
        errors: list[str] = []
        _check_positive("server_lr", self.server_lr, errors)
        _check_fraction("beta1", self.beta1, errors)
        _check_fraction("beta2", self.beta2, errors)
        _check_positive("tau", self.tau, errors)
        return errors

    def server_step(
        self, current: dict[str, torch.Tensor], average: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        stepped = {}
        for key, mean in average.items():
            delta = mean - current[key]
            m = self._first_moment.get(key, torch.zeros_like(delta))
            v = self._second_moment.get(key, torch.full_like(delta, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.beta2 * v + (1 - self.beta2) * delta * delta
            self._first_moment[key], self._second_moment[key] = m, v
            stepped[key] = current[key] + self.server_lr * m / (v.sqrt() + self.tau)
        return stepped

    def _buffers(self) -> dict[str, dict[str, torch.Tensor]]:
        return {
            "first_moment": _copy_buffers(self._first_moment),
            "second_moment": _copy_buffers(self._second_moment),
        }

    def _load_buffers(self, buffers: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self._first_moment = _copy_buffers(buffers.get("first_moment", {}))
        self._second_moment = _copy_buffers(buffers.get("second_moment", {}))


STRATEGIES: dict[str, type[Strategy]] = {
    strategy.name: strategy for strategy in (FedAvg, FedAvgM, FedAdam)
}


def build_strategy(name: str, **options: Any) -> Strategy:
    """Create the strategy registered under `name` with the given options.

    Option names may use kebab-case (`server-lr`) or snake_case (`server_lr`). Every strategy
    accepts `min_nodes`, `local_keys` and `fedbn`. `fedavgm` adds `server_lr` and `momentum`.
    `fedadam` adds `server_lr`, `beta1`, `beta2` and `tau`.

    Raises:
        ConfigError: the name is unknown, an option does not exist for that strategy, or an
            option value is invalid.
    """
    try:
        strategy_class = STRATEGIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown aggregation strategy {name!r}: choose one of {', '.join(sorted(STRATEGIES))}"
        ) from None
    normalized = {key.replace("-", "_"): value for key, value in options.items()}
    allowed = strategy_class.option_names()
    unknown = sorted(set(normalized) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for aggregation strategy {name!r}: "
            f"valid options are {', '.join(sorted(allowed))}"
        )
    return strategy_class(**normalized)


# --- class-centre geometry across nodes ------------------------------------------------------


@dataclass
class SpreadOutResult:
    """Adjusted class centres of one round and how far apart the nodes' centres are.

    `centres` maps each node to its (C_node, D) float32 rows, unit-normalized for the nodes
    that took part. `max_cosine_before` and `max_cosine_after` are the largest cosine between
    two centres of different nodes, before and after the server step (NaN with fewer than two
    non-empty nodes).
    """

    centres: dict[str, torch.Tensor]
    max_cosine_before: float
    max_cosine_after: float
    seconds: float


class SpreadOut:
    """Server-side spread-out regularizer on the class centres of nodes that share no people.

    Implements the server step of FedAwS (Yu et al., "Federated Learning with Only Positive
    Labels", ICML 2020, arXiv:2004.10342), which FedFace (Aggarwal et al., "FedFace:
    Collaborative Learning of Face Recognition Model", IJCB 2021) applies to face recognition.
    A node trains on only its own people, so its margin loss separates its own class centres but
    nothing pushes them away from the centres of other nodes. Each round the server receives
    every node's centres (the rows of its ArcFace or CosFace head, weights only) and takes
    `steps` gradient steps of size `lr` on

        reg(W) = sum over pairs (i, j) of centres of different nodes of
                 max(0, margin - ||w_i - w_j||) ** 2

    with every row normalized to unit length, as the margin heads use them. Each node then
    continues from its adjusted centres. Differences from the papers: pairs within one node are
    left out, because the node's own margin loss already separates them, and the rows are
    renormalized after each step. The regularizer is the sum of the squared hinge over pairs
    (one term per unordered pair).

    Options:
        lr: step size of each gradient step (> 0).
        margin: Euclidean distance below which two unit-length centres repel each other,
            in (0, 2]. sqrt(2) corresponds to a cosine of 0.
        steps: gradient steps per round (integer >= 1).
    """

    def __init__(self, *, lr: float = 0.1, margin: float = math.sqrt(2.0), steps: int = 10) -> None:
        errors: list[str] = []
        _check_positive("lr", lr, errors)
        if (isinstance(margin, bool) or not isinstance(margin, numbers.Real)
                or not 0 < margin <= 2):
            errors.append(f"margin must be a number in (0, 2], got {margin!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            errors.append(f"steps must be an integer >= 1, got {steps!r}")
        if errors:
            raise ConfigError(
                "invalid options for the spread-out regularizer: " + "; ".join(errors)
                + ". Set them with --spreadout-lr, --spreadout-margin and --spreadout-steps"
            )
        self.lr, self.margin, self.steps = float(lr), float(margin), steps

    def apply(self, centres: Mapping[str, torch.Tensor]) -> SpreadOutResult:
        """Return every node's centres after the server step.

        `centres` maps node name to a (C_node, D) tensor. A node with zero rows takes no part
        and is returned unchanged. When fewer than two nodes have rows, every node is returned
        unchanged.

        Raises:
            ValueError: a value is not a 2-D floating-point tensor, the embedding sizes differ,
                or a row is non-finite or all zeros.
        """
        started = time.perf_counter()
        names = [name for name, rows in centres.items() if _check_centres(name, rows)]
        if len({centres[name].shape[1] for name in names}) > 1:
            sizes = {name: centres[name].shape[1] for name in names}
            raise ValueError(f"class centres of different nodes differ in embedding size: {sizes}")
        result = {name: rows.detach().clone() for name, rows in centres.items()}
        if len(names) < 2:
            nan = float("nan")
            return SpreadOutResult(result, nan, nan, time.perf_counter() - started)

        stacked = torch.cat([centres[name].detach().to(torch.float32) for name in names])
        owner = torch.cat([torch.full((len(centres[name]),), index)
                           for index, name in enumerate(names)])
        other_node = owner[:, None] != owner[None, :]
        weights = torch.nn.functional.normalize(stacked, dim=1)
        before = _max_cross_cosine(weights, other_node)
        for _ in range(self.steps):
            weights = weights - self.lr * self._gradient(weights, other_node)
            weights = torch.nn.functional.normalize(weights, dim=1)
        after = _max_cross_cosine(weights, other_node)

        start = 0
        for name in names:
            count = len(centres[name])
            # clone() so each node gets its own storage: torch.save of a view writes the whole
            # stacked tensor, which would send every node all centres.
            result[name] = weights[start:start + count].to(centres[name].dtype).clone()
            start += count
        seconds = time.perf_counter() - started
        logger.info("spread out %d class centres of %d nodes: max cross-node cosine %.3f -> %.3f",
                    len(weights), len(names), before, after)
        return SpreadOutResult(result, before, after, seconds)

    def _gradient(self, weights: torch.Tensor, other_node: torch.Tensor) -> torch.Tensor:
        """Return the gradient of reg(W) with respect to the unit-length rows of W."""
        # d/dw_i of the sum over unordered pairs of (margin - d_ij)^2 is
        # -2 * sum_j c_ij * (w_i - w_j) with c_ij = hinge_ij / d_ij. Distances come from the
        # Gram matrix (d^2 = 2 - 2 cos for unit rows), so memory stays O(N^2), not O(N^2 D).
        cosine = weights @ weights.T
        distance = (2.0 - 2.0 * cosine).clamp_min(0.0).sqrt().clamp_min(1e-12)
        coefficient = (self.margin - distance).clamp_min(0.0) * other_node / distance
        return -2.0 * (coefficient.sum(dim=1, keepdim=True) * weights - coefficient @ weights)


def _check_centres(name: str, rows: object) -> bool:
    """Validate one node's centres and return whether it takes part (it has rows)."""
    if not isinstance(rows, torch.Tensor) or rows.ndim != 2 or not rows.is_floating_point():
        shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise ValueError(
            f"class centres of node {name!r} must be a 2-D floating-point tensor "
            f"(classes x embedding size), got {shape}"
        )
    if not len(rows):
        return False
    if not torch.isfinite(rows).all():
        raise ValueError(f"class centres of node {name!r} contain NaN or infinity")
    if bool((rows.norm(dim=1) == 0).any()):
        raise ValueError(f"class centres of node {name!r} contain an all-zero row")
    return True


def _max_cross_cosine(weights: torch.Tensor, other_node: torch.Tensor) -> float:
    cosine = weights @ weights.T
    return float(cosine[other_node].max())
