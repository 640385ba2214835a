"""
Worker cost per watched job: ``MuseJobSensor`` deferred (resumed on a worker, or ended in the
triggerer with ``end_from_trigger``), in ``reschedule`` mode and in ``poke`` mode, on a real
Airflow deployment.

One private deployment (``dev/airflow_stack.py``: API server, scheduler with the
LocalExecutor, triggerer, SQLite, all on 127.0.0.1) serves three DAGs (``dags/bench_worker_cost.py``),
one per mode, each mapping M sensors over M Muse runs of T seconds. The modes run one after the
other; each mode's runs are submitted right before its DAG run, so every mode watches runs of the
same length from their start.

What is measured, per mode, over a window from just before the DAG run is triggered to the moment
every worker is idle again afterwards:

- **worker CPU**: the LocalExecutor worker processes (children of the scheduler, titled
  ``airflow worker -- LocalExecutor: ...``) and everything they run: each worker is the task's
  supervisor and forks the task process. Counted with ``user + system + children_user +
  children_system`` of every process of the workers' subtrees, so reaped task processes are in it.
  Idle workers block on a queue; their idle CPU is measured too (see below) and subtracted.
- **worker-slot seconds**: the time worker processes are busy with a workload (their title is not
  ``<idle>``), sampled every 0.1 s. A LocalExecutor slot is one worker process, held from the
  moment it takes the workload until the supervisor has reported the end, which is what a slot
  costs. The metadata database cannot give this: a deferred task's first run ends without an end
  date of its own, and ``task_instance`` dates span the whole wait.
- **task-process starts**: distinct task processes (children of the workers) seen by the same
  sampling: tries + reschedules + resumes. ``task_reschedule`` rows are counted beside it.
- **triggerer, scheduler and API server CPU**: the same accounting on each service's process tree,
  over the same window, so the cost the deferred mode moves elsewhere stays visible.

Idle rates: after the last mode, the whole deployment is measured for ``IDLE_WINDOW`` seconds
with nothing to run; each component's idle rate times the window is subtracted from its figure
("above idle"). The scheduler and triggerer heartbeat every second in this deployment, so their
idle cost is not negligible; the workers' is about zero.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from benchmarks.deployment import bench_deployment
from benchmarks.emulator import EmulatorProcess
from benchmarks.jobs import submit_jobs
from benchmarks.report import ratio, table

DAG_FILE = Path(__file__).with_name("dags") / "bench_worker_cost.py"
PLAN_NAME = "bench_worker_cost.json"
MODES = ("deferrable", "end_from_trigger", "reschedule", "poke")
#: The deferred modes the others are compared with.
DEFERRED_MODES = ("deferrable", "end_from_trigger")
COMPONENTS = ("workers", "triggerer", "scheduler", "api")
WORKER_TITLE = "airflow worker -- LocalExecutor"
IDLE_TITLE = "<idle>"
SAMPLE_INTERVAL = 0.1
IDLE_WINDOW = 5.0
# The warm-up run's Muse runs: long enough for the sensors to defer (their first check comes a few
# seconds after the trigger), short enough to end at the trigger's second poll.
WARMUP_LENGTH = 8.0
# Longest wait for the workers to go idle once a DAG run has ended (the supervisors report last).
QUIET_TIMEOUT = 60.0


# ----- reading process trees (pure accounting below is unit-tested) ------------------------------


@dataclass(frozen=True)
class ProcSample:
    """
    One process at one moment.

    :param pid: its id.
    :param ppid: its parent's id.
    :param title: its command line as shown by ``ps`` (``setproctitle`` titles included).
    :param cpu: its own user + system CPU seconds.
    :param children_cpu: children_user + children_system: the CPU of descendants it has reaped.
    """

    pid: int
    ppid: int
    title: str
    cpu: float
    children_cpu: float


def read_tree(root: int) -> dict[int, ProcSample]:
    """Read the process ``root`` and all its descendants; empty if ``root`` is gone."""
    try:
        top = psutil.Process(root)
        processes = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    samples = {}
    for process in processes:
        try:
            with process.oneshot():
                times = process.cpu_times()
                try:
                    title = " ".join(process.cmdline())
                except psutil.ZombieProcess:  # exited, not yet reaped: its times are still readable
                    title = process.name()
                samples[process.pid] = ProcSample(
                    process.pid, process.ppid(), title, times.user + times.system,
                    times.children_user + times.children_system,
                )
        except psutil.NoSuchProcess:
            # Gone between the listing and the read: reaped, so its CPU is in its parent's children_cpu.
            continue
    return samples


def subtree(samples: Mapping[int, ProcSample], roots: Iterable[int]) -> set[int]:
    """Return the ids of ``roots`` and of all their descendants present in ``samples``."""
    children: dict[int, list[int]] = defaultdict(list)
    for sample in samples.values():
        children[sample.ppid].append(sample.pid)
    found: set[int] = set()
    pending = [pid for pid in roots if pid in samples]
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending.extend(children[pid])
    return found


def cpu_seconds(samples: Mapping[int, ProcSample], pids: Iterable[int]) -> float:
    """
    Return the CPU of these processes and of the descendants they reaped.

    A descendant still alive must be in ``pids`` too (its own ``cpu`` counts); once reaped, its
    whole CPU is in its parent's ``children_cpu``, so the sum moves from one to the other without
    counting anything twice.
    """
    return sum(samples[pid].cpu + samples[pid].children_cpu for pid in pids)


def workers_of(samples: Mapping[int, ProcSample], scheduler_pid: int) -> list[int]:
    """Return the LocalExecutor worker processes: the scheduler's children titled as such."""
    return sorted(s.pid for s in samples.values() if s.ppid == scheduler_pid and s.title.startswith(WORKER_TITLE))


def split_scheduler_tree(samples: Mapping[int, ProcSample], scheduler_pid: int) -> dict[str, float]:
    """Return the CPU of the workers' subtrees and of the rest of the scheduler's tree."""
    workers = subtree(samples, workers_of(samples, scheduler_pid))
    rest = set(samples) - workers
    return {"workers": cpu_seconds(samples, workers), "scheduler": cpu_seconds(samples, rest)}


def busy_seconds(timeline: Sequence[tuple[float, int]]) -> float:
    """
    Integrate busy workers over time: each sample's count holds until the next sample.

    :param timeline: (monotonic time, workers busy at that time), in time order.
    """
    return sum((later[0] - earlier[0]) * earlier[1] for earlier, later in zip(timeline, timeline[1:]))


# ----- sampling the deployment -------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    # /proc/PID/task/PID/children lists the children of the main thread, which is where the
    # supervisor forks; it saves a scan of every process on the machine ten times a second.
    text = _read(f"/proc/{pid}/task/{pid}/children")
    if text:
        return [int(child) for child in text.split()]
    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def _start_ticks(pid: int) -> str:
    stat = _read(f"/proc/{pid}/stat")
    return stat.rsplit(")", 1)[-1].split()[19] if stat else ""


class SlotSampler:
    """
    Sample the workers every ``SAMPLE_INTERVAL`` in a thread: how many are busy, which task processes run.

    :param workers: the worker process ids (fixed for the deployment's life: LocalExecutor forks
        them all at start and keeps them).
    """

    def __init__(self, workers: Sequence[int]) -> None:
        self.workers = list(workers)
        self.timeline: list[tuple[float, int]] = []
        self.task_processes: set[tuple[int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slot-sampler", daemon=True)

    def sample(self) -> int:
        """Take one sample; return how many workers are busy."""
        busy = 0
        for worker in self.workers:
            title = _read(f"/proc/{worker}/cmdline")
            if title and IDLE_TITLE not in title:
                busy += 1
            for child in _children(worker):
                # (pid, start time): a pid reused by a later task process is another process.
                self.task_processes.add((child, _start_ticks(child)))
        self.timeline.append((time.monotonic(), busy))
        return busy

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL):
            self.sample()

    def start(self) -> SlotSampler:
        """Take a first sample and start the thread."""
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and take a last sample."""
        self._stop.set()
        self._thread.join()
        self.sample()

    def quiet(self) -> bool:
        """Whether every worker is idle and no task process is alive (zombies are done working)."""
        if self.sample():
            return False
        return all(_read(f"/proc/{child}/stat").rsplit(")", 1)[-1].split()[:1] in (["Z"], [])
                   for worker in self.workers for child in _children(worker))


@dataclass
class Deployment:
    """The process ids of a running deployment's services, and its LocalExecutor workers."""

    scheduler: int
    triggerer: int
    api: int
    workers: list[int] = field(default_factory=list)

    def cpu(self) -> dict[str, float]:
        """Return the CPU seconds used so far by each component (workers, triggerer, scheduler, api)."""
        scheduler = read_tree(self.scheduler)
        figures = split_scheduler_tree(scheduler, self.scheduler)
        present = set(workers_of(scheduler, self.scheduler))
        if present != set(self.workers):
            # A worker that died took its CPU with it (into the scheduler's children_cpu).
            raise RuntimeError(f"LocalExecutor workers changed during the benchmark: {self.workers} -> {sorted(present)}")
        for name, pid in (("triggerer", self.triggerer), ("api", self.api)):
            tree = read_tree(pid)
            figures[name] = cpu_seconds(tree, tree)
        return figures


def _delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in before}


# ----- the benchmark -----------------------------------------------------------------------------


def _run_mode(stack: Any, deployment: Deployment, emulator: EmulatorProcess, mode: str,
              jobs: int, length: float) -> dict[str, Any]:
    """Submit the runs, trigger one mode's DAG, wait for it, check it; return the raw figures."""
    dag_id = f"bench_worker_{mode}"
    keys = [job.ident for job in submit_jobs(emulator, [length] * jobs)]
    before = deployment.cpu()
    sampler = SlotSampler(deployment.workers).start()
    started = time.monotonic()
    try:
        run_id = stack.trigger(dag_id, {"keys": keys})
        state = stack.wait_run_finished(dag_id, run_id, timeout=length + 120 + jobs * 10)
        finished = time.monotonic()
        deadline = finished + QUIET_TIMEOUT
        while not sampler.quiet():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{mode}: workers still busy {QUIET_TIMEOUT:.0f}s after the DAG run ended")
            time.sleep(SAMPLE_INTERVAL)
    finally:
        sampler.stop()
    after = deployment.cpu()
    window = time.monotonic() - started
    rows = stack.query(
        "SELECT map_index, state, try_number FROM task_instance WHERE dag_id = ? AND run_id = ?", dag_id, run_id
    )
    failed = [(index, task_state) for index, task_state, _ in rows if task_state != "success"]
    if state != "success" or len(rows) != jobs or failed:
        raise RuntimeError(
            f"{mode}: the DAG run ended {state}, {len(rows)} sensor tasks of {jobs}, not success: {failed}\n"
            f"--- scheduler ---\n{stack.log_tail('scheduler')}\n--- triggerer ---\n{stack.log_tail('triggerer')}"
        )
    reschedules = stack.query(
        "SELECT COUNT(*) FROM task_reschedule tr JOIN task_instance ti ON tr.ti_id = ti.id "
        "WHERE ti.dag_id = ? AND ti.run_id = ?", dag_id, run_id,
    )[0][0]
    return {
        "mode": mode,
        "window_s": window,
        "dag_run_s": finished - started,
        "cpu_s": _delta(before, after),
        "slot_s": busy_seconds(sampler.timeline),
        "task_starts": len(sampler.task_processes),
        "tries": sum(try_number for _, _, try_number in rows),
        "task_reschedule_rows": reschedules,
        "samples": len(sampler.timeline),
    }


def _idle_rates(deployment: Deployment) -> dict[str, float]:
    """Measure every component's CPU rate (CPU s per s) with nothing to run."""
    before, started = deployment.cpu(), time.monotonic()
    time.sleep(IDLE_WINDOW)
    after, elapsed = deployment.cpu(), time.monotonic() - started
    return {name: value / elapsed for name, value in _delta(before, after).items()}


def summarise(raw: Mapping[str, Mapping[str, Any]], idle: Mapping[str, float], jobs: int) -> dict[str, Any]:
    """Return the per-job figures of every mode (idle cost subtracted) and the ratios to the deferred mode."""
    per_mode: dict[str, Any] = {}
    for mode, figures in raw.items():
        above = {name: figures["cpu_s"][name] - idle[name] * figures["window_s"] for name in COMPONENTS}
        per_mode[mode] = {
            "worker_cpu_s_per_job": above["workers"] / jobs,
            "worker_cpu_s_per_start": above["workers"] / max(1, figures["task_starts"]),
            "slot_s_per_job": figures["slot_s"] / jobs,
            "task_starts_per_job": figures["task_starts"] / jobs,
            "reschedules_per_job": figures["task_reschedule_rows"] / jobs,
            "triggerer_cpu_s_per_job": above["triggerer"] / jobs,
            "scheduler_api_cpu_s_per_job": (above["scheduler"] + above["api"]) / jobs,
            "total_cpu_s_per_job": sum(above.values()) / jobs,
            "triggerer_cpu_s_window": figures["cpu_s"]["triggerer"],
            "dag_run_s": figures["dag_run_s"],
            "window_s": figures["window_s"],
        }
    ratios = {}
    for deferred in DEFERRED_MODES:
        base = per_mode.get(deferred)
        for mode in ("reschedule", "poke"):
            if base and mode in per_mode:
                ratios[f"{mode}/{deferred}"] = {
                    key: ratio(per_mode[mode][key], base[key])
                    for key in ("worker_cpu_s_per_job", "slot_s_per_job", "total_cpu_s_per_job")
                }
    return {"per_mode": per_mode, "ratios": ratios}


def run(emulator: EmulatorProcess, jobs: int, length: float, poke_interval: float,
        modes: Sequence[str] = MODES) -> dict[str, Any]:
    """Run ``modes`` (each of :data:`MODES`) on one deployment, one after the other; print and return the figures."""
    needed = (*DEFERRED_MODES, "reschedule")  # what target 5 compares
    if len(set(modes)) != len(modes) or not set(needed) <= set(modes) <= set(MODES):
        raise ValueError(f"modes must hold {needed}, each once, and only modes of {MODES}: {list(modes)}")
    raw: dict[str, Any] = {}
    warmup: dict[str, Any] = {}
    startup = time.monotonic()
    # One slot per sensor: in poke mode every sensor holds its slot for the whole job.
    env = {**emulator.conn_env, "AIRFLOW__CORE__PARALLELISM": str(jobs)}
    with bench_deployment("worker-cost-airflow", DAG_FILE, env) as stack:
        plan = {"jobs": jobs, "poke_interval": poke_interval, "timeout": length * 4 + 300}
        (stack.dags_folder / PLAN_NAME).write_text(json.dumps(plan))
        stack.start()
        deployment = Deployment(
            stack.processes["scheduler"].pid, stack.processes["triggerer"].pid, stack.processes["api-server"].pid
        )
        deployment.workers = workers_of(read_tree(deployment.scheduler), deployment.scheduler)
        if len(deployment.workers) != jobs:
            raise RuntimeError(f"expected {jobs} LocalExecutor workers, found {deployment.workers}")
        startup = time.monotonic() - startup
        print(f"   deployment up in {startup:.0f}s ({jobs} LocalExecutor workers)", flush=True)
        # Not measured: the first workloads import the supervisor's and the API server's code
        # paths, and the first trigger the provider in the triggerer. A deployment that has run
        # anything has paid that once; whichever mode ran first would otherwise pay it here.
        warmup = _run_mode(stack, deployment, emulator, "deferrable", jobs, WARMUP_LENGTH)
        print(f"   warm-up (deferrable, runs of {WARMUP_LENGTH:g}s, not counted): DAG run {warmup['dag_run_s']:.0f}s",
              flush=True)
        for mode in modes:
            raw[mode] = _run_mode(stack, deployment, emulator, mode, jobs, length)
            print(f"   {mode}: DAG run {raw[mode]['dag_run_s']:.0f}s, {raw[mode]['task_starts']} task processes", flush=True)
        idle = _idle_rates(deployment)
    summary = summarise(raw, idle, jobs)
    _print(summary, idle, jobs, length, poke_interval)
    return {"jobs": jobs, "length_s": length, "poke_interval_s": poke_interval, "startup_s": startup,
            "idle_cpu_rate": idle, "warmup": warmup, "raw": raw, **summary}


def _print(summary: Mapping[str, Any], idle: Mapping[str, float], jobs: int, length: float, poke_interval: float) -> None:
    per_mode = summary["per_mode"]
    print(
        f"\n-- {jobs} MuseJobSensor tasks (mapped) watching {jobs} Muse runs of {length:g}s each, poke_interval "
        f"{poke_interval:g}s in every mode (deferred: trigger polls every {poke_interval:g}s, no backoff); "
        f"CPU above each component's idle rate, per job"
    )
    rows = [
        (mode, f["dag_run_s"], f["task_starts_per_job"], f["reschedules_per_job"], f["slot_s_per_job"],
         f["worker_cpu_s_per_job"], f["worker_cpu_s_per_start"], f["triggerer_cpu_s_per_job"],
         f["scheduler_api_cpu_s_per_job"], f["total_cpu_s_per_job"])
        for mode, f in per_mode.items()
    ]
    print(table(("mode", "DAG run s", "task starts/job", "reschedules/job", "slot-s/job", "worker CPU s/job",
                 "worker CPU s/start", "triggerer CPU s/job", "sched+API CPU s/job", "total CPU s/job"), rows))
    left_out = [mode for mode in MODES if mode not in per_mode]
    if left_out:
        print(f"   not run in this mode: {', '.join(left_out)} (python -m benchmarks --full runs every mode)")
    print("   idle rates (CPU s per s, subtracted above): "
          + ", ".join(f"{name} {rate:.3f}" for name, rate in idle.items()))
    for name, values in summary["ratios"].items():
        print(f"   {name}: worker CPU {_x(values['worker_cpu_s_per_job'])}, worker-slot seconds "
              f"{_x(values['slot_s_per_job'])}, total deployment CPU {_x(values['total_cpu_s_per_job'])}")


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}x"
