"""Fixtures of the reliability tests: the hostile server and connections pointing at it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from hypothesis import settings
from reliability_support import MUSE_PASSWORD, MUSE_TOKEN, RESCALE_KEY, HostileServer


@pytest.fixture(scope="session")
def hostile() -> Iterator[HostileServer]:
    """The hostile server, shared by the session (each test scripts its own answers)."""
    server = HostileServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hostile_conns(hostile: HostileServer) -> Iterator[dict[str, str]]:
    """
    Connections ``muse_hostile`` (ready token) , ``muse_hostile_login`` and ``rescale_hostile`` on the hostile server.

    Set for the whole session (property-based tests cannot use function-scoped fixtures) and
    removed afterwards.
    """
    conns = {
        "AIRFLOW_CONN_MUSE_HOSTILE": {"conn_type": "muse", "host": f"{hostile.url}/api/", "extra": {"token": MUSE_TOKEN}},
        "AIRFLOW_CONN_MUSE_HOSTILE_LOGIN": {
            "conn_type": "muse", "host": f"{hostile.url}/api/", "login": "alice", "password": MUSE_PASSWORD,
        },
        "AIRFLOW_CONN_RESCALE_HOSTILE": {"conn_type": "rescale", "host": hostile.url, "password": RESCALE_KEY},
    }
    before = {name: os.environ.get(name) for name in conns}
    for name, value in conns.items():
        os.environ[name] = json.dumps(value)
    yield {name.removeprefix("AIRFLOW_CONN_").lower(): json.dumps(value) for name, value in conns.items()}
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# Examples are drawn afresh every run and nothing is written into the repository.
settings.register_profile("reliability", database=None, derandomize=False, print_blob=True)
settings.load_profile("reliability")
