"""The "HPC runs" page: every stored value is escaped, and only http(s) links are links."""

from __future__ import annotations

from datetime import datetime, timezone

from airflow_provider_hpc.plugins.runs import WatchedRun
from airflow_provider_hpc.plugins.runs_view import HpcRunsPlugin, render_page


def run(**changes: object) -> WatchedRun:
    values = dict(
        service="rescale", software=None, remote_id="QTVia", slurm_job_id=None, state="Executing",
        since=datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc), dag_id="d", run_id="manual__1", task_id="watch",
        map_index=-1, task_state="deferred", remote_url="https://eu.rescale.com/jobs/QTVia/", result=None,
    )
    values.update(changes)
    return WatchedRun(**values)  # type: ignore[arg-type]


def test_values_from_the_metadata_are_escaped_and_only_web_links_are_links() -> None:
    page = render_page(
        [run(state="<script>alert(1)</script>", remote_url="javascript:alert(2)", task_id='t"><img src=x>')],
        dag_id='"><b>', state=None,
    )

    assert "<script>alert(1)" not in page and "&lt;script&gt;" in page
    assert "javascript:" not in page
    assert "<img src=x>" not in page and "<b>" not in page


def test_a_row_links_the_task_instance_in_the_ui_and_the_job_on_the_service() -> None:
    page = render_page([run(map_index=3)], dag_id=None, state=None)

    assert 'href="/dags/d/runs/manual__1/tasks/watch/mapped/3" target="_top"' in page
    assert 'href="https://eu.rescale.com/jobs/QTVia/" target="_blank" rel="noopener noreferrer"' in page
    assert "2026-12-01 10:00:00 UTC" in page


def test_an_empty_list_says_so() -> None:
    assert "No remote job watched yet." in render_page([], dag_id=None, state=None)


def test_the_plugin_mounts_its_app_and_adds_a_view_to_the_navigation() -> None:
    (mounted,) = HpcRunsPlugin.fastapi_apps
    (view,) = HpcRunsPlugin.external_views
    assert mounted["url_prefix"] == "/hpc" and view["href"] == "/hpc/runs" and view["destination"] == "nav"
