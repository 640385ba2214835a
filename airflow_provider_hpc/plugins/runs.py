"""
The remote jobs the provider's tasks watch or watched, read from Airflow's own metadata.

Every task of the provider that knows its remote job pushes the job's link to XCom (the task's
extra link: :class:`~airflow_provider_hpc.links.muse.MuseJobStateLink`,
:class:`~airflow_provider_hpc.links.rescale.RescaleJobLink`) as soon as it knows it, before any
wait. Those XCom rows are the list; the task instance says where the wait stands, and the task's
return value, once there, what the service last said and where the result went. No table of the
provider's own: what Airflow keeps is what is shown.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlsplit

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session

from airflow_provider_hpc.links.muse import MuseJobStateLink
from airflow_provider_hpc.links.rescale import RescaleJobLink

MUSE_LINK_KEY = MuseJobStateLink().xcom_key
RESCALE_LINK_KEY = RescaleJobLink().xcom_key
#: The XCom keys read for each listed task instance, beside its link.
DETAIL_KEYS = ("return_value", "muse_key", RescaleJobLink.key)
#: The most rows one page lists (the newest first).
MAX_ROWS = 500
#: What a task instance's state says of the wait, when the task has no return value yet.
WAIT_STATES = {
    "deferred": "waiting (deferred to the triggerer)",
    "running": "running in a worker",
    "up_for_retry": "waiting for a retry",
    "queued": "queued",
    "scheduled": "scheduled",
}


@dataclass(frozen=True)
class WatchedRun:
    """
    One remote job a task of the provider watches or watched.

    :param service: ``muse`` or ``rescale``.
    :param software: the Muse software (or ``None`` for a Rescale job).
    :param remote_id: the Muse run's key or the Rescale job id.
    :param slurm_job_id: the Muse run's SLURM job id, once the result says it.
    :param state: what the service last said, as the task saw it, or where the wait stands.
    :param since: when the task first knew the remote job (its link's XCom time).
    :param dag_id: the task instance's DAG.
    :param run_id: its DAG run.
    :param task_id: its task.
    :param map_index: its map index (``-1`` when not mapped).
    :param task_state: the task instance's Airflow state.
    :param remote_url: the job's page on the service (the task's extra link).
    :param result: where the result went (a file or folder), once collected.
    """

    service: str
    software: str | None
    remote_id: str | None
    slurm_job_id: str | None
    state: str
    since: datetime | None
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    task_state: str | None
    remote_url: str | None
    result: str | None

    @property
    def task_instance_path(self) -> str:
        """The task instance's page in the Airflow UI, relative to its base URL."""
        path = f"dags/{quote(self.dag_id, safe='')}/runs/{quote(self.run_id, safe='')}/tasks/{quote(self.task_id, safe='')}"
        return path if self.map_index < 0 else f"{path}/mapped/{self.map_index}"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (the view's JSON answer)."""
        value = asdict(self)
        value["since"] = self.since.isoformat() if self.since else None
        value["task_instance_path"] = self.task_instance_path
        return value


def watched_runs(
    session: Session,
    readable_dag_ids: Collection[str],
    *,
    dag_id: str | None = None,
    task_state: str | None = None,
    limit: int = MAX_ROWS,
) -> list[WatchedRun]:
    """
    Return the remote jobs of the DAGs the user may read, the newest first.

    :param session: a metadata database session.
    :param readable_dag_ids: the DAGs the user may read (nothing else is ever listed).
    :param dag_id: only this DAG.
    :param task_state: only task instances in this Airflow state (``deferred``, ``success``...).
    :param limit: the most rows (at most :data:`MAX_ROWS`).
    """
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel

    dag_ids = set(readable_dag_ids) if dag_id is None else set(readable_dag_ids) & {dag_id}
    if not dag_ids:
        return []
    ti_key = (XComModel.dag_id, XComModel.run_id, XComModel.task_id, XComModel.map_index)
    query = (
        select(*ti_key, XComModel.key, XComModel.value, XComModel.timestamp, TaskInstance.state)
        .join(
            TaskInstance,
            (TaskInstance.dag_id == XComModel.dag_id)
            & (TaskInstance.run_id == XComModel.run_id)
            & (TaskInstance.task_id == XComModel.task_id)
            & (TaskInstance.map_index == XComModel.map_index),
        )
        .where(XComModel.key.in_((MUSE_LINK_KEY, RESCALE_LINK_KEY)), XComModel.dag_id.in_(dag_ids))
        .order_by(XComModel.timestamp.desc())
        .limit(max(1, min(limit, MAX_ROWS)))
    )
    if task_state:
        query = query.where(TaskInstance.state == task_state)
    links = session.execute(query).all()
    keys = [tuple(row[:4]) for row in links]
    details: dict[tuple, dict[str, Any]] = {key: {} for key in keys}
    if keys:
        rows = session.execute(
            select(*ti_key, XComModel.key, XComModel.value).where(tuple_(*ti_key).in_(keys), XComModel.key.in_(DETAIL_KEYS))
        ).all()
        for *key, name, value in rows:
            details[tuple(key)][name] = XComModel.deserialize_value(_Row(value))
    return [
        _watched_run(
            key, link_key, XComModel.deserialize_value(_Row(value)), timestamp, state, details[key]
        )
        for (*_, link_key, value, timestamp, state), key in zip(links, keys)
    ]


class _Row:
    """What ``XComModel.deserialize_value`` reads of a row: its ``value``."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _watched_run(
    key: tuple, link_key: str, link: Any, since: datetime | None, task_state: str | None, details: dict[str, Any]
) -> WatchedRun:
    dag_id, run_id, task_id, map_index = key
    value = details.get("return_value") if isinstance(details.get("return_value"), dict) else {}
    url = link if isinstance(link, str) else None
    if link_key == MUSE_LINK_KEY:
        software, key_in_url = _muse_name_and_key(url)
        service, remote_id = "muse", _text(details.get("muse_key")) or _text(value.get("key")) or key_in_url
        slurm = _text(value.get("job_id"))
    else:
        parts = details.get(RescaleJobLink.key) if isinstance(details.get(RescaleJobLink.key), dict) else {}
        service, software, remote_id, slurm = "rescale", None, _text(parts.get("job_id")), None
    return WatchedRun(
        service=service,
        software=software,
        remote_id=remote_id,
        slurm_job_id=slurm,
        state=_last_seen_state(value, task_state),
        since=since,
        dag_id=dag_id,
        run_id=run_id,
        task_id=task_id,
        map_index=map_index,
        task_state=task_state,
        remote_url=url,
        result=_result_location(value),
    )


def _muse_name_and_key(url: str | None) -> tuple[str | None, str | None]:
    # .../software/muse/state/{name}/{key}/
    segments = [s for s in urlsplit(url or "").path.split("/") if s]
    if len(segments) >= 2 and "state" in segments[:-2]:
        return segments[-2], segments[-1]
    return None, None


def _last_seen_state(value: dict[str, Any], task_state: str | None) -> str:
    """What the service last said, from the task's return value; else where the wait stands."""
    outcome = value.get("outcome") if isinstance(value.get("outcome"), dict) else {}
    history = outcome.get("history") if isinstance(outcome.get("history"), list) else []
    for said in (value.get("state"), history[-1] if history else None, value.get("status")):
        if said:
            return str(said)[:80]
    if "file_count" in value:
        return f"harvested {value['file_count']} files"
    if task_state in WAIT_STATES:
        return WAIT_STATES[task_state]
    return task_state or "unknown"


def _result_location(value: dict[str, Any]) -> str | None:
    for found in _locations(value):
        return found
    return None


def _locations(value: dict[str, Any]) -> Iterable[str]:
    for field in ("extracted", "file"):
        entry = value.get(field)
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            yield entry["path"]
    if isinstance(value.get("output_path"), str) and "file_count" in value:
        yield value["output_path"]


def _text(value: Any) -> str | None:
    return None if value in (None, "") else str(value)[:200]
