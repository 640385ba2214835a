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


#: The longest text kept from a field a server echoes (a state word, a job name...).
SHORT_TEXT = 100
_INT_LIMIT = 2**63


def optional_int(value: Any) -> int | None:
    """Return ``value`` as an int, or ``None`` when it is missing, not a number or absurdly large (never a bool)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if -_INT_LIMIT < number < _INT_LIMIT else None


def optional_text(value: Any, limit: int = SHORT_TEXT) -> str | None:
    """Return ``value`` as a string of at most about ``limit`` characters, ``None`` staying ``None``."""
    return None if value is None else capped(str(value), limit)


def capped(text: str, limit: int) -> str:
    """Return ``text`` cut to ``limit`` characters, saying so with a trailing ``...``."""
    return text if len(text) <= limit else text[:limit] + "..."


def bounded(value: Any, *, text_limit: int, items: int) -> Any:
    """
    Return a JSON value a server echoed, small enough for an event, an XCom value or a log line.

    Strings are cut to ``text_limit``, lists to their first ``items`` entries; nested objects are
    not kept (the fields worth keeping are flat).
    """
    if value is None or isinstance(value, (bool, float)):
        return value
    if isinstance(value, int):
        return optional_int(value)
    if isinstance(value, str):
        return capped(value, text_limit)
    if isinstance(value, list):
        return [bounded(item, text_limit=text_limit, items=0) for item in value[:items] if not isinstance(item, (list, dict))]
    return None


def short_json(value: Any, secrets: Sequence[str] = ()) -> str:
    """Return a short JSON excerpt of an answer for an error, with every known secret replaced."""
    return redact(json.dumps(value, default=str), secrets)[:300]
