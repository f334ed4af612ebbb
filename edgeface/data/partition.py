"""Partitions of the training images across edge nodes, with reports and per-node manifests.

Three strategies exist:

- ``identity``: each person's images all go to one node, so nodes classify disjoint people.
  Identities are placed largest first, each on the node with the fewest images so far.
- ``iid``: images are shuffled and dealt to the nodes in turn, so node sizes differ by at most one.
- ``dirichlet``: label skew after Hsu et al., "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification" (2019). Each identity's images are split
  across nodes by proportions drawn from Dirichlet(alpha); a smaller alpha gives more skew.

Every strategy is a function of the seed and the set of records: the input order does not
matter, because records are sorted by (identity, path) before any random choice.

A node manifest contains file paths (relative to the images root) and identity labels, never
pixels, because each training worker reads its own files.
"""

from __future__ import annotations

import heapq
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edgeface.data.ingest import ImageRecord, count_noun
from edgeface.errors import ConfigError, DataError, PartitionError

logger = logging.getLogger(__name__)

STRATEGIES = ("identity", "iid", "dirichlet")

# Bins of the images-per-identity histogram in reports: (label, lowest count, highest count).
HISTOGRAM_BINS: tuple[tuple[str, int, float], ...] = (
    ("1", 1, 1),
    ("2", 2, 2),
    ("3-5", 3, 5),
    ("6-10", 6, 10),
    ("11-20", 11, 20),
    (">20", 21, float("inf")),
)


@dataclass
class NodeShard:
    """Training images of one edge node; ``name`` is ``node-0``, ``node-1``, ..."""

    name: str
    records: list[ImageRecord]


@dataclass
class Partition:
    """Assignment of every training image to exactly one node.

    ``alpha`` is the Dirichlet concentration for the ``dirichlet`` strategy and None otherwise.
    """

    strategy: str
    seed: int
    nodes: list[NodeShard]
    alpha: float | None = None

    def report(self) -> dict[str, Any]:
        """Summarize the partition as a JSON-ready dict.

        Each entry of ``nodes`` has the node's ``name``, ``images``, ``identities`` and an
        ``images_per_identity`` histogram (identities counted by how many of their images the
        node contains, in the bins of `HISTOGRAM_BINS`). ``totals`` has the same counts over all
        nodes, plus ``identities_on_several_nodes``.
        """
        overall: Counter[str] = Counter()
        homes: dict[str, set[str]] = {}
        for shard in self.nodes:
            for record in shard.records:
                overall[record.identity] += 1
                homes.setdefault(record.identity, set()).add(shard.name)
        return {
            "strategy": self.strategy,
            "seed": self.seed,
            "alpha": self.alpha,
            "nodes": [_node_report(shard) for shard in self.nodes],
            "totals": {
                "nodes": len(self.nodes),
                "images": sum(overall.values()),
                "identities": len(overall),
                "identities_on_several_nodes": sum(len(h) > 1 for h in homes.values()),
                "images_per_identity": _histogram(overall.values()),
            },
        }

    def write_report(self, path: Path) -> Path:
        """Write `report` as JSON to ``path``, creating its folder, and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(), indent=2) + "\n", encoding="utf-8")
        return path

    def write_manifests(self, folder: Path) -> list[Path]:
        """Write one manifest per node to ``folder/<node name>.json`` and return the paths.

        A manifest is ``{"node": name, "records": [{"identity": ..., "path": ...}, ...]}``.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for shard in self.nodes:
            manifest = {
                "node": shard.name,
                "records": [{"identity": r.identity, "path": r.path} for r in shard.records],
            }
            path = folder / f"{shard.name}.json"
            path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
            paths.append(path)
        return paths


def _histogram(counts: Any) -> dict[str, int]:
    histogram = {label: 0 for label, _, _ in HISTOGRAM_BINS}
    for count in counts:
        for label, low, high in HISTOGRAM_BINS:
            if low <= count <= high:
                histogram[label] += 1
                break
    return histogram


def _node_report(shard: NodeShard) -> dict[str, Any]:
    per_identity = Counter(record.identity for record in shard.records)
    return {
        "name": shard.name,
        "images": len(shard.records),
        "identities": len(per_identity),
        "images_per_identity": _histogram(per_identity.values()),
    }


def read_manifest(path: Path) -> NodeShard:
    """Read a node manifest written by `Partition.write_manifests`.

    Raises:
        DataError: the file is missing, is not valid JSON, lacks ``node`` or ``records``, or a
            record path is absolute or leaves the images root (``..``).
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"node manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read node manifest {path}: {error}") from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("node"), str) \
            or not isinstance(manifest.get("records"), list):
        raise DataError(f"invalid node manifest {path}: expected a JSON object with a string "
                        "'node' and a list 'records'; write it with Partition.write_manifests")
    records = [_manifest_record(path, index, entry)
               for index, entry in enumerate(manifest["records"])]
    return NodeShard(name=manifest["node"], records=records)


def _manifest_record(path: Path, index: int, entry: Any) -> ImageRecord:
    if not isinstance(entry, dict) or not isinstance(entry.get("identity"), str) \
            or not isinstance(entry.get("path"), str):
        raise DataError(f"invalid record {index} in node manifest {path}: expected an object "
                        f"with string 'identity' and 'path', got {entry!r}")
    relative = PurePosixPath(entry["path"])
    if not entry["path"] or relative.is_absolute() or ".." in relative.parts:
        raise DataError(f"invalid path {entry['path']!r} in record {index} of node manifest "
                        f"{path}: expected a path relative to the images root, without '..'")
    return ImageRecord(identity=entry["identity"], path=entry["path"])


# --- strategies -------------------------------------------------------------------------------


def partition(
    records: list[ImageRecord],
    nodes: int,
    strategy: str,
    *,
    seed: int,
    alpha: float = 0.5,
    min_images_per_node: int = 1,
) -> Partition:
    """Assign every record to exactly one of ``nodes`` edge nodes.

    Args:
        records: training images; their order does not affect the result.
        nodes: number of edge nodes, at least 1.
        strategy: ``identity``, ``iid`` or ``dirichlet`` (see the module docstring).
        seed: seed of every random choice; the same seed and records give the same partition.
        alpha: Dirichlet concentration for ``dirichlet``, > 0 (default 0.5).
        min_images_per_node: images that every node must get (default 1). ``dirichlet`` moves
            images from the largest node to nodes below it; ``identity`` raises instead, because
            moving images would put a person on two nodes. 0 lets ``dirichlet`` leave nodes
            empty.

    Raises:
        ConfigError: unknown strategy, or ``alpha`` or ``min_images_per_node`` out of range.
        DataError: no records, or two records with the same path.
        PartitionError: ``nodes`` < 1, more nodes than identities for ``identity``, or too few
            images to give each node ``min_images_per_node``.
    """
    groups = _validate(records, nodes, strategy, alpha, min_images_per_node)
    rng = np.random.default_rng(seed)
    if strategy == "identity":
        shards = _split_by_identity(groups, nodes, rng, min_images_per_node)
    elif strategy == "iid":
        shards = _split_iid(groups, nodes, rng)
    else:
        shards = _split_dirichlet(groups, nodes, rng, alpha)
        _repair_small_nodes(shards, min_images_per_node)
    result = Partition(
        strategy=strategy,
        seed=seed,
        nodes=[NodeShard(f"node-{k}", sorted(shard, key=_sort_key))
               for k, shard in enumerate(shards)],
        alpha=alpha if strategy == "dirichlet" else None,
    )
    logger.info("partition %s (seed %d): %s of %s on %s, images per node %s", strategy, seed,
                count_noun(len(records), "image"),
                count_noun(len(groups), "identity", "identities"), count_noun(nodes, "node"),
                [len(shard.records) for shard in result.nodes])
    return result


def _sort_key(record: ImageRecord) -> tuple[str, str]:
    return record.identity, record.path


def _validate(
    records: list[ImageRecord], nodes: int, strategy: str, alpha: float, min_images: int
) -> dict[str, list[ImageRecord]]:
    """Check the request and return the records grouped by identity, both levels sorted."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown partition strategy {strategy!r}: use one of "
                          f"{', '.join(STRATEGIES)} (--partition)")
    if nodes < 1:
        raise PartitionError(f"invalid --nodes {nodes}: expected at least 1 node")
    if strategy == "dirichlet" and not alpha > 0:
        raise ConfigError(f"invalid dirichlet alpha {alpha}: expected a number > 0, for "
                          "example 0.5 (smaller means more skew)")
    if min_images < 0:
        raise ConfigError(f"invalid min-images-per-node {min_images}: expected an integer >= 0")
    if not records:
        raise DataError("cannot partition an empty dataset: check the data directory")
    duplicates = [path for path, n in Counter(r.path for r in records).items() if n > 1]
    if duplicates:
        raise DataError(f"{len(duplicates)} image path(s) are listed more than once, for "
                        f"example {duplicates[0]!r}; pass each image once")
    if len(records) < nodes * max(min_images, 1):
        raise PartitionError(
            f"{count_noun(len(records), 'image')} cannot give each of {nodes} nodes at least "
            f"{count_noun(max(min_images, 1), 'image')}: lower --nodes or min-images-per-node"
        )
    groups: dict[str, list[ImageRecord]] = {}
    for record in sorted(records, key=_sort_key):
        groups.setdefault(record.identity, []).append(record)
    return groups


def _split_by_identity(
    groups: dict[str, list[ImageRecord]], nodes: int, rng: np.random.Generator, min_images: int
) -> list[list[ImageRecord]]:
    """Place identities largest first on the node with the fewest images so far.

    Identities with equal image counts are placed in a seeded random order. Ties between nodes
    go to the node with fewer identities, then to the lower node index.
    """
    identities = list(groups)
    if nodes > len(identities):
        raise PartitionError(
            f"cannot place {count_noun(len(identities), 'identity', 'identities')} on {nodes} "
            f"nodes with --partition "
            f"identity, which keeps each person on one node: use --nodes <= {len(identities)} "
            "or --partition iid"
        )
    tie_break = rng.permutation(len(identities))
    order = sorted(range(len(identities)),
                   key=lambda i: (-len(groups[identities[i]]), tie_break[i]))
    shards: list[list[ImageRecord]] = [[] for _ in range(nodes)]
    heap = [(0, 0, k) for k in range(nodes)]  # (images, identities, node index)
    for i in order:
        images, count, k = heapq.heappop(heap)
        shards[k].extend(groups[identities[i]])
        heapq.heappush(heap, (images + len(groups[identities[i]]), count + 1, k))
    for k, shard in enumerate(shards):
        if len(shard) < min_images:
            raise PartitionError(
                f"--partition identity leaves node-{k} with {count_noun(len(shard), 'image')}, "
                f"fewer than "
                f"min-images-per-node {min_images}, because whole identities cannot be split: "
                "lower --nodes or min-images-per-node, or use --partition iid"
            )
    return shards


def _split_iid(
    groups: dict[str, list[ImageRecord]], nodes: int, rng: np.random.Generator
) -> list[list[ImageRecord]]:
    """Shuffle all images and deal them in turn, so node sizes differ by at most one."""
    images = [record for group in groups.values() for record in group]
    shuffled = [images[i] for i in rng.permutation(len(images))]
    return [shuffled[k::nodes] for k in range(nodes)]


def _split_dirichlet(
    groups: dict[str, list[ImageRecord]], nodes: int, rng: np.random.Generator, alpha: float
) -> list[list[ImageRecord]]:
    """Split each identity's images across nodes by Dirichlet(alpha) proportions.

    The identity's shuffled images are laid on [0, 1) at midpoints (m + 0.5) / n, and each image
    goes to the node whose share of the cumulative proportions covers its point. Node counts are
    thus the proportions times n, rounded, and a one-image identity lands on one node with
    probability equal to that node's proportion.
    """
    shards: list[list[ImageRecord]] = [[] for _ in range(nodes)]
    concentration = np.full(nodes, float(alpha))
    for images in groups.values():
        proportions = rng.dirichlet(concentration)
        cumulative = np.cumsum(proportions)
        points = (np.arange(len(images)) + 0.5) / len(images)
        targets = np.minimum(np.searchsorted(cumulative, points, side="right"), nodes - 1)
        for position, k in zip(rng.permutation(len(images)), targets):
            shards[k].append(images[position])
    return shards


def _repair_small_nodes(shards: list[list[ImageRecord]], min_images: int) -> None:
    """Move images into nodes below ``min_images`` until none is, changing ``shards`` in place.

    Each move takes one image from the node with the most images (lowest index on ties),
    from its most frequent identity (alphabetically first on ties), to the first node below the
    minimum. The caller has checked that the dataset has at least nodes * min_images images, so
    the largest node always has more than the minimum while another node is below it.
    """
    moved = 0
    receivers = set()
    while True:
        small = [k for k, shard in enumerate(shards) if len(shard) < min_images]
        if not small:
            break
        donor = max(range(len(shards)), key=lambda k: (len(shards[k]), -k))
        counts = Counter(record.identity for record in shards[donor])
        identity = min(counts, key=lambda name: (-counts[name], name))
        index = max(i for i, record in enumerate(shards[donor]) if record.identity == identity)
        shards[small[0]].append(shards[donor].pop(index))
        receivers.add(small[0])
        moved += 1
    if moved:
        logger.warning("dirichlet partition: moved %s into %s that had fewer than %s; raise "
                       "alpha or lower --nodes for fewer moves", count_noun(moved, "image"),
                       count_noun(len(receivers), "node"), count_noun(min_images, "image"))
