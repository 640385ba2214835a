"""
One variant of the triggerer load, alone in its process: ``python -m benchmarks.load_worker``.

The parent starts this process, which imports what its variant needs and says ``ready`` on the
handshake pipe; the parent submits the jobs meanwhile, waits for ``ready`` and sends ``go
JOBS_FILE`` on stdin once every job waits at the gate. From then
on, everything this process spends is the variant's cost: CPU (``time.process_time``), resident
memory (``/proc/self/statm``, sampled from the loop), and TCP connections opened (every
``loop.create_connection`` call, which aiohttp makes for each new connection).

Variants:

- ``ours``: :class:`MuseJobTrigger` / :class:`RescaleRunTrigger`, rebuilt from ``serialize()``
  through JSON as the triggerer does, their ``run()`` generators driven concurrently;
- ``floor``: a bare aiohttp loop, one shared session, the same GETs and JSON parsing, nothing else;
- ``anchor``: Airflow's ``HttpSensorTrigger`` on the same state URLs, rebuilt the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SAMPLE_SECONDS = 0.5
# The emulator's DEMO_API_KEY, written out: importing hpc_emulator (FastAPI, uvicorn) would weigh on the memory measured.
RESCALE_HEADERS = {"Authorization": "Token demo-rescale-api-key"}


def rss_bytes() -> int:
    """Return this process's resident memory now."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def round_trip(trigger: Any) -> Any:
    """Rebuild a trigger from ``serialize()`` through JSON, as the triggerer does from the database."""
    classpath, kwargs = trigger.serialize()
    kwargs = json.loads(json.dumps(kwargs))
    module, name = classpath.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**kwargs)


async def drive(trigger: Any) -> Any:
    """Run a trigger as the triggerer does: take its first event, then close the generator."""
    events = trigger.run()
    try:
        return await events.__anext__()
    finally:
        await events.aclose()


class Probe:
    """CPU, memory, garbage collection and connection figures of this process, sampled from the running loop."""

    def __init__(self) -> None:
        self.connections = 0
        self.gc_seconds = [0.0, 0.0, 0.0]
        self.gc_collections = [0, 0, 0]
        self._gc_started = 0.0
        self.samples: list[tuple[float, float, int]] = []
        self.rss_base = 0
        self.rss_peak = 0

    def count_connections(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count every TCP connection the loop opens (aiohttp opens each through ``create_connection``)."""
        original = loop.create_connection

        async def counting(*args: Any, **kwargs: Any) -> Any:
            self.connections += 1
            return await original(*args, **kwargs)

        loop.create_connection = counting  # type: ignore[method-assign]

    def time_gc(self) -> None:
        """Add up the time the cyclic garbage collector takes (it grows with the objects kept alive)."""

        def callback(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                self._gc_started = time.perf_counter()
            else:
                self.gc_seconds[info["generation"]] += time.perf_counter() - self._gc_started
                self.gc_collections[info["generation"]] += 1

        gc.callbacks.append(callback)

    def sample(self) -> None:
        """Record (epoch seconds, CPU seconds, RSS bytes)."""
        rss = rss_bytes()
        self.rss_peak = max(self.rss_peak, rss)
        self.samples.append((time.time(), time.process_time(), rss))

    async def sample_forever(self) -> None:
        """Sample every :data:`SAMPLE_SECONDS` until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_SECONDS)


# ----- the three variants -------------------------------------------------------------------------

Work = list[tuple[str, Callable[[], Awaitable[str]]]]


async def _nothing() -> None:
    return None


def ours(spec: dict[str, Any], jobs: list[dict[str, Any]]) -> tuple[Work, Callable[[], Awaitable[None]]]:
    """The provider's triggers, one per job, rebuilt from ``serialize()``."""
    from airflow_provider_hpc.transport.aio import close_all_sessions
    from airflow_provider_hpc.triggers.muse import MuseJobTrigger
    from airflow_provider_hpc.triggers.rescale import RescaleRunTrigger

    interval = spec["interval"]
    work: Work = []
    for job in jobs:
        if job["kind"] == "muse":
            trigger = MuseJobTrigger(
                muse_conn_id="muse_default", name=spec["muse_software"], key=job["ident"],
                poll_interval=interval, max_poll_interval=interval,
            )
        else:
            trigger = RescaleRunTrigger(
                job_id=job["ident"], run_id="1", rescale_conn_id="rescale_default",
                poll_interval=interval, max_poll_interval=interval,
            )
        rebuilt = round_trip(trigger)
        work.append((job["ident"], lambda t=rebuilt: _event_status(t)))
    # The triggers release the shared session themselves; this only covers an aborted run.
    return work, close_all_sessions


async def _event_status(trigger: Any) -> str:
    event = await drive(trigger)
    payload = event.payload
    return str(payload.get("status") if isinstance(payload, dict) else payload)


def floor(spec: dict[str, Any], jobs: list[dict[str, Any]]) -> tuple[Work, Callable[[], Awaitable[None]]]:
    """A bare aiohttp loop: one shared session, the same GETs and JSON parsing, nothing else."""
    import ssl

    import aiohttp

    interval = spec["interval"]
    context = ssl.create_default_context(cafile=spec["ca_path"])
    holder: dict[str, aiohttp.ClientSession] = {}

    def session() -> aiohttp.ClientSession:
        if "session" not in holder:
            holder["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        return holder["session"]

    async def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
        async with session().get(url, ssl=context, headers=headers) as response:
            return json.loads(await response.read())

    async def muse(key: str) -> str:
        url = f"{spec['muse_url']}software/muse/state/{spec['muse_software']}/{key}/"
        while True:
            cr = (await get_json(url))["info"]["report"]["cr"]
            if cr != "WAIT":
                return "ok" if cr == "OK" else "nok"
            await asyncio.sleep(interval)

    async def rescale(job_id: str) -> str:
        run_url = f"{spec['base_url']}/api/jobs/{job_id}/runs/1/"
        statuses_url = f"{spec['base_url']}/api/v2/jobs/{job_id}/statuses/"
        while True:
            if (await get_json(run_url, RESCALE_HEADERS)).get("dateCompleted"):
                statuses = (await get_json(statuses_url, RESCALE_HEADERS))["results"]
                if any(s["status"] == "Completed" for s in statuses):
                    return "success"
            await asyncio.sleep(interval)

    async def close() -> None:
        if "session" in holder:
            await holder["session"].close()

    work: Work = [
        (job["ident"], (lambda k=job["ident"]: muse(k)) if job["kind"] == "muse" else (lambda j=job["ident"]: rescale(j)))
        for job in jobs
    ]
    return work, close


def anchor(spec: dict[str, Any], jobs: list[dict[str, Any]]) -> tuple[Work, Callable[[], Awaitable[None]]]:
    """Airflow's HttpSensorTrigger on the same state URLs, rebuilt from ``serialize()``, stopped at the job's end."""
    from airflow.providers.http.triggers.http import HttpSensorTrigger

    work: Work = []
    for job in (j for j in jobs if j["kind"] == "muse"):
        trigger = HttpSensorTrigger(
            endpoint=f"api/software/muse/state/{spec['muse_software']}/{job['ident']}/",
            http_conn_id=spec["anchor_conn_id"], method="GET", poke_interval=spec["interval"],
        )
        stop_at = job["released_at"] + job["length"]
        rebuilt = round_trip(trigger)
        work.append((job["ident"], lambda t=rebuilt, s=stop_at: _until(t, s)))
    return work, _nothing


async def _until(trigger: Any, stop_at: float) -> str:
    """Run the trigger until the job's end: HttpSensorTrigger has no way to see a Muse job end by itself."""
    try:
        await asyncio.wait_for(drive(trigger), timeout=max(0.0, stop_at - time.time()))
    except asyncio.TimeoutError:
        return "stopped at the job's end"
    return "fired"


VARIANTS = {"ours": ours, "floor": floor, "anchor": anchor}


# ----- running --------------------------------------------------------------------------------------


async def run_all(work: Work, close: Callable[[], Awaitable[None]], probe: Probe) -> dict[str, Any]:
    """Run every job's wait concurrently; return each one's event time and status."""
    probe.count_connections(asyncio.get_running_loop())
    events: dict[str, tuple[float, str]] = {}
    errors: list[str] = []

    async def one(ident: str, make: Callable[[], Awaitable[str]]) -> None:
        try:
            status = await make()
        except Exception as exc:  # a figure is only worth something if every wait ended well: report
            errors.append(f"{ident}: {type(exc).__name__}: {exc}"[:300])
            return
        events[ident] = (time.time(), status)

    sampler = asyncio.create_task(probe.sample_forever())
    try:
        await asyncio.gather(*(one(ident, make) for ident, make in work))
    finally:
        sampler.cancel()
        probe.sample()
        await close()
    return {"events": events, "errors": errors}


@contextmanager
def profiled(path: str | None) -> Iterator[None]:
    """
    Profile the block with pyinstrument when asked and installed (``--profile``); write its call tree to ``path``.

    Time in C shows as the built-in call under the Python function that made it.
    """
    if not path:
        yield
        return
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("--profile needs pyinstrument (pip install pyinstrument); not profiling", file=sys.stderr)
        yield
        return
    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    try:
        yield
    finally:
        profiler.stop()
        with open(path, "w") as report:
            report.write(profiler.output_text(unicode=False, color=False))


def main(argv: list[str] | None = None) -> int:
    """Import, say ready, wait for the jobs, run them, write the figures."""
    parser = argparse.ArgumentParser(description="Run one variant of the triggerer load.")
    parser.add_argument("--spec", required=True, help="JSON file: variant, interval, URLs")
    parser.add_argument("--out", required=True, help="where to write the figures (JSON)")
    parser.add_argument("--ready-fd", type=int, required=True, help="pipe to say 'ready' on")
    args = parser.parse_args(argv)
    with open(args.spec) as handle:
        spec = json.load(handle)
    build = VARIANTS[spec["variant"]]
    # Import everything the variant uses before measuring: a running triggerer has it loaded.
    build(spec, [])
    import aiohttp  # noqa: F401

    with os.fdopen(args.ready_fd, "w") as ready:
        ready.write("ready\n")
    command = sys.stdin.readline().split()
    if len(command) != 2 or command[0] != "go":
        return 1
    with open(command[1]) as handle:
        jobs = json.load(handle)

    probe = Probe()
    probe.time_gc()
    probe.rss_base = rss_bytes()
    cpu_start, wall_start, started_at = time.process_time(), time.monotonic(), time.time()
    probe.sample()
    work, close = build(spec, jobs)
    with profiled(spec.get("profile")):
        outcome = asyncio.run(run_all(work, close, probe))
    figures = {
        "variant": spec["variant"],
        "jobs": len(jobs),
        "started_at": started_at,
        "cpu_seconds": time.process_time() - cpu_start,
        "wall_seconds": time.monotonic() - wall_start,
        "rss_base": probe.rss_base,
        "rss_peak": probe.rss_peak,
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "connections_opened": probe.connections,
        "gc_seconds": probe.gc_seconds,
        "gc_collections": probe.gc_collections,
        "samples": probe.samples,
        **outcome,
    }
    with open(args.out, "w") as handle:
        json.dump(figures, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
