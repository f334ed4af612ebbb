"""Fleet file loading and validation (edgeface/fleet.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeface.errors import ConfigError
from edgeface.fleet import (
    EdgeNode,
    Fleet,
    load_fleet,
    parse_cpu_millicores,
    parse_memory_bytes,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "pipelines" / "fleet.example.yaml"

NODE = """\
  - name: {name}
    label: {label}
    host-data-path: {path}
    data-path: /data/edge
    cpu: "1"
    memory: 2Gi
"""


def write_fleet(folder: Path, body: str) -> Path:
    path = folder / "fleet.yaml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def minimal_fleet(folder: Path, image: str = "edgeface:0.1.0", nodes: int = 2) -> Path:
    node_text = "".join(
        NODE.format(name=f"edge-{i}", label=f"edge-{i}", path=f"data/edge-{i}")
        for i in range(nodes)
    )
    return write_fleet(folder, f"name: test-fleet\nimage: {image}\nnodes:\n{node_text}")


def test_example_fleet_loads() -> None:
    fleet = load_fleet(EXAMPLE)

    assert fleet.name == "edgeface-demo"
    assert len(fleet.nodes) == 4
    assert [node.name for node in fleet.nodes] == ["edge-0", "edge-1", "edge-2", "edge-3"]
    assert fleet.edge_taint is not None
    assert fleet.edge_taint.k3s_arg() == "edgeface.io/edge=true:NoSchedule"
    assert fleet.mlflow.secret == "edgeface-mlflow"
    assert fleet.mlflow.config_map == "edgeface-mlflow"
    for node in fleet.nodes:
        assert node.host_data_path.is_absolute()
        assert node.host_data_path.parent == REPO_ROOT / "fleet-data"
        assert node.cpu_millicores == 1000
        assert node.memory_bytes == 2 * 2**30


def test_node_lookup_by_name() -> None:
    fleet = load_fleet(EXAMPLE)

    assert fleet.node("edge-2").label == "edge-2"
    with pytest.raises(ConfigError) as error:
        fleet.node("edge-9")
    assert "'edge-9'" in str(error.value)
    assert "edge-0, edge-1, edge-2, edge-3" in str(error.value)


def test_relative_host_path_follows_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    path = minimal_fleet(folder)
    monkeypatch.chdir(tmp_path)

    fleet = load_fleet(Path("conf") / "fleet.yaml")

    assert fleet.nodes[0].host_data_path == (folder / "data" / "edge-0").resolve()


def test_absolute_host_path_kept(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    path = write_fleet(tmp_path, f"""\
        name: test-fleet
        image: edgeface:0.1.0
        nodes:
          - {{name: edge-0, label: edge-0, host-data-path: {target}, data-path: /data,
              cpu: 1, memory: 1Gi}}
        """)

    assert load_fleet(path).nodes[0].host_data_path == target


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = write_fleet(tmp_path, """\
        name: Edge_Demo
        image: edgeface:latest
        node-label-key: "bad key/"
        edge-taint: {key: edgeface.io/edge, value: "true", effect: Sometimes}
        colour: blue
        nodes:
          - name: edge-0
            label: edge-0
            host-data-path: ./a
            data-path: data/edge
            cpu: 0
            memory: 2gb
          - name: edge-0
            label: edge-1
            host-data-path: a
            data-path: /data/edge
            cpu: 1.5
            memory: 2Gi
            gpu: 1
        """)

    with pytest.raises(ConfigError) as error:
        load_fleet(path)
    message = str(error.value)

    assert str(path) in message
    assert "11 problem(s)" in message
    expected_lines = [
        "  - name: expected a DNS-1123 label",
        "  - image: expected a tag other than latest",
        "  - node-label-key: expected a Kubernetes label key",
        "  - edge-taint.effect: Input should be 'NoSchedule', 'PreferNoSchedule' or 'NoExecute'",
        "  - colour: unknown key; known keys here are name, namespace, image,",
        "  - nodes[0].data-path: expected an absolute POSIX path",
        "  - nodes[0].cpu: expected at least 1m CPU",
        "  - nodes[0].memory: expected a memory quantity such as 2Gi",
        "  - nodes[1].gpu: unknown key; known keys here are name, label, host-data-path,",
        "  - nodes[1].name: expected a value unique across nodes, but nodes[0] has it too",
        "  - nodes[1].host-data-path: expected a value unique across nodes",
    ]
    for line in expected_lines:
        assert line in message
    assert "(got 'Edge_Demo')" in message
    assert "(got '2gb')" in message


def test_duplicate_labels_rejected(tmp_path: Path) -> None:
    body = "name: test-fleet\nimage: edgeface:0.1.0\nnodes:\n" + "".join(
        NODE.format(name=f"edge-{i}", label="same", path=f"d{i}") for i in range(2)
    )
    path = write_fleet(tmp_path, body)

    with pytest.raises(ConfigError, match=r"nodes\[1\]\.label: expected a value unique"):
        load_fleet(path)


def test_empty_node_list_rejected(tmp_path: Path) -> None:
    path = write_fleet(tmp_path, "name: test-fleet\nimage: edgeface:0.1.0\nnodes: []\n")

    with pytest.raises(ConfigError, match=r"nodes: List should have at least 1 item"):
        load_fleet(path)


@pytest.mark.parametrize("image, accepted", [
    ("edgeface:0.1.0", True),
    ("localhost:5000/edgeface:1", True),
    ("ghcr.io/example/edgeface:2024-01", True),
    ("edgeface", False),
    ("localhost:5000/edgeface", False),
    ("edgeface:latest", False),
    ("edge face:1", False),
])
def test_image_needs_explicit_tag(tmp_path: Path, image: str, accepted: bool) -> None:
    path = minimal_fleet(tmp_path, image=f"'{image}'")

    if accepted:
        assert load_fleet(path).image == image
    else:
        with pytest.raises(ConfigError, match=r"  - image: expected"):
            load_fleet(path)


def test_cluster_name_length_limit(tmp_path: Path) -> None:
    body = minimal_fleet(tmp_path).read_text().replace("test-fleet", "a" * 51)
    path = write_fleet(tmp_path, body)

    with pytest.raises(ConfigError, match="at most 50 lowercase"):
        load_fleet(path)


def test_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fleet file not found: .*nope.yaml"):
        load_fleet(tmp_path / "nope.yaml")


def test_invalid_yaml_reported(tmp_path: Path) -> None:
    path = write_fleet(tmp_path, "name: [unclosed\n")

    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_fleet(path)


def test_non_mapping_reported(tmp_path: Path) -> None:
    path = write_fleet(tmp_path, "- just\n- a list\n")

    with pytest.raises(ConfigError, match="must contain a mapping, got list"):
        load_fleet(path)


@pytest.mark.parametrize("text, millicores", [
    ("1", 1000), ("500m", 500), ("1.5", 1500), ("0.25", 250), ("2000m", 2000), (".5", 500),
])
def test_cpu_quantities_parsed(text: str, millicores: int) -> None:
    assert parse_cpu_millicores(text) == millicores


@pytest.mark.parametrize("text", ["0", "0m", "1.0005", "-1", "1Gi", "abc", "", "1.5m"])
def test_cpu_quantities_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_millicores(text)


@pytest.mark.parametrize("text, size", [
    ("2Gi", 2 * 2**30), ("512Mi", 512 * 2**20), ("1G", 10**9), ("1e9", 10**9),
    ("1.5Gi", 3 * 2**29), ("2147483648", 2**31), ("1500M", 1.5 * 10**9),
])
def test_memory_quantities_parsed(text: str, size: int) -> None:
    assert parse_memory_bytes(text) == size


@pytest.mark.parametrize("text", ["2gb", "2gi", "512m", "100", "1Ki", "Gi", "-1Gi", ""])
def test_memory_quantities_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_memory_bytes(text)


def test_yaml_numbers_become_quantities() -> None:
    node = EdgeNode.model_validate({
        "name": "edge-0", "label": "edge-0", "host-data-path": "/d", "data-path": "/data",
        "cpu": 2, "memory": 2147483648,
    })

    assert node.cpu == "2"
    assert node.cpu_millicores == 2000
    assert node.memory_bytes == 2**31


def test_snake_case_field_names_in_python() -> None:
    fleet = Fleet(name="f", image="edgeface:1", nodes=[EdgeNode(
        name="edge-0", label="edge-0", host_data_path=Path("/d"), data_path="/data",
        cpu="1", memory="1Gi",
    )])

    dumped = fleet.model_dump(by_alias=True)
    assert "node-label-key" in dumped
    assert "host-data-path" in dumped["nodes"][0]


def test_fleet_module_does_not_import_kfp() -> None:
    code = "import sys, edgeface.fleet; sys.exit(1 if 'kfp' in sys.modules else 0)"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    result = subprocess.run([sys.executable, "-c", code], env=env, timeout=60)

    assert result.returncode == 0
