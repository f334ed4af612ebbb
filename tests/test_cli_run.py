"""`edgeface run` command line: the help of its config flags and its dataset errors."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest

from edgeface.cli.main import build_parser, main
from edgeface.cli.run import collect_overrides
from edgeface.config import leaf_keys, load_config

DEFAULT_IN_HELP = re.compile(r"\(default (\S+)\)$")


def run_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    [commands] = [action for action in parser._actions
                  if isinstance(action, argparse._SubParsersAction)]
    return commands.choices["run"]


def config_actions() -> dict[str, argparse.Action]:
    """Map each config flag name to its argparse action."""
    return {action.dest.split(":", 1)[1]: action for action in run_parser()._actions
            if action.dest.startswith("override:")}


def test_help_has_every_config_flag() -> None:
    assert set(config_actions()) == set(leaf_keys())


def test_help_defaults_are_effective_defaults() -> None:
    """Passing each default shown in the help as its flag gives the built-in config again."""
    effective = load_config()
    shown_defaults = {}
    for flag, action in config_actions().items():
        match = DEFAULT_IN_HELP.search(" ".join(action.help.split()))
        if match:
            shown_defaults[flag] = match.group(1)

    assert shown_defaults["eval-every"] == str(effective.evaluation.eval_every) == "2"
    assert shown_defaults["seed"] == "0"
    # Keys without a value describe their fallback instead of showing "None".
    assert {"cache-dir", "server-lr", "tracking-uri"}.isdisjoint(shown_defaults)
    assert len(shown_defaults) == len(leaf_keys()) - 3
    for flag, text in shown_defaults.items():
        namespace = argparse.Namespace(**{f"override:{flag}": text})
        assert load_config(None, collect_overrides(namespace)) == effective, flag


@pytest.mark.parametrize("flag, choices", [
    ("aggregation", ["fedavg", "fedavgm", "fedadam"]),
    ("partition", ["identity", "iid", "dirichlet"]),
    ("loss", ["arcface", "cosface"]),
    ("protocol", ["auto", "lfw-view1", "lfw-view2", "holdout"]),
])
def test_enum_flags_list_choices(flag: str, choices: list[str],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    listed = "{" + ",".join(choices) + "}"
    assert config_actions()[flag].metavar == listed

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert f"--{flag} {listed}" in capsys.readouterr().out


@pytest.mark.parametrize("source", ["--data", "EDGEFACE_DATA"])
def test_missing_dataset_one_message(source: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "nosuchdata"
    monkeypatch.setenv("EDGEFACE_DATA", str(missing))
    argv = ["run", "--out", str(tmp_path / "run")]
    if source == "--data":
        argv += ["--data", str(missing)]

    with caplog.at_level(logging.ERROR):
        code = main(argv)

    assert code == 2
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    message = record.getMessage()
    assert message.startswith(f"dataset folder {missing} (from {source}) not found: ")
    assert "pass --data with a folder of <identity>/<image> subfolders" in message
    assert "no dataset given" not in message
    assert not (tmp_path / "run").exists()


def test_dataset_file_not_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    archive = tmp_path / "lfw.tgz"
    archive.write_bytes(b"not a folder")

    code = main(["run", "--data", str(archive), "--out", str(tmp_path / "run")])

    assert code == 2
    assert f"dataset folder {archive} (from --data) is not a folder" in caplog.text


def test_no_dataset_explains_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("EDGEFACE_DATA", raising=False)

    code = main(["run", "--out", str(tmp_path / "run")])

    assert code == 2
    assert "no dataset given: pass --data DATASET_DIR or set EDGEFACE_DATA" in caplog.text


def resumable_run(tmp_path: Path) -> Path:
    """Return a run folder with the files `--resume` reads first: config.yaml, state.json."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train:\n  rounds: 2\n")
    (run_dir / "state.json").write_text('{"status": "interrupted", "rounds_completed": 1}')
    return run_dir


def test_resume_missing_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "nope"

    assert main(["run", "--resume", str(missing)]) == 2

    assert f"cannot resume {missing}: folder not found" in caplog.text
    assert "config.yaml" not in caplog.text


def test_resume_rejects_other_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = resumable_run(tmp_path)
    other = tmp_path / "other"

    assert main(["run", "--resume", str(run_dir), "--out", str(other)]) == 2

    assert f"--out {other} does not apply" in caplog.text
    assert not other.exists()


def test_resume_names_config_flags(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = resumable_run(tmp_path)

    assert main(["run", "--resume", str(run_dir), "--rounds", "3", "--lr", "0.2"]) == 2

    assert "but got " in caplog.text
    assert "--rounds" in caplog.text
    assert "--lr" in caplog.text
    assert "rounds: 2" in (run_dir / "config.yaml").read_text()
