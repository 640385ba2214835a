"""
Fault injection: a pure-ASGI middleware that makes chosen requests fail the way networks and proxies do.

A rule names the requests it applies to and what happens to them::

    {"route": "GET /api/software/muse/state/*", "probability": 0.1, "action": {"status": 503}}
    {"route": "POST /api/software/muse/run/*",
     "sequence": [{"status": 429, "retry_after": 1}, {"drop": true}, "pass"]}

- ``route``: an ``fnmatch`` pattern matched against ``"METHOD /path"`` (the query string left out);
  a pattern starting with ``/`` matches the path under any method.
- ``probability`` + ``action``: each matching request gets the action with that probability,
  drawn from a generator seeded by ``EmulatorConfig.seed`` (and re-seeded on reset), so a run
  can be repeated.
- ``sequence``: the actions are consumed one per matching request, in arrival order, then the
  rule stops applying. A scripted sequence is served exactly as scripted: the first rule whose
  route matches and which still has something to say decides, even when it says ``"pass"``.

Actions (a JSON object; ``"pass"`` or ``{}`` lets the request through untouched):

- ``{"status": 503}``: answer at once with that status, as a gateway would, without reaching the
  service (so nothing is submitted). 502/504 get an nginx-like HTML page, 500 Django's HTML
  page, others a small JSON body; ``"body": "html"`` or ``"json"`` chooses. ``"retry_after"``
  (seconds, or an HTTP date string) adds a ``Retry-After`` header; it is the point of 429.
- ``{"drop": true}``: the service handles the request (a submission does happen), then the
  connection breaks mid-answer: the headers promise a ``Content-Length``, half the body is sent,
  and the connection is closed. Clients see an incomplete read, as with a reset connection.
- ``{"delay": 0.2}``: wait that many seconds before handling the request (combines with others).
- ``{"slow_body": 0.5}``: send the headers at once, then the body in ten pieces spread over that
  many seconds.
- ``{"corrupt": true}``: flip one byte of the body (the headers, ``Content-Length`` included, stay
  as they were), for md5 checks.

Faults never apply to the emulator's own ``/_emulator/`` endpoints.
"""

from __future__ import annotations

import asyncio
import copy
import fnmatch
import json
import logging
import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hpc_emulator.config import Counters

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/_emulator/"
SLOW_BODY_PIECES = 10
_ACTION_KEYS = frozenset({"status", "retry_after", "body", "drop", "delay", "slow_body", "corrupt"})
_RULE_KEYS = frozenset({"route", "probability", "action", "sequence"})
# uvicorn logs this when an app returns before finishing its answer: a drop does exactly that on purpose.
_DROP_LOG_MESSAGE = "ASGI callable returned without completing response."


class FaultRuleError(ValueError):
    """A fault rule that cannot be understood; the message says which rule and why."""


@dataclass(frozen=True)
class FaultAction:
    """What happens to one request; every field at its default means "pass"."""

    status: int | None = None
    retry_after: float | str | None = None
    body: str | None = None
    drop: bool = False
    delay: float = 0.0
    slow_body: float = 0.0
    corrupt: bool = False

    @classmethod
    def parse(cls, raw: Any, where: str) -> FaultAction:
        """Build an action from its JSON form (``"pass"``, ``None`` or an object), or raise."""
        if raw is None or raw == "pass":
            return cls()
        if not isinstance(raw, Mapping):
            raise FaultRuleError(f"{where}: an action is \"pass\" or an object, not {raw!r}")
        unknown = set(raw) - _ACTION_KEYS
        if unknown:
            raise FaultRuleError(f"{where}: unknown action keys {sorted(unknown)}; known: {sorted(_ACTION_KEYS)}")
        action = cls(
            status=_optional_status(raw.get("status"), where),
            retry_after=_optional_retry_after(raw.get("retry_after"), where),
            body=_optional_choice(raw.get("body"), ("json", "html"), "body", where),
            drop=_flag(raw.get("drop"), "drop", where),
            delay=_seconds(raw.get("delay"), "delay", where),
            slow_body=_seconds(raw.get("slow_body"), "slow_body", where),
            corrupt=_flag(raw.get("corrupt"), "corrupt", where),
        )
        action._check_combination(where)
        return action

    def _check_combination(self, where: str) -> None:
        shaping = [name for name in ("drop", "slow_body", "corrupt") if getattr(self, name)]
        if self.status is not None and shaping:
            raise FaultRuleError(f"{where}: a status answer cannot also {', '.join(shaping)}")
        if self.drop and self.slow_body:
            raise FaultRuleError(f"{where}: choose drop or slow_body, not both")
        if (self.retry_after is not None or self.body is not None) and self.status is None:
            raise FaultRuleError(f"{where}: retry_after and body go with a status")

    @property
    def is_pass(self) -> bool:
        """Return whether the request goes through untouched."""
        return self == FaultAction()

    @property
    def kind(self) -> str:
        """Return a short name for counters and logs, e.g. ``status:503``, ``drop``, ``delay``."""
        if self.status is not None:
            return f"status:{self.status}"
        for name in ("drop", "slow_body", "corrupt", "delay"):
            if getattr(self, name):
                return name
        return "pass"


@dataclass
class FaultRule:
    """One rule: which requests, and either a probability and an action or a scripted sequence."""

    route: str
    action: FaultAction | None = None
    probability: float = 1.0
    sequence: list[FaultAction] | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    served: int = 0

    @classmethod
    def parse(cls, raw: Any, index: int) -> FaultRule:
        """Build a rule from its JSON form, or raise :class:`FaultRuleError`."""
        where = f"fault rule #{index}"
        if not isinstance(raw, Mapping):
            raise FaultRuleError(f"{where}: a rule is a JSON object, not {raw!r}")
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            raise FaultRuleError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(_RULE_KEYS)}")
        route = raw.get("route")
        if not isinstance(route, str) or not route.strip():
            raise FaultRuleError(f"{where}: 'route' is required, e.g. \"GET /api/software/muse/state/*\"")
        if ("sequence" in raw) == ("action" in raw):
            raise FaultRuleError(f"{where}: give either 'sequence' or 'action' (with an optional 'probability')")
        if "sequence" in raw:
            if "probability" in raw:
                raise FaultRuleError(f"{where}: a sequence is served as scripted, it takes no probability")
            steps = raw["sequence"]
            if not isinstance(steps, list) or not steps:
                raise FaultRuleError(f"{where}: 'sequence' is a non-empty list of actions")
            sequence = [FaultAction.parse(step, f"{where} step #{n}") for n, step in enumerate(steps)]
            return cls(route=route.strip(), sequence=sequence, raw=copy.deepcopy(dict(raw)))
        probability = raw.get("probability", 1.0)
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
            raise FaultRuleError(f"{where}: 'probability' is a number from 0 to 1")
        action = FaultAction.parse(raw["action"], f"{where} action")
        return cls(route=route.strip(), action=action, probability=float(probability), raw=copy.deepcopy(dict(raw)))

    def matches(self, method: str, path: str) -> bool:
        """Return whether the rule's route pattern covers this request."""
        target = path if self.route.startswith("/") else f"{method} {path}"
        return fnmatch.fnmatchcase(target, self.route)

    def describe(self) -> dict[str, Any]:
        """Return the rule as given, with how many requests it has decided so far."""
        described = {**self.raw, "served": self.served}
        if self.sequence is not None:
            described["remaining"] = max(0, len(self.sequence) - self.served)
        return described


class FaultInjector:
    """
    The live fault rules, safe to change from any thread while requests are served.

    :param rules: rules in their JSON form.
    :param seed: seeds the generator behind ``probability``.
    :param counters: where to count the faults served (counter ``faults``, key = action kind).
    """

    def __init__(self, rules: Iterable[Any] = (), seed: int | None = None, counters: Counters | None = None) -> None:
        self._lock = threading.Lock()
        self._seed = seed
        self._random = random.Random(seed)
        self._counters = counters
        self._rules = parse_rules(rules)

    def set_rules(self, rules: Iterable[Any]) -> None:
        """Replace every rule; nothing changes when one of them is invalid."""
        parsed = parse_rules(rules)
        with self._lock:
            self._rules = parsed

    def reset(self) -> None:
        """Drop every rule and re-seed the generator, so a scenario can be replayed identically."""
        with self._lock:
            self._rules = []
            self._random = random.Random(self._seed)

    def describe(self) -> list[dict[str, Any]]:
        """Return the rules with their progress, for ``GET /_emulator/faults``."""
        with self._lock:
            return [rule.describe() for rule in self._rules]

    def pick(self, method: str, path: str) -> FaultAction | None:
        """Return the action for this request, or ``None`` when no rule applies."""
        with self._lock:
            action = self._decide(method, path)
        if action is not None and not action.is_pass and self._counters is not None:
            self._counters.incr("faults", action.kind)
        return action

    def _decide(self, method: str, path: str) -> FaultAction | None:
        for rule in self._rules:
            if not rule.matches(method, path):
                continue
            if rule.sequence is not None:
                if rule.served >= len(rule.sequence):
                    continue
                rule.served += 1
                return rule.sequence[rule.served - 1]
            if self._random.random() < rule.probability:
                rule.served += 1
                return rule.action
        return None


def parse_rules(rules: Iterable[Any]) -> list[FaultRule]:
    """Parse rules from their JSON form (a list), or raise :class:`FaultRuleError`."""
    if isinstance(rules, (str, bytes, Mapping)) or not isinstance(rules, Iterable):
        raise FaultRuleError("fault rules are a JSON list of rule objects")
    return [FaultRule.parse(raw, index) for index, raw in enumerate(rules)]


class FaultMiddleware:
    """
    Pure-ASGI middleware applying a :class:`FaultInjector`'s rules to every request but the admin ones.

    :param app: the application behind.
    :param injector: the live rules.
    """

    def __init__(self, app: ASGIApp, injector: FaultInjector) -> None:
        self.app = app
        self.injector = injector

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request, faulted or not."""
        if scope["type"] != "http" or scope["path"].startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        action = self.injector.pick(scope["method"], scope["path"])
        if action is None or action.is_pass:
            await self.app(scope, receive, send)
            return
        log.info("fault %s on %s %s", action.kind, scope["method"], scope["path"])
        if action.delay:
            await asyncio.sleep(action.delay)
        if action.status is not None:
            await _send_status(send, action)
        elif action.drop:
            await _serve_dropped(self.app, scope, receive, send)
        elif action.slow_body:
            await _serve_slowly(self.app, scope, receive, send, action.slow_body, action.corrupt)
        elif action.corrupt:
            await self.app(scope, receive, _corrupting(send))
        else:
            await self.app(scope, receive, send)


class _DropNoiseFilter(logging.Filter):
    """Hide uvicorn's error line for answers a ``drop`` fault cut on purpose; the fault logs its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep every record but uvicorn's complaint about an unfinished answer."""
        return record.getMessage() != _DROP_LOG_MESSAGE


_DROP_FILTER = _DropNoiseFilter()


def quiet_dropped_answers() -> None:
    """Install (once) the filter hiding uvicorn's complaint about answers dropped on purpose."""
    logger = logging.getLogger("uvicorn.error")
    if _DROP_FILTER not in logger.filters:
        logger.addFilter(_DROP_FILTER)


async def _send_status(send: Send, action: FaultAction) -> None:
    """Answer with the action's status, as a gateway or a throttle would, without calling the app."""
    status = action.status or 503
    style = action.body or ("html" if status in (500, 502, 504) else "json")
    if style == "html":
        body, content_type = _html_page(status), b"text/html; charset=utf-8"
    else:
        body, content_type = json.dumps({"detail": _json_detail(status, action.retry_after)}).encode(), b"application/json"
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if action.retry_after is not None:
        headers.append((b"retry-after", _retry_after_value(action.retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _html_page(status: int) -> bytes:
    phrase = _phrase(status)
    if status == 500:
        # Django's own page when DEBUG is off: what the services answer when their code fails.
        return b"\n<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Server Error (500)</title>\n</head>\n<body>\n  <h1>Server Error (500)</h1><p></p>\n</body>\n</html>\n"
    return (
        f"<html>\r\n<head><title>{status} {phrase}</title></head>\r\n<body>\r\n"
        f"<center><h1>{status} {phrase}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    ).encode()


def _json_detail(status: int, retry_after: float | str | None) -> str:
    if status == 429:
        wait = f" Expected available in {retry_after} seconds." if isinstance(retry_after, (int, float)) else ""
        return f"Request was throttled.{wait}"
    return _phrase(status)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _retry_after_value(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


async def _collect(app: ASGIApp, scope: Scope, receive: Receive) -> tuple[Message, bytes]:
    """Run the app and return its start message and whole body (drop and slow_body need it all)."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def capture(message: Message) -> None:
        """Keep the start message and the body pieces instead of sending them."""
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, capture)
    if start is None:
        raise RuntimeError("the application returned without answering")
    return start, b"".join(chunks)


def _with_content_length(start: Message, length: int) -> Message:
    """Return ``start`` announcing ``length`` bytes and no chunked encoding."""
    headers = [
        (name, value)
        for name, value in start.get("headers", [])
        if name.lower() not in (b"content-length", b"transfer-encoding")
    ]
    headers.append((b"content-length", str(length).encode()))
    return {**start, "headers": headers}


async def _serve_dropped(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Let the app answer, then send the headers and half the body and return: uvicorn closes the connection."""
    start, body = await _collect(app, scope, receive)
    # An empty answer announced as empty would arrive complete: promise one byte that never comes.
    await send(_with_content_length(start, max(len(body), 1)))
    await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})


async def _serve_slowly(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, seconds: float, corrupt: bool
) -> None:
    """Send the headers at once, then the body in pieces spread over ``seconds``."""
    start, body = await _collect(app, scope, receive)
    if corrupt:
        body = _flip_one_byte(body)
    await send(_with_content_length(start, len(body)))
    piece = max(1, -(-len(body) // SLOW_BODY_PIECES))
    pieces = [body[offset : offset + piece] for offset in range(0, len(body), piece)] or [b""]
    for index, chunk in enumerate(pieces):
        await asyncio.sleep(seconds / len(pieces))
        await send({"type": "http.response.body", "body": chunk, "more_body": index < len(pieces) - 1})


def _corrupting(send: Send) -> Send:
    """Return a ``send`` that flips one byte of the first non-empty body piece, streaming the rest."""
    done = False

    async def corrupt_send(message: Message) -> None:
        """Send ``message``, the first non-empty body piece with one byte flipped."""
        nonlocal done
        if not done and message["type"] == "http.response.body" and message.get("body"):
            message = {**message, "body": _flip_one_byte(message["body"])}
            done = True
        await send(message)

    return corrupt_send


def _flip_one_byte(body: bytes) -> bytes:
    if not body:
        return body
    middle = len(body) // 2
    return body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]


def _optional_status(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 400 <= value <= 599:
        raise FaultRuleError(f"{where}: 'status' is an HTTP error status from 400 to 599, not {value!r}")
    return value


def _optional_retry_after(value: Any, where: str) -> float | str | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise FaultRuleError(f"{where}: 'retry_after' is seconds (a number) or an HTTP date, not {value!r}")
    return value


def _optional_choice(value: Any, choices: tuple[str, ...], name: str, where: str) -> str | None:
    if value is None or value in choices:
        return value
    raise FaultRuleError(f"{where}: {name!r} is one of {list(choices)}, not {value!r}")


def _flag(value: Any, name: str, where: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise FaultRuleError(f"{where}: {name!r} is true or false, not {value!r}")


def _seconds(value: Any, name: str, where: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise FaultRuleError(f"{where}: {name!r} is a number of seconds, not {value!r}")
    return float(value)
