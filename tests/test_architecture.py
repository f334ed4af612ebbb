"""Import boundaries of the code base, checked on the source and in fresh interpreters."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "edgeface"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def library_files() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_library_never_imports_kfp(path: Path) -> None:
    forbidden = {name for name in imported_modules(path)
                 if name.split(".")[0] in {"kfp", "components", "pipelines"}}
    assert not forbidden, f"{path} imports {forbidden}"


def test_aggregation_never_imports_data_loaders() -> None:
    names = imported_modules(LIBRARY / "aggregation.py")
    assert not {n for n in names if n.startswith("edgeface.data")}
    # Also at run time: importing aggregation must not pull the data package in.
    code = "import sys, edgeface.aggregation; print('edgeface.data' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "False"


def test_only_tracking_imports_mlflow() -> None:
    offenders = [str(p.relative_to(REPO)) for p in library_files()
                 if p.name != "tracking.py"
                 and any(n.split(".")[0] == "mlflow" for n in imported_modules(p))]
    assert offenders == []


def test_importing_every_library_module_loads_no_kfp() -> None:
    modules = [".".join(p.relative_to(REPO).with_suffix("").parts) for p in library_files()]
    modules = [m.removesuffix(".__init__") for m in modules]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kfp', 'pipelines', 'components')))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=REPO)
    assert output.stdout.strip() == "[]"


def test_runner_and_components_share_steps() -> None:
    tree = ast.parse((LIBRARY / "runner.py").read_text())
    imported_names = {(node.module, alias.name) for node in ast.walk(tree)
                      if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert ("edgeface", "steps") in imported_names
    component_files = sorted((REPO / "components").rglob("*.py"))
    assert component_files, "components/ has no modules"
    uses_steps = [p for p in component_files if "edgeface.steps" in p.read_text()
                  or "from edgeface import steps" in p.read_text()]
    assert uses_steps, "no component calls edgeface.steps"
