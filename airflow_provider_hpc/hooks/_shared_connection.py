"""
One read of a connection per event loop and connection id, shared by the triggers that use it.

A triggerer runs all its triggers on one event loop. Each trigger's hook used to read its
connection itself: Airflow's ``aget_connection``, then the parse of the extras, then the masking
of each secret, each of them a round trip to the triggerer's supervisor. Ten thousand triggers
starting together meant some forty thousand round trips queued behind one another, for the same
few connections. Here the first hook reads a connection and every other hook of the same loop
waits for that read and shares it, for :data:`SHARED_FOR_S` seconds (a changed password is seen
after that); a read that fails is not kept, so the next hook reads again.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.sdk import Connection

#: How long one read of a connection serves the hooks of an event loop before it is read again.
SHARED_FOR_S = 60.0


@dataclass
class SharedConnection:
    """A connection as read once for an event loop: the connection, its parsed extras, the secrets masked so far."""

    conn: Connection
    extras: dict[str, Any]
    read_at: float
    masked: set[str] = field(default_factory=set)

    async def mask(self, secrets: Iterable[str], amask: Callable[[str], Awaitable[None]]) -> None:
        """Register with the masker, through ``amask``, each of ``secrets`` not registered from this read yet."""
        for secret in secrets:
            if secret not in self.masked:
                self.masked.add(secret)
                await amask(secret)


#: The reads of each event loop by connection id: a task, done or under way, that gives the read.
_READS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Task[SharedConnection]]] = (
    weakref.WeakKeyDictionary()
)


async def read_shared(conn_id: str, aget_connection: Callable[[str], Awaitable[Connection]]) -> SharedConnection:
    """
    Return the running loop's read of ``conn_id``, reading it with ``aget_connection`` when none is fresh.

    Hooks asking while a read is under way wait for that read. A hook cancelled while waiting
    does not cancel the read the others wait for.

    :param conn_id: the Airflow connection id.
    :param aget_connection: reads the connection (a hook's ``aget_connection``).
    """
    loop = asyncio.get_running_loop()
    reads = _READS.get(loop)
    if reads is None:
        reads = _READS.setdefault(loop, {})
    read = reads.get(conn_id)
    if read is None or _stale(read):
        read = reads[conn_id] = loop.create_task(_read(conn_id, aget_connection))
        read.add_done_callback(lambda done: _forget_failed(reads, conn_id, done))
    return await asyncio.shield(read)


def forget_shared(conn_id: str | None = None) -> None:
    """Drop the running loop's reads (of ``conn_id`` only when given), so the next hook reads afresh."""
    reads = _READS.get(asyncio.get_running_loop(), {})
    if conn_id is None:
        reads.clear()
    else:
        reads.pop(conn_id, None)


async def _read(conn_id: str, aget_connection: Callable[[str], Awaitable[Connection]]) -> SharedConnection:
    conn = await aget_connection(conn_id)
    extras = await conn.aextra_dejson() or {}
    return SharedConnection(conn=conn, extras=extras, read_at=time.monotonic())


def _stale(read: asyncio.Task[SharedConnection]) -> bool:
    if not read.done():
        return False
    return read.cancelled() or read.exception() is not None or time.monotonic() - read.result().read_at > SHARED_FOR_S


def _forget_failed(reads: dict[str, asyncio.Task[SharedConnection]], conn_id: str, done: asyncio.Task[Any]) -> None:
    """Drop a failed read at once; its waiters have its error, the next hook reads again."""
    if (done.cancelled() or done.exception() is not None) and reads.get(conn_id) is done:
        del reads[conn_id]
