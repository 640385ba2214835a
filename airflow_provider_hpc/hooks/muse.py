"""MuseHook: the INRAE Muse cluster web service (submit a software run, follow its state, get results)."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import requests

from airflow_provider_hpc.exceptions import MuseApiError
from airflow_provider_hpc.hooks._base import HpcHttpHook, clean_secret, mask
from airflow_provider_hpc.models.muse import (
    DOWNLOAD_KEY_IN_URL,
    KEY_IN_URL,
    RETURNED_TYPES,
    MuseCr,
    MuseReport,
    MuseResult,
    MuseSubmission,
)
from airflow_provider_hpc.models.values import capped, optional_text, short_json, validate_segment
from airflow_provider_hpc.storage import StoredFile, as_storage_path, file_sink
from airflow_provider_hpc.transport.base import UploadFile
from airflow_provider_hpc.transport.errors import MAX_JSON_BYTES, server_error_fields
from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.transport.sync import body_chunks, read_capped
from airflow_provider_hpc.transport.urls import endpoint_of

if TYPE_CHECKING:
    from airflow.sdk import Connection, ObjectStoragePath

_BARE_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]{8,8192}")

#: Error ``type`` values that mean the token was refused (the service runs Django REST framework's JWT).
AUTH_ERROR_TYPES = frozenset({"authenticationfailed", "notauthenticated", "invalidtoken", "tokenerror"})

__all__ = ["MuseCr", "MuseHook", "MuseReport", "MuseResult", "MuseSubmission"]


class MuseHook(HpcHttpHook):
    """
    Talk to the Muse web service: token, submit, state, result, content and download.

    Connection (type ``muse``): ``host`` is the service's base URL (e.g. ``http://147.100.179.250/api/``);
    ``login``/``password`` obtain a JWT from ``jwt/obtain/``, or a ready token goes in the ``token`` extra
    (or the password field with no login). Extras: ``verify``, ``ca_bundle``, ``connect_timeout``,
    ``read_timeout``, ``max_attempts`` (see ``docs/connections.md``).

    :param muse_conn_id: the Airflow connection id.
    :param retry: a retry policy overriding the connection's.
    """

    conn_name_attr = "muse_conn_id"
    default_conn_name = "muse_default"
    conn_type = "muse"
    hook_name = "Muse (INRAE cluster web service)"
    error_class = MuseApiError
    default_path = "api"

    def __init__(self, muse_conn_id: str = default_conn_name, *, retry: RetryPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(muse_conn_id, retry=retry, **kwargs)
        self.muse_conn_id = muse_conn_id
        self._token: str | None = None
        self._token_lock = threading.Lock()

    # ----- token --------------------------------------------------------------------------------

    def _secrets_of(self, conn: Connection) -> list[str]:
        return super()._secrets_of(conn) + ([self._token] if self._token else [])

    def get_token(self, *, refresh: bool = False) -> str:
        """Return a JWT: the connection's ready token, or one obtained (once, then cached) from ``jwt/obtain/``."""
        with self._token_lock:
            if self._token and not refresh:
                return self._token
            conn = self.connection
            password = clean_secret(conn.password, "password", conn.conn_id)
            token = clean_secret(self.extra(conn, "token"), "token", conn.conn_id)
            login = (conn.login or "").strip()
            ready = token or (None if login else password)
            if ready:
                if refresh:
                    raise MuseApiError(
                        "The service refused the connection's ready token (expired or invalid); "
                        "put a new one in the connection, or give login/password so one can be obtained"
                    )
                self._token = ready
            elif login and password:
                self._token = self._obtain_token(login, password)
            else:
                raise MuseApiError(
                    f"Connection {self.muse_conn_id!r} gives neither login/password nor a token: running software needs one"
                )
            mask(self._token)
            self.transport.add_secret(self._token)
            return self._token

    def _obtain_token(self, username: str, password: str) -> str:
        # A failed login is not retried beyond the transport's own policy: it is not idempotent work,
        # but obtaining a token creates nothing, so it may be repeated safely.
        endpoint = self._endpoint("POST", "jwt/obtain/")

        def read(response: requests.Response) -> Any:
            # The service answers "the JWT value": a JSON object or string, or the bare token as text.
            # The body is the token itself: it must never end up in an error excerpt.
            body = read_capped(response, MAX_JSON_BYTES + 1)
            try:
                return json.loads(body)
            except (ValueError, RecursionError):
                text = body.decode("utf-8", errors="replace").strip()
                if _BARE_TOKEN.fullmatch(text):
                    return text
                # Never quoted: the body may hold the token, which the masker does not know yet.
                raise MuseApiError(
                    f"jwt/obtain/ answered {len(body)} bytes of {response.headers.get('Content-Type') or 'no stated type'} "
                    "that are neither JSON nor a token (the body is not shown: it may hold a token)",
                    endpoint=endpoint,
                    status=response.status_code,
                ) from None

        answer = self.transport.fetch(
            "POST", "jwt/obtain/", read, data={"username": username, "password": password}, idempotent=True
        )
        if isinstance(answer, dict):
            self._raise_for_error_body(answer, endpoint)
        token = _token_from(answer)
        if not token:
            raise MuseApiError("jwt/obtain/ answered without a token", endpoint=endpoint)
        self.log.info("Obtained a Muse token for user %s", username)
        return token

    def verify_token(self) -> bool:
        """Ask ``jwt/verify/`` whether the current token is still good."""
        token = self.get_token()
        try:
            answer = self.transport.request_json("POST", "jwt/verify/", data={"jwt": token}, idempotent=True)
        except MuseApiError as exc:
            if exc.status in (400, 401, 403):
                return False
            raise
        if isinstance(answer, dict) and ("error" in answer or answer.get("valid") is False):
            return False
        return True

    def _with_token(self, call: Any) -> Any:
        """Run ``call(token)``; on an expired/invalid-token answer, obtain a new token and run it once more."""
        # Obtaining the first token stays outside the try: a refused login is not tried twice.
        token = self.get_token()
        try:
            return call(token)
        except MuseApiError as exc:
            if not _is_token_error(exc):
                raise
            self.log.info("The Muse token was refused (%s); obtaining a new one and trying once more", exc.error or exc.status)
            return call(self.get_token(refresh=True))

    # ----- runs ---------------------------------------------------------------------------------

    def submit(
        self,
        name: str,
        *,
        cmd: str = "",
        cmd_option: str = "",
        returned_type: str = "stdout",
        todownload: bool = False,
        files: Sequence[str | ObjectStoragePath] = (),
        files_order: Sequence[str] | None = None,
        sbatch_list: Sequence[str] | None = None,
        module_list: Sequence[str] | None = None,
    ) -> MuseSubmission:
        """
        Launch ``name`` on the Muse cluster (``POST software/muse/run/{name}/``) and return its key.

        :param cmd: the command run in the software's container (e.g. ``python /add.py 4 5``).
        :param cmd_option: options inserted as ``singularity exec {cmd_option} {image} {cmd}``.
        :param returned_type: ``stdout``, ``stdout.txt`` or ``run.zip``.
        :param todownload: for ``stdout.txt``/``run.zip``: answer a download key instead of the file.
        :param files: input files (local paths or ``ObjectStoragePath``), sent as multipart ``file`` parts.
        :param files_order: the order the files are given to the command.
        :param sbatch_list: SLURM sbatch options (under construction at Muse).
        :param module_list: modules to load (under construction at Muse).
        """
        name = validate_segment(name, "Software name")
        fields = self._run_fields(cmd, cmd_option, returned_type, todownload, files_order)
        if sbatch_list:
            fields["sbatch_list"] = json.dumps(list(sbatch_list))
        if module_list:
            fields["module_list"] = json.dumps(list(module_list))
        uploads = _uploads(files)
        self._log_inputs(name, files, uploads)
        path = f"software/muse/run/{name}/"

        def post(token: str) -> Any:
            # Not idempotent: a retry happens only when the request surely never reached the server.
            answer = self.transport.request_json(
                "POST", path, data={**fields, "jwt": token}, files=uploads, idempotent=False
            )
            self._raise_for_error_body(answer, self._endpoint("POST", path))
            return answer

        answer = self._with_token(post)
        url = answer.get("url") if isinstance(answer, dict) else None
        match = KEY_IN_URL.search(str(url or ""))
        if not match:
            raise MuseApiError(
                "The submit answer has no url ending with the run key",
                endpoint=self._endpoint("POST", path),
                excerpt=short_json(answer, self.known_secrets),
            )
        key = match.group(1)
        # The state URL is built from the connection: the server's own url only gave the key, so it
        # can never point the UI link or the XCom value elsewhere.
        submission = MuseSubmission(
            name=name, key=key, state_url=self.state_url(name, key), message=optional_text(answer.get("msg"), 1000) or ""
        )
        # The URL ends the line: the Airflow log view links a URL up to the next whitespace.
        self.log.info("Submitted %s to Muse: key %s; state: %s", name, submission.key, submission.state_url)
        return submission

    def run(
        self,
        name: str,
        *,
        cmd: str = "",
        cmd_option: str = "",
        returned_type: str = "stdout",
        todownload: bool = False,
        files: Sequence[str | ObjectStoragePath] = (),
        files_order: Sequence[str] | None = None,
        dest: ObjectStoragePath | None = None,
        max_bytes: int | None = None,
    ) -> MuseResult:
        """
        Run ``name`` off-cluster (``POST software/run/{name}/``): the answer is the result itself.

        :param dest: where a file result (``stdout.txt``, ``run.zip``) is written.
        """
        name = validate_segment(name, "Software name")
        fields = self._run_fields(cmd, cmd_option, returned_type, todownload, files_order)
        uploads = _uploads(files)
        self._log_inputs(name, files, uploads)
        path = f"software/run/{name}/"

        def post(token: str) -> MuseResult:
            return self.transport.fetch(
                "POST", path, lambda r: self._read_result(r, self._endpoint("POST", path), dest, max_bytes),
                data={**fields, "jwt": token}, files=uploads, idempotent=False,
            )

        return self._with_token(post)

    @staticmethod
    def _run_fields(
        cmd: str, cmd_option: str, returned_type: str, todownload: bool, files_order: Sequence[str] | None
    ) -> dict[str, str]:
        if returned_type not in RETURNED_TYPES:
            raise MuseApiError(f"returned_type {returned_type!r} is not one of {', '.join(RETURNED_TYPES)}")
        if todownload and returned_type == "stdout":
            raise MuseApiError("todownload applies to returned_type 'stdout.txt' or 'run.zip' only")
        fields = {
            "cmd": cmd or "",
            "cmd_option": cmd_option or "",
            "returned_type": returned_type,
            "todownload": "yes" if todownload else "no",
        }
        if files_order:
            fields["files_order"] = json.dumps(list(files_order))
        return fields

    def get_state(self, name: str, key: str) -> MuseReport:
        """Return the run's report (``GET software/muse/state/{name}/{key}/``)."""
        path = self._state_path(name, key)
        answer = self.transport.get_json(path)
        endpoint = self._endpoint("GET", path)
        self._raise_for_error_body(answer, endpoint)
        return MuseReport.from_answer(answer, endpoint)

    async def a_get_state(self, name: str, key: str) -> MuseReport:
        """Return the run's report without blocking the event loop (for triggers)."""
        path = self._state_path(name, key)
        # The transport is built once per hook: no coroutine per poll to fetch it again.
        transport = self._async or await self.async_transport()
        answer = await transport.get_json(path)
        endpoint = endpoint_of("GET", transport.url(path))
        self._raise_for_error_body(answer, endpoint)
        return MuseReport.from_answer(answer, endpoint)

    def state_url(self, name: str, key: str) -> str:
        """Return the absolute URL of the run's state (shown in the UI and XCom)."""
        return self.base_url + self._state_path(name, key)

    @staticmethod
    def _state_path(name: str, key: str) -> str:
        return f"software/muse/state/{validate_segment(name, 'Software name')}/{validate_segment(key, 'Run key')}/"

    def get_result(
        self, name: str, key: str, dest: ObjectStoragePath | None = None, *, max_bytes: int | None = None
    ) -> MuseResult:
        """
        Fetch the results of a run whose ``cr`` is ``OK`` (``GET software/muse/run/{name}/{key}/``).

        :param dest: where a file result (``stdout.txt``, ``run.zip``) is written, atomically.
        :param max_bytes: refuse a file result larger than this.
        """
        path = f"software/muse/run/{validate_segment(name, 'Software name')}/{validate_segment(key, 'Run key')}/"
        endpoint = self._endpoint("GET", path)
        return self.transport.fetch("GET", path, lambda r: self._read_result(r, endpoint, dest, max_bytes))

    def _read_result(
        self, response: requests.Response, endpoint: str, dest: ObjectStoragePath | None, max_bytes: int | None
    ) -> MuseResult:
        if "json" in response.headers.get("Content-Type", ""):
            answer = self.transport.parse_json(read_capped(response, MAX_JSON_BYTES + 1), endpoint, response.status_code)
            return self._result_from_json(answer, endpoint)
        if dest is None:
            raise MuseApiError("The result is a file: give a destination path to write it to", endpoint=endpoint)
        stored = file_sink(as_storage_path(dest), max_bytes=max_bytes)(body_chunks(response))
        return MuseResult(kind="file", file=stored)

    def _result_from_json(self, answer: Any, endpoint: str) -> MuseResult:
        self._raise_for_error_body(answer, endpoint)
        info = answer.get("info") if isinstance(answer, dict) else None
        if isinstance(info, dict) and "stdout" in info:
            report = MuseReport.from_answer(answer, endpoint) if isinstance(info.get("report"), dict) else None
            return MuseResult(kind="stdout", stdout=str(info.get("stdout") or ""), report=report)
        url = answer.get("url") if isinstance(answer, dict) else None
        match = DOWNLOAD_KEY_IN_URL.search(str(url or ""))
        if match:
            return MuseResult(kind="download", download_key=match.group(1), download_url=str(url))
        raise MuseApiError(
            "The result answer is neither stdout nor a download key",
            endpoint=endpoint,
            excerpt=short_json(answer, self.known_secrets),
        )

    def download(self, download_key: str, dest: ObjectStoragePath, *, max_bytes: int | None = None) -> StoredFile:
        """Stream the file behind a download key (``GET download/?key=...``) to ``dest``."""
        key = validate_segment(download_key, "Download key")
        return self.transport.fetch(
            "GET", "download/", lambda r: self._read_file(r, self._endpoint("GET", "download/"), dest, max_bytes), params={"key": key}
        )

    def get_content(self, name: str, key: str, dest: ObjectStoragePath, *, max_bytes: int | None = None) -> StoredFile:
        """Stream the run folder's zip (``GET software/muse/content/{name}/{key}/``) to ``dest``, to investigate."""
        path = f"software/muse/content/{validate_segment(name, 'Software name')}/{validate_segment(key, 'Run key')}/"
        endpoint = self._endpoint("GET", path)
        return self.transport.fetch("GET", path, lambda r: self._read_file(r, endpoint, dest, max_bytes))

    def _read_file(self, response: requests.Response, endpoint: str, dest: ObjectStoragePath, max_bytes: int | None) -> StoredFile:
        # The service answers its error shape as JSON even where a file is expected.
        if "json" in response.headers.get("Content-Type", ""):
            answer = self.transport.parse_json(read_capped(response, MAX_JSON_BYTES + 1), endpoint, response.status_code)
            self._raise_for_error_body(answer, endpoint)
            raise MuseApiError(
                "Expected a file, the service answered JSON", endpoint=endpoint, excerpt=short_json(answer, self.known_secrets)
            )
        return file_sink(as_storage_path(dest), max_bytes=max_bytes)(body_chunks(response))

    def _endpoint(self, method: str, path: str) -> str:
        """Name a request of the sync transport as the transport's own errors do (``POST /api/jwt/obtain/``)."""
        return endpoint_of(method, self.transport.url(path))

    def _raise_for_error_body(self, answer: Any, endpoint: str) -> None:
        """Muse may answer its error shape with a 2xx status: the body's shape is the signal."""
        if isinstance(answer, dict) and "error" in answer and "info" not in answer:
            raise MuseApiError(
                "The Muse service answered an error", endpoint=endpoint, **server_error_fields(answer, self.known_secrets)
            )
        if not isinstance(answer, dict):
            raise MuseApiError(
                "The answer is not a JSON object", endpoint=endpoint, excerpt=short_json(answer, self.known_secrets)
            )

    def _log_inputs(self, name: str, files: Sequence[str | ObjectStoragePath], uploads: Sequence[UploadFile]) -> None:
        """Say which input files a run is sent (names, sizes, where from; never their contents)."""
        if uploads:
            self.log.info("%s", describe_inputs(name, files, uploads))

    def test_connection(self) -> tuple[bool, str]:
        """Check the base URL answers and the credentials give a token (the UI's Test button)."""
        try:
            self.get_token(refresh=False)
            if not self.verify_token():
                return False, "The service does not accept the token"
        except Exception as exc:  # the UI shows the message, whatever went wrong
            return False, str(exc)
        return True, f"Connected to {self.base_url} and obtained a valid token"


#: The most input files one log line lists (the others are counted).
MAX_LISTED_INPUTS = 20


def describe_inputs(name: str, files: Sequence[str | ObjectStoragePath], uploads: Sequence[UploadFile]) -> str:
    """
    Return the log text naming the input files sent to a run: one line each, name, size and source.

    Bounded: the first :data:`MAX_LISTED_INPUTS` files, each source cut to 300 characters, which
    ends its line (a URL followed by nothing stays a link in the Airflow log view).

    :param name: the software name.
    :param files: the files as the task gave them (paths or ``ObjectStoragePath``).
    :param uploads: the parts built from them (name sent and size).
    """
    total = sum(part.size or 0 for part in uploads)
    count = f"{len(uploads)} input file{'s' if len(uploads) != 1 else ''}"
    lines = [f"Sending {count} ({total} bytes) to Muse software {name}:"]
    for item, part in list(zip(files, uploads))[:MAX_LISTED_INPUTS]:
        lines.append(f"  {capped(part.filename, 200)}: {part.size} bytes, from {capped(str(item), 300)}")
    if len(uploads) > MAX_LISTED_INPUTS:
        lines.append(f"  ... and {len(uploads) - MAX_LISTED_INPUTS} more")
    return "\n".join(lines)


def _uploads(files: Sequence[str | ObjectStoragePath]) -> list[UploadFile]:
    uploads = []
    for item in files or ():
        path = as_storage_path(item)
        if not path.is_file():
            raise MuseApiError(f"Input file {item} does not exist")
        uploads.append(UploadFile("file", path.name, lambda p=path: p.open("rb"), path.stat().st_size))
    return uploads


def _is_token_error(exc: MuseApiError) -> bool:
    """
    Tell whether an error surely means the token was refused (then a new one is worth one more try).

    Only a 401/403, or the service's authentication error type, says so: words such as "expired"
    in some other error's text do not, and a submit is never repeated on them.
    """
    if exc.status in (401, 403):
        return True
    return (exc.error_type or "").replace(" ", "").lower() in AUTH_ERROR_TYPES


def _token_from(answer: Any) -> str | None:
    if isinstance(answer, str):
        return answer.strip() or None
    if isinstance(answer, dict):
        for field_name in ("token", "jwt", "access"):
            if isinstance(answer.get(field_name), str) and answer[field_name]:
                return answer[field_name]
    return None
