"""
The provider and the emulator are two distributions: the provider's wheel holds no emulator module
(nor dev/, tests/, benchmarks/ or scripts/), and the emulator's wheel holds its command line and
its built-in software.

Both wheels are built the way a user builds them (``pip wheel --no-deps``, isolated build) from a
copy of what a clone of the repository holds, so the working tree gets no ``build/`` folder.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
EMULATOR_PACKAGE = REPO / "emulator" / "hpc_emulator"
BUILD_TIMEOUT = 300


def _clone_files() -> list[str]:
    """The files a clone holds: tracked ones and new ones git does not ignore, as they are now."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True, timeout=60,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build both wheels once; return each one's path, by distribution (the wheel's name prefix)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to know what a clone holds")
    work = tmp_path_factory.mktemp("wheels")
    source, dist = work / "source", work / "dist"
    for name in _clone_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    # One pip per wheel, side by side: each isolated build spends most of its time setting up.
    builds = [
        subprocess.Popen(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(dist), str(project)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for project in (source, source / "emulator")
    ]
    for build in builds:
        out, err = build.communicate(timeout=BUILD_TIMEOUT)
        assert build.returncode == 0, out[-3000:] + err[-3000:]
    built = {wheel.name.split("-")[0]: wheel for wheel in dist.glob("*.whl")}
    assert set(built) == {"airflow_provider_hpc", "hpc_emulator"}, sorted(built)
    return built


def _names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def _entry_points(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        [name] = [name for name in archive.namelist() if name.endswith(".dist-info/entry_points.txt")]
        return archive.read(name).decode()


def _top_level(names: list[str]) -> set[str]:
    return {name.split("/")[0] for name in names}


def test_the_provider_wheel_holds_the_provider_only(wheels: dict[str, Path]) -> None:
    names = _names(wheels["airflow_provider_hpc"])
    assert _top_level(names) == {"airflow_provider_hpc", "airflow_provider_hpc-0.1.0.dist-info"}
    assert [name for name in names if "emulator" in name.lower()] == []
    assert "airflow_provider_hpc/__init__.py" in names
    entry_points = _entry_points(wheels["airflow_provider_hpc"])
    assert "[apache_airflow_provider]" in entry_points
    assert "console_scripts" not in entry_points and "emulator" not in entry_points


def test_the_emulator_wheel_holds_its_command_and_software(wheels: dict[str, Path]) -> None:
    names = _names(wheels["hpc_emulator"])
    assert _top_level(names) == {"hpc_emulator", "hpc_emulator-0.1.0.dist-info"}
    assert "hpc_emulator/__main__.py" in names
    assert {f"hpc_emulator/{path.name}" for path in EMULATOR_PACKAGE.glob("*.py")} <= set(names)
    software = {name for name in names if name.startswith("hpc_emulator/software/")}
    assert software == {
        "hpc_emulator/" + path.relative_to(EMULATOR_PACKAGE).as_posix()
        for path in (EMULATOR_PACKAGE / "software").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert "hpc_emulator/software/sw_example/usrcmd.sh" in software
    assert "hpc-emulator = hpc_emulator.__main__:main" in _entry_points(wheels["hpc_emulator"])
