"""The `edgeface` commands in the README and docs/ parse with the real command-line parser.

Every line of a fenced code block that starts with `edgeface ` is parsed by `build_parser()`,
so an example with a removed flag, a misspelled option or two options that exclude each other
fails here. Square brackets mark optional parts in synopses and are parsed as if present.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from edgeface.cli.main import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
FENCED_BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
# Shell command substitutions such as "$(nproc)" stand for a number in these examples.
COMMAND_SUBSTITUTION = re.compile(r'"\$\([^)]*\)"')


def example_commands(document: Path) -> list[str]:
    """Return the `edgeface` command lines of the fenced blocks in `document`."""
    commands = []
    for block in FENCED_BLOCK.findall(document.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("edgeface "):
                commands.append(line)
    return commands


def to_argv(command: str) -> list[str]:
    """Split a documented command line into the arguments after `edgeface`."""
    command = COMMAND_SUBSTITUTION.sub("2", command)
    tokens = shlex.split(command, comments=True)
    return [token.strip("[]") for token in tokens[1:] if token.strip("[]") and token != "&"]


EXAMPLES = [
    pytest.param(command, id=f"{document.name}:{command[:60]}")
    for document in DOCUMENTS
    for command in example_commands(document)
]


def test_docs_contain_examples() -> None:
    readme = [param.values[0] for param in EXAMPLES if param.id.startswith("README.md:")]
    assert any(command.startswith("edgeface pipeline submit") for command in readme)
    assert len(EXAMPLES) > 20


@pytest.mark.parametrize("command", EXAMPLES)
def test_documented_command_parses(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = to_argv(command)
    if "--help" in argv or "--version" in argv:
        pytest.skip("prints and exits by design")
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`{command}` does not parse: {capsys.readouterr().err.strip()}")
