"""
The fault soak in short: a few Muse and Rescale runs through the faults, every check of the full soak's
in-process phase (its phase on a real Airflow deployment is left to ``python scripts/soak.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_a_short_fault_soak_passes_every_check(tmp_path: Path) -> None:
    report = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "soak.py"), "--phase", "in-process",
         "--muse-runs", "8", "--rescale-jobs", "3", "--concurrency", "8", "--max-seconds", "90", "--seed", "7",
         "--json", str(report)],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    figures = json.loads(report.read_text())["figures"]
    assert figures["muse_runs"] == 8 and figures["rescale_runs"] == 6
    for name in ("duplicate_submissions", "lost_results", "wrong_results", "lost_files", "files_md5_mismatch",
                 "client_crashes", "rescale_stops"):
        assert figures[name] == 0, figures
    assert figures["files_md5_verified"] > 0
    assert sum(v for k, v in figures.items() if k.startswith("fault_")) > 0
