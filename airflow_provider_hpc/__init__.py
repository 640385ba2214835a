"""Apache Airflow provider for HPC services: Muse (INRAE) cluster runs and Rescale runs."""

from __future__ import annotations

__version__ = "0.1.0"

_TIMEOUT_FIELDS = {
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
    "verify": {
        "label": "Verify TLS certificate",
        "schema": {"type": ["boolean", "null"], "default": True},
        "description": "Leave on unless the service uses a self-signed certificate you trust.",
    },
    "max_attempts": {
        "label": "Attempts per request",
        "schema": {"type": ["integer", "null"], "default": 5},
        "description": "Bounded retries on connection errors, 429 and 5xx answers.",
    },
}


def get_provider_info() -> dict:
    """Describe the provider to Airflow's providers manager (entry point ``apache_airflow_provider``)."""
    return {
        "package-name": "airflow-provider-hpc",
        "name": "HPC (Muse, Rescale)",
        "description": "Run simulations on HPC services (INRAE Muse cluster, Rescale) and chain their results.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Muse",
                "external-doc-url": "http://147.100.179.250/api/",
                "tags": ["service"],
            },
            {
                "integration-name": "Rescale",
                "external-doc-url": "https://platform.rescale.com/",
                "tags": ["service"],
            },
        ],
        "hooks": [
            {"integration-name": "Muse", "python-modules": ["airflow_provider_hpc.hooks.muse"]},
            {"integration-name": "Rescale", "python-modules": ["airflow_provider_hpc.hooks.rescale"]},
        ],
        "connection-types": [
            {
                "connection-type": "muse",
                "hook-class-name": "airflow_provider_hpc.hooks.muse.MuseHook",
                "hook-name": "Muse (INRAE cluster web service)",
                "conn-fields": {
                    "token": {
                        "label": "Ready JWT (instead of login/password)",
                        "schema": {"type": ["string", "null"], "format": "password"},
                    },
                    **_TIMEOUT_FIELDS,
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "extra"],
                    "relabeling": {"host": "Base URL", "login": "Username"},
                    "placeholders": {
                        "host": "http://147.100.179.250/api/",
                        "login": "your Muse username",
                        "password": "your Muse password (or leave empty and give a ready token)",
                    },
                },
            },
            {
                "connection-type": "rescale",
                "hook-class-name": "airflow_provider_hpc.hooks.rescale.RescaleHook",
                "hook-name": "Rescale",
                "conn-fields": {
                    "api_version": {
                        "label": "API version",
                        "schema": {"type": ["string", "null"], "default": "v1", "enum": ["v1", "v2"]},
                        "description": "v1 uses /api/jobs/...; v2 uses /api/v2/jobs/...",
                    },
                    **_TIMEOUT_FIELDS,
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "port", "login", "extra"],
                    "relabeling": {"host": "Platform URL", "password": "API key"},
                    "placeholders": {
                        "host": "https://platform.rescale.com (or eu.rescale.com, platform.rescale.jp, ...)",
                        "password": "your Rescale API key",
                    },
                },
            },
        ],
    }
