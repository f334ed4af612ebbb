"""Run configuration: YAML files and flags are validated at once, with every problem listed."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from edgeface.cli.main import main as edgeface_main
from edgeface.config import RunConfig, load_config
from edgeface.errors import ConfigError


def write_config(folder: Path, text: str) -> Path:
    path = folder / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def config_error(path: Path | None = None, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as raised:
        load_config(path, overrides)
    return str(raised.value)


def test_file_values_override_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        seed: 7
        partition:
          nodes: 3
        train:
          rounds: 2
          batch-size: 16
    """)
    config = load_config(path)
    assert config.seed == 7
    assert config.partition.nodes == 3
    assert config.train.rounds == 2
    assert config.train.batch_size == 16
    assert config.train.lr == RunConfig().train.lr  # untouched keys keep their defaults


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, "")) == load_config()


def test_every_problem_listed_at_once(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        seed: -3
        data:
          image-size: 8
          colour: rgb
        train:
          rounds: zero
        federation:
          min-fraction: 1.5
          round-timeout: -1
    """)
    message = config_error(path)
    assert str(path) in message.splitlines()[0]
    assert "6 problem(s)" in message
    expected_lines = [
        "seed: Input should be greater than or equal to 0 (got -3)",
        "data.image-size: Input should be greater than or equal to 16 (got 8)",
        "data.colour: unknown key (got 'rgb'); section 'data' accepts: protocol, fold,",
        "train.rounds: Input should be a valid integer",
        "federation.min-fraction: Input should be less than or equal to 1 (got 1.5)",
        "federation.round-timeout: Input should be greater than or equal to 0 (got -1)",
    ]
    for line in expected_lines:
        assert line in message, line


def test_snake_case_key_suggests_kebab_case(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "train:\n  local_epochs: 2\n"))
    assert "train.local_epochs: unknown key (got 2); did you mean 'local-epochs'?" in message


def test_key_in_wrong_section_named(tmp_path: Path) -> None:
    text = "rounds: 3\ndata:\n  nodes: 2\ntrain:\n  seed: 1\n"
    message = config_error(write_config(tmp_path, text))
    assert "rounds: unknown key (got 3); it belongs in section 'train' as 'rounds'" in message
    assert "data.nodes: unknown key (got 2); it belongs in section 'partition'" in message
    assert "train.seed: unknown key (got 1); it belongs at the top level as 'seed'" in message


def test_unknown_top_level_key_lists_sections(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "trainig:\n  rounds: 3\n"))
    assert "did you mean 'train'?" in message
    assert "the top level accepts: seed, data, partition, model, train" in message


def test_section_must_be_mapping(tmp_path: Path) -> None:
    message = config_error(write_config(tmp_path, "export: 5\n"))
    assert "export: Input should be a valid dictionary" in message
    assert "(got 5)" in message


@pytest.mark.parametrize("text, expected", [
    ("train: [unclosed\n", "is not valid YAML"),
    ("- a list\n- of items\n", "must contain a mapping, got list"),
])
def test_malformed_file_rejected(tmp_path: Path, text: str, expected: str) -> None:
    path = write_config(tmp_path, text)
    message = config_error(path)
    assert str(path) in message
    assert expected in message


def test_missing_file_names_path(tmp_path: Path) -> None:
    message = config_error(tmp_path / "nope.yaml")
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in message
    assert "--config" in message


def test_flags_and_file_checked_together(tmp_path: Path) -> None:
    path = write_config(tmp_path, "train:\n  lr: -1\n")
    message = config_error(path, {"nodes": "0", "partition": "bogus"})
    assert f"({path} + command-line flags)" in message
    for key in ("train.lr", "partition.nodes", "partition.strategy"):
        assert f"{key}:" in message, key


def test_unknown_override_named() -> None:
    message = config_error(None, {"node-count": 3})
    assert "unknown option 'node-count'" in message
    assert "nodes" in message


def test_min_nodes_above_nodes_rejected() -> None:
    message = config_error(None, {"nodes": 2, "min-nodes": 3})
    assert "min-nodes 3 is larger than nodes 2" in message
    assert "--min-nodes" in message


def test_torchscript_exporter_with_newer_opset_rejected() -> None:
    message = config_error(None, {"exporter": "torchscript", "opset": 21})
    assert "opset 21 is newer than the torchscript exporter can write" in message
    assert "--exporter dynamo" in message
    assert load_config(None, {"exporter": "torchscript", "opset": 20}).export.opset == 20


def test_invalid_crop_explained() -> None:
    message = config_error(None, {"crop": ["0.8", "0.2", "0.3", "0.9"]})
    assert "data.crop" in message
    assert "0 <= left < right <= 1" in message


@pytest.mark.parametrize("crop", [
    ["1", "2"],
    ["[0.1", "0.2", "0.9", "0.8]"],
    "0.5",
    ["0.1", "0.2", "0.9", "0.8", "1.0"],
    ["a", "b", "c", "d"],
])
def test_crop_flag_needs_four_numbers(crop: list[str] | str) -> None:
    message = config_error(None, {"crop": crop})

    assert "1 problem(s)" in message
    assert "data.crop: Value error, invalid crop: expected 4 numbers" in message
    assert "left,top,right,bottom" in message
    assert f"(got {crop!r})" in message
    assert "data.crop.0" not in message
    assert "Field required" not in message


@pytest.mark.parametrize(
    "crop", ["[0.1, 0.2]", "[0.1, 0.2, 0.9, 0.8, 1.0]", "0.5", "[yes, no, 0.9, 0.8]"]
)
def test_crop_in_yaml_needs_four_numbers(tmp_path: Path, crop: str) -> None:
    message = config_error(write_config(tmp_path, f"data:\n  crop: {crop}\n"))

    assert "1 problem(s)" in message
    assert "data.crop: Value error, invalid crop: expected 4 numbers" in message
    assert "data.crop.2" not in message


def test_crop_accepts_list_and_string(tmp_path: Path) -> None:
    from_flag = load_config(None, {"crop": ["0.1", "0.2", "0.9", "0.8"]}).data.crop
    yaml_list = write_config(tmp_path, "data:\n  crop: [0.1, 0.2, 0.9, 0.8]\n")
    from_yaml = load_config(yaml_list).data.crop
    yaml_string = write_config(tmp_path, "data:\n  crop: 0.1,0.2,0.9,0.8\n")
    from_string = load_config(yaml_string).data.crop

    assert from_flag == (0.1, 0.2, 0.9, 0.8)
    assert from_yaml == (0.1, 0.2, 0.9, 0.8)
    assert from_string == (0.1, 0.2, 0.9, 0.8)


@pytest.mark.parametrize("overrides, expected", [
    ({"server-lr": "0.5"}, "server-lr 0.5 has no effect with aggregation fedavg"),
    ({"server-momentum": "0.5"}, "server-momentum 0.5 has no effect with aggregation fedavg"),
    ({"aggregation": "fedadam", "server-momentum": "0.5"},
     "server-momentum 0.5 has no effect with aggregation fedadam"),
])
def test_server_option_without_effect_rejected(overrides: dict, expected: str) -> None:
    message = config_error(None, overrides)

    assert f"federation: Value error, {expected}" in message
    assert "--aggregation fedavgm" in message
    assert "(got {" not in message


def test_server_option_in_yaml_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        federation:
          strategy: fedavg
          server-lr: 1.0
    """)

    message = config_error(path)

    assert "server-lr 1 has no effect with aggregation fedavg" in message
    assert "remove server-lr" in message


def test_server_options_accepted_where_used() -> None:
    fedavgm = load_config(None, {"aggregation": "fedavgm", "server-lr": "0.5",
                                 "server-momentum": "0.5"}).federation
    fedadam = load_config(None, {"aggregation": "fedadam", "server-lr": "0.02"}).federation

    assert (fedavgm.server_lr, fedavgm.server_momentum) == (0.5, 0.5)
    assert fedadam.server_lr == 0.02


def test_saved_fedavg_config_reloads(tmp_path: Path) -> None:
    """A run's config.yaml lists server-momentum 0.9 and server-lr null even for fedavg."""
    config = load_config()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    saved = yaml.safe_load(path.read_text())["federation"]
    assert saved["server-momentum"] == 0.9
    assert saved["server-lr"] is None
    assert load_config(path) == config


def test_written_config_reloads_with_same_hash(tmp_path: Path) -> None:
    # `edgeface run --resume` reloads config.yaml from the run directory and compares hashes.
    config = load_config(overrides={"nodes": 3, "crop": ["0.2", "0.2", "0.8", "0.8"],
                                    "aggregation": "fedavgm", "server-lr": "0.5"})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    reloaded = load_config(path)
    assert reloaded == config
    assert reloaded.config_hash() == config.config_hash()
    assert load_config(overrides={"nodes": 4}).config_hash() != config.config_hash()


def test_cli_bad_config_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path, "train:\n  rounds: 0\n  bogus: 1\n")
    code = edgeface_main(["run", "--data", str(tmp_path), "--config", str(path), "--out", "run",
                          "--lr", "-1"])
    assert code == 2
    for key in ("train.rounds", "train.bogus", "train.lr"):
        assert key in caplog.text, key
    assert not (tmp_path / "run").exists()


def test_config_hash_ignores_exporter() -> None:
    """Runs checkpointed before the exporter key existed must keep their hash to resume."""
    import hashlib
    import json

    dynamo = load_config()
    torchscript = load_config(overrides={"exporter": "torchscript"})
    assert torchscript.config_hash() == dynamo.config_hash()

    settings = dynamo.to_dict()
    del settings["export"]["exporter"], settings["train"]["worker-processes"]
    before_the_key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    assert dynamo.config_hash() == before_the_key[:16]


def test_config_hash_ignores_worker_processes() -> None:
    pooled = load_config()
    own = load_config(overrides={"worker-processes": 4})
    assert own.train.worker_processes == 4
    assert own.config_hash() == pooled.config_hash()
