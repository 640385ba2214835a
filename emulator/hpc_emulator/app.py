"""
The emulator's ASGI application: Muse and Rescale side by side, faults, request counting, admin endpoints.

Middleware order, outermost first: request counting (every request the server receives, faulted
or not, so tests can compare counts with the requests they made), then fault injection, then the
services. Neither applies to the admin endpoints under ``/_emulator/``:

- ``GET  /_emulator/health``                 ``{"status": "ok", "services": {...}}``
- ``GET  /_emulator/counters``               every counter (``Counters.snapshot()``)
- ``GET  /_emulator/faults``                 the fault rules, with how many requests each decided
- ``POST /_emulator/faults``                 replace the fault rules with the JSON list in the body
- ``POST /_emulator/reset``                  forget counters and fault rules (and re-seed faults)
- ``GET  /_emulator/muse/jobs``              the Muse jobs, emulator side (state, pid, folder)
- ``POST /_emulator/muse/cancel/{key}``      cancel a Muse job (the real API cannot)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from hpc_emulator.config import Counters, EmulatorConfig
from hpc_emulator.faults import (
    ADMIN_PREFIX,
    FaultInjector,
    FaultMiddleware,
    FaultRuleError,
    quiet_dropped_answers,
)
from hpc_emulator.muse import MuseEngine, MuseError, create_muse_router, muse_error_response

if TYPE_CHECKING:
    from hpc_emulator.rescale_runs import RescaleEngine

log = logging.getLogger(__name__)

RESCALE_MODULES = (
    "hpc_emulator.rescale",
    "hpc_emulator.rescale_files",
    "hpc_emulator.rescale_models",
    "hpc_emulator.rescale_process",
    "hpc_emulator.rescale_runs",
    "hpc_emulator.rescale_spec",
    "hpc_emulator.rescale_uploads",
)


def create_app(config: EmulatorConfig, counters: Counters | None = None) -> FastAPI:
    """
    Build the emulator's application.

    :param config: what to serve and how.
    :param counters: the counters to fill; a new set when not given (``app.state.counters``).
    """
    counters = counters if counters is not None else Counters()
    engine = MuseEngine(config, counters)
    injector = FaultInjector(config.faults, seed=config.seed, counters=counters)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Serve; on the way out, end every Muse job and its command."""
        yield
        # Stopping: no job command outlives the server.
        await engine.shutdown()

    app = FastAPI(
        title="HPC services emulator (Muse + Rescale)",
        lifespan=lifespan,
        # The real services are strict about the trailing '/': no redirect that would hide a wrong path.
        redirect_slashes=False,
        docs_url=f"{ADMIN_PREFIX}docs",
        redoc_url=None,
        openapi_url=f"{ADMIN_PREFIX}openapi.json",
    )
    app.state.config = config
    app.state.counters = counters
    app.state.muse = engine
    app.state.faults = injector
    app.state.started_at = time.time()
    app.add_exception_handler(MuseError, muse_error_response)
    app.include_router(create_muse_router(engine))
    app.state.rescale_engine = _include_rescale(app, config, counters)
    app.state.rescale = app.state.rescale_engine is not None
    app.include_router(_admin_router(app))
    quiet_dropped_answers()
    # Added last = outermost: counting sees every request, faulted ones included.
    app.add_middleware(FaultMiddleware, injector=injector)
    app.add_middleware(RequestCountingMiddleware, counters=counters)
    return app


def _include_rescale(app: FastAPI, config: EmulatorConfig, counters: Counters) -> RescaleEngine | None:
    """Include the Rescale router when its module is there; return its engine, or ``None``."""
    try:
        from hpc_emulator.rescale import create_rescale_router
        from hpc_emulator.rescale_runs import RescaleEngine
    except ModuleNotFoundError as exc:
        if exc.name not in RESCALE_MODULES:
            raise
        log.warning("Rescale emulator not available (%s is missing): serving Muse only", exc.name)
        return None
    engine = RescaleEngine(config, counters)
    app.include_router(create_rescale_router(config, counters, engine))
    return engine


def close_engines(app: FastAPI, wait: float = 0.0) -> None:
    """
    Refuse new runs and kill every command the emulator started, from any thread.

    The server calls it before it stops serving, so a request waiting on a command ends at once
    and nothing starts afterwards, and again after, as a safety net.

    :param wait: seconds to wait for the Rescale engine's threads to end (they write into the
        data folder, which may be removed next).
    """
    app.state.muse.close()
    engine = app.state.rescale_engine
    if engine is not None:
        engine.close()
        if wait > 0 and not engine.wait_closed(wait):
            log.warning("Rescale emulator threads still running after %.1f s", wait)


class RequestCountingMiddleware:
    """
    Count every request as ``counters.incr("requests", "METHOD /route/template")``.

    The route is found here, before any fault answers, by matching the app's routes: a request a
    fault turns away still counts under its route. A path no route serves counts under itself.
    """

    def __init__(self, app: ASGIApp, counters: Counters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the request, then serve it."""
        if scope["type"] == "http" and not scope["path"].startswith(ADMIN_PREFIX):
            self.counters.incr("requests", f"{scope['method']} {route_template(scope)}")
        await self.app(scope, receive, send)


def route_template(scope: Scope) -> str:
    """Return the path template of the route serving ``scope`` (``/api/.../{key}/``), or its path."""
    app = scope.get("app")
    partial: str | None = None
    for route in getattr(getattr(app, "router", None), "routes", []):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(route.path)
        if match is Match.PARTIAL and partial is None:
            partial = str(route.path)
    return partial or scope["path"]


def _admin_router(app: FastAPI) -> APIRouter:
    """Return the ``/_emulator/`` endpoints that observe and steer the emulator."""
    router = APIRouter(prefix=ADMIN_PREFIX.rstrip("/"))
    state = app.state

    @router.get("/health")
    async def health() -> dict[str, Any]:
        """Say the emulator is up, and which services it serves."""
        return {
            "status": "ok",
            "services": {"muse": True, "rescale": state.rescale},
            "uptime": round(time.time() - state.started_at, 3),
            "time_scale": state.config.time_scale,
        }

    @router.get("/counters")
    async def counters() -> dict[str, dict[str, int]]:
        """Return every counter."""
        return state.counters.snapshot()

    @router.get("/faults")
    async def faults() -> list[dict[str, Any]]:
        """Return the fault rules and their progress."""
        return state.faults.describe()

    @router.post("/faults")
    async def set_faults(request: Request) -> Response:
        """Replace the fault rules with the JSON list in the body."""
        try:
            rules = json.loads(await request.body() or b"[]")
            state.faults.set_rules(rules)
        except (json.JSONDecodeError, FaultRuleError) as exc:
            return JSONResponse({"detail": f"invalid fault rules: {exc}"}, status_code=400)
        return JSONResponse({"rules": len(rules)})

    @router.post("/reset")
    async def reset() -> dict[str, bool]:
        """Forget the counters and the fault rules."""
        state.counters.reset()
        state.faults.reset()
        return {"reset": True}

    @router.get("/muse/jobs")
    async def muse_jobs() -> list[dict[str, Any]]:
        """Return the Muse jobs as the emulator sees them."""
        return [job.describe() for job in state.muse.jobs()]

    @router.post("/muse/cancel/{key}")
    async def muse_cancel(key: str) -> dict[str, Any]:
        """Cancel a Muse job; an ended one keeps its state."""
        job = await state.muse.cancel(key)
        return {"key": job.key, "latest_state": job.state.value, "cr": job.state.cr}

    return router
