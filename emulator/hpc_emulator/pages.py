"""
Small human pages of the emulator: what the provider's UI links open in a browser.

The Rescale job link (``{platform}/jobs/{job_id}/``) opens a page on the real platform; the Muse
state link (``.../software/muse/state/{name}/{key}/``) opens the service's browsable answer. The
emulator answers both with a plain HTML page, every value HTML-escaped (a job name, a command or a
status reason is whatever a client sent), no script, no outside resource.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from starlette.requests import Request

_STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f3f3f3}"
)


def wants_html(request: Request) -> bool:
    """Tell whether the request comes from a browser (``Accept`` names ``text/html``); API clients send ``*/*``."""
    return "text/html" in request.headers.get("accept", "").lower()


def _text(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_text(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body or f'<tr><td colspan={len(headers)}>none</td></tr>'}</table>"


def _fields(pairs: Iterable[tuple[str, Any]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_text(k)}</th><td>{_text(v)}</td></tr>" for k, v in pairs) + "</table>"


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_text(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{_text(title)}</h1>{body}"
        "<p><small>HPC services emulator: a local stand-in for the service's own page.</small></p></body></html>"
    )


def rescale_job_page(job: Mapping[str, Any], statuses: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]]) -> str:
    """
    Return the page of a Rescale job: its name, its status history by date, its runs.

    :param job: the job as ``GET /api/v2/jobs/{job_id}/`` shows it.
    :param statuses: its statuses as the statuses endpoint shows them (any order).
    :param runs: its runs as the runs endpoint shows them.
    """
    history = sorted(statuses, key=lambda s: str(s.get("statusDate") or ""))
    body = _fields([("Job id", job.get("id")), ("Name", job.get("name")), ("Created", job.get("dateInserted"))])
    body += "<h2>Status history</h2>" + _table(
        ("Status", "Date", "Reason"), ((s.get("status"), s.get("statusDate"), s.get("statusReason")) for s in history)
    )
    body += "<h2>Runs</h2>" + _table(
        ("Run", "Started", "Completed", "Output files"),
        ((r.get("id"), r.get("dateStarted") or "not yet", r.get("dateCompleted") or "not yet", r.get("outputFileCount"))
         for r in runs),
    )
    return _page(f"Rescale job {job.get('id')}: {job.get('name')}", body)


def muse_state_page(name: str, key: str, answer: Mapping[str, Any]) -> str:
    """
    Return the page of a Muse run's state: its report, the service's message, the next request.

    :param name: the software name.
    :param key: the run's key.
    :param answer: the JSON answer of ``GET software/muse/state/{name}/{key}/``.
    """
    report = (answer.get("info") or {}).get("report") or {}
    process = report.get("process") or {}
    request = report.get("request") or {}
    body = _fields([
        ("Software", report.get("name")),
        ("cr", report.get("cr")),
        ("Latest state", process.get("latest_state")),
        ("Latest cr", process.get("latest_cr")),
        ("SLURM job", f"{process.get('job_id')} ({process.get('jobname')})"),
        ("Command", request.get("cmd")),
    ])
    body += f"<p>{_text(answer.get('msg'))}</p>"
    url = str(answer.get("url") or "")
    if url.startswith(("http://", "https://")):
        body += f"<p>Next request: <a href=\"{_text(url)}\">{_text(url)}</a></p>"
    return _page(f"Muse run {name}/{key}", body)
