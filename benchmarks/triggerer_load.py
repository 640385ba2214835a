"""
Triggerer load: N triggers in one asyncio loop against the emulator over TLS, beside the floor and the anchor.

Each (case, variant) runs alone in a fresh process (:mod:`benchmarks.load_worker`), one after the
other, on the same workload: the same number of jobs with the same random lengths (same seed),
submitted just before the variant starts. The emulator runs in its own process.

Figures per variant:

- CPU per poll: the variant process's CPU seconds (user + system) over the state requests the
  emulator counted while it ran;
- CPU % of one core: CPU seconds over wall seconds, over the whole run and over the steady
  window (every trigger alive, past the first poll round);
- memory per trigger: (peak RSS - RSS before the triggers were built) / N;
- TCP connections opened by the process;
- requests per job, and the delay between a job's end (emulator side) and its event.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.emulator import EmulatorProcess
from benchmarks.jobs import MUSE_SOFTWARE, Gate, SubmittedJob, rescale_run, submit_jobs, wait_all_running
from benchmarks.report import median, percentile, ratio, table

ANCHOR_CONN_ID = "hpc_bench_http"
MUSE_STATE_GLOB = "GET /api/software/muse/state/*"
READY_TIMEOUT = 120.0
REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LoadCase:
    """
    One workload.

    :param name: shown in the tables.
    :param muse_jobs: Muse jobs (``MuseJobTrigger``).
    :param rescale_jobs: one-run Rescale jobs (``RescaleRunTrigger``).
    :param interval: seconds between two polls of one job, the same for every variant.
    :param lengths: the range job lengths are drawn from (seconds, uniform).
    :param variants: which variants run.
    """

    name: str
    muse_jobs: int
    rescale_jobs: int
    interval: float
    lengths: tuple[float, float]
    variants: tuple[str, ...] = ("ours", "floor", "anchor")

    @property
    def size(self) -> int:
        """Jobs in all."""
        return self.muse_jobs + self.rescale_jobs


def job_lengths(case: LoadCase, seed: int) -> tuple[list[float], list[float]]:
    """Return the Muse and Rescale job lengths, the same for every variant of a case."""
    draw = random.Random(seed)
    low, high = case.lengths
    return [draw.uniform(low, high) for _ in range(case.muse_jobs)], [draw.uniform(low, high) for _ in range(case.rescale_jobs)]


def run_variant(
    emulator: EmulatorProcess, case: LoadCase, variant: str, seed: int, workdir: Path, profile_dir: Path | None = None
) -> dict[str, Any]:
    """Run one variant of one case in its own process and return its figures."""
    tag = f"{case.name}-{variant}".replace(" ", "_").replace("/", "_")
    spec = {
        "variant": variant,
        "interval": case.interval,
        "muse_url": emulator.muse_url,
        "base_url": emulator.base_url,
        "ca_path": emulator.ca_path,
        "muse_software": MUSE_SOFTWARE,
        "anchor_conn_id": ANCHOR_CONN_ID,
        "profile": str(profile_dir / f"{tag}.txt") if profile_dir else None,
    }
    spec_path, jobs_path, out_path = (workdir / f"{tag}.{suffix}.json" for suffix in ("spec", "jobs", "out"))
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        **emulator.conn_env,
        f"AIRFLOW_CONN_{ANCHOR_CONN_ID.upper()}": json.dumps({"conn_type": "http", "host": emulator.base_url}),
        # HttpSensorTrigger verifies TLS with aiohttp's default context: it must trust the emulator's CA.
        "SSL_CERT_FILE": emulator.ca_path or "",
        # Every variant logs as a triggerer does by default; the log goes to a file.
        "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    }
    read_end, write_end = os.pipe()
    with open(workdir / f"{tag}.log", "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.load_worker", "--spec", str(spec_path), "--out", str(out_path),
             "--ready-fd", str(write_end)],
            stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, pass_fds=(write_end,), env=env,
            cwd=REPO, text=True,
        )
    os.close(write_end)
    gate = Gate(workdir / f"{tag}.gate")
    polls = PollCounter(emulator)
    try:
        if variant == "anchor":
            # HttpSensorTrigger fires on the first answer that is not a 404: Muse's state URL answers
            # 200 while the job waits, so the emulator answers 404 there for the anchor's run.
            emulator.set_faults([{"route": MUSE_STATE_GLOB, "action": {"status": 404, "body": "json"}}])
        # The jobs are submitted while the worker imports (neither is measured): the worker's
        # figures start at "go", once the jobs wait at the gate.
        muse_lengths, rescale_lengths = job_lengths(case, seed)
        jobs = submit_jobs(emulator, muse_lengths, rescale_lengths, gate=gate)
        wait_all_running(emulator, jobs)
        _wait_ready(read_end, child)
        polls.start()
        released_at = gate.open(len(jobs))
        jobs_path.write_text(json.dumps([{**job.to_dict(), "released_at": released_at} for job in jobs]))
        assert child.stdin is not None
        child.stdin.write(f"go {jobs_path}\n")
        child.stdin.flush()
        time.sleep(1.0)
        gate.close()
        timeout = case.lengths[1] + 4 * case.interval + 300
        if child.wait(timeout) != 0:
            raise RuntimeError(f"{tag} failed; see its log: {(workdir / f'{tag}.log').read_text()[-2000:]}")
    finally:
        polls.stop()
        gate.close()
        os.close(read_end)
        if child.poll() is None:
            child.kill()
            child.wait()
        if variant == "anchor":
            emulator.set_faults([])
    figures = json.loads(out_path.read_text())
    figures["gets"] = polls.delta_by_route()
    figures["poll_samples"] = polls.samples
    figures["released_at"] = released_at
    figures["submitted"] = [job.to_dict() for job in jobs]
    figures["ends"] = job_ends(emulator, jobs)
    return summarize(case, figures)


class PollCounter:
    """
    The GET requests the emulator counted, read once a second while a variant runs.

    The admin endpoint is not counted itself, and the emulator spends the CPU, not the variant.
    """

    def __init__(self, emulator: EmulatorProcess) -> None:
        self.emulator = emulator
        self.samples: list[tuple[float, int]] = []
        self._first: dict[str, int] = {}
        self._last: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> None:
        routes = self.emulator.requests_by_route()
        gets = {route: count for route, count in routes.items() if route.startswith("GET ")}
        if not self._first:
            self._first = gets
        self._last = gets
        self.samples.append((time.time(), sum(gets.values())))

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._read()

    def start(self) -> None:
        """Take the first reading, then one a second."""
        self._read()
        self._thread.start()

    def stop(self) -> None:
        """Stop reading, and take the last reading."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._read()

    def delta_by_route(self) -> dict[str, int]:
        """GET requests per route between the first and the last reading."""
        return {
            route: self._last[route] - self._first.get(route, 0)
            for route in self._last
            if self._last[route] - self._first.get(route, 0)
        }


def _wait_ready(read_end: int, child: subprocess.Popen[str]) -> None:
    import select

    ready, _, _ = select.select([read_end], [], [], READY_TIMEOUT)
    if not ready or os.read(read_end, 64).strip() != b"ready":
        raise RuntimeError(f"The load worker did not start (exit code {child.poll()})")


def job_ends(emulator: EmulatorProcess, jobs: list[SubmittedJob]) -> dict[str, float | None]:
    """Return when each job ended, emulator side (epoch seconds)."""
    from datetime import datetime

    muse = emulator.muse_jobs() if any(job.kind == "muse" for job in jobs) else {}
    ends: dict[str, float | None] = {}
    for job in jobs:
        if job.kind == "muse":
            ends[job.ident] = muse.get(job.ident, {}).get("ended_at")
        else:
            completed = rescale_run(emulator, job.ident).get("dateCompleted")
            ends[job.ident] = datetime.fromisoformat(completed.replace("Z", "+00:00")).timestamp() if completed else None
    return ends


def summarize(case: LoadCase, figures: dict[str, Any]) -> dict[str, Any]:
    """Turn a variant's raw figures into the table's figures."""
    polls = sum(figures["gets"].values())
    n = figures["jobs"]
    delays = [
        figures["events"][ident][0] - end
        for ident, end in figures["ends"].items()
        if end is not None and ident in figures["events"] and figures["variant"] != "anchor"
    ]
    samples = figures["samples"]
    window = (figures["released_at"] + case.interval / 2 + 2, figures["released_at"] + case.lengths[0])
    steady = steady_figures(samples, figures["poll_samples"], window)
    return {
        "variant": figures["variant"],
        "jobs": n,
        "polls": polls,
        "gets": figures["gets"],
        "cpu_seconds": figures["cpu_seconds"],
        "wall_seconds": figures["wall_seconds"],
        "cpu_per_poll_ms": 1000 * figures["cpu_seconds"] / polls if polls else None,
        "cpu_pct_run": 100 * figures["cpu_seconds"] / figures["wall_seconds"],
        "cpu_pct_steady": steady["cpu_pct"],
        "cpu_per_poll_steady_ms": steady["cpu_per_poll_ms"],
        "steady_polls": steady["polls"],
        "steady_window_s": steady["seconds"],
        "rss_base_mib": figures["rss_base"] / 2**20,
        "rss_peak_mib": figures["rss_peak"] / 2**20,
        "mem_per_trigger_kib": (figures["rss_peak"] - figures["rss_base"]) / n / 1024 if n else None,
        "connections": figures["connections_opened"],
        # Seconds and counts of the cyclic garbage collector's runs, per generation (young to full).
        "gc_seconds": figures["gc_seconds"],
        "gc_collections": figures["gc_collections"],
        "gc_seconds_total": sum(figures["gc_seconds"]),
        "requests_per_job": polls / n if n else None,
        "delay_p50_s": median(delays),
        "delay_p95_s": percentile(delays, 0.95),
        "delay_p99_s": percentile(delays, 0.99),
        "delay_max_s": max(delays) if delays else None,
        "events": len(figures["events"]),
        "errors": figures["errors"][:5],
        "error_count": len(figures["errors"]),
        # (seconds since release, CPU seconds, RSS MiB) and (seconds since release, GETs served).
        "timeline": {
            "cpu": [(round(t - figures["released_at"], 2), round(c, 3), round(r / 2**20, 1)) for t, c, r in samples],
            "polls": [(round(t - figures["released_at"], 2), n) for t, n in figures["poll_samples"]],
        },
    }


def _interpolate(samples: list[list[float]] | list[tuple[float, float]], at: float, column: int) -> float | None:
    """Return the value of ``column`` at time ``at``, linearly between the two samples around it."""
    for before, after in zip(samples, samples[1:], strict=False):
        if before[0] <= at <= after[0]:
            if after[0] == before[0]:
                return float(before[column])
            share = (at - before[0]) / (after[0] - before[0])
            return before[column] + share * (after[column] - before[column])
    return None


def steady_figures(
    cpu_samples: list[list[float]], poll_samples: list[list[float]], window: tuple[float, float]
) -> dict[str, Any]:
    """
    CPU per poll and CPU % of one core inside ``window``: every trigger alive, past the first poll round.

    The CPU comes from the variant's own samples, the polls from the emulator's counters, both
    read at the window's edges by linear interpolation.
    """
    start, end = window
    cpu = [_interpolate(cpu_samples, at, 1) for at in window]
    polls = [_interpolate(poll_samples, at, 1) for at in window]
    if end <= start or None in cpu or None in polls:
        return {"cpu_pct": None, "cpu_per_poll_ms": None, "polls": 0, "seconds": 0.0}
    cpu_seconds = cpu[1] - cpu[0]  # type: ignore[operator]
    poll_count = polls[1] - polls[0]  # type: ignore[operator]
    return {
        "cpu_pct": 100 * cpu_seconds / (end - start),
        "cpu_per_poll_ms": 1000 * cpu_seconds / poll_count if poll_count > 0 else None,
        "polls": round(poll_count),
        "seconds": end - start,
    }


def run_case(emulator: EmulatorProcess, case: LoadCase, seed: int, profile_dir: Path | None = None) -> dict[str, Any]:
    """Run every variant of a case, one after the other; print and return the figures."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hpc-bench-load-") as scratch:
        for variant in case.variants:
            started = time.monotonic()
            results[variant] = run_variant(emulator, case, variant, seed, Path(scratch), profile_dir)
            print(f"   {case.name}: {variant} done in {time.monotonic() - started:.0f}s", flush=True)
    print_case(case, results)
    return {"case": case.__dict__, "variants": results, "ratios": case_ratios(results)}


def case_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """ours/floor and anchor/ours for CPU per poll, memory per trigger and connections."""
    keys = ("cpu_per_poll_ms", "cpu_per_poll_steady_ms", "mem_per_trigger_kib", "connections")
    ours, floor, anchor = (results.get(v) for v in ("ours", "floor", "anchor"))
    out: dict[str, Any] = {}
    if ours and floor:
        out["ours/floor"] = {k: ratio(ours[k], floor[k]) for k in keys}
    if ours and anchor:
        out["anchor/ours"] = {k: ratio(anchor[k], ours[k]) for k in keys}
    return out


def print_case(case: LoadCase, results: dict[str, Any]) -> None:
    """Print one case's table and ratios."""
    mix = f"{case.muse_jobs} Muse" + (f" + {case.rescale_jobs} Rescale" if case.rescale_jobs else "")
    print(
        f"\n-- {case.name}: {mix} jobs, poll every {case.interval:g}s, job lengths "
        f"{case.lengths[0]:g}-{case.lengths[1]:g}s (uniform)"
    )
    headers = (
        "variant", "polls", "CPU ms/poll", "steady ms/poll", "CPU % run", "CPU % steady", "GC s", "KiB/trigger",
        "peak RSS MiB", "TCP conns", "req/job", "delay p50 s", "delay max s", "errors",
    )
    rows = [
        (
            name, r["polls"], r["cpu_per_poll_ms"], r["cpu_per_poll_steady_ms"], r["cpu_pct_run"], r["cpu_pct_steady"],
            r["gc_seconds_total"], r["mem_per_trigger_kib"], r["rss_peak_mib"], r["connections"], r["requests_per_job"],
            r["delay_p50_s"], r["delay_max_s"], r["error_count"],
        )
        for name, r in results.items()
    ]
    print(table(headers, rows))
    window = next(iter(results.values()))
    print(f"   steady window: {window['steady_window_s']:.1f}s, every trigger alive, past the first poll round")
    for name, values in case_ratios(results).items():
        print(
            f"   {name}: CPU/poll {_x(values['cpu_per_poll_ms'])} (steady {_x(values['cpu_per_poll_steady_ms'])}), "
            f"memory/trigger {_x(values['mem_per_trigger_kib'])}, connections {_x(values['connections'])}"
        )
    for name, r in results.items():
        for error in r["errors"]:
            print(f"   {name} error: {error}")


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
