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


# ----- the form definition and the connection list's Test button ----------------------------------
#
# Airflow 3.3.2's connection list builds the Test request as ``{..., port: Number(connection.port)}``
# (ui/dist: ``_=Number(n.port)``), so a connection without a port is tested with ``port: 0``; the
# API (``POST /api/v2/connections/test``) then finds the port "differs from the stored connection"
# and, the password being the masked ``***``, answers 400. The forms therefore show the port.


def list_test_button_port(stored_port: int | None) -> int:
    """The port the list's Test icon sends for a stored port: JavaScript's ``Number(null)`` is 0."""
    return 0 if stored_port is None else int(stored_port)


def api_accepts_the_list_test(stored: Connection) -> bool:
    """Run the API route's own check on the body the list's Test icon sends for ``stored``."""
    from airflow.api_fastapi.core_api.routes.public.connections import _same_endpoint

    return _same_endpoint(stored.host or "", stored.host) and _same_endpoint(
        list_test_button_port(stored.port), stored.port
    )


@pytest.mark.parametrize("conn_type", ["muse", "rescale"])
def test_the_form_shows_a_relabelled_port_and_hides_the_unused_fields(conn_type: str) -> None:
    """Port is shown (the Test button needs a stored one), relabelled as the URL's, with a placeholder."""
    behaviour = HOOK_TYPES[conn_type].get_ui_field_behaviour()
    assert "port" not in behaviour["hidden_fields"]
    assert "URL's" in behaviour["relabeling"]["port"]
    assert "443" in behaviour["placeholders"]["port"]
    assert "schema" in behaviour["hidden_fields"]
    assert ("login" in behaviour["hidden_fields"]) is (conn_type == "rescale")
    assert behaviour["relabeling"]["host"] in ("Base URL", "Platform URL")


def test_this_airflow_refuses_the_list_test_of_a_connection_without_port() -> None:
    """
    The Airflow fault the form works around (3.3.1-3.3.2): a stored port of NULL never matches.

    When this fails, Airflow compares 0 with NULL as the same endpoint (apache/airflow#73298):
    docs/connections.md's "The Test button" section can then drop the workaround.
    """
    stored = Connection(conn_id="no_port", conn_type="rescale", host="https://platform.rescale.com", password="k" * 16)
    assert api_accepts_the_list_test(stored) is False


@pytest.mark.parametrize(
    ("conn_type", "host", "port"),
    [
        ("muse", "http://147.100.179.250/api/", 80),
        ("rescale", "https://eu.rescale.com", 443),
        ("rescale", "http://127.0.0.1:8443", 8443),
    ],
)
def test_a_connection_storing_its_urls_port_passes_the_api_check(conn_type: str, host: str, port: int) -> None:
    """Filled as the form asks (the URL's port), the list's Test reaches the hook."""
    stored = Connection(conn_id="with_port", conn_type=conn_type, host=host, port=port, password="k" * 16)
    assert api_accepts_the_list_test(stored) is True


@pytest.mark.parametrize("conn_type", ["muse", "rescale"])
def test_the_port_changes_nothing_with_a_full_url(
    emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch, conn_type: str
) -> None:
    """With a whole URL as host the port is only the URL's own: same base URL, and both Test paths pass."""
    form = emulator.muse_connection() if conn_type == "muse" else emulator.rescale_connection()
    monkeypatch.setenv("AIRFLOW_CONN_NO_PORT", json.dumps(form))
    monkeypatch.setenv("AIRFLOW_CONN_WITH_PORT", json.dumps({**form, "port": emulator.port}))
    hook_type = HOOK_TYPES[conn_type]
    assert hook_type("with_port").base_url == hook_type("no_port").base_url
    # What `airflow connections test` does: the connection from the secrets backends, then its test.
    ok, message = Connection.get_connection_from_secrets("with_port").test_connection()
    assert ok, message
    # What the API behind the Test button does: the form's fields as a transient URI connection.
    ok, message = ui_test_button(monkeypatch, **{**form, "port": emulator.port})
    assert ok, message


HOOK_TYPES = {"muse": MuseHook, "rescale": RescaleHook}
