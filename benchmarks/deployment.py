"""The private Airflow deployment a benchmark section runs on, made and removed in one place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def bench_deployment(name: str, dag_file: Path, extra_env: Mapping[str, str]) -> Iterator[Any]:
    """
    Yield an ``AirflowStack`` (``dev/airflow_stack.py``) on a fresh home serving ``dag_file``; stop and remove it after.

    The home is ``name`` under the benchmark's scratch folder (``HPC_BENCH_TMP``). Any process of
    the deployment still alive after the stop is killed, and reported as an error.
    """
    from dev.airflow_stack import AirflowStack

    scratch = Path(os.path.realpath(os.environ.get("HPC_BENCH_TMP") or tempfile.gettempdir()))
    home = scratch / name
    dags = home / "dags"
    dags.mkdir(parents=True)
    shutil.copy(dag_file, dags / dag_file.name)
    stack = AirflowStack(home, dags, extra_env)
    try:
        yield stack
    finally:
        stack.stop()
        left = stack.kill_leftovers()
        shutil.rmtree(home, ignore_errors=True)
    if left:
        raise RuntimeError(f"{len(left)} processes of the deployment outlived it (killed): {left}")
