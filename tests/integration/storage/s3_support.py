"""What the object-storage tests share: a view of one S3 bucket (objects, uploads in progress)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow.sdk import ObjectStoragePath

CONN_ID = "aws_default"


@dataclass
class S3Bucket:
    """One bucket of the S3 server, with what a test needs to look inside it."""

    name: str
    endpoint: str
    client: Any

    def url(self, key: str = "") -> str:
        """Return the ``ObjectStoragePath`` URL of ``key``, naming the ``aws_default`` connection."""
        return f"s3://{CONN_ID}@{self.name}/{key}"

    def path(self, key: str = "") -> ObjectStoragePath:
        """Return ``key`` as an ``ObjectStoragePath``."""
        return ObjectStoragePath(self.url(key))

    def keys(self, prefix: str = "") -> list[str]:
        """Every object under ``prefix``, as S3 lists it (every page)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def uploads(self) -> list[str]:
        """The keys of the multipart uploads still in progress (neither completed nor aborted)."""
        return sorted(u["Key"] for u in self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", []))

    def read(self, key: str) -> bytes:
        """Return an object's bytes."""
        return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        """Store an object (as another tool would)."""
        self.client.put_object(Bucket=self.name, Key=key, Body=data)
