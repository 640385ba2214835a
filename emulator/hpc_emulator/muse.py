"""
The Muse emulator: every ``/api/`` endpoint of the reference pages, and the SLURM-like jobs behind them.

What the pages leave open is decided here, and said in ``docs/emulator.md``:

- errors always have the documented shape ``{"error", "more", "type"}``; a missing, expired or
  invalid ``jwt`` answers 401, a token below the ``user`` level 403, an unknown software name,
  run key or download key 404, any other bad request 400;
- asking a result before ``cr`` is ``OK`` answers that error shape with status **200**: the docs
  give no status, so a client must read the body's shape, and this proves it does;
- a job walks PENDING (``pending_seconds`` scaled by ``time_scale``, longer while
  ``muse_max_running`` jobs already run) → RUNNING (its command really runs) → COMPLETED (exit
  status 0), FAILED (any other), TIMEOUT (past the ``--time`` of ``sbatch_list``, SLURM formats,
  so ``time=2`` is two minutes and ``0`` no limit; real seconds, not scaled by ``time_scale``) or
  CANCELLED (``POST /_emulator/muse/cancel/{key}``: the real API has no cancel endpoint);
- while the server stops, every command is killed and new runs are refused with 503.

The records are in ``muse_models.py``, the tokens in ``muse_auth.py``, the request bodies in
``muse_forms.py`` and the jobs and their commands in ``muse_engine.py``; this module holds the
answers and the routes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.background import BackgroundTask

from hpc_emulator.muse_engine import MuseEngine
from hpc_emulator.pages import muse_state_page, wants_html
from hpc_emulator.muse_files import read_stdout
from hpc_emulator.muse_forms import read_body
from hpc_emulator.muse_models import (
    STDERR_NAME,
    STDOUT_NAME,
    JobState,
    MuseError,
    MuseJob,
    RunRequest,
    bad_request,
    parse_walltime,
)

# What the app and the tests take from the Muse side.
__all__ = ["MuseEngine", "MuseError", "create_muse_router", "muse_error_response", "parse_walltime"]

log = logging.getLogger(__name__)

_DOWNLOAD_KEY = re.compile(r"^\d{8}_\d{6}_[0-9a-f-]{36}$")


async def muse_error_response(request: Request, exc: Exception) -> Response:
    """Turn a :class:`MuseError` into its JSON answer (registered as the app's exception handler)."""
    assert isinstance(exc, MuseError)
    return JSONResponse(exc.body(), status_code=exc.status)


# ------------------------------------------------------------------------------------- answers


def muse_base_url(request: Request) -> str:
    """Return the service's base URL as the client reached it, ending with ``/api/``."""
    return f"{request.base_url}api/"


def _urls(base: str, name: str, key: str) -> dict[str, str]:
    return {
        "state": f"{base}software/muse/state/{name}/{key}/",
        "run": f"{base}software/muse/run/{name}/{key}/",
        "content": f"{base}software/muse/content/{name}/{key}/",
    }


def submit_answer(base: str, job: MuseJob) -> dict[str, Any]:
    """Return the answer of ``POST software/muse/run/{name}/``, worded as in the reference."""
    urls = _urls(base, job.name, job.key)
    msg = (
        f"GET {urls['state']} request to get cluster job state, while waiting for results "
        f"(the GET {urls['run']} request to get results will be possible once job finished). "
        f"Keep the software name value={job.name} and the key value={job.key} in order to be able to "
        "follow your POST request. Notifications will be sent during process running if mail-user "
        "given into sbatch_list option. (__todo__: add information about temps imparti...)"
    )
    return {"msg": msg, "url": urls["state"], "urls": urls}


def state_answer(base: str, job: MuseJob) -> dict[str, Any]:
    """Return the answer of ``GET software/muse/state/{name}/{key}/``; ``url`` is the next request."""
    urls = _urls(base, job.name, job.key)
    cr = job.state.cr
    if cr == "OK":
        msg = (
            f"End of job. You can now get results by GET {urls['run']} request or ask for content "
            f"(to investigate) by GET {urls['content']} request."
        )
        url = urls["run"]
    elif cr == "NOK":
        msg = (
            f"End of job, with failure (latest state {job.state.value}): no results to get. You can ask "
            f"for content (to investigate) by GET {urls['content']} request."
        )
        url = urls["content"]
    else:
        msg = (
            f"Job not ended (latest state {job.state.value}). Ask again by GET {urls['state']} request "
            f"until cr is 'OK', then get results by GET {urls['run']} request (content to investigate "
            f"by GET {urls['content']} request)."
        )
        url = urls["state"]
    return {"info": {"report": job.report()}, "msg": msg, "url": url}


def download_answer(base: str, key: str) -> dict[str, Any]:
    """Return the ``todownload=yes`` result, worded as in the reference."""
    url = f"{base}download/?key={key}"
    msg = (
        f"The response content can be downloaded at : {url} *** The resource to download the "
        f"response content is 'GET download' with 'key' option (key value : {key}) *** Keep this "
        f"key value in order to be able to download the response content later on : key={key}"
    )
    return {"msg": msg, "url": url}


def not_ready_error(base: str, job: MuseJob) -> MuseError:
    """Return the error a result asked before ``cr`` is ``OK`` gets, with status 200 (see module doc)."""
    urls = _urls(base, job.name, job.key)
    return MuseError(
        200,
        f"Results are not available: cr is '{job.state.cr}' (latest state {job.state.value}), "
        "results can be asked only once cr is 'OK'.",
        "NotReady" if job.state.cr == "WAIT" else "JobEndedNOK",
        [f"GET {urls['state']} to follow the job", f"GET {urls['content']} to investigate"],
    )


async def result_response(
    engine: MuseEngine,
    base: str,
    report: dict[str, Any],
    request: RunRequest,
    run_dir: Path,
    zip_target: Path,
    download_key: str | None = None,
) -> tuple[Response, str | None]:
    """
    Return the result answer per ``returned_type`` and ``todownload``, and the download key used.

    ``todownload`` applies to ``stdout.txt`` and ``run.zip`` only, as documented; a ``stdout``
    result is always the JSON answer.
    """
    if request.returned_type == "stdout":
        return JSONResponse({"info": {"stdout": read_stdout(run_dir), "report": report}}), download_key
    if request.returned_type == "stdout.txt":
        path, filename, media_type = run_dir / STDOUT_NAME, "stdout.txt", "text/plain; charset=utf-8"
    else:
        path = await engine.run_zip(run_dir, zip_target)
        filename, media_type = "run.zip", "application/zip"
    if request.todownload:
        key = download_key or await engine.keep_for_download(path, filename)
        return JSONResponse(download_answer(base, key)), key
    return FileResponse(path, media_type=media_type, filename=filename), download_key


# ---------------------------------------------------------------------------------------- routes


def create_muse_router(engine: MuseEngine) -> APIRouter:
    """Return the router serving Muse's ``/api/`` endpoints from ``engine``."""
    router = APIRouter(prefix="/api")

    @router.post("/jwt/obtain/")
    async def jwt_obtain(request: Request) -> Response:
        """Give a JWT for ``username`` and ``password``."""
        body, _ = await read_body(request)
        username, password = body.text("username"), body.text("password")
        if not username or not password:
            raise bad_request("The username and password parameters are required.")
        return JSONResponse({"token": engine.tokens.obtain(username, password)})

    @router.post("/jwt/verify/")
    async def jwt_verify(request: Request) -> Response:
        """Say whether the ``jwt`` parameter is a token still good."""
        body, _ = await read_body(request)
        token = body.text("jwt")
        if not token:
            raise bad_request("The jwt parameter (the token to verify) is required.")
        try:
            claims = engine.tokens.decode(token)
        except MuseError as exc:
            return JSONResponse({"valid": False, "error": exc.error})
        return JSONResponse(
            {"valid": True, "username": claims["username"], "level": claims["level"], "exp": claims["exp"]}
        )

    @router.post("/software/muse/run/{name}/")
    async def muse_run(name: str, request: Request) -> Response:
        """Submit a cluster run; answer how to follow it."""
        body, form = await read_body(request)
        try:
            engine.tokens.require(body.one("jwt"))
            software = engine.software(name)
            run_request = RunRequest.from_body(body, cluster=True)
            job = await engine.submit(software, run_request, body.uploads)
        finally:
            if form is not None:
                await form.close()
        log.info("Muse job %s (%s) submitted: %s", job.key, job.jobname, run_request.cmd)
        return JSONResponse(submit_answer(muse_base_url(request), job))

    @router.get("/software/muse/state/{name}/{key}/")
    async def muse_state(name: str, key: str, request: Request) -> Response:
        """Report where the job is: JSON, or a small page for a browser (the provider's "Muse job state" link)."""
        answer = state_answer(muse_base_url(request), engine.job(name, key))
        if wants_html(request):
            return HTMLResponse(muse_state_page(name, key, answer))
        return JSONResponse(answer)

    @router.get("/software/muse/run/{name}/{key}/")
    async def muse_result(name: str, key: str, request: Request) -> Response:
        """Give the job's result, once ``cr`` is ``OK``."""
        job = engine.job(name, key)
        base = muse_base_url(request)
        if job.state is not JobState.COMPLETED:
            raise not_ready_error(base, job)
        async with engine.result_lock(job.key):
            response, job.download_key = await result_response(
                engine, base, job.report(), job.request, job.run_dir, job.folder / "run.zip", job.download_key
            )
        return response

    @router.get("/software/muse/content/{name}/{key}/")
    async def muse_content(name: str, key: str) -> Response:
        """Give the run folder zipped as it is now, to investigate."""
        job = engine.job(name, key)
        archive = await engine.content_zip(job.run_dir)
        return FileResponse(
            archive,
            media_type="application/zip",
            filename=f"{name}_{key}.zip",
            background=BackgroundTask(archive.unlink, missing_ok=True),
        )

    @router.get("/download/")
    async def download(request: Request) -> Response:
        """Give a result kept with ``todownload=yes``."""
        key = request.query_params.get("key", "")
        if not key:
            raise bad_request("The key parameter is required.")
        if not _DOWNLOAD_KEY.match(key):
            raise MuseError(404, f"Unknown download key value {key!r}.", "NotFound")
        path = engine.download(key)
        media_type = "application/zip" if path.suffix == ".zip" else "text/plain; charset=utf-8"
        return FileResponse(path, media_type=media_type, filename=path.name)

    @router.post("/software/run/{name}/")
    async def local_run(name: str, request: Request) -> Response:
        """Run off-cluster and answer the result directly."""
        body, form = await read_body(request)
        try:
            engine.tokens.require(body.one("jwt"))
            software = engine.software(name)
            run_request = RunRequest.from_body(body, cluster=False)
            run = await engine.run_now(software, run_request, body.uploads)
        finally:
            if form is not None:
                await form.close()
        if run.exit_code != 0:
            stderr = (run.run_dir / STDERR_NAME).read_text(encoding="utf-8", errors="replace")
            raise MuseError(
                200,
                f"The run ended with exit status {run.exit_code}.",
                "RunFailed",
                stderr.splitlines()[-20:],
            )
        response, _ = await result_response(
            engine, muse_base_url(request), run.report(), run_request, run.run_dir, run.folder / "run.zip"
        )
        return response

    return router
