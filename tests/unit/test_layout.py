"""
The provider's layers: imports point one way, and the transport knows nothing of Airflow.

Operators and sensors sit on triggers, which sit on models and hooks, which sit on the transport
and storage. A module that imports upwards (a hook importing a trigger, a sensor importing an
operator) ties two concerns together; these tests name the import that does.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "airflow_provider_hpc"

# Each layer and the provider's packages it must not import (what sits above it).
FORBIDDEN = {
    "transport": ("hooks", "models", "storage", "storage_sink", "lineage", "triggers", "operators", "sensors", "links", "muse_results", "durable", "plugins"),
    "storage": ("hooks", "models", "triggers", "operators", "sensors", "links", "muse_results", "durable", "plugins"),
    "storage_sink": ("storage", "hooks", "models", "triggers", "operators", "sensors", "links", "muse_results", "durable", "lineage", "plugins"),
    "lineage": ("storage", "storage_sink", "hooks", "models", "triggers", "operators", "sensors", "links", "muse_results", "durable", "plugins"),
    "models": ("hooks", "triggers", "operators", "sensors", "links", "muse_results", "durable", "plugins"),
    "hooks": ("triggers", "operators", "sensors", "links", "muse_results", "durable", "plugins"),
    "triggers": ("operators", "sensors", "links", "muse_results", "durable", "plugins"),
    "muse_results": ("triggers", "operators", "sensors", "plugins"),
    "durable": ("hooks", "triggers", "operators", "sensors", "links", "muse_results", "plugins"),
    "operators": ("sensors", "plugins"),
    "sensors": ("operators", "plugins"),
}


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Return ``(line, dotted name)`` of every module (and ``from`` name) ``path`` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def _provider_imports(path: Path) -> list[tuple[int, str]]:
    """Return ``(line, layer)`` of every import of the provider's own modules in ``path``."""
    return [
        (line, parts[1]) for line, name in _imports(path)
        if (parts := name.split("."))[0] == "airflow_provider_hpc" and len(parts) > 1
    ]


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path: Path) -> None:
    forbidden = FORBIDDEN.get(_layer(path), ())
    upward = [f"line {line}: airflow_provider_hpc.{layer}" for line, layer in _provider_imports(path) if layer in forbidden]
    assert not upward, f"{path.relative_to(PACKAGE)} imports a layer above it: {upward}"


def test_no_transport_module_imports_airflow() -> None:
    for path in sorted((PACKAGE / "transport").glob("*.py")):
        airflow = [line for line, name in _imports(path) if name.split(".")[0] == "airflow"]
        assert not airflow, f"transport/{path.name} imports Airflow at lines {airflow}"


def test_the_transport_runs_without_airflow_loaded() -> None:
    # A fresh interpreter: importing every transport module must not pull Airflow in, even indirectly.
    code = (
        "import sys\n"
        "import airflow_provider_hpc.transport.aio, airflow_provider_hpc.transport.sync, airflow_provider_hpc.transport.paging\n"
        "loaded = sorted(m for m in sys.modules if m == 'airflow' or m.startswith('airflow.'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=PACKAGE.parent)
    assert done.returncode == 0, f"Airflow modules loaded by the transport: {done.stdout or done.stderr}"


def test_the_provider_never_imports_the_emulator() -> None:
    for path in _modules():
        for line, layer in _provider_imports(path):
            assert layer != "emulator", f"{path.relative_to(PACKAGE)}:{line} imports the emulator"
        assert "hpc_emulator" not in path.read_text(), f"{path.relative_to(PACKAGE)} names the emulator's package"


def test_no_provider_module_is_much_over_500_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 550}
    assert not long, f"modules over about 500 lines: {long}"
