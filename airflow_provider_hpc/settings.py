"""Deployment-wide settings of the provider, read from Airflow's configuration (section ``[hpc]``)."""

from __future__ import annotations

import os
from typing import Any

SECTION = "hpc"


def default_deferrable() -> bool:
    """
    Return whether waits defer by default: yes, unless the deployment turned it off.

    HPC runs last hours, so waits free the worker slot unless told otherwise. The
    ``[operators] default_deferrable`` line of ``airflow.cfg`` is not read: Airflow writes
    ``false`` there in every file it generates, so it cannot tell a deliberate choice from the
    shipped default. To make the waits hold a worker slot by default, set
    ``[hpc] default_deferrable`` (``AIRFLOW__HPC__DEFAULT_DEFERRABLE``) or the environment variable
    ``AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE`` to ``false``; ``deferrable=`` on a task always wins.
    """
    from airflow.sdk.configuration import conf

    own = conf.get(SECTION, "default_deferrable", fallback=None)
    if own not in (None, ""):
        return is_truthy(own)
    explicit = os.environ.get("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE")
    if explicit not in (None, ""):
        return is_truthy(explicit)
    return True


def is_truthy(value: Any) -> bool:
    """Read a configuration flag the way Airflow does (``true``, ``1``, ``yes``, ``on``...)."""
    return str(value).strip().lower() in ("true", "1", "yes", "on", "t", "y")
