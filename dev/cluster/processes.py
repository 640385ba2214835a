"""Starting and ending the deployment's own server processes, each in its own process group."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from dev.airflow_stack import kill_by_environment

#: Every process of one deployment carries this variable, so what outlived it can be found.
MARKER_ENV = "HPC_CLUSTER_ID"


class ServerProcess:
    """
    One long-running program in its own process group, its output in a log file.

    :param name: a short name for messages.
    :param argv: the program and its arguments.
    :param log_path: where its stdout and stderr go (appended, so a restart keeps the history).
    :param env: its environment.
    :param user: run it as this OS user (PostgreSQL refuses to run as root).
    """

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str], *, user: str | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env)
        self.user = user
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        """Start the program (its own session, hence its own process group)."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, user=self.user, cwd=self.log_path.parent,
            )
        return self

    @property
    def running(self) -> bool:
        """Whether the program is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, grace: float = 15.0, *, whole_group: bool = True) -> None:
        """
        Send ``sig`` to the process group (or its leader only), wait up to ``grace`` seconds, then SIGKILL the group.

        :param whole_group: False for a server that shuts its own children down in order
            (PostgreSQL's postmaster: a signal sent to every backend would only cancel queries).
        """
        if self.process is None:
            return
        if whole_group:
            _signal_group(self.process.pid, sig)
        else:
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        # The group may hold children that outlive their parent (a postgres backend, a fork).
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def log_tail(self, chars: int = 3000) -> str:
        """Return the end of the program's log."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_marked(marker: str) -> list[int]:
    """
    SIGKILL every live process whose environment holds ``HPC_CLUSTER_ID=marker``; return their ids.

    Called after a normal stop: anything found then outlived the deployment (a forked task
    process that left its group, for instance).
    """
    return kill_by_environment(f"{MARKER_ENV}={marker}")
