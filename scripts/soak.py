"""
Fault soak: many Muse runs and Rescale runs with harvests while the emulator injects faults.

The entry point of ``make soak``; the soak itself is ``dev/soak/``, whose docstring says what the
two phases run and what is checked. Prints the counts; exits 1 when any check fails.

    python scripts/soak.py                                   # both phases (about 8 minutes on 2 cores)
    python scripts/soak.py --phase in-process --muse-runs 8 --rescale-jobs 3 --max-seconds 90   # a short one
    python scripts/soak.py --phase airflow --airflow-muse-runs 12 --airflow-rescale-jobs 2     # phase 2, short
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Phase 1 runs the operators in this process: they get a throwaway AIRFLOW_HOME, removed at exit.
if "AIRFLOW_HOME" not in os.environ:
    os.environ["AIRFLOW_HOME"] = _OWN_AIRFLOW_HOME = tempfile.mkdtemp(prefix="hpc-soak-airflow-home-")
    atexit.register(shutil.rmtree, _OWN_AIRFLOW_HOME, ignore_errors=True)
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
# The provider's retry warnings would be thousands of lines, and every run designed to fail logs its
# stderr tail as an error: the counts it prints say what happened.
os.environ.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "CRITICAL")

from dev.soak.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
