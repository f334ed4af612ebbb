"""Partitions of real LFW and ORL image lists across edge nodes, reports and manifests."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgeface.data.ingest import ImageRecord, list_images, resolve_images_root
from edgeface.data.partition import (
    STRATEGIES,
    NodeShard,
    Partition,
    partition,
    read_manifest,
)
from edgeface.errors import ConfigError, DataError, PartitionError


@pytest.fixture(scope="module")
def lfw_records(lfw_dir: Path) -> list[ImageRecord]:
    return list_images(resolve_images_root(lfw_dir))


@pytest.fixture(scope="module")
def orl_records(orl_dir: Path) -> list[ImageRecord]:
    return list_images(resolve_images_root(orl_dir))


@pytest.fixture(scope="module", params=["lfw", "orl"])
def dataset(request: pytest.FixtureRequest) -> list[ImageRecord]:
    return request.getfixturevalue(f"{request.param}_records")


def synthetic(counts: dict[str, int]) -> list[ImageRecord]:
    """Records of identities with the given image counts; the files need not exist."""
    return [ImageRecord(name, f"{name}/{name}_{i:04d}.jpg")
            for name, count in counts.items() for i in range(1, count + 1)]


def node_homes(result: Partition) -> dict[str, set[str]]:
    homes: dict[str, set[str]] = {}
    for shard in result.nodes:
        for record in shard.records:
            homes.setdefault(record.identity, set()).add(shard.name)
    return homes


def max_node_share(result: Partition, min_images: int) -> float:
    """Mean over identities with >= min_images images of the largest share on one node."""
    per_identity: dict[str, Counter[str]] = {}
    for shard in result.nodes:
        for record in shard.records:
            per_identity.setdefault(record.identity, Counter())[shard.name] += 1
    shares = [max(c.values()) / sum(c.values()) for c in per_identity.values()
              if sum(c.values()) >= min_images]
    return float(np.mean(shares))


# --- every strategy ---------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_record_assigned_once(dataset: list[ImageRecord], strategy: str) -> None:
    result = partition(dataset, 4, strategy, seed=0)
    assigned = [record for shard in result.nodes for record in shard.records]
    assert len(assigned) == len(dataset)
    assert Counter(assigned) == Counter(dataset)
    assert [shard.name for shard in result.nodes] == ["node-0", "node-1", "node-2", "node-3"]
    assert all(shard.records for shard in result.nodes)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_same_seed_ignores_input_order(dataset: list[ImageRecord], strategy: str) -> None:
    shuffled = list(dataset)
    random.Random(11).shuffle(shuffled)
    first = partition(dataset, 3, strategy, seed=5)
    again = partition(shuffled, 3, strategy, seed=5)
    assert first == again


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seed_changes_partition(lfw_records: list[ImageRecord], strategy: str) -> None:
    first = partition(lfw_records, 3, strategy, seed=0)
    other = partition(lfw_records, 3, strategy, seed=1)
    assert first.nodes != other.nodes


# --- identity ---------------------------------------------------------------------------------


def test_identity_keeps_person_on_one_node(dataset: list[ImageRecord]) -> None:
    result = partition(dataset, 5, "identity", seed=0)
    assert all(len(homes) == 1 for homes in node_homes(result).values())
    assert result.report()["totals"]["identities_on_several_nodes"] == 0


def test_identity_balances_images(lfw_records: list[ImageRecord]) -> None:
    result = partition(lfw_records, 5, "identity", seed=0)
    sizes = [len(shard.records) for shard in result.nodes]
    # Greedy largest-first places LFW's thousands of one-image identities last, and they even
    # out the nodes that George_W_Bush (530 images) and the other large identities unbalance.
    assert max(sizes) - min(sizes) <= 1


def test_identity_more_nodes_than_people(orl_records: list[ImageRecord]) -> None:
    with pytest.raises(PartitionError) as raised:
        partition(orl_records, 41, "identity", seed=0)
    message = str(raised.value)
    assert "40 identities on 41 nodes" in message
    assert "--nodes <= 40" in message
    assert "--partition iid" in message


def test_identity_node_below_minimum() -> None:
    records = synthetic({"A": 100, "B": 1})
    with pytest.raises(PartitionError, match="node-1 with 1 image, fewer than "
                                             "min-images-per-node 5"):
        partition(records, 2, "identity", seed=0, min_images_per_node=5)


def test_single_image_identities() -> None:
    records = synthetic({f"P{i:02d}": 1 for i in range(12)})
    for strategy in ("identity", "iid"):
        result = partition(records, 4, strategy, seed=2)
        assert [len(shard.records) for shard in result.nodes] == [3, 3, 3, 3]
    result = partition(records, 4, "dirichlet", seed=2)
    assert sum(len(shard.records) for shard in result.nodes) == 12
    assert min(len(shard.records) for shard in result.nodes) >= 1


# --- iid --------------------------------------------------------------------------------------


def test_iid_sizes_even(dataset: list[ImageRecord]) -> None:
    result = partition(dataset, 7, "iid", seed=0)
    sizes = [len(shard.records) for shard in result.nodes]
    assert max(sizes) - min(sizes) <= 1


def test_iid_mixes_identities(lfw_records: list[ImageRecord]) -> None:
    result = partition(lfw_records, 4, "iid", seed=0)
    bush = Counter(shard.name for shard in result.nodes for record in shard.records
                   if record.identity == "George_W_Bush")
    # 530 images dealt at random: each node gets close to a quarter.
    assert len(bush) == 4
    assert all(90 <= count <= 175 for count in bush.values())


# --- dirichlet --------------------------------------------------------------------------------


def test_dirichlet_skew_grows_as_alpha_shrinks(lfw_records: list[ImageRecord]) -> None:
    shares = {alpha: max_node_share(partition(lfw_records, 5, "dirichlet", seed=0, alpha=alpha),
                                    min_images=10)
              for alpha in (100.0, 1.0, 0.1)}
    # Five nodes: a share of 0.2 is perfectly even, 1.0 puts each identity on one node.
    assert shares[100.0] < 0.35
    assert shares[100.0] < shares[1.0] < shares[0.1]
    assert shares[0.1] > 0.8


def test_dirichlet_repairs_small_nodes(orl_records: list[ImageRecord]) -> None:
    unrepaired = partition(orl_records, 20, "dirichlet", seed=0, alpha=0.01,
                           min_images_per_node=0)
    assert min(len(shard.records) for shard in unrepaired.nodes) < 5

    repaired = partition(orl_records, 20, "dirichlet", seed=0, alpha=0.01, min_images_per_node=5)
    assert min(len(shard.records) for shard in repaired.nodes) >= 5
    assigned = [record for shard in repaired.nodes for record in shard.records]
    assert Counter(assigned) == Counter(orl_records)
    assert repaired == partition(orl_records, 20, "dirichlet", seed=0, alpha=0.01,
                                 min_images_per_node=5)


# --- invalid requests -------------------------------------------------------------------------


@pytest.mark.parametrize("nodes", [0, -2])
def test_nodes_below_one(orl_records: list[ImageRecord], nodes: int) -> None:
    with pytest.raises(PartitionError, match=f"invalid --nodes {nodes}"):
        partition(orl_records, nodes, "iid", seed=0)


def test_too_few_images_for_nodes() -> None:
    with pytest.raises(PartitionError, match="3 images cannot give each of 5 nodes"):
        partition(synthetic({"A": 3}), 5, "iid", seed=0)


def test_unknown_strategy(orl_records: list[ImageRecord]) -> None:
    with pytest.raises(ConfigError, match="'random'.*identity, iid, dirichlet"):
        partition(orl_records, 2, "random", seed=0)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_alpha_invalid(orl_records: list[ImageRecord], alpha: float) -> None:
    with pytest.raises(ConfigError, match=f"invalid dirichlet alpha {alpha}"):
        partition(orl_records, 2, "dirichlet", seed=0, alpha=alpha)


def test_duplicate_records(orl_records: list[ImageRecord]) -> None:
    with pytest.raises(DataError, match="listed more than once.*'s1/1.pgm'"):
        partition(orl_records + orl_records[:1], 2, "iid", seed=0)


# --- reports and manifests --------------------------------------------------------------------


def test_report_histogram_by_hand() -> None:
    records = synthetic({"A": 1, "B": 2, "C": 4, "D": 7, "E": 15, "F": 25})
    report = partition(records, 1, "iid", seed=0).report()
    expected = {"1": 1, "2": 1, "3-5": 1, "6-10": 1, "11-20": 1, ">20": 1}
    assert report["nodes"][0]["images_per_identity"] == expected
    assert report["totals"]["images_per_identity"] == expected
    assert report["totals"]["images"] == 54
    assert report["nodes"][0]["identities"] == 6


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_report_sums(lfw_records: list[ImageRecord], strategy: str) -> None:
    result = partition(lfw_records, 4, strategy, seed=0)
    report = result.report()
    totals = report["totals"]
    assert report["strategy"] == strategy
    assert totals["nodes"] == 4
    assert totals["images"] == len(lfw_records) == sum(n["images"] for n in report["nodes"])
    assert totals["identities"] == 5749 == sum(totals["images_per_identity"].values())
    for node in report["nodes"]:
        assert sum(node["images_per_identity"].values()) == node["identities"]
    identities_per_node = sum(node["identities"] for node in report["nodes"])
    if strategy == "identity":
        assert identities_per_node == totals["identities"]
    else:
        assert identities_per_node == totals["identities"] + sum(
            len(homes) - 1 for homes in node_homes(result).values())


def test_write_report_json(tmp_path: Path, orl_records: list[ImageRecord]) -> None:
    result = partition(orl_records, 3, "dirichlet", seed=4, alpha=0.3)
    path = result.write_report(tmp_path / "reports" / "partition.json")
    loaded = json.loads(path.read_text())
    assert loaded == result.report()
    assert loaded["alpha"] == 0.3
    assert loaded["seed"] == 4


def test_manifests_round_trip(tmp_path: Path, orl_records: list[ImageRecord]) -> None:
    result = partition(orl_records, 3, "identity", seed=0)
    paths = result.write_manifests(tmp_path / "manifests")
    assert [path.name for path in paths] == ["node-0.json", "node-1.json", "node-2.json"]
    assert [read_manifest(path) for path in paths] == result.nodes
    manifest = json.loads(paths[0].read_text())
    assert set(manifest) == {"node", "records"}
    assert all(set(entry) == {"identity", "path"} for entry in manifest["records"])


@pytest.mark.parametrize("bad_path", ["/etc/passwd", "../outside/1.pgm", "s1/../../x.pgm", ""])
def test_manifest_rejects_escaping_paths(tmp_path: Path, bad_path: str) -> None:
    path = tmp_path / "node-0.json"
    path.write_text(json.dumps({"node": "node-0",
                                "records": [{"identity": "s1", "path": bad_path}]}))
    with pytest.raises(DataError, match="relative to the images root"):
        read_manifest(path)


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", "cannot read node manifest"),
    ('{"node": "node-0"}', "a list 'records'"),
    ('{"node": "node-0", "records": [{"path": "s1/1.pgm"}]}', "invalid record 0"),
])
def test_manifest_malformed(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "node-0.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_manifest(path)


def test_manifest_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="node manifest not found"):
        read_manifest(tmp_path / "node-9.json")


def test_manifest_synthetic_round_trip(tmp_path: Path) -> None:
    shard = NodeShard("node-0", synthetic({"A": 2}))
    path = Partition("iid", 0, [shard]).write_manifests(tmp_path)[0]
    assert read_manifest(path) == shard
