"""
Waits in one real ``airflow triggerer`` process, what users size their deployments by.

One private deployment (``dev/airflow_stack.py``'s home: SQLite, the DAG ``dags/bench_triggerer.py``)
runs nothing but ``airflow triggerer --capacity N``. Each variant:

1. submits its Muse runs to the emulator (over TLS), each held at a gate so that every run's
   length counts from the same moment;
2. creates the DAG run (as ``airflow dags trigger`` does) and writes one mapped task instance per run,
   deferred on its trigger row, as the execution API does when a task defers
   (``trigger_rows.py``);
3. starts the triggerer and waits until every trigger has polled once (the emulator counts the
   state requests), then opens the gate;
4. ``ours`` (``MuseJobSensor``'s ``MuseJobTrigger``): runs until every task instance was resumed
   by its event; ``anchor`` (``HttpSensor``'s ``HttpSensorTrigger`` on the same state URLs,
   answered 404 so that it keeps polling, as in section 1): until the steady window ends, since it
   cannot see a Muse run end by itself;
5. stops the triggerer and reads, from the metadata database, when each task instance was resumed.

The bare aiohttp floor runs beside them at the size of ``ours``, in its own process as in section 1.

Figures, from the triggerer's whole process tree (the ``airflow triggerer`` supervisor, the
trigger runner it starts, the log server), sampled once a second: CPU % of one core in the steady
window (every trigger alive, past the first poll round) and from the gate's opening to the last
event, CPU per poll (over the emulator's count of state requests), peak resident memory (the sum
over the tree); two delays from each run's end (emulator side): to its trigger's event, as the
time of the "Trigger fired event" line (Airflow's runner logs it after the trigger yields, stamped
when its log thread formats it, and hands the event on to its supervisor once the line is
written), and to the moment the supervisor resumed its task instance with it
(``task_instance.updated_at``); every "event loop blocked" warning the triggerer logged, and every
error.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from benchmarks.deployment import bench_deployment
from benchmarks.emulator import EmulatorProcess
from benchmarks.jobs import MUSE_SOFTWARE, Gate, submit_jobs, wait_all_running
from benchmarks.process_profile import TreeProfile
from benchmarks.report import median, percentile, ratio, table
from benchmarks.triggerer_load import (
    ANCHOR_CONN_ID, MUSE_STATE_GLOB, LoadCase, PollCounter, job_ends, job_lengths, run_variant, steady_figures,
)

DAG_FILE = Path(__file__).with_name("dags") / "bench_triggerer.py"
DAG_ID = "bench_triggerer"
TASKS = {"ours": "watch", "anchor": "anchor"}
SAMPLE_SECONDS = 1.0
#: The triggerer's own warning when a trigger held its event loop (``TriggerRunner.block_watchdog``).
BLOCKED = re.compile(r"Triggerer's async thread was blocked for ([0-9.]+) seconds")
#: Log lines at error level (structlog's JSON and console renderings) and tracebacks.
ERROR_LINE = re.compile(r'"level": ?"(error|critical)"|\[(error|critical)\s*\]|Traceback \(most recent', re.IGNORECASE)
LOG_TIME = re.compile(r'(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z')
#: The line for a trigger's event (Airflow's ``run_trigger``; JSON in a trigger's log file, console
#: rendering in the triggerer's own output), and the Muse key in its payload.
FIRED_KEY = re.compile(r"Trigger fired event.*?'key': '([0-9A-Za-z-]+)'")
STATE_ROUTE_PREFIX = MUSE_STATE_GLOB.rstrip("*")


@dataclass(frozen=True)
class TriggererCase:
    """
    One size of the real-triggerer benchmark.

    :param name: shown in the tables.
    :param jobs: ``MuseJobTrigger`` waits (and the floor's).
    :param anchor_jobs: ``HttpSensorTrigger`` waits, on the same URLs.
    :param interval: seconds between two polls of one run, in every variant.
    :param lengths: the range run lengths are drawn from (seconds, uniform).
    """

    name: str
    jobs: int
    anchor_jobs: int
    interval: float
    lengths: tuple[float, float]

    def load_case(self, jobs: int) -> LoadCase:
        """The same workload for ``jobs`` runs, as section 1 describes it (same lengths, same seed)."""
        return LoadCase(self.name, jobs, 0, self.interval, self.lengths, ("floor",))


class TreeSampler:
    """
    CPU seconds and resident memory of a process and all its descendants, once a second.

    CPU is ``user + system`` of every live process plus what each reaped of its children, so a
    process that exits between two samples still counts through its parent. The root's own CPU
    (the triggerer's supervisor, without its children) is kept beside it, so the figures can say
    which side of the triggerer spends it: the supervisor (database reads and writes) or the
    trigger runner (the triggers' event loop).
    """

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.samples: list[tuple[float, float, int]] = []
        self.root_samples: list[tuple[float, float]] = []
        self.peak_rss = 0
        self.peak_runner_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        """Record (epoch seconds, CPU seconds, RSS bytes) of the tree, and (epoch seconds, CPU seconds) of its root alone."""
        cpu, rss, largest, own = 0.0, 0, 0, None
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    resident = process.memory_info().rss
            except psutil.NoSuchProcess:
                continue
            cpu += times.user + times.system + times.children_user + times.children_system
            rss += resident
            largest = max(largest, resident)
            if process is self.root:
                own = times.user + times.system
        at = time.time()
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_runner_rss = max(self.peak_runner_rss, largest)
        self.samples.append((at, cpu, rss))
        if own is not None:
            self.root_samples.append((at, own))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            self.sample()

    def start(self) -> TreeSampler:
        """Take the first sample, then one a second."""
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling after one last sample."""
        self._stop.set()
        self._thread.join()
        self.sample()


def run(emulator: EmulatorProcess, case: TriggererCase, seed: int, profile_dir: Path | None = None) -> dict[str, Any]:
    """
    Run the anchor, ours and the floor, one after the other; print and return the figures.

    With ``profile_dir``, a py-spy profile of the triggerer's process tree per variant is written
    there (``triggerer-VARIANT.txt``) and summarized.
    """
    env = {
        **emulator.conn_env,
        f"AIRFLOW_CONN_{ANCHOR_CONN_ID.upper()}": json.dumps({"conn_type": "http", "host": emulator.base_url}),
        # HttpSensorTrigger verifies TLS with aiohttp's default context: it must trust the emulator's CA.
        "SSL_CERT_FILE": emulator.ca_path or "",
        # Airflow's defaults, not the quick heartbeats of the reliability deployments.
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "5",
        "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "30",
    }
    results: dict[str, Any] = {}
    with bench_deployment("triggerer-airflow", DAG_FILE, env) as stack:
        started = time.monotonic()
        stack.prepare()
        print(f"   deployment prepared in {time.monotonic() - started:.0f}s", flush=True)
        for variant, jobs in (("anchor", case.anchor_jobs), ("ours", case.jobs)):
            started = time.monotonic()
            profile = profile_dir / f"triggerer-{variant}.txt" if profile_dir else None
            results[variant] = _run_in_triggerer(stack, emulator, case, variant, jobs, seed, stack.home, profile)
            print(f"   {case.name}: {variant} ({jobs} waits) done in {time.monotonic() - started:.0f}s", flush=True)
    with tempfile.TemporaryDirectory(prefix="hpc-bench-triggerer-") as workdir:
        started = time.monotonic()
        results["floor"] = run_variant(emulator, case.load_case(case.jobs), "floor", seed, Path(workdir))
        print(f"   {case.name}: floor ({case.jobs} waits, bare loop) done in {time.monotonic() - started:.0f}s", flush=True)
    figures = {"case": case.__dict__, "variants": results, "ratios": _ratios(results)}
    print_case(case, figures)
    return figures


def _run_in_triggerer(
    stack: Any, emulator: EmulatorProcess, case: TriggererCase, variant: str, jobs: int, seed: int, home: Path,
    profile_path: Path | None = None,
) -> dict[str, Any]:
    muse_lengths, _ = job_lengths(case.load_case(jobs), seed)
    gate = Gate(home / f"{variant}.gate")
    run_id = f"bench_{variant}_{int(time.time())}"
    plan = {
        "dag_id": DAG_ID, "run_id": run_id, "task_id": TASKS[variant], "interval": case.interval,
        "software": MUSE_SOFTWARE, "http_conn_id": ANCHOR_CONN_ID,
    }
    polls = PollCounter(emulator)
    sampler: TreeSampler | None = None
    profile: TreeProfile | None = None
    if variant == "anchor":
        emulator.set_faults([{"route": MUSE_STATE_GLOB, "action": {"status": 404, "body": "json"}}])
    try:
        submitted = submit_jobs(emulator, muse_lengths, gate=gate)
        wait_all_running(emulator, submitted, timeout=120 + jobs / 20)
        plan["keys"] = [job.ident for job in submitted]
        plan_path = home / f"{variant}.plan.json"
        plan_path.write_text(json.dumps(plan))
        _rows(stack, "create", plan_path)
        polls.start()
        spawned_at = time.time()
        stack.spawn("triggerer", "triggerer", "--capacity", str(jobs))
        triggerer_pid = stack.processes["triggerer"].pid
        sampler = TreeSampler(triggerer_pid).start()
        if profile_path is not None:
            profile = TreeProfile(triggerer_pid, profile_path).start()
        ready_s = _wait_first_round(stack, emulator, home, jobs, timeout=300 + jobs / 10) - spawned_at
        released_at = gate.open(jobs)
        time.sleep(1.0)
        gate.close()
        if variant == "ours":
            _wait_resumed(stack, run_id, timeout=case.lengths[1] + 3 * case.interval + 300)
        else:
            time.sleep(max(0.0, released_at + case.lengths[0] + 1 - time.time()))
        ended_at = time.time()
    finally:
        polls.stop()
        if sampler is not None:
            sampler.stop()
        gate.close()
        if "triggerer" in stack.processes:
            stack.kill("triggerer", signal.SIGTERM)
        if variant == "anchor":
            emulator.set_faults([])
        if profile is not None:
            print(f"   {variant}: {profile_path}", flush=True)
            for line in profile.stop():
                print(f"   {line}", flush=True)
    log_text = _triggerer_logs(stack, home)
    events_path = home / f"{variant}.events.json"
    _rows(stack, "events", plan_path, events_path)
    instances = json.loads(events_path.read_text())
    _retire(stack, run_id)
    return summarize(
        case, variant, jobs, instances, sampler, polls, released_at, ended_at, ready_s,
        job_ends(emulator, submitted) if variant == "ours" else {}, log_text,
    )


def _rows(stack: Any, *args: Any) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.trigger_rows", *map(str, args)], env=stack.env,
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"trigger_rows {args[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")


def _state_polls(emulator: EmulatorProcess) -> int:
    return sum(n for route, n in emulator.requests_by_route().items() if route.startswith(STATE_ROUTE_PREFIX))


def _wait_first_round(stack: Any, emulator: EmulatorProcess, home: Path, jobs: int, timeout: float) -> float:
    """
    Wait until every trigger has started and polled once; return when (epoch seconds).

    A started trigger has its own log file (the triggerer opens one per trigger) and polls at once;
    the state requests alone would count the early triggers' second polls for the late ones' first.
    """
    first = _state_polls(emulator)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process = stack.processes["triggerer"]
        if process.poll() is not None:
            raise RuntimeError(f"airflow triggerer exited with {process.returncode}:\n{stack.log_tail('triggerer')}")
        if _state_polls(emulator) - first >= jobs and _trigger_logs(home) >= jobs:
            return time.time()
        time.sleep(2.0)
    raise TimeoutError(f"the triggerer did not start its {jobs} triggers within {timeout:.0f}s:\n{stack.log_tail('triggerer')}")


def _trigger_logs(home: Path) -> int:
    return sum(1 for _ in (home / "logs").rglob("*.trigger.*.log"))


def _wait_resumed(stack: Any, run_id: str, timeout: float) -> None:
    """Wait until no task instance of the run is deferred any more, or say that it did not in time."""
    deadline = time.monotonic() + timeout
    sql = "SELECT COUNT(*) FROM task_instance WHERE dag_id = ? AND run_id = ? AND state = 'deferred'"
    while time.monotonic() < deadline:
        if stack.query(sql, DAG_ID, run_id)[0][0] == 0:
            return
        time.sleep(1.0)
    # The task instances still deferred count as errors in the figures: the run goes on to the floor.
    print(f"   task instances of {run_id} still deferred after {timeout:.0f}s", flush=True)


def _retire(stack: Any, run_id: str) -> None:
    """Take a variant's task instances and triggers out, so that the next variant's triggerer starts clean."""
    stack.execute_script(
        f"UPDATE task_instance SET state = 'removed', trigger_id = NULL WHERE dag_id = '{DAG_ID}' AND run_id = '{run_id}';"
        "DELETE FROM trigger WHERE id NOT IN (SELECT trigger_id FROM task_instance WHERE trigger_id IS NOT NULL);"
    )


def _triggerer_logs(stack: Any, home: Path) -> str:
    """The triggerer's own output and every trigger log file it wrote, joined."""
    parts = [stack.log_text("triggerer")]
    for path in sorted((home / "logs").rglob("*.trigger.*.log")):
        parts.append(path.read_text(errors="replace"))
        path.unlink()
    return "\n".join(parts)


def summarize(
    case: TriggererCase, variant: str, jobs: int, instances: list[dict[str, Any]], sampler: TreeSampler | None,
    polls: PollCounter, released_at: float, ended_at: float, ready_s: float, ends: dict[str, float | None], log_text: str,
) -> dict[str, Any]:
    """Turn one variant's raw figures into the table's figures."""
    assert sampler is not None
    samples = sampler.samples
    window = (released_at + case.interval / 2 + 2, released_at + case.lengths[0])
    steady = steady_figures(samples, polls.samples, window)
    supervisor = steady_figures(sampler.root_samples, polls.samples, window)
    run_window = steady_figures(samples, polls.samples, (released_at, ended_at))
    resumed = {i["key"]: i for i in instances if i["state"] != "deferred" and i["event"] is not None}
    # Two delays from a run's end: to its trigger's event (the runner's line for it, what the floor
    # measures too), and to its task instance resumed (the event written by the supervisor).
    lines = log_text.splitlines()
    fired = _fired_at(lines)
    delays = [fired[key] - end for key, end in ends.items() if end is not None and key in fired]
    resume_delays = [resumed[key]["updated_at"] - end for key, end in ends.items() if end is not None and key in resumed]
    errors = [line.strip()[:300] for line in lines if ERROR_LINE.search(line)]
    if variant == "ours":
        errors += [
            f"{i['key']}: {i['state']}, event {i['event']}"[:300] for i in instances
            if not (isinstance(i["event"], dict) and i["event"].get("status") == "ok")
        ]
    blocked_lines = [line.strip()[:400] for line in lines if BLOCKED.search(line)]
    blocked = [float(BLOCKED.search(line).group(1)) for line in blocked_lines]  # type: ignore[union-attr]
    # When each came, in seconds from the gate's opening: at the start (negative), or among the events.
    blocked_at = [round(at - released_at, 1) for line in blocked_lines if (at := _log_time(line)) is not None]
    start_cpu = samples[0][1] if samples else 0.0
    cpu_at_release = next((cpu for at, cpu, _ in samples if at >= released_at), start_cpu)
    return {
        "variant": variant,
        "jobs": jobs,
        "ready_s": ready_s,
        "startup_cpu_s": cpu_at_release - start_cpu,
        "polls": run_window["polls"],
        "cpu_pct_steady": steady["cpu_pct"],
        "supervisor_cpu_pct_steady": supervisor["cpu_pct"],
        "cpu_per_poll_steady_ms": steady["cpu_per_poll_ms"],
        "steady_polls": steady["polls"],
        "steady_window_s": steady["seconds"],
        "cpu_pct_run": run_window["cpu_pct"],
        "cpu_per_poll_ms": run_window["cpu_per_poll_ms"],
        "rss_peak_mib": sampler.peak_rss / 2**20,
        "runner_rss_peak_mib": sampler.peak_runner_rss / 2**20,
        "events": len(resumed),
        "fired": len(delays),  # the runs whose event line was found: the event delays cover these
        "delay_p50_s": median(delays),
        "delay_p99_s": percentile(delays, 0.99),
        "delay_max_s": max(delays) if delays else None,
        "resume_delay_p50_s": median(resume_delays),
        "resume_delay_p99_s": percentile(resume_delays, 0.99),
        "resume_delay_max_s": max(resume_delays) if resume_delays else None,
        "blocked_warnings": len(blocked),
        "blocked_max_s": max(blocked) if blocked else None,
        "blocked_lines": blocked_lines[:5],
        "blocked_at_s": blocked_at,
        "errors": errors[:5],
        "error_count": len(errors),
    }


def _fired_at(lines: list[str]) -> dict[str, float]:
    """The epoch seconds of each Muse key's first trigger event, from the lines of the trigger logs."""
    fired: dict[str, float] = {}
    for line in lines:
        if (found := FIRED_KEY.search(line)) is not None and (at := _log_time(line)) is not None:
            fired.setdefault(found.group(1), at)
    return fired


def _log_time(line: str) -> float | None:
    """The epoch seconds of a log line's leading ISO timestamp (both of the triggerer's renderings), if any."""
    found = LOG_TIME.search(line)
    if found is None:
        return None
    return datetime.fromisoformat(found.group(1)).replace(tzinfo=timezone.utc).timestamp()


def _ratios(results: dict[str, Any]) -> dict[str, Any]:
    ours, floor, anchor = (results.get(v) for v in ("ours", "floor", "anchor"))
    key = "cpu_per_poll_steady_ms"
    return {
        "ours/floor": ratio(ours[key], floor[key]) if ours and floor else None,
        "anchor/ours": ratio(anchor[key], ours[key]) if ours and anchor else None,
    }


def print_case(case: TriggererCase, figures: dict[str, Any]) -> None:
    """Print the case's table and ratios."""
    print(
        f"\n-- {case.name}: poll every {case.interval:g}s, run lengths {case.lengths[0]:g}-{case.lengths[1]:g}s; "
        f"ours and anchor in one real `airflow triggerer`, floor a bare aiohttp loop"
    )
    headers = (
        "variant", "waits", "start s", "CPU % steady", "steady ms/poll", "CPU % run", "peak RSS MiB",
        "event p50 s", "event p99 s", "event max s", "resumed p50 s", "resumed p99 s", "resumed max s",
        "events", "blocked", "errors",
    )
    rows = []
    for name, r in figures["variants"].items():
        real = name != "floor"
        rows.append((
            name, r["jobs"], r["ready_s"] if real else None, r["cpu_pct_steady"], r["cpu_per_poll_steady_ms"],
            r["cpu_pct_run"], r["rss_peak_mib"], r["delay_p50_s"], r["delay_p99_s"], r["delay_max_s"],
            r.get("resume_delay_p50_s"), r.get("resume_delay_p99_s"), r.get("resume_delay_max_s"),
            r["events"], r["blocked_warnings"] if real else None, r["error_count"],
        ))
    print(table(headers, rows))
    print("   start s: from the triggerer's start to every trigger's first poll; event and resumed: from a run's end")
    print("   to its trigger's event, and to its task instance resumed by the triggerer's supervisor")
    for name, r in figures["variants"].items():
        if r.get("supervisor_cpu_pct_steady") is not None and r["cpu_pct_steady"] is not None:
            print(f"   {name}: of its {r['cpu_pct_steady']:.1f} % steady, the supervisor {r['supervisor_cpu_pct_steady']:.1f} % "
                  f"(trigger assignment, database reads and writes), the trigger runner and log server "
                  f"{r['cpu_pct_steady'] - r['supervisor_cpu_pct_steady']:.1f} %")
    for name, value in figures["ratios"].items():
        print(f"   {name}: CPU per poll (steady) {'-' if value is None else f'{value:.2f}x'}")
    for name, r in figures["variants"].items():
        for error in r["errors"]:
            print(f"   {name} error: {error}")
