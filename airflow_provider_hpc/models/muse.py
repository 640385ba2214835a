"""
Muse's rules as values: a run's report and its ``cr``, a submission, a result, and the XCom value.

A report's ``cr`` is ``WAIT`` while the run goes on, ``OK`` once results may be asked, ``NOK`` when
it failed; ``process.latest_state`` is the SLURM job state. The XCom value of a collected run is
:func:`result_value` completed with the result (``docs/results.md``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from airflow_provider_hpc.exceptions import MuseApiError
from airflow_provider_hpc.models.values import bounded, optional_int, optional_text, short_json
from airflow_provider_hpc.storage import StoredFile

if TYPE_CHECKING:
    from airflow.sdk import ObjectStoragePath

RETURNED_TYPES = ("stdout", "stdout.txt", "run.zip")
#: The run's key is the last path segment of the submit answer's ``url`` (a UUID).
KEY_IN_URL = re.compile(r"/([0-9a-fA-F-]{8,64})/?$")
#: A ``todownload=yes`` result's ``url`` ends with ``download/?key=YYYYMMDD_HHMMSS_UUID``.
DOWNLOAD_KEY_IN_URL = re.compile(r"[?&]key=([A-Za-z0-9_.:-]+)")
#: A stdout longer than this (characters) is written to ``stdout.txt`` instead of XCom.
DEFAULT_MAX_XCOM_STDOUT = 64 * 1024
#: The largest result file (``stdout.txt``, ``run.zip``, a download) written unless a task says otherwise.
DEFAULT_MAX_FILE_BYTES = 64 * 1024**3
#: The largest content zip of a failed run fetched to investigate it.
MAX_CONTENT_ZIP_BYTES = 4 * 1024**3
#: The bytes of ``__WS__stderr.txt`` shown in the log of a failed run.
STDERR_TAIL_BYTES = 4096
STDOUT_MEMBER = "__WS__stdout.txt"
STDERR_MEMBER = "__WS__stderr.txt"
RESULT_FILE_NAMES = {"stdout": "stdout.txt", "stdout.txt": "stdout.txt", "run.zip": "run.zip"}
CONTENT_ZIP_NAME = "content.zip"
EXTRACT_DIR_NAME = "run"
#: Error ``type`` values that mean the service does not know a run (compared lower-cased, without spaces).
NOT_FOUND_TYPES = frozenset({"notfound", "http404", "doesnotexist", "unknownkey", "objectdoesnotexist"})
#: The request fields a report keeps of what the service echoes (every other is dropped).
REQUEST_FIELDS = (
    "cmd", "cmd_option", "returned_type", "todownload", "files_order", "ordered_filename_list", "sbatch_list", "module_list",
)
#: Bounds on what is kept of an echoed request: the command, any other text, list entries.
REQUEST_CMD_CHARS = 2000
REQUEST_TEXT_CHARS = 200
REQUEST_LIST_ITEMS = 10


class MuseCr(str, Enum):
    """The report's ``cr``: ``WAIT`` while the job runs, ``OK`` when results may be asked, ``NOK`` when it failed."""

    WAIT = "WAIT"
    OK = "OK"
    NOK = "NOK"


@dataclass(frozen=True)
class MuseReport:
    """
    The state of a Muse run, as ``GET software/muse/state/{name}/{key}/`` reports it.

    :param name: the software name.
    :param cr: ``WAIT``, ``OK`` or ``NOK``.
    :param latest_cr: ``process.latest_cr`` (``IN_PROGRESS``, ``ENDED_OK``, ``ENDED_NOK``...).
    :param latest_state: ``process.latest_state``, a SLURM job state (``PENDING``, ``RUNNING``, ``COMPLETED``...).
    :param job_id: the SLURM job id.
    :param jobname: the SLURM job name, like ``114-ws-sw_example``.
    :param request: the request the service echoes back (cmd, returned_type, todownload...).
    """

    name: str
    cr: MuseCr
    latest_cr: str | None = None
    latest_state: str | None = None
    job_id: int | None = None
    jobname: str | None = None
    request: dict[str, Any] = field(default_factory=dict)

    @property
    def is_terminal(self) -> bool:
        """Whether the run has ended (well or badly)."""
        return self.cr is not MuseCr.WAIT

    @property
    def is_successful(self) -> bool:
        """Whether the run ended well and its results may be asked."""
        return self.cr is MuseCr.OK

    @property
    def state(self) -> str:
        """The most telling state word: the SLURM state when known, else ``cr``."""
        return self.latest_state or self.latest_cr or self.cr.value

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (trigger events, XCom)."""
        data = asdict(self)
        data["cr"] = self.cr.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MuseReport:
        """Rebuild a report from :meth:`to_dict` output."""
        return cls(**{**data, "cr": MuseCr(data["cr"])})

    @classmethod
    def from_answer(cls, answer: Any, endpoint: str = "") -> MuseReport:
        """Parse a state (or result) answer; a missing ``report`` or an unknown ``cr`` is a :class:`MuseApiError`."""
        info = answer.get("info") if isinstance(answer, dict) else None
        report = info.get("report") if isinstance(info, dict) else None
        if not isinstance(report, dict):
            raise MuseApiError("The answer holds no info.report", endpoint=endpoint, excerpt=short_json(answer))
        try:
            cr = MuseCr(report.get("cr"))
        except ValueError:
            raise MuseApiError(
                f"Unknown cr value {str(report.get('cr'))[:50]!r} (expected WAIT, OK or NOK)", endpoint=endpoint
            ) from None
        process = report.get("process") if isinstance(report.get("process"), dict) else {}
        request = report.get("request") if isinstance(report.get("request"), dict) else {}
        return cls(
            name=optional_text(report.get("name")) or "",
            cr=cr,
            latest_cr=optional_text(process.get("latest_cr")),
            latest_state=optional_text(process.get("latest_state")),
            job_id=optional_int(process.get("job_id")),
            jobname=optional_text(process.get("jobname")),
            request=_kept_request(request),
        )


@dataclass(frozen=True)
class MuseSubmission:
    """
    What a submit answered.

    :param name: the software name.
    :param key: the run's key (a UUID), the last path segment of ``url``.
    :param state_url: the URL to follow the run's state.
    :param message: the service's ``msg``.
    """

    name: str
    key: str
    state_url: str
    message: str = ""


@dataclass(frozen=True)
class MuseResult:
    """
    The result of a run, in one of three forms depending on ``returned_type`` and ``todownload``.

    :param kind: ``stdout`` (the text is in ``stdout``), ``file`` (written to ``file``) or
        ``download`` (a download key to fetch later, in ``download_key``/``download_url``).
    :param report: the run's report, when the answer carries it.
    """

    kind: str
    stdout: str | None = None
    file: StoredFile | None = None
    download_key: str | None = None
    download_url: str | None = None
    report: MuseReport | None = None


def _kept_request(request: Mapping[str, Any]) -> dict[str, Any]:
    """Return the known fields of an echoed request, each bounded: a report travels in events and XCom."""
    kept = {}
    for name in REQUEST_FIELDS:
        if name in request:
            limit = REQUEST_CMD_CHARS if name == "cmd" else REQUEST_TEXT_CHARS
            kept[name] = bounded(request[name], text_limit=limit, items=REQUEST_LIST_ITEMS)
    return kept


def is_unknown_run(exc: MuseApiError) -> bool:
    """
    Tell whether an error means the service does not know the run (its key expired or never was).

    Muse's status codes are not documented: a 404, or an error body whose ``type`` says "not
    found", whatever the status (a 200 or a 400 carrying ``{"type": "NotFound"}`` included).
    """
    if exc.status == 404:
        return True
    return (exc.error_type or "").replace(" ", "").replace("_", "").lower() in NOT_FOUND_TYPES


def report_signature(report: MuseReport | None) -> tuple[Any, ...] | None:
    """What counts as a state change between two polls: cr, latest_cr or latest_state moved."""
    return None if report is None else (report.cr, report.latest_cr, report.latest_state)


def result_value(
    *,
    name: str,
    key: str | None,
    report: MuseReport | None,
    returned_type: str,
    state_url: str | None,
    output_path: ObjectStoragePath,
) -> dict[str, Any]:
    """Return the XCom value's common part (what ran, where), before the result itself is added."""
    return {
        "name": name,
        "key": key,
        "job_id": report.job_id if report else None,
        "state": report.state if report else None,
        "state_url": state_url,
        "returned_type": returned_type,
        "stdout": None,
        "file": None,
        "download": None,
        "extracted": None,
        "output_path": str(output_path),
    }


def asset_extra(value: Mapping[str, Any]) -> dict[str, Any]:
    """Return the small part of a result worth attaching to an asset event (no stdout, no download key)."""
    extra = {k: value.get(k) for k in ("name", "key", "job_id", "state", "returned_type", "output_path")}
    if value.get("file"):
        extra["file"] = value["file"]["path"]
        extra["size"] = value["file"]["size"]
    return extra


def describe_result(value: dict[str, Any]) -> str:
    """One log line about a result: its stdout or its file, never the whole text."""
    if value.get("stdout") is not None:
        text = value["stdout"]
        return f"stdout {text[:200]!r}" + ("..." if len(text) > 200 else "")
    if value.get("file"):
        return f"{value['file']['path']} ({value['file']['size']} bytes)"
    return "no result"
