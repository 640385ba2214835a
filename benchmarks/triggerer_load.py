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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.emulator import EmulatorProcess
from benchmarks.jobs import MUSE_SOFTWARE, SubmittedJob, rescale_run, submit_jobs
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


def run_variant(emulator: EmulatorProcess, case: LoadCase, variant: str, seed: int, workdir: Path) -> dict[str, Any]:
    """Run one variant of one case in its own process and return its figures."""
    spec = {
        "variant": variant,
        "interval": case.interval,
        "muse_url": emulator.muse_url,
        "base_url": emulator.base_url,
        "ca_path": emulator.ca_path,
        "muse_software": MUSE_SOFTWARE,
        "anchor_conn_id": ANCHOR_CONN_ID,
        "pending_seconds": 0.5 * emulator.time_scale,
    }
    tag = f"{case.name}-{variant}".replace(" ", "_").replace("/", "_")
    spec_path, jobs_path, out_path = (workdir / f"{tag}.{suffix}.json" for suffix in ("spec", "jobs", "out"))
    spec_path.write_text(json.dumps(spec))
    env = {
        **os.environ,
        **emulator.conn_env,
        f"AIRFLOW_CONN_{ANCHOR_CONN_ID.upper()}": json.dumps({"conn_type": "http", "host": emulator.base_url}),
        # HttpSensorTrigger verifies TLS with aiohttp's default context: it must trust the emulator's CA.
        "SSL_CERT_FILE": emulator.ca_path or "",
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
    try:
        _wait_ready(read_end, child)
        if variant == "anchor":
            # HttpSensorTrigger fires on the first answer that is not a 404: Muse's state URL answers
            # 200 while the job waits, so the emulator answers 404 there for the anchor's run.
            emulator.set_faults([{"route": MUSE_STATE_GLOB, "action": {"status": 404, "body": "json"}}])
        before = emulator.requests_by_route()
        muse_lengths, rescale_lengths = job_lengths(case, seed)
        jobs = submit_jobs(emulator, muse_lengths, rescale_lengths)
        jobs_path.write_text(json.dumps([job.to_dict() for job in jobs]))
        assert child.stdin is not None
        child.stdin.write(f"go {jobs_path}\n")
        child.stdin.flush()
        timeout = case.lengths[1] + 4 * case.interval + 300
        if child.wait(timeout) != 0:
            raise RuntimeError(f"{tag} failed; see its log: {(workdir / f'{tag}.log').read_text()[-2000:]}")
        after = emulator.requests_by_route()
    finally:
        os.close(read_end)
        if child.poll() is None:
            child.kill()
            child.wait()
        if variant == "anchor":
            emulator.set_faults([])
    figures = json.loads(out_path.read_text())
    figures["gets"] = {
        route: after.get(route, 0) - before.get(route, 0)
        for route in after
        if route.startswith("GET ") and after.get(route, 0) - before.get(route, 0)
    }
    figures["submitted"] = [job.to_dict() for job in jobs]
    figures["ends"] = job_ends(emulator, jobs)
    return summarize(case, figures)


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
    window_start = figures["started_at"] + case.interval / 2 + 2
    window_end = min(job["submitted_at"] + job["length"] for job in figures["submitted"])
    steady = [s for s in samples if window_start <= s[0] <= window_end]
    steady_pct = None
    if len(steady) >= 2 and steady[-1][0] > steady[0][0]:
        steady_pct = 100 * (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0])
    return {
        "variant": figures["variant"],
        "jobs": n,
        "polls": polls,
        "gets": figures["gets"],
        "cpu_seconds": figures["cpu_seconds"],
        "wall_seconds": figures["wall_seconds"],
        "cpu_per_poll_ms": 1000 * figures["cpu_seconds"] / polls if polls else None,
        "cpu_pct_run": 100 * figures["cpu_seconds"] / figures["wall_seconds"],
        "cpu_pct_steady": steady_pct,
        "steady_window_s": (steady[-1][0] - steady[0][0]) if len(steady) >= 2 else 0.0,
        "rss_base_mib": figures["rss_base"] / 2**20,
        "rss_peak_mib": figures["rss_peak"] / 2**20,
        "mem_per_trigger_kib": (figures["rss_peak"] - figures["rss_base"]) / n / 1024 if n else None,
        "connections": figures["connections_opened"],
        "requests_per_job": polls / n if n else None,
        "delay_p50_s": median(delays),
        "delay_p95_s": percentile(delays, 0.95),
        "delay_max_s": max(delays) if delays else None,
        "events": len(figures["events"]),
        "errors": figures["errors"][:5],
        "error_count": len(figures["errors"]),
    }


def run_case(emulator: EmulatorProcess, case: LoadCase, seed: int) -> dict[str, Any]:
    """Run every variant of a case, one after the other; print and return the figures."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hpc-bench-load-") as scratch:
        for variant in case.variants:
            started = time.monotonic()
            results[variant] = run_variant(emulator, case, variant, seed, Path(scratch))
            print(f"   {case.name}: {variant} done in {time.monotonic() - started:.0f}s", flush=True)
    print_case(case, results)
    return {"case": case.__dict__, "variants": results, "ratios": case_ratios(results)}


def case_ratios(results: dict[str, Any]) -> dict[str, Any]:
    """ours/floor and anchor/ours for CPU per poll, memory per trigger and connections."""
    keys = ("cpu_per_poll_ms", "mem_per_trigger_kib", "connections")
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
        "variant", "polls", "CPU ms/poll", "CPU % run", "CPU % steady", "KiB/trigger", "peak RSS MiB",
        "TCP conns", "req/job", "delay p50 s", "delay max s", "errors",
    )
    rows = [
        (
            name, r["polls"], r["cpu_per_poll_ms"], r["cpu_pct_run"], r["cpu_pct_steady"], r["mem_per_trigger_kib"],
            r["rss_peak_mib"], r["connections"], r["requests_per_job"], r["delay_p50_s"], r["delay_max_s"],
            r["error_count"],
        )
        for name, r in results.items()
    ]
    print(table(headers, rows))
    for name, values in case_ratios(results).items():
        print(
            f"   {name}: CPU/poll {_x(values['cpu_per_poll_ms'])}, memory/trigger {_x(values['mem_per_trigger_kib'])}, "
            f"connections {_x(values['connections'])}"
        )
    for name, r in results.items():
        for error in r["errors"]:
            print(f"   {name} error: {error}")


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"
