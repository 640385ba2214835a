"""
Both connection types against the local emulator (a real HTTP server on 127.0.0.1): the hooks'
``test_connection``, and the path the Airflow UI's *Test* button takes (the form's fields turned into a
transient ``AIRFLOW_CONN_*`` URI, then ``Connection.test_connection()``), for good and bad credentials,
and for every way of giving a connection (JSON, URI, ready token).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from airflow.models.connection import Connection

from hpc_emulator import EmulatorServer
from airflow_provider_hpc.hooks.muse import MuseHook
from airflow_provider_hpc.hooks.rescale import RescaleHook

# Airflow's own Connection.test_connection still asks the providers manager the deprecated way.
pytestmark = pytest.mark.filterwarnings("ignore:ProvidersManager.hooks is deprecated")

def ui_test_button(monkeypatch: pytest.MonkeyPatch, **form: Any) -> tuple[bool, str]:
    """Do what the API behind the form's Test button does: a transient connection exported as a URI, then tested."""
    if isinstance(form.get("extra"), dict):
        form["extra"] = json.dumps(form["extra"])
    conn = Connection(conn_id="transient_ui_test", **form)
    monkeypatch.setenv("AIRFLOW_CONN_TRANSIENT_UI_TEST", conn.get_uri())
    return conn.test_connection()


def test_muse_test_button_obtains_and_verifies_a_token(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Muse form (base URL, username, password) passes the Test button against the emulator."""
    ok, message = ui_test_button(monkeypatch, **emulator.muse_connection())
    assert ok, message
    assert emulator.muse_url in message


def test_muse_test_button_with_a_wrong_password(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong password fails the test with the service's words, never repeating the password."""
    form = {**emulator.muse_connection(), "password": "not-the-password"}
    ok, message = ui_test_button(monkeypatch, **form)
    assert not ok
    assert "401" in message and "jwt/obtain" in message
    assert "not-the-password" not in message


def test_muse_ready_token_connection(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection holding only a ready JWT (the ``token`` extra) passes; a bogus token fails."""
    monkeypatch.setenv("AIRFLOW_CONN_MUSE_LOGIN", json.dumps(emulator.muse_connection()))
    token = MuseHook("muse_login").get_token()
    ready = {"conn_type": "muse", "host": emulator.muse_url, "extra": {"token": token}}
    assert ui_test_button(monkeypatch, **ready)[0] is True
    bogus = {**ready, "extra": {"token": "eyJhbGciOiJIUzI1NiJ9.bm90LWEtdG9rZW4.c2lnbmF0dXJl"}}
    ok, message = ui_test_button(monkeypatch, **bogus)
    assert not ok and "does not accept the token" in message


def test_muse_uri_connection(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The URI form with a bare host: port and path from the URI, ``scheme=http`` as an extra."""
    conn = emulator.muse_connection()
    uri = f"muse://{conn['login']}:{conn['password']}@127.0.0.1:{emulator.port}/api?scheme=http"
    monkeypatch.setenv("AIRFLOW_CONN_MUSE_URI", uri)
    hook = MuseHook("muse_uri")
    assert hook.base_url == emulator.muse_url
    assert hook.test_connection()[0] is True


def test_rescale_test_button(emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Rescale form (platform URL, API key) passes; a wrong key fails with the platform's 401."""
    ok, message = ui_test_button(monkeypatch, **emulator.rescale_connection())
    assert ok, message
    ok, message = ui_test_button(monkeypatch, **{**emulator.rescale_connection(), "password": "wrong-key-0000"})
    assert not ok and "401" in message and "Invalid token" in message
    assert "wrong-key-0000" not in message


@pytest.mark.parametrize("api_version", ["v1", "v2"])
def test_rescale_hook_test_connection_for_both_versions(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch, api_version: str
) -> None:
    """Both API versions answer the test (the emulator serves /api/ and /api/v2/)."""
    conn = emulator.rescale_connection()
    conn["extra"] = {**conn.get("extra", {}), "api_version": api_version}
    monkeypatch.setenv("AIRFLOW_CONN_RESCALE_VERSION", json.dumps(conn))
    ok, message = RescaleHook("rescale_version").test_connection()
    assert ok, message


def test_unreachable_service_fails_the_test_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listening: the test fails with a connection error, after the connection's attempts."""
    form = {"conn_type": "rescale", "host": "http://127.0.0.1:9", "password": "k" * 16, "extra": {"max_attempts": 1}}
    ok, message = ui_test_button(monkeypatch, **form)
    assert not ok and "connection failed" in message
