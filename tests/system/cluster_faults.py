"""
Faults the system tests inflict on the running deployment, and the repairs that undo them.

Built only on the public attributes of :class:`dev.cluster.cluster.LocalCluster` and its
:class:`~dev.cluster.deployment.ClusterDeployment`: a machine crash (every process of one worker,
task processes included), a scheduler started again with other settings, a queue handed to a
surviving Celery worker, the metadata database stopped and started again on the same port and data
folder, and a supervisor that starts again whatever service exited, as systemd or Kubernetes would.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dev.airflow_stack import START_TIMEOUT, wait_for
from dev.cluster.deployment import TRIGGERERS, WORKERS, Worker
from dev.cluster.hostname import HOSTNAME_ENV
from dev.cluster.processes import MARKER_ENV

#: Every service of the deployment, in the order :meth:`ClusterDeployment.start_services` starts them.
SERVICES = ("api-server", "scheduler", "dag-processor", *TRIGGERERS, *(worker.name for worker in WORKERS))


# ----- one machine's processes ---------------------------------------------------------------------


def _parents() -> dict[int, int]:
    """Return every live process's parent id, by process id (from ``/proc/PID/stat``)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: the fields after it are plain.
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Return the ids of every live descendant of process ``pid`` (children, their children...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def machine_processes(airflow: Any, name: str) -> list[int]:
    """
    Return the ids of the live processes of the deployment that run "on machine" ``name``.

    The service's process and all its descendants, wherever their process group (Airflow's
    supervisor puts a task process in a group of its own), and any other process whose environment
    says ``HPC_CLUSTER_HOSTNAME=name``. The tree matters: a process that sets its title
    (``airflow worker -- <ti id>``) overwrites the memory ``/proc/PID/environ`` shows.
    """
    found = set()
    process = airflow.processes.get(name)
    if process is not None and process.poll() is None:
        found.add(process.pid)
        found.update(descendants(process.pid))
    needles = (f"{MARKER_ENV}={airflow.marker}".encode(), f"{HOSTNAME_ENV}={name}".encode())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(needle in environ for needle in needles):
            found.add(int(entry.name))
    return sorted(found)


def crash_machine(airflow: Any, name: str) -> list[int]:
    """
    Kill -9 one service's whole process group and every other process of its machine; return their ids.

    A worker's task process sits in a process group of its own (Airflow's supervisor calls
    ``setpgid``): killing only the worker's group would leave it running, which a machine that
    loses its power does not. The processes are listed first, so nothing forks out of reach.
    """
    doomed = machine_processes(airflow, name)
    airflow.kill(name, signal.SIGKILL)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not [pid for pid in doomed if _alive(pid)], 30, f"every process of {name} to be gone", interval=0.2)
    return doomed


def kill_if_alive(pid: int) -> bool:
    """SIGKILL process ``pid`` if it still lives (a test's own task process); return whether it did."""
    if not _alive(pid):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, killed and awaiting its reaper, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# ----- Celery workers ------------------------------------------------------------------------------


def worker_named(name: str) -> Worker:
    """Return the deployment's worker called ``name`` (``worker-a``)."""
    return next(worker for worker in WORKERS if worker.name == name)


def worker_ready(airflow: Any, worker: Worker) -> bool:
    """Whether the worker's latest process is alive and has told Celery it is ready."""
    process = airflow.processes.get(worker.name)
    if process is None or process.poll() is not None:
        return False
    log = airflow.log_text(worker.name)
    return f"{worker.name}@" in log and " ready." in log


def start_worker_again(airflow: Any, worker: Worker, timeout: float = START_TIMEOUT) -> None:
    """Start a stopped worker with its usual queues; return once Celery says it is ready."""
    airflow.start_worker(worker)
    wait_for(lambda: worker_ready(airflow, worker), timeout, f"{worker.name} to be ready again", interval=1.0)


def _celery_control(airflow: Any) -> Any:
    from celery import Celery

    # Only the broker matters for remote control; Airflow's own app would need its config here.
    return Celery("hpc-system-tests", broker=airflow.redis.url).control


def add_queue(airflow: Any, worker: Worker, queue: str, timeout: float = 60.0) -> str:
    """
    Make a live worker consume ``queue`` as well (Celery remote control); return its node name.

    What an operator does when a worker dies: hand its queue to a survivor, so the tasks routed
    there (a retry keeps its queue) go on running.
    """
    control = _celery_control(airflow)
    deadline = time.monotonic() + timeout
    while True:
        replies = control.add_consumer(queue, reply=True, timeout=5.0) or []
        nodes = [node for reply in replies for node in reply if node.startswith(f"{worker.name}@")]
        if nodes:
            return nodes[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"{worker.name} did not answer add_consumer({queue!r}): {replies}")
        time.sleep(1.0)


def remove_queue(airflow: Any, node: str, queue: str) -> None:
    """Make worker ``node`` stop consuming ``queue`` (the reverse of :func:`add_queue`)."""
    _celery_control(airflow).cancel_consumer(queue, destination=[node], reply=True, timeout=5.0)


# ----- the scheduler -------------------------------------------------------------------------------


def live_scheduler_jobs(airflow: Any, fresh_seconds: float = 15.0) -> list[int]:
    """Return the ids of the scheduler jobs marked running whose heartbeat is fresh."""
    rows = airflow.query(
        "SELECT id FROM job WHERE job_type = 'SchedulerJob' AND state = 'running' "
        "AND latest_heartbeat > now() - make_interval(secs => ?) ORDER BY id",
        fresh_seconds,
    )
    return [job_id for (job_id,) in rows]


def restart_scheduler(airflow: Any, env: Mapping[str, str] | None = None, timeout: float = START_TIMEOUT) -> int:
    """
    Stop the scheduler (SIGTERM: it ends its job cleanly) and start it again; return its new job id.

    :param env: its environment (default: the deployment's), e.g. with a shorter heartbeat timeout.
    """
    before = max(live_scheduler_jobs(airflow, fresh_seconds=3600.0), default=0)
    airflow.kill("scheduler", signal.SIGTERM)
    airflow.spawn("scheduler", "scheduler", env=env)

    def started() -> int | None:
        process = airflow.processes["scheduler"]
        if process.poll() is not None:
            raise AssertionError(f"the scheduler exited with {process.returncode}:\n{airflow.log_tail('scheduler')}")
        newer = [job_id for job_id in live_scheduler_jobs(airflow) if job_id > before]
        return newer[-1] if newer else None

    return wait_for(started, timeout, "the scheduler to start again", interval=1.0)


@contextmanager
def scheduler_settings(airflow: Any, settings: Mapping[str, str]) -> Iterator[int]:
    """
    Run the block with the scheduler started again under more ``AIRFLOW__*`` settings; restore it after.

    Yields the new scheduler's job id. Only task instances this scheduler queues are subject to
    its settings (Airflow looks for missing heartbeats among its own), so trigger the DAG inside.
    """
    job_id = restart_scheduler(airflow, {**airflow.env, **settings})
    try:
        yield job_id
    finally:
        restart_scheduler(airflow)


# ----- the metadata database -----------------------------------------------------------------------


def stop_database(cluster: Any) -> None:
    """Stop the deployment's own PostgreSQL (fast shutdown), keeping its data folder and port."""
    if cluster.postgres.existing_url:
        raise AssertionError("the database outage needs the deployment's own PostgreSQL, not an existing server")
    cluster.postgres.stop()
    assert not cluster.postgres.running


def start_database(cluster: Any) -> None:
    """Start PostgreSQL again on the same port and data folder; return once it takes connections."""
    port, folder = cluster.postgres.port, cluster.postgres.folder
    cluster.postgres.start()
    # Every process of the deployment holds this URL: anything else would strand them.
    assert (cluster.postgres.port, cluster.postgres.folder) == (port, folder), "PostgreSQL moved"


# ----- a supervisor for the services ---------------------------------------------------------------


@dataclass
class ServiceSupervisor:
    """
    Start again, as systemd's ``Restart=always`` would, every service of the deployment that exited.

    Some Airflow services exit when they lose the metadata database; in production a supervisor
    brings them back. :meth:`check` is called in a polling loop; each restart is recorded.

    :param airflow: the running :class:`~dev.cluster.deployment.ClusterDeployment`.
    :param backoff: seconds to leave between two starts of one service (``RestartSec``).
    """

    airflow: Any
    backoff: float = 3.0
    restarts: dict[str, list[float]] = field(default_factory=dict)
    exits: dict[str, list[int]] = field(default_factory=dict)
    _started_at: dict[str, float] = field(default_factory=dict)

    def _starter(self, name: str) -> Callable[[], None]:
        airflow = self.airflow
        # The same command lines as ClusterDeployment.start_services.
        if name == "api-server":
            return lambda: airflow.spawn("api-server", "api-server", "--host", "127.0.0.1", "--port", str(airflow.api_port))
        if name in ("scheduler", "dag-processor"):
            return lambda: airflow.spawn(name, name)
        if name in TRIGGERERS:
            return lambda: airflow.start_triggerer(name)
        return lambda: airflow.start_worker(worker_named(name))

    def dead(self) -> list[str]:
        """Return the services whose latest process has exited (or that have none)."""
        return [name for name in SERVICES
                if name not in self.airflow.processes or self.airflow.processes[name].poll() is not None]

    def check(self) -> list[str]:
        """Start again each exited service whose backoff has passed; return the ones started now."""
        started = []
        now = time.monotonic()
        for name in self.dead():
            if now - self._started_at.get(name, -1e9) < self.backoff:
                continue
            process = self.airflow.processes.get(name)
            if process is not None:
                self.exits.setdefault(name, []).append(process.returncode)
            self._starter(name)()
            self._started_at[name] = now
            self.restarts.setdefault(name, []).append(now)
            started.append(name)
        return started

    def all_alive(self) -> bool:
        """Whether every service's process is alive and the workers and triggerers are serving again."""
        if self.dead():
            return False
        workers = all(worker_ready(self.airflow, worker) for worker in WORKERS)
        return workers and len(self.airflow.live_triggerers()) == len(TRIGGERERS) and bool(live_scheduler_jobs(self.airflow))

    def summary(self) -> str:
        """Describe which services exited and were started again (for the test's output)."""
        if not self.restarts:
            return "no service exited"
        return ", ".join(f"{name} started again {len(times)}x (exit codes {self.exits.get(name, [])})"
                         for name, times in self.restarts.items())
