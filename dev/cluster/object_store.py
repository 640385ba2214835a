"""An S3-compatible object store on loopback (moto's ``ThreadedMotoServer``) and the Airflow connection to it."""

from __future__ import annotations

import json
import logging
from typing import Any

from dev.airflow_stack import free_port

CONN_ID = "aws_default"
REGION = "us-east-1"
# moto accepts any credentials; these are not secrets, only the shape an aws connection needs.
ACCESS_KEY = "cluster-access-key"
SECRET_KEY = "cluster-secret-key"


class S3Server:
    """
    moto's S3 in a thread of this process, with one bucket.

    :param bucket: the bucket made at start (results and remote task logs go there).
    """

    def __init__(self, bucket: str = "hpc-cluster") -> None:
        self.bucket = bucket
        self.port = 0
        self._server: Any = None

    @property
    def endpoint_url(self) -> str:
        """The S3 endpoint (``http://127.0.0.1:PORT``)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        """Serve S3 on a free loopback port and create the bucket."""
        from moto.server import ThreadedMotoServer

        # moto's werkzeug logs every request at INFO: thousands of lines, none of them useful here.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        """Stop serving (moto keeps the objects in memory: they go with it)."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self) -> Any:
        """A boto3 S3 client on this store (for tests to look at objects directly)."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Return every object key under ``prefix`` in the bucket (all pages)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        """Return one object's bytes (``NoSuchKey`` from the client when there is none)."""
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def airflow_connection(self) -> dict[str, Any]:
        """The ``aws`` connection (JSON form) that points Airflow, the S3 hook and s3fs here."""
        return {
            "conn_type": "aws",
            "login": ACCESS_KEY,
            "password": SECRET_KEY,
            "extra": {"endpoint_url": self.endpoint_url, "region_name": REGION},
        }

    def airflow_conn_env(self) -> dict[str, str]:
        """``AIRFLOW_CONN_AWS_DEFAULT`` for every Airflow process."""
        return {f"AIRFLOW_CONN_{CONN_ID.upper()}": json.dumps(self.airflow_connection())}

    def url(self, prefix: str) -> str:
        """An ``ObjectStoragePath`` URL under the bucket that names the connection (``s3://aws_default@bucket/prefix``)."""
        return f"s3://{CONN_ID}@{self.bucket}/{prefix.strip('/')}"
