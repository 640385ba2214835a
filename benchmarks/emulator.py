"""
The emulator in its own process, so that its CPU never counts against the code measured.

``python -m benchmarks.emulator`` is the emulator's own command line plus two settings the
benchmarks need: ``--muse-max-running`` (the default queue of 32 running jobs would serialise
thousands of jobs) and ``--parent-pid`` (the server stops by itself when the benchmark is gone).
:class:`EmulatorProcess` starts it, reads its banner, and talks to its admin endpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

BANNER_TIMEOUT = 60.0
SCRATCH_PREFIX = "hpc-bench-emulator-"
STOP_TIMEOUT = 30.0
MUSE_STATE_ROUTE = "GET /api/software/muse/state/{name}/{key}/"


@dataclass
class EmulatorProcess:
    """
    A running emulator process: its URLs, CA, Airflow connection variables and admin calls.

    :param tls: serve HTTPS (every benchmark uses it: the figures are about TLS polling).
    :param time_scale: multiplies the emulator's own delays (queue wait, Rescale status steps).
    :param muse_max_running: Muse jobs running at once.
    :param faults: fault rules applied from start.
    :param seed: seed of the emulator's random choices.
    """

    tls: bool = True
    time_scale: float = 1.0
    muse_max_running: int = 32
    faults: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 1
    base_url: str = ""
    ca_path: str | None = None
    conn_env: dict[str, str] = field(default_factory=dict)
    _process: subprocess.Popen[str] | None = None
    _data_dir: Path | None = None
    _session: requests.Session | None = None

    def start(self) -> EmulatorProcess:
        """Start the server and wait for its banner."""
        self._data_dir = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
        command = [
            sys.executable, "-m", "benchmarks.emulator",
            "--host", "127.0.0.1", "--port", "0",
            "--data-dir", str(self._data_dir / "data"),
            "--time-scale", repr(self.time_scale),
            "--seed", str(self.seed),
            "--muse-max-running", str(self.muse_max_running),
            "--parent-pid", str(os.getpid()),
        ]
        if self.tls:
            command.append("--tls")
        if self.faults:
            command += ["--faults", json.dumps(self.faults)]
        log = open(self._data_dir / "emulator.log", "w")  # noqa: SIM115 - closed with the process
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        log.close()
        banner = self._read_banner()
        self.base_url = re.search(r"listening on (\S+)", banner).group(1)  # type: ignore[union-attr]
        ca = re.search(r"TLS CA\s+(\S+)", banner)
        self.ca_path = ca.group(1) if ca else None
        self.conn_env = dict(re.findall(r"export (AIRFLOW_CONN_\w+)='(.*)'", banner))
        self._session = requests.Session()
        return self

    def _read_banner(self) -> str:
        assert self._process is not None and self._process.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + BANNER_TIMEOUT

        def read() -> None:
            assert self._process is not None and self._process.stdout is not None
            for line in self._process.stdout:
                lines.append(line)
                if line.startswith("Admin:"):
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        if reader.is_alive() or not any(line.startswith("Admin:") for line in lines):
            self.stop()
            raise RuntimeError(f"The emulator did not start; its log is gone with it. Banner so far: {''.join(lines)!r}")
        return "".join(lines)

    @property
    def muse_url(self) -> str:
        """The Muse base URL (ends with ``/api/``)."""
        return f"{self.base_url}/api/"

    @property
    def pid(self) -> int | None:
        """The server's process id."""
        return self._process.pid if self._process else None

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Call an admin endpoint (``/_emulator/...``) and return its JSON answer."""
        assert self._session is not None
        # verify per request: REQUESTS_CA_BUNDLE in the environment would override the session's.
        response = self._session.request(
            method, f"{self.base_url}/_emulator/{path}", json=body, timeout=120, verify=self.ca_path or True
        )
        response.raise_for_status()
        return response.json()

    def counters(self) -> dict[str, dict[str, int]]:
        """Every counter of the emulator."""
        return self.admin("GET", "counters")

    def requests_by_route(self) -> dict[str, int]:
        """Requests counted per route template."""
        return dict(self.counters().get("requests", {}))

    def reset(self) -> None:
        """Forget counters and fault rules."""
        self.admin("POST", "reset")

    def set_faults(self, rules: list[dict[str, Any]]) -> None:
        """Replace the fault rules."""
        self.admin("POST", "faults", rules)

    def muse_jobs(self) -> dict[str, dict[str, Any]]:
        """The Muse jobs as the emulator sees them, by key."""
        return {job["key"]: job for job in self.admin("GET", "muse/jobs")}

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) the server process has used so far."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL), and remove its data folder."""
        if self._session is not None:
            self._session.close()
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        if process is not None and process.stdout is not None:
            process.stdout.close()
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def route_delta(before: dict[str, int], after: dict[str, int], *routes: str) -> int:
    """Return how many requests the given routes received between two snapshots (all routes if none given)."""
    keys = routes or tuple(after)
    return sum(after.get(key, 0) - before.get(key, 0) for key in keys)


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """Set ``stop`` once the benchmark that started this server is gone."""
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            stop.set()


def main(argv: list[str] | None = None) -> int:
    """Serve the emulator until SIGTERM, Ctrl-C, or the parent benchmark process ending."""
    from hpc_emulator.__main__ import banner, build_parser, config_from
    from hpc_emulator.server import EmulatorServer

    parser = build_parser()
    parser.add_argument("--muse-max-running", type=int, default=32, help="Muse jobs running at once")
    parser.add_argument("--parent-pid", type=int, help="stop when this process is no longer the parent")
    args = parser.parse_args(argv)
    config = config_from(args)
    config.muse_max_running = max(1, args.muse_max_running)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = EmulatorServer(config, host=args.host, port=args.port).start()
    print(banner(server), flush=True)
    stop = threading.Event()
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, stop), daemon=True).start()
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        orphaned = args.parent_pid and os.getppid() != args.parent_pid
        scratch = Path(args.data_dir).parent if args.data_dir else None
        if orphaned and scratch is not None and scratch.name.startswith(SCRATCH_PREFIX):
            # The benchmark died without cleaning up: its scratch folder is this server's to remove.
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
