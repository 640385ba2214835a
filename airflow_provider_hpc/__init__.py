"""Apache Airflow provider for HPC services: Muse (INRAE) cluster runs and Rescale runs."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_PACKAGE = "airflow_provider_hpc"


def _modules(kind: str, *names: str) -> list[str]:
    return [f"{_PACKAGE}.{kind}.{name}" for name in names]


def get_provider_info() -> dict[str, Any]:
    """
    Describe the provider to Airflow's providers manager (entry point ``apache_airflow_provider``).

    Lists every hook, operator, sensor and trigger module, the extra links, both connection types
    with their form (``conn-fields``, ``ui-field-behaviour``), and the ``[hpc]`` configuration section.
    Imports nothing heavy: Airflow calls it while starting.
    """
    from airflow_provider_hpc.hooks._forms import MUSE_DOC_URL, RESCALE_PLATFORM_URL, connection_types

    return {
        "package-name": "airflow-provider-hpc",
        "name": "HPC (Muse, Rescale)",
        "description": "Run simulations on HPC services (INRAE Muse cluster, Rescale) and chain their results.",
        "versions": [__version__],
        "integrations": [
            {"integration-name": "Muse", "external-doc-url": MUSE_DOC_URL, "tags": ["service"]},
            {"integration-name": "Rescale", "external-doc-url": f"{RESCALE_PLATFORM_URL}/", "tags": ["service"]},
        ],
        "hooks": [
            {"integration-name": "Muse", "python-modules": _modules("hooks", "muse")},
            {"integration-name": "Rescale", "python-modules": _modules("hooks", "rescale")},
        ],
        "operators": [
            {"integration-name": "Muse", "python-modules": _modules("operators", "muse")},
            {
                "integration-name": "Rescale",
                "python-modules": _modules("operators", "rescale", "rescale_download", "rescale_submit"),
            },
        ],
        "sensors": [
            {"integration-name": "Muse", "python-modules": _modules("sensors", "muse")},
            {"integration-name": "Rescale", "python-modules": _modules("sensors", "rescale")},
        ],
        "triggers": [
            {"integration-name": "Muse", "python-modules": _modules("triggers", "muse")},
            {"integration-name": "Rescale", "python-modules": _modules("triggers", "rescale", "rescale_job")},
        ],
        "extra-links": [
            f"{_PACKAGE}.links.muse.MuseJobStateLink",
            f"{_PACKAGE}.links.rescale.RescaleJobLink",
        ],
        "connection-types": connection_types(),
        "config": {
            "hpc": {
                "description": "Settings of the HPC provider (Muse, Rescale).",
                "options": {
                    "results_base": {
                        "description": "The folder under which task results are written, one sub-folder per "
                        "DAG, run and task: a local path or any fsspec URL (s3://bucket/prefix, gs://...). "
                        "Empty means {AIRFLOW_HOME}/hpc-results.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "s3://my-bucket/hpc-results",
                        "default": None,
                    },
                    "default_deferrable": {
                        "description": "Whether Muse and Rescale waits defer to the triggerer when a task does "
                        "not say (deferrable=...). On by default whatever [operators] default_deferrable says, "
                        "since Airflow writes false there in every airflow.cfg it generates; set false to wait "
                        "in the worker. Unset means on, unless the environment sets "
                        "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE.",
                        "version_added": "0.1.0",
                        "type": "boolean",
                        "example": "false",
                        "default": None,
                    },
                },
            },
        },
    }
