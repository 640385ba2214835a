"""
The "HPC runs" view: a page of Airflow's UI listing every remote job the provider's tasks watch.

An Airflow 3 plugin: a FastAPI app mounted in the API server under ``/hpc`` (``/hpc/runs`` the
page, ``/hpc/runs.json`` the same rows as JSON) and an external view in the UI's navigation that
shows the page inside the UI. The user is the UI's own (its session cookie or a bearer token),
and only the DAGs the auth manager lets them read are listed.
"""

from __future__ import annotations

from html import escape
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, Query
from fastapi.responses import HTMLResponse

from airflow_provider_hpc.plugins.runs import MAX_ROWS, WatchedRun, watched_runs

URL_PREFIX = "/hpc"
COLUMNS = ("service", "software / job", "key or job id", "SLURM job", "state as last seen", "since", "task instance", "remote job", "result")

app = FastAPI(title="HPC runs", description="The remote jobs the HPC provider's tasks watch or watched.")


def _readable_dag_ids(user: Any, auth_manager: Any) -> set[str]:
    return set(auth_manager.get_authorized_dag_ids(user=user, method="GET"))


def _rows(user: Any, auth_manager: Any, dag_id: str | None, state: str | None, limit: int) -> list[WatchedRun]:
    from airflow.utils.session import create_session

    with create_session() as session:
        return watched_runs(session, _readable_dag_ids(user, auth_manager), dag_id=dag_id or None, task_state=state or None, limit=limit)


def auth_manager() -> Any:
    """The API server's auth manager (the mounted app has no ``app.state`` of its own to find it in)."""
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def _user_dependency() -> Any:
    from airflow.api_fastapi.core_api.security import get_user

    return Depends(get_user)


_USER, _AUTH_MANAGER = _user_dependency(), Depends(auth_manager)
DagFilter = Annotated[str | None, Query(max_length=250, description="Only this DAG")]
StateFilter = Annotated[str | None, Query(max_length=40, description="Only task instances in this state")]
Limit = Annotated[int, Query(ge=1, le=MAX_ROWS)]


@app.get("/runs.json")
def runs_json(dag_id: DagFilter = None, state: StateFilter = None, limit: Limit = 200, user: Any = _USER, auth_manager: Any = _AUTH_MANAGER) -> dict[str, Any]:
    """The watched remote jobs of the DAGs the user may read, as JSON, the newest first."""
    rows = _rows(user, auth_manager, dag_id, state, limit)
    return {"runs": [row.to_dict() for row in rows], "total_entries": len(rows)}


@app.get("/runs", response_class=HTMLResponse)
def runs_page(dag_id: DagFilter = None, state: StateFilter = None, limit: Limit = 200, user: Any = _USER, auth_manager: Any = _AUTH_MANAGER) -> str:
    """The watched remote jobs of the DAGs the user may read, as a page of the UI."""
    return render_page(_rows(user, auth_manager, dag_id, state, limit), dag_id=dag_id, state=state)


def render_page(rows: list[WatchedRun], *, dag_id: str | None, state: str | None) -> str:
    """Return the page: a filter form and one table row per remote job, every value escaped."""
    body = "".join(_row_html(row) for row in rows) or f'<tr><td colspan="{len(COLUMNS)}">No remote job watched yet.</td></tr>'
    head = "".join(f"<th>{escape(c)}</th>" for c in COLUMNS)
    json_link = f"runs.json?{urlencode({k: v for k, v in (('dag_id', dag_id), ('state', state)) if v})}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>HPC runs</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1rem; color: #1a202c; }}
table {{ border-collapse: collapse; width: 100%; font-size: 0.9rem; }}
th, td {{ border-bottom: 1px solid #e2e8f0; padding: 0.35rem 0.5rem; text-align: left; vertical-align: top; }}
th {{ background: #f7fafc; }} code {{ font-size: 0.85rem; }} form {{ margin-bottom: 0.8rem; }}
</style></head><body>
<h1>HPC runs</h1>
<form method="get"><label>DAG <input name="dag_id" value="{escape(dag_id or '')}"></label>
<label>task state <input name="state" value="{escape(state or '')}" placeholder="deferred, success, failed..."></label>
<button type="submit">Filter</button> <a href="{escape(json_link)}">JSON</a></form>
<table id="hpc-runs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
</body></html>"""


def _row_html(row: WatchedRun) -> str:
    task = f"{row.dag_id} / {row.run_id} / {row.task_id}" + ("" if row.map_index < 0 else f" [{row.map_index}]")
    cells = [
        escape(row.service),
        escape(row.software or ""),
        f"<code>{escape(row.remote_id or '')}</code>",
        escape(row.slurm_job_id or ""),
        escape(row.state),
        escape(row.since.strftime("%Y-%m-%d %H:%M:%S UTC") if row.since else ""),
        # The UI's own page of the task instance, outside the frame the view is shown in.
        f'<a href="/{escape(row.task_instance_path)}" target="_top">{escape(task)}</a> ({escape(row.task_state or "")})',
        _external_link(row.remote_url, "open"),
        f"<code>{escape(row.result or '')}</code>",
    ]
    return '<tr class="hpc-run">' + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def _external_link(url: str | None, text: str) -> str:
    """A link to the service, only for an http(s) URL (a stored value is never trusted as markup)."""
    if not url or urlsplit(url).scheme not in ("http", "https"):
        return ""
    return f'<a href="{escape(url)}" target="_blank" rel="noopener noreferrer">{escape(text)}</a>'


class HpcRunsPlugin(AirflowPlugin):
    """Adds the "HPC runs" page to the Airflow UI (Browse menu) and its app to the API server."""

    name = "hpc_runs"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "HPC runs"}]
    external_views = [
        {
            "name": "HPC runs",
            "href": f"{URL_PREFIX}/runs",
            "destination": "nav",
            "category": "browse",
            "url_route": "hpc-runs",
        }
    ]
