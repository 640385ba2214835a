"""
The bodies of the Muse emulator's POST requests: JSON, form-urlencoded or multipart, and their uploads.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from hpc_emulator.muse_models import MuseError, bad_request

MAX_FORM_FILES = 1000
MAX_FORM_FIELDS = 1000


@dataclass
class RequestBody:
    """The parameters of a POST, whatever its encoding, and its uploaded ``file`` parts."""

    params: dict[str, list[Any]]
    uploads: list[UploadFile]

    def one(self, name: str, default: Any = None) -> Any:
        """Return the last value given for ``name`` (as Django's ``QueryDict.get`` does), or ``default``."""
        values = self.params.get(name)
        return values[-1] if values else default

    def text(self, name: str, default: str = "") -> str:
        """Return a text parameter; numbers are accepted and written as text."""
        value = self.one(name, None)
        if value is None:
            return default
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad_request(f"The {name} parameter must be a text, not {type(value).__name__}.")

    def text_list(self, name: str) -> list[str] | None:
        """Return a list parameter: a JSON list, as a string or as JSON, or one or more texts."""
        values = self.params.get(name)
        if not values:
            return None
        if len(values) > 1:
            return [self._list_item(name, value) for value in values]
        value = values[0]
        if isinstance(value, str):
            stripped = value.strip()
            if not stripped:
                return []
            if not stripped.startswith("["):
                return [stripped]
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise bad_request(f"The {name} parameter is not a valid JSON list: {exc}.") from None
        if not isinstance(value, list):
            raise bad_request(f"The {name} parameter must be a list of texts, e.g. '[\"a.txt\", \"b.txt\"]'.")
        return [self._list_item(name, item) for item in value]

    @staticmethod
    def _list_item(name: str, item: Any) -> str:
        if isinstance(item, str):
            return item
        raise bad_request(f"The {name} parameter must be a list of texts, not holding {item!r}.")


async def read_body(request: Request) -> tuple[RequestBody, Any]:
    """
    Read a POST's parameters from its JSON, form-urlencoded or multipart body.

    Returns the body and the form to close once the uploads are saved (``None`` without one).
    Query-string parameters are not read: the service takes its parameters from the body.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    params: dict[str, list[Any]] = defaultdict(list)
    uploads: list[UploadFile] = []
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name == "file":
                    uploads.append(value)
                else:
                    # A parameter sent as a file part (some clients do): its content is the value.
                    params[name].append((await value.read()).decode("utf-8", errors="replace"))
            else:
                params[name].append(value)
        return RequestBody(params, uploads), form
    raw = await request.body()
    if not raw.strip():
        return RequestBody(params, uploads), None
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MuseError(400, f"JSON parse error: {exc}.", "ParseError") from None
        if not isinstance(data, dict):
            raise MuseError(400, "JSON parse error: the body must be a JSON object.", "ParseError")
        for name, value in data.items():
            params[name].append(value)
        return RequestBody(params, uploads), None
    raise MuseError(
        400,
        f"Unsupported media type {content_type or '(none)'!r} in request.",
        "UnsupportedMediaType",
        ["Send application/json, application/x-www-form-urlencoded or multipart/form-data."],
    )


def safe_filename(filename: str | None) -> str:
    """Return an uploaded file's base name, or raise when it has none worth the name."""
    name = PurePosixPath((filename or "").replace("\\", "/")).name
    if not name or name in (".", ".."):
        raise bad_request(f"Uploaded file part without a usable file name ({filename!r}).")
    return name
