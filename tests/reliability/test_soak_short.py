"""
The fault soak in short, both phases: a few Muse and Rescale runs through the faults, with every
check of the full soak (``make soak``): in-process, then through a DAG on a real API server,
scheduler and triggerer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ZERO_COUNTS = ("duplicate_submissions", "lost_results", "wrong_results", "lost_files", "files_md5_mismatch", "rescale_stops")

pytestmark = pytest.mark.slow


def _soak(tmp_path: Path, *args: str, timeout: float) -> dict[str, Any]:
    report = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "soak.py"), *args, "--seed", "7", "--json", str(report)],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(report.read_text())


def test_a_short_in_process_soak_passes_every_check(tmp_path: Path) -> None:
    figures = _soak(tmp_path, "--phase", "in-process", "--muse-runs", "8", "--rescale-jobs", "3", "--concurrency", "8",
                    "--max-seconds", "90", timeout=240)["figures"]
    assert figures["muse_runs"] == 8 and figures["rescale_runs"] == 6
    for name in (*ZERO_COUNTS, "client_crashes"):
        assert figures[name] == 0, figures
    assert figures["files_md5_verified"] > 0
    assert sum(v for k, v in figures.items() if k.startswith("fault_")) > 0


def test_a_short_soak_on_real_airflow_passes_every_check(tmp_path: Path) -> None:
    figures = _soak(tmp_path, "--phase", "airflow", "--airflow-muse-runs", "12", "--airflow-rescale-jobs", "2",
                    timeout=420)["airflow_figures"]
    assert figures["muse_tasks"] == 12 and figures["rescale_runs"] == 4
    assert figures["muse_tasks_success"] + figures["muse_tasks_failed"] == 12
    assert figures["muse_tasks_failed"] == figures["muse_tasks_designed_to_fail"]
    for name in (*ZERO_COUNTS, "secrets_found", "processes_left_behind"):
        assert figures[name] == 0, figures
    assert figures["files_md5_verified"] > 0 and figures["secrets_looked_for"] > 0
    assert sum(v for k, v in figures.items() if k.startswith("fault_")) > 0
