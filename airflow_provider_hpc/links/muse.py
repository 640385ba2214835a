"""The "Muse job state" button on a Muse task in the Airflow UI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context
    from airflow.sdk.types import TaskInstanceKey

#: The XCom key under which Muse operators push the run's state URL.
STATE_URL_XCOM_KEY = "muse_state_url"


def web_link(url: Any) -> str:
    """Return ``url`` when it is an http(s) URL a browser may open, else ``""`` (never a ``javascript:`` one)."""
    text = str(url or "").strip()
    return text if urlsplit(text).scheme.lower() in ("http", "https") and urlsplit(text).netloc else ""


class MuseJobStateLink(BaseOperatorLink):
    """
    Link to the run's state page (``GET software/muse/state/{name}/{key}/``), read from XCom.

    The operator pushes the URL as soon as the run is submitted (or re-attached), both under
    :data:`STATE_URL_XCOM_KEY` and under the link's own XCom key, so the button works while the
    task is still deferred, not only once it has finished.
    """

    name = "Muse job state"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """
        Return the state URL the task pushed, or ``""`` when it has not submitted yet.

        :param operator: the task the link belongs to.
        :param ti_key: the task instance to read the URL of.
        """
        url = XCom.get_value(ti_key=ti_key, key=STATE_URL_XCOM_KEY)
        return web_link(url)

    @classmethod
    def persist(cls, context: Context, state_url: str) -> None:
        """
        Push ``state_url`` where both the link and downstream tasks find it.

        :param context: the running task's context.
        :param state_url: the run's state URL.
        """
        ti: Any = context["ti"]
        state_url = web_link(state_url)
        ti.xcom_push(key=STATE_URL_XCOM_KEY, value=state_url)
        ti.xcom_push(key=cls().xcom_key, value=state_url)
