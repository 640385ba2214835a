"""
What the Airflow connection form shows for the ``muse`` and ``rescale`` types: one source for all forms.

Airflow 3.2+ reads the form from the provider info (``conn-fields`` and ``ui-field-behaviour``,
see :func:`airflow_provider_hpc.get_provider_info`) without importing the hooks; older forms ask the
hooks (``get_ui_field_behaviour`` and ``get_connection_form_widgets``). Both are built from the
dictionaries below, so the forms cannot drift apart. This module imports nothing heavy: the
providers manager loads it while Airflow starts.
"""

from __future__ import annotations

import copy
from typing import Any

MUSE_DOC_URL = "http://147.100.179.250/api/"
RESCALE_PLATFORM_URL = "https://platform.rescale.com"

# The Port field is shown, not hidden, for the connection list's Test button: Airflow 3.3.1-3.3.2
# sends ``port: Number(stored port)``, i.e. 0 for a connection without one, and its API refuses a
# test whose port differs from the stored one (``0`` is not ``NULL``) unless the request carries a
# new password, which the list never does. A connection storing its URL's port (80, 443...) passes
# that check; the hooks read the port only when the host is a bare name (docs/connections.md).
MUSE_PORT_LABEL = "Port (the Base URL's)"
RESCALE_PORT_LABEL = "Port (the Platform URL's)"
PORT_PLACEHOLDER = "80 for http://..., 443 for https://... (the Test button needs it)"

#: Extras both connection types read (transport settings), in the order the form shows them.
TRANSPORT_FIELDS: dict[str, dict[str, Any]] = {
    "verify": {
        "label": "Verify TLS certificate",
        "schema": {"type": ["boolean", "null"], "default": True},
        "description": "Leave on unless the service uses a certificate you cannot verify (then prefer a CA bundle).",
    },
    "ca_bundle": {
        "label": "CA bundle path",
        "schema": {"type": ["string", "null"]},
        "description": "Path of a PEM file of the certificate authorities to trust (a private or self-signed CA).",
    },
    "connect_timeout": {
        "label": "Connect timeout (s)",
        "schema": {"type": ["number", "null"], "default": 10},
        "description": "Seconds to wait for a TCP/TLS connection.",
    },
    "read_timeout": {
        "label": "Read timeout (s)",
        "schema": {"type": ["number", "null"], "default": 60},
        "description": "Seconds to wait for the server between two bytes of an answer.",
    },
    "max_attempts": {
        "label": "Attempts per request",
        "schema": {"type": ["integer", "null"], "default": 5},
        "description": "Attempts in all, the first included, on connection errors, timeouts, 429 and 5xx answers.",
    },
}

MUSE_FORM: dict[str, Any] = {
    "connection-type": "muse",
    "hook-class-name": "airflow_provider_hpc.hooks.muse.MuseHook",
    "hook-name": "Muse (INRAE cluster web service)",
    "conn-fields": {
        "token": {
            "label": "Ready JWT (instead of username/password)",
            "schema": {"type": ["string", "null"], "format": "password"},
            "description": "A token from jwt/obtain/; it cannot be renewed when it expires. "
            "Leave empty to obtain one with the username and password.",
        },
        **TRANSPORT_FIELDS,
    },
    "ui-field-behaviour": {
        "hidden-fields": ["schema"],
        "relabeling": {"host": "Base URL", "login": "Username", "password": "Password", "port": MUSE_PORT_LABEL},
        "placeholders": {
            "host": MUSE_DOC_URL,
            "port": PORT_PLACEHOLDER,
            "login": "your Muse username",
            "password": "your Muse password (or leave empty and give a ready token)",
        },
    },
}

RESCALE_FORM: dict[str, Any] = {
    "connection-type": "rescale",
    "hook-class-name": "airflow_provider_hpc.hooks.rescale.RescaleHook",
    "hook-name": "Rescale",
    "conn-fields": {
        "api_version": {
            "label": "API version",
            "schema": {"type": ["string", "null"], "default": "v1", "enum": ["v1", "v2"]},
            "description": "v1 uses /api/jobs/...; v2 uses /api/v2/jobs/... (job statuses always come from v2).",
        },
        **TRANSPORT_FIELDS,
    },
    "ui-field-behaviour": {
        "hidden-fields": ["schema", "login"],
        "relabeling": {"host": "Platform URL", "password": "API key", "port": RESCALE_PORT_LABEL},
        "placeholders": {
            "host": f"{RESCALE_PLATFORM_URL} (or https://eu.rescale.com, https://platform.rescale.jp, ...)",
            "port": "443",
            "password": "your Rescale API key",
        },
    },
}

FORMS: dict[str, dict[str, Any]] = {"muse": MUSE_FORM, "rescale": RESCALE_FORM}


def connection_types() -> list[dict[str, Any]]:
    """Return the ``connection-types`` entries of the provider info (copies: callers may change them)."""
    return [copy.deepcopy(form) for form in FORMS.values()]


def ui_field_behaviour(conn_type: str) -> dict[str, Any]:
    """Return the form behaviour in the hook-method style (``hidden_fields``, ``relabeling``, ``placeholders``)."""
    behaviour = FORMS[conn_type]["ui-field-behaviour"]
    return {
        "hidden_fields": list(behaviour["hidden-fields"]),
        "relabeling": dict(behaviour["relabeling"]),
        "placeholders": dict(behaviour["placeholders"]),
    }


def connection_form_widgets(conn_type: str) -> dict[str, Any]:
    """
    Return the extra fields as WTForms fields, for forms that read them from the hook.

    Imports Flask-AppBuilder and WTForms only when called (a form that asks has them).
    """
    from flask_appbuilder.fieldwidgets import BS3PasswordFieldWidget, BS3TextFieldWidget
    from flask_babel import lazy_gettext
    from wtforms import BooleanField, IntegerField, PasswordField, StringField
    from wtforms.validators import Optional, any_of

    widgets: dict[str, Any] = {}
    for name, spec in FORMS[conn_type]["conn-fields"].items():
        schema = spec["schema"]
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        label = lazy_gettext(spec["label"])
        common: dict[str, Any] = {"description": spec.get("description", "")}
        if "default" in schema:
            common["default"] = schema["default"]
        validators: list[Any] = [Optional()]
        if "enum" in schema:
            validators.append(any_of(list(schema["enum"])))
        if schema.get("format") == "password":
            widgets[name] = PasswordField(label, widget=BS3PasswordFieldWidget(), **common)
        elif "boolean" in types:
            widgets[name] = BooleanField(label, **common)
        elif "integer" in types:
            widgets[name] = IntegerField(label, validators=validators, **common)
        else:  # strings, and numbers with decimals (a text field: the hook parses the number)
            if "default" in common and not isinstance(common["default"], str):
                common["default"] = str(common["default"])
            widgets[name] = StringField(label, validators=validators, widget=BS3TextFieldWidget(), **common)
    return widgets
