"""
Fixtures of the unit tests: connections given as ``AIRFLOW_CONN_*`` variables, fast retry policies,
recorded sleeps, hooks, and a local destination folder as an ``ObjectStoragePath``.

Unit tests never reach the network: the sync side is answered by ``requests_mock``, the async side
by a tiny aiohttp server bound to 127.0.0.1 inside the test.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import tenacity.nap
from airflow.sdk import ObjectStoragePath

from airflow_provider_hpc.transport.retry import RetryPolicy
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.hooks.rescale import RescaleHook

MUSE_URL = "http://muse.test/api/"
RESCALE_URL = "https://platform.rescale.com/"


@dataclass(frozen=True)
class Creds:
    """The secrets the fixtures' connections hold; no test output may ever show one of them."""

    login: str = "alice"
    password: str = "s3cret-pass"
    jwt: str = "eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyIjoiYWxpY2UiLCJuIjoxfQ.Zmlyc3Qtc2lnbmF0dXJl"
    new_jwt: str = "eyJhbGciOiJIUzI1NiJ9.eyJ1c2VyIjoiYWxpY2UiLCJuIjoyfQ.c2Vjb25kLXNpZ25hdHVyZQ"
    api_key: str = "rk-0123456789abcdef-SECRET"

    @property
    def all(self) -> tuple[str, ...]:
        """Every secret, for leak checks."""
        return (self.password, self.jwt, self.new_jwt, self.api_key)


@pytest.fixture
def creds() -> Creds:
    """The secrets held by the test connections."""
    return Creds()


@pytest.fixture
def set_conn(monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Return a function that defines a connection through ``AIRFLOW_CONN_<ID>`` (Airflow's JSON form)."""

    def define(conn_id: str, **fields: Any) -> str:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))
        return conn_id

    return define


@pytest.fixture
def fast_retry() -> RetryPolicy:
    """A retry policy of three attempts whose waits last milliseconds."""
    return RetryPolicy(max_attempts=3, initial_wait=0.001, max_wait=0.004, max_retry_after=0.01)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Record, instead of sleeping, every wait the sync retry loop asks for (tenacity's ``nap.sleep``)."""
    recorded: list[float] = []
    monkeypatch.setattr(tenacity.nap, "time", SimpleNamespace(sleep=recorded.append))
    return recorded


@pytest.fixture
def muse_conn(set_conn: Callable[..., str], creds: Creds) -> str:
    """A Muse connection with login and password (the token is obtained from ``jwt/obtain/``)."""
    return set_conn("muse_test", conn_type="muse", host=MUSE_URL, login=creds.login, password=creds.password)


@pytest.fixture
def muse_hook(muse_conn: str, fast_retry: RetryPolicy) -> Iterator[MuseHook]:
    """A Muse hook on :func:`muse_conn` with the fast retry policy."""
    hook = MuseHook(muse_conn, retry=fast_retry)
    yield hook
    hook.close()


@pytest.fixture
def rescale_conn(set_conn: Callable[..., str], creds: Creds) -> str:
    """A Rescale connection on the North America platform with an API key."""
    return set_conn("rescale_test", conn_type="rescale", host=RESCALE_URL, password=creds.api_key)


@pytest.fixture
def rescale_hook(rescale_conn: str, fast_retry: RetryPolicy) -> Iterator[RescaleHook]:
    """A Rescale hook on :func:`rescale_conn` with the fast retry policy."""
    hook = RescaleHook(rescale_conn, retry=fast_retry)
    yield hook
    hook.close()


@pytest.fixture
def dest_dir(tmp_path: Any) -> ObjectStoragePath:
    """A local destination folder, as the ``file://`` ``ObjectStoragePath`` users give."""
    return ObjectStoragePath(f"file://{tmp_path}")


def files_under(root: ObjectStoragePath) -> list[str]:
    """Return the relative names of every file under ``root`` (temporary ones included)."""
    base = str(root).rstrip("/")
    return sorted(str(p)[len(base) + 1 :] for p in root.rglob("*") if p.is_file())


@pytest.fixture
def list_files() -> Callable[[ObjectStoragePath], list[str]]:
    """Return a function listing every file under a folder, to prove nothing half-written stays."""
    return files_under
