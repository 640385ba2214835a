"""The host name Airflow records for a process (``[core] hostname_callable``)."""

from __future__ import annotations

import os
import socket

HOSTNAME_ENV = "HPC_CLUSTER_HOSTNAME"


def from_environment() -> str:
    """
    Return ``HPC_CLUSTER_HOSTNAME`` if set, else the machine's FQDN (Airflow's default).

    Every process of the local cluster runs on one machine; naming each worker and triggerer as
    if it were a host of its own lets a test read, from the ``task_instance.hostname`` and
    ``job.hostname`` columns, which worker ran a task and which triggerer holds a trigger.
    """
    return os.environ.get(HOSTNAME_ENV) or socket.getfqdn()
