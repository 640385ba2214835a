"""
Request economy: state requests per job and delay to the event, default backoff beside a fixed interval.

Time is scaled down by ``scale``: a job of 1 h runs ``3600 * scale`` seconds, every poll interval
is multiplied by ``scale``, and so is the emulator's own queue wait (``--time-scale``). Requests per
job do not depend on the scale; delays are divided by it to be read in real seconds. What does not
scale is the request's own round trip (a few milliseconds here), which stretches the shortest
scaled intervals a little, so the fixed interval makes slightly fewer requests than it would.

Each policy watches its own jobs, of the same planned lengths, all at once. Requests are counted
per job key by wrapping ``MuseHook.a_get_state``, and the total is checked against the emulator's
own count.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import time
from collections import Counter
from typing import Any

from benchmarks.emulator import MUSE_STATE_ROUTE, EmulatorProcess
from benchmarks.jobs import submit_jobs
from benchmarks.report import table

LENGTHS = {"1 min": 60.0, "10 min": 600.0, "1 h": 3600.0}
FIXED_INTERVAL = 5.0


def default_backoff() -> tuple[float, float]:
    """Return MuseJobTrigger's own defaults: (poll_interval, max_poll_interval, the polling loop's)."""
    from airflow_provider_hpc.triggers._polling import PollingTrigger
    from airflow_provider_hpc.triggers.muse import MuseJobTrigger

    own = inspect.signature(MuseJobTrigger.__init__).parameters
    loop = inspect.signature(PollingTrigger.__init__).parameters
    return float(own["poll_interval"].default), float(loop["max_poll_interval"].default)


async def _watch(watched: list[tuple[Any, str, float, float]], scale: float) -> dict[str, tuple[float, int, str]]:
    """Run one trigger per (job, policy intervals); return (event time, state requests, status) by job key."""
    from airflow_provider_hpc.hooks.muse import MuseHook
    from airflow_provider_hpc.triggers.muse import MuseJobTrigger

    counts: Counter[str] = Counter()
    original = MuseHook.a_get_state

    async def counted(hook: MuseHook, name: str, key: str) -> Any:
        counts[key] += 1
        return await original(hook, name, key)

    async def one(job: Any, interval: float, maximum: float) -> tuple[str, float, str]:
        trigger = MuseJobTrigger(
            muse_conn_id="muse_default", name="sw_example", key=job.ident,
            poll_interval=interval * scale, max_poll_interval=maximum * scale,
        )
        events = trigger.run()
        try:
            event = await events.__anext__()
        finally:
            await events.aclose()
        return job.ident, time.time(), event.payload["status"]

    MuseHook.a_get_state = counted  # type: ignore[method-assign]
    try:
        done = await asyncio.gather(*(one(job, interval, maximum) for job, _, interval, maximum in watched))
    finally:
        MuseHook.a_get_state = original  # type: ignore[method-assign]
    return {key: (when, counts[key], status) for key, when, status in done}


def run(emulator: EmulatorProcess, scale: float, jobs_per_length: int, seed: int) -> dict[str, Any]:
    """Measure both policies on jobs of 1 min, 10 min and 1 h (scaled); print and return the figures."""
    os.environ.update(emulator.conn_env)
    interval, maximum = default_backoff()
    policies = {
        f"default backoff {interval:g}s x1.5 up to {maximum:g}s": (interval, maximum),
        f"fixed {FIXED_INTERVAL:g}s": (FIXED_INTERVAL, FIXED_INTERVAL),
    }
    draw = random.Random(seed)
    planned = [(label, length * draw.uniform(0.9, 1.1)) for label, length in LENGTHS.items() for _ in range(jobs_per_length)]
    # The same planned lengths for every policy, each on its own jobs.
    plan = [(label, length, policy) for policy in policies for label, length in planned]
    before = emulator.requests_by_route()
    jobs = submit_jobs(emulator, [length * scale for _, length, _ in plan])
    watched = [(job, policy, *policies[policy]) for job, (_, _, policy) in zip(jobs, plan, strict=True)]
    outcome = asyncio.run(_watch(watched, scale))
    after = emulator.requests_by_route()
    ends = {key: job["ended_at"] for key, job in emulator.muse_jobs().items()}
    counted = sum(requests for _, requests, _ in outcome.values())
    served = after.get(MUSE_STATE_ROUTE, 0) - before.get(MUSE_STATE_ROUTE, 0)
    results: dict[str, Any] = {}
    rows = []
    for label in LENGTHS:
        for policy in policies:
            picked = [
                outcome[job.ident] + (ends[job.ident],)
                for job, (lab, _, pol) in zip(jobs, plan, strict=True)
                if (lab, pol) == (label, policy)
            ]
            requests = [r for _, r, _, _ in picked]
            delays = [(when - end) / scale for when, _, _, end in picked]
            statuses = {status for _, _, status, _ in picked}
            entry = {
                "requests_per_job": sum(requests) / len(requests),
                "requests_max": max(requests),
                "delay_mean_s": sum(delays) / len(delays),
                "delay_max_s": max(delays),
                "statuses": sorted(statuses),
            }
            results[f"{label} / {policy}"] = entry
            rows.append((
                label, policy, entry["requests_per_job"], entry["delay_mean_s"], entry["delay_max_s"],
                ",".join(entry["statuses"]),
            ))
    print(
        f"\n-- request economy: {jobs_per_length} Muse jobs per length (lengths +-10%), time scaled by {scale:g} "
        f"(1 h runs {3600 * scale:.0f}s); delays in real-time seconds"
    )
    print(table(("job", "policy", "state req/job", "mean delay s", "worst delay s", "events"), rows))
    print(f"   state requests counted by the triggers: {counted}; by the emulator: {served}")
    return {"scale": scale, "jobs_per_length": jobs_per_length, "policies": policies, "results": results,
            "requests_counted": counted, "requests_served": served}
