"""
The Rescale side of the emulator: the jobs and runs API over HTTP, as ``shared/api/rescale`` shows it.

Every path exists under ``/api/`` (v1) and ``/api/v2/``. Answers follow Django REST Framework's
conventions, as the real service does: errors are ``{"detail": ...}`` (plus DRF's field errors
for a refused body field), lists are paginated with ``page`` / ``page_size`` and ``count`` /
``next`` / ``previous`` / ``results``. The engine that executes the runs is in
``rescale_runs.py``, job bodies are checked in ``rescale_spec.py``, uploads received in
``rescale_uploads.py``; the protocol is described in ``docs/emulator.md``.
"""

from __future__ import annotations

import hmac
import json
import math
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from hpc_emulator.config import Counters, EmulatorConfig
from hpc_emulator.pages import rescale_job_page
from hpc_emulator.rescale_files import CHUNK, describe_file_type, tail_lines
from hpc_emulator.rescale_models import EngineError, Job, OutputFile, Run
from hpc_emulator.rescale_runs import RescaleEngine
from hpc_emulator.rescale_spec import FieldError, parse_job_spec
from hpc_emulator.rescale_uploads import receive_upload, store_upload

DEFAULT_PAGE_SIZE = 25
MAX_PAGE_SIZE = 1000
MAX_BODY_BYTES = 8 * 1024 * 1024
NOT_FOUND = "Not found."


def create_rescale_router(
    config: EmulatorConfig, counters: Counters, engine: RescaleEngine | None = None
) -> APIRouter:
    """
    Build the router serving the Rescale API under ``/api/`` and ``/api/v2/``, and a job's page under ``/jobs/``.

    :param config: the emulator settings; ``rescale_api_keys`` and ``rescale_max_upload_bytes``
        are read on every request.
    :param counters: where submissions (``rescale_jobs_submitted``) and stops (``rescale_stops``)
        are counted.
    :param engine: the engine to serve; a new one when not given. The server passes its own, so
        it can stop every run even when the router's lifespan does not get to run.
    """
    engine = engine if engine is not None else RescaleEngine(config, counters)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        """Serve; on the way out, kill every run still running."""
        # No run process may outlive the server.
        try:
            yield
        finally:
            engine.close()

    api = APIRouter(dependencies=[Depends(_authenticator(config))])
    _add_job_routes(api, engine)
    _add_run_routes(api, engine)
    _add_live_routes(api, engine)
    _add_file_routes(api, engine)
    _add_upload_routes(api, engine, config)
    router = APIRouter(lifespan=lifespan)
    router.include_router(api, prefix="/api")
    router.include_router(api, prefix="/api/v2")
    _add_job_page(router, engine)
    return router


def _add_job_page(router: APIRouter, engine: RescaleEngine) -> None:
    """Serve the job's page that the provider's "Rescale job" link opens (``{platform}/jobs/{job_id}/``)."""

    @router.get("/jobs/{job_id}/", response_class=HTMLResponse)
    def job_page(job_id: str) -> HTMLResponse:
        """Show the job's name, status history and runs to a person (no API key: a browser sends none)."""
        job = _job_or_404(engine, job_id)
        job_json, statuses, runs = engine.read(
            lambda: (job.to_json(), [s.to_json() for s in engine.statuses(job)], [r.to_json() for r in job.runs])
        )
        return HTMLResponse(rescale_job_page(job_json, statuses, runs))


# -- authentication and plumbing ------------------------------------------------------------------


def _authenticator(config: EmulatorConfig) -> Callable[[Request], None]:
    """Return a dependency checking ``Authorization: Token <key>`` with DRF's messages."""

    def authenticate(request: Request) -> None:
        """Let the request through, or answer 401 saying what is wrong with its header."""
        parts = request.headers.get("authorization", "").split()
        if not parts or parts[0].lower() != "token":
            _unauthorized("Authentication credentials were not provided.")
        if len(parts) == 1:
            _unauthorized("Invalid token header. No credentials provided.")
        if len(parts) > 2:
            _unauthorized("Invalid token header. Token string should not contain spaces.")
        # compare_digest on every key: the time taken says nothing about how close a guess was.
        given = parts[1].encode()
        if not any(hmac.compare_digest(given, key.encode()) for key in config.rescale_api_keys):
            _unauthorized("Invalid token.")

    return authenticate


def _unauthorized(detail: str) -> NoReturn:
    raise HTTPException(401, detail, headers={"WWW-Authenticate": "Token"})


def _refusal(exc: EngineError) -> JSONResponse:
    """Answer a refusal: ``{"detail"}``, with DRF's field errors when a body field is at fault."""
    body = exc.to_json() if isinstance(exc, FieldError) else {"detail": str(exc)}
    return JSONResponse(body, status_code=exc.status_code)


@contextmanager
def _http_errors() -> Iterator[None]:
    """Turn an engine refusal into its HTTP answer."""
    try:
        yield
    except EngineError as exc:
        raise HTTPException(exc.status_code, str(exc)) from exc


def _job_or_404(engine: RescaleEngine, job_id: str) -> Job:
    job = engine.job(job_id)
    if job is None:
        raise HTTPException(404, NOT_FOUND)
    return job


def _run_or_404(engine: RescaleEngine, job_id: str, run_id: str) -> Run:
    run = engine.run(job_id, run_id)
    if run is None:
        raise HTTPException(404, NOT_FOUND)
    return run


def paginate(
    request: Request,
    items: Sequence[Any],
    render: Callable[[Any], dict[str, Any]],
    keep: Sequence[str] = (),
) -> dict[str, Any]:
    """
    Return one page of ``items`` as DRF's ``PageNumberPagination`` does.

    ``page`` counts from 1; ``page_size`` defaults to 25 (at most 1000; an invalid one falls back
    to the default); a page past the end answers 404 ``Invalid page.``. Like the real service, the
    ``next`` and ``previous`` URLs keep only ``page`` (and the filters named in ``keep``): a client
    must carry ``page_size`` over. Only the items of the page are rendered, so long lists stay fast.
    """
    size = _page_size(request.query_params.get("page_size"))
    pages = max(1, math.ceil(len(items) / size))
    page = _page_number(request.query_params.get("page", "1"), pages)
    start = (page - 1) * size
    return {
        "count": len(items),
        "next": _page_url(request, page + 1, keep) if page < pages else None,
        "previous": _page_url(request, page - 1, keep) if page > 1 else None,
        "results": [render(item) for item in items[start : start + size]],
    }


def _page_size(raw: str | None) -> int:
    try:
        size = int(raw) if raw is not None else DEFAULT_PAGE_SIZE
    except ValueError:
        return DEFAULT_PAGE_SIZE
    return min(size, MAX_PAGE_SIZE) if size > 0 else DEFAULT_PAGE_SIZE


def _page_number(raw: str, pages: int) -> int:
    try:
        page = int(raw)
    except ValueError:
        page = 0
    if not 1 <= page <= pages:
        raise HTTPException(404, "Invalid page.")
    return page


def _page_url(request: Request, page: int, keep: Sequence[str]) -> str:
    # DRF drops ``page`` for the first page; every other query parameter is dropped too, but for
    # the list's filters (a next page of a search is a page of the same search).
    query = [(name, value) for name, value in request.query_params.multi_items() if name in keep]
    if page > 1:
        query.append(("page", str(page)))
    return str(request.url.replace(query=urlencode(query)))


# -- routes ---------------------------------------------------------------------------------------


def _add_job_routes(api: APIRouter, engine: RescaleEngine) -> None:
    """List, create, get, submit, stop a job; read its statuses."""

    @api.get("/jobs/")
    def list_jobs(request: Request) -> dict[str, Any]:
        """Return the jobs, newest first, paginated; ``search`` keeps those whose name holds it."""
        jobs = engine.jobs(request.query_params.get("search"))
        return engine.read(lambda: paginate(request, jobs, Job.summary_json, keep=("search",)))

    @api.post("/jobs/", status_code=201)
    async def create_job(request: Request) -> JSONResponse:
        """Create a job without starting it."""
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, "Request body too large.")
        try:
            payload = json.loads(body or b"null")
        except ValueError as exc:
            raise HTTPException(400, f"JSON parse error - {exc}") from exc
        try:
            spec = parse_job_spec(payload, engine.input_file)
        except EngineError as exc:
            return _refusal(exc)
        job = await run_in_threadpool(engine.create_job, spec)
        return JSONResponse(engine.read(job.to_json), status_code=201)

    @api.get("/jobs/{job_id}/")
    def get_job(job_id: str) -> dict[str, Any]:
        """Return a job."""
        return engine.read(_job_or_404(engine, job_id).to_json)

    @api.post("/jobs/{job_id}/submit/")
    def submit_job(job_id: str) -> dict[str, Any]:
        """Start a created job; a second submit is refused with 400."""
        with _http_errors():
            engine.submit(_job_or_404(engine, job_id))
        return {}

    @api.post("/jobs/{job_id}/stop/")
    def stop_job(job_id: str) -> dict[str, Any]:
        """Stop every run of a job; a finished job is left as is."""
        engine.stop_job(_job_or_404(engine, job_id))
        return {}

    @api.get("/jobs/{job_id}/statuses/")
    def job_statuses(job_id: str) -> dict[str, Any]:
        """Return the job's status history, deliberately not sorted by date."""
        statuses = engine.statuses(_job_or_404(engine, job_id))
        results = [entry.to_json() for entry in statuses]
        return {"count": len(results), "next": None, "previous": None, "results": results}

    @api.get("/jobs/{job_id}/files/")
    def job_files(job_id: str, request: Request) -> dict[str, Any]:
        """Return, paginated, the uploaded output files of every run of the job."""
        files = engine.job_files(_job_or_404(engine, job_id))
        return paginate(request, files, OutputFile.to_json)


def _add_run_routes(api: APIRouter, engine: RescaleEngine) -> None:
    """List and get runs, stop or snapshot one, list its output files."""

    @api.get("/jobs/{job_id}/runs/")
    def list_runs(job_id: str, request: Request) -> dict[str, Any]:
        """Return the job's runs, paginated, in display order."""
        job = _job_or_404(engine, job_id)
        return engine.read(lambda: paginate(request, job.runs, Run.to_json))

    @api.get("/jobs/{job_id}/runs/{run_id}/")
    def get_run(job_id: str, run_id: str) -> dict[str, Any]:
        """Return one run."""
        return engine.read(_run_or_404(engine, job_id, run_id).to_json)

    @api.post("/jobs/{job_id}/runs/{run_id}/stop/")
    def stop_run(job_id: str, run_id: str) -> dict[str, Any]:
        """Kill the run's processes; its files so far become outputs. Idempotent."""
        engine.stop_run(_run_or_404(engine, job_id, run_id))
        return {}

    @api.post("/jobs/{job_id}/runs/{run_id}/snapshot/")
    def snapshot_run(job_id: str, run_id: str) -> dict[str, Any]:
        """Archive the working folder of a running run; it becomes an output file shortly after."""
        with _http_errors():
            previous = engine.snapshot(_run_or_404(engine, job_id, run_id))
        return {"data": "", "exitcode": 0, "lastSnapshotID": previous, "reason": "Generating snapshot."}

    @api.get("/jobs/{job_id}/runs/{run_id}/files/")
    def run_files(job_id: str, run_id: str, request: Request) -> dict[str, Any]:
        """Return the run's uploaded output files, paginated (snapshots only until it completes)."""
        run = _run_or_404(engine, job_id, run_id)
        return paginate(request, engine.read(lambda: run.files), OutputFile.to_json)


def _add_live_routes(api: APIRouter, engine: RescaleEngine) -> None:
    """Look into the working folder of a run in progress."""

    @api.get("/jobs/{job_id}/runs/{run_id}/directory-contents/")
    def directory_contents(job_id: str, run_id: str) -> list[dict[str, str]]:
        """List the files of the run's working folder (400 unless the run is in progress)."""
        with _http_errors():
            paths = engine.work_files(_run_or_404(engine, job_id, run_id))
        # The real service always points at the v1 tail URL, without a trailing slash.
        return [{"path": path, "resource": f"/api/jobs/{job_id}/runs/{run_id}/tail/{path}"} for path in paths]

    @api.get("/jobs/{job_id}/runs/{run_id}/tail/{path:path}")
    def tail(job_id: str, run_id: str, path: str, request: Request) -> Any:
        """Return the last ``lines`` lines of a working file, or its raw bytes without ``lines``."""
        run = _run_or_404(engine, job_id, run_id)
        with _http_errors():
            file_path = engine.work_file(run, path)
        raw_lines = request.query_params.get("lines")
        if raw_lines is not None and not (raw_lines.isascii() and raw_lines.isdigit()):
            raise HTTPException(400, "lines must be a non-negative integer.")
        try:
            if raw_lines is None:
                return _stream_growing_file(file_path)
            return {
                "fileType": f"/home/job_{job_id}/work/{path.strip('/')}: {describe_file_type(file_path)}",
                "lines": tail_lines(file_path, int(raw_lines)),
            }
        except FileNotFoundError as exc:  # removed by the running command since it was found
            raise HTTPException(404, NOT_FOUND) from exc


def _add_file_routes(api: APIRouter, engine: RescaleEngine) -> None:
    """Describe and download files: run outputs and uploaded inputs alike."""

    @api.get("/files/{file_id}/")
    def file_metadata(file_id: str) -> dict[str, Any]:
        """Return a file's record, as the upload or the output-files list shows it."""
        item = engine.file(file_id)
        if item is None:
            raise HTTPException(404, NOT_FOUND)
        return item.to_json()

    @api.get("/files/{file_id}/contents/")
    def file_contents(file_id: str) -> FileResponse:
        """Stream a file's bytes (Content-Length set, Range honoured)."""
        output = engine.file(file_id)
        if output is None or not output.disk_path.is_file():
            raise HTTPException(404, NOT_FOUND)
        return FileResponse(
            output.disk_path,
            media_type="application/octet-stream",
            filename=output.relative_path.rsplit("/", 1)[-1],
        )


def _add_upload_routes(api: APIRouter, engine: RescaleEngine, config: EmulatorConfig) -> None:
    """Upload input files."""

    @api.post("/files/contents/", status_code=201)
    async def upload_file(request: Request) -> JSONResponse:
        """Store the multipart ``file`` part as an input file; answer its record."""
        folder = engine.uploads_dir
        try:
            name, received, size, md5 = await receive_upload(request, folder, config.rescale_max_upload_bytes)
        except EngineError as exc:
            return _refusal(exc)
        record = await run_in_threadpool(store_upload, folder, engine.new_file_id(), name, received, size, md5)
        engine.add_input(record)
        return JSONResponse(record.to_json(), status_code=201)


def _stream_growing_file(path: Path) -> StreamingResponse:
    """
    Stream a file that may still be growing, exactly as big as it was when asked.

    ``FileResponse`` reads until the end, which sends more than the ``Content-Length`` it
    announced when a running command appends meanwhile.
    """
    handle = path.open("rb")
    size = os.fstat(handle.fileno()).st_size

    def chunks() -> Iterator[bytes]:
        """Yield the file's first ``size`` bytes, then close it."""
        with handle:
            remaining = size
            while remaining > 0 and (chunk := handle.read(min(CHUNK, remaining))):
                remaining -= len(chunk)
                yield chunk

    return StreamingResponse(
        chunks(), media_type="application/octet-stream", headers={"Content-Length": str(size)}
    )
