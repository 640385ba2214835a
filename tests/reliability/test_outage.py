"""
The service goes away mid-poll and comes back: the triggers' waits ride the outage out within
their retry budget and then deliver the run's real outcome; an outage longer than the budget
ends the wait with a clear ``error`` event, never a hang.

The outage lasts 4 seconds here (a real one may last 30 s or more); the retry settings are scaled
down in proportion, so the test keeps the ratio between outage and budget and stays short.
The emulator keeps running behind a TCP proxy that goes down, so its jobs live on.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from reliability_support import TcpProxy

from hpc_emulator import DEMO_API_KEY, DEMO_PASSWORD, EmulatorConfig, EmulatorServer
from airflow_provider_hpc.transport.aio import close_all_sessions
from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.triggers.muse import MuseJobTrigger
from airflow_provider_hpc.triggers.rescale import RescaleRunTrigger

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 4.0
# One failed poll costs about 0.2 + 0.4 + 0.8 s of transport retries plus the poll interval;
# five tolerated failures in a row cover about 8 s, twice the outage.
RIDING_RETRY = RetryPolicy(max_attempts=3, initial_wait=0.2, max_wait=0.8, max_retry_after=1.0)
RIDING_FAILURES = 5
# A budget of well under a second: the same outage must exhaust it.
SHORT_RETRY = RetryPolicy(max_attempts=2, initial_wait=0.05, max_wait=0.1)


@pytest.fixture
def slow_emulator(tmp_path: Path) -> Iterator[EmulatorServer]:
    """Runs that wait 7 s in the queue: the outage starts and ends while they are still going."""
    config = EmulatorConfig(data_dir=tmp_path / "emulator", time_scale=1.0, pending_seconds=7.0, seed=5)
    with EmulatorServer(config) as server:
        yield server


@pytest.fixture
def proxy(slow_emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    """A proxy in front of the emulator, and connections ``*_outage`` going through it."""
    forwarder = TcpProxy(slow_emulator.port)
    forwarder.up()
    monkeypatch.setenv("AIRFLOW_CONN_MUSE_OUTAGE", json.dumps(
        {"conn_type": "muse", "host": f"{forwarder.url}/api/", "login": "demo", "password": DEMO_PASSWORD}))
    monkeypatch.setenv("AIRFLOW_CONN_RESCALE_OUTAGE", json.dumps(
        {"conn_type": "rescale", "host": forwarder.url, "password": DEMO_API_KEY}))
    yield forwarder
    forwarder.down()


def _start_rescale_job(server: EmulatorServer, command: str) -> str:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {DEMO_API_KEY}"
    body = {"name": "outage", "jobanalyses": [{"command": command}]}
    job_id = session.post(f"{server.rescale_url}/api/v2/jobs/", json=body, timeout=10).json()["id"]
    session.post(f"{server.rescale_url}/api/v2/jobs/{job_id}/submit/", timeout=10).raise_for_status()
    return job_id


def _outage(proxy: TcpProxy, after: float, seconds: float) -> threading.Thread:
    def run() -> None:
        time.sleep(after)
        proxy.down()
        time.sleep(seconds)
        proxy.up()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_both(muse_trigger: MuseJobTrigger, rescale_trigger: RescaleRunTrigger) -> list[dict[str, Any]]:
    async def both() -> list[dict[str, Any]]:
        try:
            return list(await asyncio.wait_for(asyncio.gather(muse_trigger.wait(), rescale_trigger.wait()), timeout=60))
        finally:
            await close_all_sessions()

    return asyncio.run(both())


def _triggers(slow_emulator: EmulatorServer, retry: RetryPolicy, failures: int) -> tuple[MuseJobTrigger, RescaleRunTrigger, str]:
    key = MuseHook("muse_outage").submit("sw_example", cmd="python /add.py 20 22").key
    job_id = _start_rescale_job(slow_emulator, "echo done > out.txt")
    common = {"poll_interval": 0.2, "max_poll_interval": 0.5, "deadline": time.time() + 50,
              "max_poll_failures": failures, "retry": retry.to_dict()}
    muse = MuseJobTrigger(muse_conn_id="muse_outage", name="sw_example", key=key, **common)
    rescale = RescaleRunTrigger(job_id=job_id, run_id="1", rescale_conn_id="rescale_outage", outcome_wait=5, **common)
    return muse, rescale, key


def test_waits_ride_out_an_outage_within_their_retry_budget(slow_emulator: EmulatorServer, proxy: TcpProxy) -> None:
    muse, rescale, key = _triggers(slow_emulator, RIDING_RETRY, RIDING_FAILURES)
    outage = _outage(proxy, after=1.0, seconds=OUTAGE_SECONDS)
    started = time.monotonic()
    muse_event, rescale_event = _wait_both(muse, rescale)
    outage.join(timeout=10)
    assert muse_event["status"] == "ok", muse_event
    assert muse_event["key"] == key
    assert rescale_event["status"] == "success", rescale_event
    # The runs ended after the outage did: the waits really lived through it.
    assert time.monotonic() - started > 1.0 + OUTAGE_SECONDS
    counters = slow_emulator.counters
    assert counters.get("muse_submissions") == 1
    assert sum(counters.snapshot().get("rescale_stops", {}).values()) == 0


def test_an_outage_longer_than_the_budget_ends_the_wait_with_a_clear_error(
    slow_emulator: EmulatorServer, proxy: TcpProxy
) -> None:
    muse, rescale, _ = _triggers(slow_emulator, SHORT_RETRY, 2)
    outage = _outage(proxy, after=0.5, seconds=OUTAGE_SECONDS)
    started = time.monotonic()
    muse_event, rescale_event = _wait_both(muse, rescale)
    took = time.monotonic() - started
    outage.join(timeout=10)
    for event in (muse_event, rescale_event):
        assert event["status"] == "error", event
        assert "in a row" in event["message"], event["message"]
    # Given up during the outage, not after a hang.
    assert took < 0.5 + OUTAGE_SECONDS
    # Giving up on the wait never stops the remote run.
    assert sum(slow_emulator.counters.snapshot().get("rescale_stops", {}).values()) == 0
