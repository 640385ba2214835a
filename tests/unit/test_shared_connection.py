"""
The hooks of one event loop (a triggerer's triggers) read each connection once and share it: one
``aget_connection`` and one masking of each secret for thousands of trigger starts, not four
round trips to the triggerer's supervisor per trigger.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.exceptions import AirflowNotFoundException

from airflow_provider_hpc.hooks import _base, _shared_connection
from airflow_provider_hpc.hooks.rescale import RescaleHook

API_KEY = "k" * 24


class Reads:
    """Counts the connection reads and the secrets masked, with the real Airflow calls behind them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[str] = []
        self.masked: list[str] = []
        real_read = RescaleHook.aget_connection.__func__  # type: ignore[attr-defined]

        async def read(cls: type, conn_id: str) -> Any:
            self.reads.append(conn_id)
            await asyncio.sleep(0.01)  # a supervisor's round trip: the other hooks arrive meanwhile
            return await real_read(cls, conn_id)

        async def amask(secret: str | None) -> None:
            self.masked.append(str(secret))

        monkeypatch.setattr(RescaleHook, "aget_connection", classmethod(read))
        monkeypatch.setattr(_base, "amask", amask)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    return Reads(monkeypatch)


@pytest.fixture
def conn_id(set_conn: Callable[..., str]) -> str:
    return set_conn(
        "rescale_shared", conn_type="rescale", host="https://platform.rescale.com", password=API_KEY,
        extra={"read_timeout": 40},
    )


async def _start(hooks: int, conn_id: str) -> list[Any]:
    return await asyncio.gather(*(RescaleHook(conn_id).async_transport() for _ in range(hooks)))


def test_hooks_starting_together_on_one_loop_read_the_connection_once(reads: Reads, conn_id: str) -> None:
    transports = asyncio.run(_start(200, conn_id))

    assert reads.reads == [conn_id]
    assert reads.masked == [API_KEY]
    # Each hook still has the connection's own settings and secrets.
    assert {t.settings.read_timeout for t in transports} == {40.0}
    assert all(API_KEY in t.secrets for t in transports)


def test_hooks_that_waited_for_the_read_go_on_one_per_loop_iteration(reads: Reads, conn_id: str) -> None:
    """Hundreds of triggers woken in one loop iteration would block the loop while they all set up."""

    async def scenario() -> list[int]:
        iteration = 0

        async def count_iterations() -> None:
            nonlocal iteration
            while True:
                iteration += 1
                await asyncio.sleep(0)

        async def start() -> int:
            await RescaleHook(conn_id).async_transport()
            return iteration

        ticker = asyncio.create_task(count_iterations())
        try:
            return await asyncio.gather(*(start() for _ in range(50)))
        finally:
            ticker.cancel()

    went_on_at = asyncio.run(scenario())

    assert reads.reads == [conn_id]
    assert len(set(went_on_at)) == len(went_on_at)


def test_each_event_loop_reads_the_connection_itself(reads: Reads, conn_id: str) -> None:
    asyncio.run(_start(3, conn_id))
    asyncio.run(_start(3, conn_id))

    assert reads.reads == [conn_id, conn_id]
    assert reads.masked == [API_KEY, API_KEY]


def test_a_read_older_than_its_time_is_read_again(
    reads: Reads, conn_id: str, set_conn: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rotated = "r" * 24

    async def scenario() -> tuple[Any, Any, Any]:
        first = await RescaleHook(conn_id).async_transport()
        set_conn(conn_id, conn_type="rescale", host="https://platform.rescale.com", password=rotated)
        within = await RescaleHook(conn_id).async_transport()
        monkeypatch.setattr(_shared_connection, "SHARED_FOR_S", 0.0)
        after = await RescaleHook(conn_id).async_transport()
        return first, within, after

    first, within, after = asyncio.run(scenario())

    assert reads.reads == [conn_id, conn_id]
    assert API_KEY in within.secrets and rotated not in within.secrets
    assert rotated in after.secrets and first.settings.read_timeout == 40.0
    assert after.settings.read_timeout != 40.0  # the new read's extras, not the old ones
    assert reads.masked == [API_KEY, rotated]


def test_a_failed_read_fails_its_waiters_and_is_not_kept(
    reads: Reads, set_conn: Callable[..., str]
) -> None:
    async def scenario() -> list[Any]:
        missing = await asyncio.gather(*(RescaleHook("rescale_later").async_transport() for _ in range(3)),
                                       return_exceptions=True)
        set_conn("rescale_later", conn_type="rescale", host="https://platform.rescale.com", password=API_KEY)
        return [missing, await RescaleHook("rescale_later").async_transport()]

    missing, transport = asyncio.run(scenario())

    assert [type(error) for error in missing] == [AirflowNotFoundException] * 3
    assert reads.reads == ["rescale_later", "rescale_later"]
    assert API_KEY in transport.secrets


def test_a_hook_cancelled_while_waiting_leaves_the_read_to_the_others(reads: Reads, conn_id: str) -> None:
    async def scenario() -> Any:
        first = asyncio.ensure_future(RescaleHook(conn_id).async_transport())
        second = asyncio.ensure_future(RescaleHook(conn_id).async_transport())
        await asyncio.sleep(0)
        first.cancel()
        return await second

    transport = asyncio.run(scenario())

    assert reads.reads == [conn_id]
    assert API_KEY in transport.secrets


def test_a_shared_read_shows_no_secret_in_its_repr() -> None:
    shared = _shared_connection.SharedConnection(
        conn=SimpleNamespace(password=API_KEY), extras={"token": API_KEY}, read_at=1.0, masked={API_KEY},
    )
    assert API_KEY not in repr(shared)


def test_a_loop_that_ended_is_freed_with_its_reads(reads: Reads, conn_id: str) -> None:
    """A worker runs one event loop per wait: each must go, with the connection it read."""

    async def scenario() -> weakref.ref[asyncio.AbstractEventLoop]:
        await _start(3, conn_id)
        return weakref.ref(asyncio.get_running_loop())

    # Airflow's SDK keeps the last loop it ran a thread call for (asgiref's thread-local): the
    # loops before it must be gone.
    ended = [asyncio.run(scenario()) for _ in range(4)]
    gc.collect()

    # Their reads went with them: the reads are kept by loop, weakly.
    assert [loop() is None for loop in ended[:-1]] == [True, True, True]
