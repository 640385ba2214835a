"""
A small Muse client over plain ``requests``, and a polling function, for the emulator's own tests.

It speaks the API as the reference pages show it (``shared/api/muse``) and nothing more, so what
the tests check is the emulator's answers, not the provider's hooks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from hpc_emulator import DEMO_PASSWORD, EmulatorServer
from hpc_emulator.software import BUILTIN_CATALOGUE

SOFTWARE = "sw_example"
# The example's own files: stdin.txt (example E) and usrcmd.sh (example F).
EXAMPLE_DIR: Path = BUILTIN_CATALOGUE / SOFTWARE
WAIT_SECONDS = 15.0
HTTP_TIMEOUT = 10.0


def wait_for(probe: Callable[[], Any], timeout: float = WAIT_SECONDS, interval: float = 0.02) -> Any:
    """Call ``probe`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s")


def key_of(answer: dict[str, Any]) -> str:
    """Return the run key of a submission answer: the last path segment of its ``url``."""
    return str(answer["url"]).rstrip("/").rsplit("/", 1)[-1]


@dataclass
class MuseClient:
    """The Muse side of a running emulator, reached with plain ``requests``."""

    server: EmulatorServer
    session: requests.Session = field(default_factory=requests.Session)
    _token: str | None = None

    @property
    def base(self) -> str:
        """The Muse base URL, ending with ``/api/``."""
        return self.server.muse_url

    @property
    def admin(self) -> str:
        """The emulator's admin URL prefix, ending with ``/_emulator/``."""
        return f"{self.server.base_url}/_emulator/"

    def token(self) -> str:
        """Return a token of the ``demo`` account, obtained once."""
        if self._token is None:
            answer = self.session.post(
                f"{self.base}jwt/obtain/", data={"username": "demo", "password": DEMO_PASSWORD}, timeout=HTTP_TIMEOUT
            )
            assert answer.status_code == 200, answer.text
            self._token = answer.json()["token"]
        return self._token

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET a path under the Muse base URL."""
        return self.session.get(f"{self.base}{path}", timeout=HTTP_TIMEOUT, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        """POST to a path under the Muse base URL."""
        return self.session.post(f"{self.base}{path}", timeout=HTTP_TIMEOUT, **kwargs)

    def submit_json(self, **params: Any) -> dict[str, Any]:
        """Submit a cluster run with a JSON body (the token added); return the answer."""
        answer = self.post(f"software/muse/run/{SOFTWARE}/", json={**params, "jwt": self.token()})
        assert answer.status_code == 200, answer.text
        return answer.json()

    def state(self, key: str) -> dict[str, Any]:
        """Return the state answer of a run."""
        answer = self.get(f"software/muse/state/{SOFTWARE}/{key}/")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def wait_ended(self, key: str) -> dict[str, Any]:
        """Poll the state until ``cr`` is no longer ``WAIT``; return the last state answer."""
        return wait_for(lambda: (state := self.state(key))["info"]["report"]["cr"] != "WAIT" and state)

    def result(self, key: str) -> requests.Response:
        """GET the result of a run."""
        return self.get(f"software/muse/run/{SOFTWARE}/{key}/")

    def counters(self) -> dict[str, dict[str, int]]:
        """Return the emulator's counters."""
        answer = self.session.get(f"{self.admin}counters", timeout=HTTP_TIMEOUT)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def jobs(self) -> list[dict[str, Any]]:
        """Return the Muse jobs as the emulator sees them."""
        return self.session.get(f"{self.admin}muse/jobs", timeout=HTTP_TIMEOUT).json()
