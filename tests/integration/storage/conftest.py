"""
Fixtures of the object-storage tests: a real S3 server (moto's) on loopback, a fresh bucket per
test, and Airflow's ``aws_default`` connection pointing at it.

Nothing of the object store is mocked: the provider writes through Airflow's ``ObjectStoragePath``,
the amazon provider's ``s3fs`` filesystem and HTTP, as it does against AWS, and the tests look at
the bucket with boto3 (objects and multipart uploads in progress).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from tests.integration.storage.s3_support import S3Bucket

REGION = "us-east-1"
# moto accepts any key; these are its documented test credentials, not a secret.
ACCESS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def _forget_airflow_filesystems() -> None:
    """Drop Airflow's cached object stores, so the next path builds its filesystem from the current connection."""
    from airflow.sdk.io import store

    for alias in [a for a in store._STORE_CACHE if a.startswith("s3")]:
        del store._STORE_CACHE[alias]


def _bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """Point ``aws_default`` at ``endpoint`` for one test, with a bucket of its own."""
    conn = {"conn_type": "aws", "login": ACCESS["aws_access_key_id"], "password": ACCESS["aws_secret_access_key"],
            "extra": {"endpoint_url": endpoint, "region_name": REGION}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))
    _forget_airflow_filesystems()
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, **ACCESS)
    name = f"hpc-results-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    try:
        yield S3Bucket(name, endpoint, client)
    finally:
        _forget_airflow_filesystems()
        client.close()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server, in a thread of the test process, on 127.0.0.1 and a free port."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A fresh bucket of the in-process S3 server, ``aws_default`` pointing at it."""
    yield from _bucket(s3_endpoint, monkeypatch)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def s3_apart(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """
    A bucket of an S3 server in a process of its own (for memory measurements: the server keeps
    every part it receives, which must not count against the writer).
    """
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{endpoint}/moto-api/", timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)
        yield from _bucket(endpoint, monkeypatch)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
