"""The "Rescale job" button on a Rescale task in the Airflow UI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperatorLink
from airflow.sdk.execution_time.xcom import XCom

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator, Context
    from airflow.sdk.types import TaskInstanceKey

    from airflow_provider_hpc.hooks.rescale import RescaleHook


class RescaleJobLink(BaseOperatorLink):
    """
    Link to the job's page on the Rescale platform of the connection's region.

    Built like the AWS provider's links: the task persists the link's parts (``platform_url``,
    ``job_id``) under :attr:`key` when it starts, and :meth:`get_link` formats :attr:`format_str`
    with them. The finished link is also pushed under the link's own XCom key at once, so the
    button works while the task is still deferred, not only once it has finished.
    """

    name = "Rescale job"
    key: ClassVar[str] = "rescale_job"
    format_str: ClassVar[str] = "{platform_url}jobs/{job_id}/"

    def format_link(self, **parts: Any) -> str:
        """
        Return :attr:`format_str` filled with ``parts``, or ``""`` when a part is missing.

        :param parts: ``platform_url`` (ending with ``/``) and ``job_id``.
        """
        try:
            return self.format_str.format(**parts)
        except (KeyError, IndexError):
            return ""

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        """
        Return the job's URL the task persisted, or ``""`` before it has.

        :param operator: the task the link belongs to.
        :param ti_key: the task instance to read the parts of.
        """
        parts = XCom.get_value(ti_key=ti_key, key=self.key)
        return self.format_link(**parts) if isinstance(parts, dict) else ""

    @classmethod
    def persist(cls, context: Context, *, hook: RescaleHook, job_id: str) -> str:
        """
        Push the link's parts (and the finished link) for the running task; return the link.

        :param context: the running task's context.
        :param hook: the task's hook; its connection gives the region's platform URL.
        :param job_id: the job id.
        """
        hook.job_url(job_id)  # refuses an id that is unsafe in a URL before anything is pushed
        parts = {"platform_url": hook.base_url, "job_id": str(job_id)}
        link = cls()
        url = link.format_link(**parts)
        ti: Any = context["ti"]
        ti.xcom_push(key=cls.key, value=parts)
        ti.xcom_push(key=link.xcom_key, value=url)
        return url
