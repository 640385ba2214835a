"""The "Rescale job" extra link: the job's page on the platform of the connection's region."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from airflow.sdk.execution_time.xcom import XCom

from airflow_provider_hpc.exceptions import InvalidIdentifierError
from airflow_provider_hpc.hooks.rescale import RescaleHook
from airflow_provider_hpc.links.rescale import RescaleJobLink
from airflow_provider_hpc.sensors.rescale import RescaleRunSensor
from tests.integration.rescale.support import FakeTaskInstance


@pytest.fixture
def region_conn(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Return a function defining a Rescale connection on a given host."""

    def define(conn_id: str, host: str) -> str:
        body = {"conn_type": "rescale", "host": host, "password": "rk-region-key-0123456789"}
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(body))
        return conn_id

    return define


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("https://platform.rescale.com", "https://platform.rescale.com/jobs/QTVia/"),
        ("https://eu.rescale.com/", "https://eu.rescale.com/jobs/QTVia/"),
        ("eu.rescale.com", "https://eu.rescale.com/jobs/QTVia/"),
        ("https://platform.rescale.jp/api/v2/", "https://platform.rescale.jp/jobs/QTVia/"),
    ],
)
def test_link_points_to_the_region_of_the_connection(
    region_conn: Any, monkeypatch: pytest.MonkeyPatch, host: str, expected: str
) -> None:
    conn_id = region_conn("rescale_region", host)
    ti = FakeTaskInstance(task_id="watch")

    url = RescaleJobLink.persist({"ti": ti}, hook=RescaleHook(conn_id), job_id="QTVia")  # type: ignore[arg-type]

    assert url == expected
    # The UI reads the finished link under the link's own key (the API server has no provider code).
    assert ti.xcom[RescaleJobLink().xcom_key] == expected
    # The link class itself rebuilds it from the parts, e.g. in a UI that has the provider installed.
    monkeypatch.setattr(XCom, "get_value", staticmethod(lambda *, ti_key, key: ti.xcom.get(key)))
    task = RescaleRunSensor(task_id="watch", job_id="QTVia", run_id="1", rescale_conn_id=conn_id)
    assert RescaleJobLink().get_link(task, ti_key=object()) == expected  # type: ignore[arg-type]


def test_two_regions_side_by_side(region_conn: Any) -> None:
    na, eu = FakeTaskInstance(), FakeTaskInstance()
    na_hook = RescaleHook(region_conn("na", "https://platform.rescale.com"))
    eu_hook = RescaleHook(region_conn("eu", "https://eu.rescale.com"))

    RescaleJobLink.persist({"ti": na}, hook=na_hook, job_id="abc12")  # type: ignore[arg-type]
    RescaleJobLink.persist({"ti": eu}, hook=eu_hook, job_id="abc12")  # type: ignore[arg-type]

    key = RescaleJobLink().xcom_key
    assert na.xcom[key] == "https://platform.rescale.com/jobs/abc12/"
    assert eu.xcom[key] == "https://eu.rescale.com/jobs/abc12/"
    assert "rk-region-key" not in json.dumps([na.xcom, eu.xcom])


def test_no_link_before_the_task_pushed_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(XCom, "get_value", staticmethod(lambda *, ti_key, key: None))
    task = RescaleRunSensor(task_id="watch", job_id="QTVia", run_id="1")

    assert RescaleJobLink().get_link(task, ti_key=object()) == ""  # type: ignore[arg-type]


def test_unsafe_job_id_pushes_no_link(region_conn: Any) -> None:
    ti = FakeTaskInstance()
    hook = RescaleHook(region_conn("na", "https://platform.rescale.com"))

    with pytest.raises(InvalidIdentifierError):
        RescaleJobLink.persist({"ti": ti}, hook=hook, job_id="../admin")  # type: ignore[arg-type]
    assert ti.xcom == {}


def test_the_link_opens_the_emulator_s_page_of_the_job(api: Any) -> None:
    job_id = api.start_job("true")
    api.wait_job_completed(job_id)

    page = requests.get(RescaleHook().job_url(job_id), headers={"Accept": "text/html"}, timeout=10)

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f"Rescale job {job_id}" in page.text and "Completed" in page.text
