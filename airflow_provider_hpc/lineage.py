"""
OpenLineage for the provider's operators: the files a task sent, the results it wrote, the remote job.

The OpenLineage provider calls ``get_openlineage_facets_on_complete`` / ``_on_failure`` of an
operator once its task ended. The operators fill a :class:`LineageRecord` as they go (the inputs
before the submit, the job once it exists, the results once they are stored), and
:class:`LineageMixin` turns it into an ``OperatorLineage``:

- every input file is an input dataset, every stored result file or harvested folder an output
  dataset, named by OpenLineage's naming rules (``s3://bucket`` + key, ``file`` + absolute path);
- the remote job is a run facet ``externalQuery`` (``externalQueryId`` = the Muse key or the
  Rescale job id, ``source`` = the service) and a job facet ``hpcJob`` with its service, id, URL
  and software.

Nothing here is imported unless the OpenLineage provider asks: the provider does not need it.
Locations are reduced to scheme, bucket or host and path: a connection id, credentials or a
query string in a URL never reach a lineage event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

#: The ``hpcJob`` facet's schema id (its fields are described in docs/lineage.md).
HPC_JOB_FACET_SCHEMA = "urn:airflow-provider-hpc:facet:HpcJobFacet:1-0-0"
#: The most datasets one side of an event lists (a harvest of 100,000 files is one folder, not 100,000).
MAX_DATASETS = 100


@dataclass
class LineageRecord:
    """
    What one task did, for its lineage event.

    :param service: ``"muse"`` or ``"rescale"``.
    :param job_id: the Muse run's key or the Rescale job id, once it exists.
    :param url: the remote job's page (the task's extra link).
    :param software: the Muse software or the Rescale analysis code.
    :param inputs: the locations of the files the task sent.
    :param outputs: the locations of the result files or folders it wrote.
    """

    service: str
    job_id: str | None = None
    url: str | None = None
    software: str | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def dataset_name(location: str) -> tuple[str, str]:
    """
    Return the OpenLineage ``(namespace, name)`` of a file or folder location.

    ``s3://conn@bucket/key`` gives ``("s3://bucket", "key")`` (the connection id dropped), a local
    path or ``file://`` URL ``("file", "/abs/path")``, an HTTP URL ``("https://host", "/path")``
    without credentials or query.

    :param location: a local path, a URL or an ``ObjectStoragePath``'s string.
    """
    text = str(location)
    parts = urlsplit(text)
    if not parts.scheme or parts.scheme == "file" or len(parts.scheme) == 1:  # "C:\\..." is a path
        return "file", parts.path if parts.scheme == "file" else text
    host = parts.hostname or ""
    if parts.port and parts.scheme in ("http", "https"):
        host = f"{host}:{parts.port}"
    if parts.scheme in ("http", "https"):
        return f"{parts.scheme}://{host}", parts.path or "/"
    return f"{parts.scheme}://{host}", parts.path.lstrip("/") or "/"


class LineageMixin:
    """
    ``get_openlineage_facets_on_complete`` and ``_on_failure`` built from the operator's :attr:`lineage`.

    An operator sets ``self.lineage`` to a :class:`LineageRecord` and fills it as its task goes.
    """

    lineage: LineageRecord | None = None

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Return the task's inputs, outputs and remote job, for the OpenLineage provider."""
        return operator_lineage(self.lineage)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> Any:
        """Return what the failed task had sent and written, and its remote job if it existed."""
        return operator_lineage(self.lineage)


def operator_lineage(record: LineageRecord | None) -> Any:
    """Return the ``OperatorLineage`` of ``record`` (an empty one when the task recorded nothing)."""
    from airflow.providers.common.compat.openlineage.facet import Dataset, ExternalQueryRunFacet
    from airflow.providers.openlineage.extractors import OperatorLineage

    if record is None:
        return OperatorLineage()
    inputs = [Dataset(*dataset_name(location)) for location in _unique(record.inputs)]
    outputs = [Dataset(*dataset_name(location)) for location in _unique(record.outputs)]
    run_facets: dict[str, Any] = {}
    job_facets: dict[str, Any] = {}
    if record.job_id:
        run_facets["externalQuery"] = ExternalQueryRunFacet(externalQueryId=record.job_id, source=record.service)
        job_facets["hpcJob"] = hpc_job_facet(record)
    return OperatorLineage(inputs=inputs, outputs=outputs, run_facets=run_facets, job_facets=job_facets)


def hpc_job_facet(record: LineageRecord) -> Any:
    """Return the ``hpcJob`` job facet: the remote job's service, id, URL and software."""
    from openlineage.client.generated.base import JobFacet

    url = record.url
    if url:  # a page on the service: scheme, host and path only
        parts = urlsplit(url)
        url = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
    facet = JobFacet().with_additional_properties(service=record.service, jobId=record.job_id, url=url, software=record.software)
    facet._schemaURL = HPC_JOB_FACET_SCHEMA  # set last: building the facet resets it to JobFacet's
    return facet


def _unique(locations: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for location in locations:
        if location:
            seen.setdefault(str(location), None)
    return list(seen)[:MAX_DATASETS]
