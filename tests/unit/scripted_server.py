"""
A tiny aiohttp server on 127.0.0.1 and a free port, answering scripted replies: the async transport's
ground in unit tests (no network beyond loopback, no real service).

Each route answers its replies in turn, the last one forever. A reply is a dict (``status``,
``json``, ``text``, ``body``, ``headers``), ``RESET`` (the connection is dropped before any answer)
or ``HANG`` (no answer until the server stops, so the client's read timeout fires).
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

RESET = "reset"
HANG = "hang"


@dataclass
class Recorded:
    """One request the server received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class ScriptedServer:
    """Serve scripted replies per ``(method, path)``; record every request."""

    replies: dict[tuple[str, str], list[Any]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    served: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    url: str = ""
    _runner: web.AppRunner | None = None
    _release: asyncio.Event | None = None

    def script(self, method: str, path: str, *replies: Any) -> None:
        """Answer ``method path`` with ``replies`` in turn (the last one forever)."""
        self.replies[(method.upper(), path)] = list(replies)

    def calls(self, method: str, path: str) -> int:
        """How many requests ``method path`` received."""
        return self.served[(method.upper(), path)]

    async def start(self) -> ScriptedServer:
        """Listen on 127.0.0.1 and a free port; ``url`` is then ``http://127.0.0.1:PORT/``."""
        self._release = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/"
        return self

    async def close(self) -> None:
        """Release hanging handlers and stop listening."""
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        key = (request.method, request.path)
        body = await request.read()
        self.requests.append(Recorded(request.method, request.path, dict(request.query), dict(request.headers), body))
        replies = self.replies.get(key)
        if not replies:
            return web.json_response({"detail": "Not found."}, status=404)
        reply = replies[min(self.served[key], len(replies) - 1)]
        self.served[key] += 1
        if reply == RESET:
            assert request.transport is not None
            request.transport.abort()  # the client sees the connection dropped mid-exchange
            return web.Response()
        if reply == HANG:
            assert self._release is not None
            await self._release.wait()
            return web.Response(status=204)
        headers = dict(reply.get("headers", {}))
        if "json" in reply:
            return web.Response(
                status=reply.get("status", 200), text=json.dumps(reply["json"]), content_type="application/json", headers=headers
            )
        if "text" in reply:
            return web.Response(status=reply.get("status", 200), text=reply["text"], content_type=reply.get("content_type", "text/html"), headers=headers)
        return web.Response(status=reply.get("status", 200), body=reply.get("body", b""), headers=headers)
