"""Reading untrusted values: identifiers that go into URLs, numbers and texts from answers."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from airflow_provider_hpc.exceptions import InvalidIdentifierError
from airflow_provider_hpc.transport.errors import redact

_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=~-]{0,254}")


def validate_segment(value: Any, what: str) -> str:
    """
    Return ``value`` as a string safe to put into a URL path segment, or raise.

    :param value: a software name, run key, job id or run id.
    :param what: what the value is, for the error message.
    """
    text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    # fullmatch, not match: "$" would let a trailing newline through ("key\n").
    if not text or not _SAFE_SEGMENT.fullmatch(text) or ".." in text:
        raise InvalidIdentifierError(
            f"{what} {value!r} is not a valid identifier: use letters, digits and . _ - only "
            "(no '/', '..', '?', '#', spaces)"
        )
    return text


def optional_int(value: Any) -> int | None:
    """Return ``value`` as an int, or ``None`` when it is missing or not a number (never a bool)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return None


def optional_text(value: Any) -> str | None:
    """Return ``value`` as a string, ``None`` staying ``None``."""
    return None if value is None else str(value)


def short_json(value: Any, secrets: Sequence[str] = ()) -> str:
    """Return a short JSON excerpt of an answer for an error, with every known secret replaced."""
    return redact(json.dumps(value, default=str), secrets)[:300]
