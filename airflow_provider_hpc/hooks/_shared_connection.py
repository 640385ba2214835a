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
                # Marked before the await: the hooks going on meanwhile do not register it again.
                # Airflow's ``amask_secret`` registers it in this process before its own await; only
                # the supervisor's copy is a round trip later.
                self.masked.add(secret)
                await amask(secret)


class _LoopReads:
    """
    The reads of one event loop by connection id, and the turn the hooks that waited take.

    A read under way is its task; a finished one, its result. Nothing kept here once the loop is
    idle refers to the loop (a task or a lock would), so a loop that ends is freed with its reads:
    a worker runs one loop per wait.
    """

    def __init__(self) -> None:
        self.reads: dict[str, SharedConnection | asyncio.Task[SharedConnection]] = {}
        self._turn: asyncio.Lock | None = None
        self._waiting = 0

    async def take_turn(self) -> None:
        """Return after one loop iteration holding the turn: the hooks that waited go on one by one."""
        if self._turn is None:
            self._turn = asyncio.Lock()
        turn = self._turn
        self._waiting += 1
        try:
            async with turn:
                await asyncio.sleep(0)
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._turn = None

    def settle(self, conn_id: str, done: asyncio.Task[SharedConnection]) -> None:
        """Keep a finished read's result in place of its task; drop a failed one, so the next hook reads again."""
        if self.reads.get(conn_id) is not done:
            return
        if done.cancelled() or done.exception() is not None:
            del self.reads[conn_id]
        else:
            self.reads[conn_id] = done.result()


_LOOPS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopReads] = weakref.WeakKeyDictionary()


async def read_shared(conn_id: str, aget_connection: Callable[[str], Awaitable[Connection]]) -> SharedConnection:
    """
    Return the running loop's read of ``conn_id``, reading it with ``aget_connection`` when none is fresh.

    Hooks asking while a read is under way wait for that read, then go on one at a time, a loop
    iteration or two apart: hundreds of triggers started while the first read was under way would
    otherwise all build their transports and send their first polls in one iteration, blocking the
    loop for seconds. A hook cancelled while waiting does not cancel the read the others wait for.

    :param conn_id: the Airflow connection id.
    :param aget_connection: reads the connection (a hook's ``aget_connection``).
    """
    loop = asyncio.get_running_loop()
    state = _LOOPS.get(loop)
    if state is None:
        state = _LOOPS.setdefault(loop, _LoopReads())
    entry = state.reads.get(conn_id)
    if isinstance(entry, SharedConnection) and time.monotonic() - entry.read_at <= SHARED_FOR_S:
        return entry
    if not isinstance(entry, asyncio.Task):  # none yet, or too old
        entry = state.reads[conn_id] = loop.create_task(_read(conn_id, aget_connection))
        entry.add_done_callback(lambda done: state.settle(conn_id, done))
    shared = await asyncio.shield(entry)
    await state.take_turn()
    return shared


async def _read(conn_id: str, aget_connection: Callable[[str], Awaitable[Connection]]) -> SharedConnection:
    conn = await aget_connection(conn_id)
    extras = await conn.aextra_dejson() or {}
    return SharedConnection(conn=conn, extras=extras, read_at=time.monotonic())
