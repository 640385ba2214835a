"""OpenLineage events of the provider's tasks: datasets named by OpenLineage's rules, the remote job, no secrets."""

from __future__ import annotations

import json

import pytest
from openlineage.client.serde import Serde

from airflow_provider_hpc.lineage import HPC_JOB_FACET_SCHEMA, MAX_DATASETS, LineageMixin, LineageRecord, dataset_name


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("s3://aws_default@results/muse/run/stdout.txt", ("s3://results", "muse/run/stdout.txt")),
        ("s3://results/harvest/", ("s3://results", "harvest/")),
        ("gs://bucket/a.zip", ("gs://bucket", "a.zip")),
        ("file:///data/out/run.zip", ("file", "/data/out/run.zip")),
        ("/data/in/case.json", ("file", "/data/in/case.json")),
        ("https://user:secret@files.example.org:8443/case.json?token=abc", ("https://files.example.org:8443", "/case.json")),
    ],
)
def test_locations_are_named_by_openlineage_rules_without_connection_ids_or_credentials(location: str, expected: tuple[str, str]) -> None:
    assert dataset_name(location) == expected


class Task(LineageMixin):
    """An operator that recorded what it did."""


def event_json(lineage) -> str:
    return json.dumps(
        {
            "inputs": [Serde.to_dict(d) for d in lineage.inputs],
            "outputs": [Serde.to_dict(d) for d in lineage.outputs],
            "run": {k: Serde.to_dict(v) for k, v in lineage.run_facets.items()},
            "job": {k: Serde.to_dict(v) for k, v in lineage.job_facets.items()},
        }
    )


def test_a_finished_task_reports_its_inputs_outputs_and_remote_job() -> None:
    task = Task()
    task.lineage = LineageRecord(
        "rescale",
        job_id="QTVia",
        url="https://eu.rescale.com/jobs/QTVia/",
        software="user_included",
        inputs=["s3://aws_default@cases/case.json", "s3://aws_default@cases/case.json", "/opt/solve.py"],
        outputs=["s3://aws_default@results/harvest/QTVia/"],
    )

    lineage = task.get_openlineage_facets_on_complete(None)

    assert [(d.namespace, d.name) for d in lineage.inputs] == [("s3://cases", "case.json"), ("file", "/opt/solve.py")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [("s3://results", "harvest/QTVia/")]
    external = lineage.run_facets["externalQuery"]
    assert (external.externalQueryId, external.source) == ("QTVia", "rescale")
    facet = Serde.to_dict(lineage.job_facets["hpcJob"])
    assert facet["_schemaURL"] == HPC_JOB_FACET_SCHEMA
    assert {k: facet[k] for k in ("service", "jobId", "url", "software")} == {
        "service": "rescale", "jobId": "QTVia", "url": "https://eu.rescale.com/jobs/QTVia/", "software": "user_included"
    }
    assert "aws_default" not in event_json(lineage)


def test_a_task_that_failed_before_its_job_existed_reports_only_what_it_sent() -> None:
    task = Task()
    task.lineage = LineageRecord("muse", inputs=["/data/in.txt"])

    lineage = task.get_openlineage_facets_on_failure(None)

    assert [d.name for d in lineage.inputs] == ["/data/in.txt"] and not lineage.outputs
    assert not lineage.run_facets and not lineage.job_facets


def test_a_task_that_recorded_nothing_reports_an_empty_lineage() -> None:
    lineage = Task().get_openlineage_facets_on_complete(None)
    assert not lineage.inputs and not lineage.outputs and not lineage.run_facets


def test_credentials_in_a_job_url_never_reach_the_event_and_huge_lists_are_capped() -> None:
    task = Task()
    task.lineage = LineageRecord(
        "muse", job_id="k1", url="https://login:p4ssw0rd-secret@muse.example.org/api/runs/k1/state?token=t0k3n",
        outputs=[f"/results/file-{i}" for i in range(MAX_DATASETS * 3)],
    )

    lineage = task.get_openlineage_facets_on_complete(None)

    text = event_json(lineage)
    assert "p4ssw0rd-secret" not in text and "t0k3n" not in text and "login" not in text
    assert len(lineage.outputs) == MAX_DATASETS
