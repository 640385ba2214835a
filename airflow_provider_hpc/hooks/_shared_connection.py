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

    # Never in a repr: the connection and its extras hold the secrets.
    conn: Connection = field(repr=False)
    extras: dict[str, Any] = field(repr=False)
    read_at: float
    masked: set[str] = field(default_factory=set, repr=False)

    async def mask(self, secrets: Iterable[str], amask: Callable[[str], Awaitable[None]]) -> None:
        """Register with the masker, through ``amask``, each of ``secrets`` not registered from this read yet."""
        for secret in secrets:
            if secret not in self.masked:
                self.masked.add(secret)
                await amask(secret)


class _LoopReads:
    """The reads of one event loop by connection id (tasks, done or under way), and the turn the waiters take."""

    def __init__(self) -> None:
        self.reads: dict[str, asyncio.Task[SharedConnection]] = {}
        #: Held by one waiter at a time for one loop iteration (see :func:`read_shared`).
        self.turn = asyncio.Lock()


_LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopReads] = weakref.WeakKeyDictionary()


async def read_shared(conn_id: str, aget_connection: Callable[[str], Awaitable[Connection]]) -> SharedConnection:
    """
    Return the running loop's read of ``conn_id``, reading it with ``aget_connection`` when none is fresh.

    Hooks asking while a read is under way wait for that read, then go on one per loop iteration:
    hundreds of triggers started while the first read was under way would otherwise all build
    their transports and send their first polls in one iteration, blocking the loop for seconds. A
    hook cancelled while waiting does not cancel the read the others wait for.

    :param conn_id: the Airflow connection id.
    :param aget_connection: reads the connection (a hook's ``aget_connection``).
    """
    loop = asyncio.get_running_loop()
    state = _LOOPS.get(loop)
    if state is None:
        state = _LOOPS.setdefault(loop, _LoopReads())
    read = state.reads.get(conn_id)
    if read is not None and read.done() and not _stale(read):
        return read.result()
    if read is None or _stale(read):
        read = state.reads[conn_id] = loop.create_task(_read(conn_id, aget_connection))
        read.add_done_callback(lambda done: _forget_failed(state.reads, conn_id, done))
    shared = await asyncio.shield(read)
    async with state.turn:
        await asyncio.sleep(0)
    return shared


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
