"""
Dropped connections: an answer cut in the middle is a retryable error of the family, whether the
answer was a success or an error, on the sync and the async transport.
"""

from __future__ import annotations

import asyncio

import pytest

from hpc_emulator import EmulatorServer
from airflow_provider_hpc.exceptions import RescaleApiError
from airflow_provider_hpc.transport.aio import close_all_sessions
from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.hooks.rescale import RescaleHook

TWO_ATTEMPTS = RetryPolicy(max_attempts=2, initial_wait=0.01, max_wait=0.02)
DROP_EVERY_RUN_READ = [{"route": "GET /api/jobs/*", "probability": 1.0, "action": {"drop": True}}]


@pytest.fixture
def dropping_emulator(emulator_conns: EmulatorServer) -> EmulatorServer:
    """The emulator cutting every answer about runs in the middle."""
    import requests

    answer = requests.post(f"{emulator_conns.base_url}/_emulator/faults", json=DROP_EVERY_RUN_READ, timeout=10)
    answer.raise_for_status()
    return emulator_conns


def test_a_dropped_error_answer_is_a_family_error_sync(dropping_emulator: EmulatorServer) -> None:
    hook = RescaleHook("rescale_default", retry=TWO_ATTEMPTS)
    with pytest.raises(RescaleApiError) as caught:
        hook.get_run("AbCdE", "1")  # unknown job: a 404 whose body is cut
    assert caught.value.retryable


def test_a_dropped_error_answer_is_a_family_error_async(dropping_emulator: EmulatorServer) -> None:
    async def read() -> RescaleApiError:
        hook = RescaleHook("rescale_default", retry=TWO_ATTEMPTS)
        try:
            with pytest.raises(RescaleApiError) as caught:
                await hook.a_get_run("AbCdE", "1")
        finally:
            await close_all_sessions()
        return caught.value

    error = asyncio.run(read())
    assert error.status is None or error.status == 404
    assert dropping_emulator.counters.get("requests", "GET /api/jobs/{job_id}/runs/{run_id}/") == 2
