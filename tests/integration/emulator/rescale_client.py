"""
A Rescale client over plain ``requests``, and a Rescale emulator served on 127.0.0.1, for the
emulator's own tests.

It speaks the API as Rescale's reference shows it and nothing more, so what the tests check is
the emulator's answers, not the provider's hooks.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests
import uvicorn
from emulator_client import wait_for
from fastapi import FastAPI

from hpc_emulator.config import Counters, EmulatorConfig
from hpc_emulator.rescale import create_rescale_router

KEY = "test-key"


@dataclass
class RescaleClient:
    """A running Rescale emulator and an authenticated session to it."""

    base_url: str
    session: requests.Session
    counters: Counters
    config: EmulatorConfig

    def url(self, path: str, version: str = "/api/v2") -> str:
        """Return the absolute URL of an API path such as ``/jobs/``."""
        return f"{self.base_url}{version}{path}"

    def get(self, path: str, version: str = "/api/v2", **kwargs: Any) -> requests.Response:
        """GET an API path."""
        return self.session.get(self.url(path, version), timeout=10, **kwargs)

    def post(self, path: str, version: str = "/api/v2", **kwargs: Any) -> requests.Response:
        """POST to an API path."""
        return self.session.post(self.url(path, version), timeout=10, **kwargs)

    def create_job(self, command: str, **body: Any) -> str:
        """Create a job running ``command`` and return its id."""
        body = {"name": "test", "jobanalyses": [{"command": command}], **body}
        answer = self.post("/jobs/", json=body)
        assert answer.status_code == 201, answer.text
        return answer.json()["id"]

    def start_job(self, command: str, **body: Any) -> str:
        """Create and submit a job; return its id."""
        job_id = self.create_job(command, **body)
        assert self.post(f"/jobs/{job_id}/submit/").json() == {}
        return job_id

    def run(self, job_id: str, run_id: str = "1") -> dict[str, Any]:
        """Return a run."""
        answer = self.get(f"/jobs/{job_id}/runs/{run_id}/")
        assert answer.status_code == 200, answer.text
        return answer.json()

    def wait_run_completed(self, job_id: str, run_id: str = "1") -> dict[str, Any]:
        """Wait until a run has a ``dateCompleted``; return it."""
        return wait_for(lambda: (run := self.run(job_id, run_id))["dateCompleted"] and run)

    def sorted_statuses(self, job_id: str) -> list[dict[str, Any]]:
        """Return a job's statuses sorted by date, as a client must do."""
        body = self.get(f"/jobs/{job_id}/statuses/").json()
        assert body["count"] == len(body["results"])
        return sorted(body["results"], key=lambda entry: entry["statusDate"])

    def wait_job_completed(self, job_id: str) -> list[dict[str, Any]]:
        """Wait until a job's latest status is ``Completed``; return its sorted statuses."""
        return wait_for(lambda: (found := self.sorted_statuses(job_id))[-1]["status"] == "Completed" and found)

    def all_files(self, job_id: str, run_id: str = "1", page_size: int = 1000) -> list[dict[str, Any]]:
        """Return every output file of a run, following ``next`` and carrying ``page_size`` over."""
        files: list[dict[str, Any]] = []
        url: str | None = self.url(f"/jobs/{job_id}/runs/{run_id}/files/")
        while url:
            body = self.session.get(url, params={"page_size": page_size}, timeout=10).json()
            files += body["results"]
            url = body["next"]
        return files

    def download(self, file_id: str, version: str = "/api/v2") -> bytes:
        """Return an output file's bytes."""
        answer = self.get(f"/files/{file_id}/contents/", version)
        assert answer.status_code == 200, answer.text
        return answer.content

    def upload(self, name: str, content: bytes, version: str = "/api/v2") -> dict[str, Any]:
        """Upload an input file; return the file record answered."""
        answer = self.post("/files/contents/", version, files={"file": (name, content)})
        assert answer.status_code == 201, answer.text
        return answer.json()



@contextmanager
def serve_rescale(config: EmulatorConfig) -> Iterator[RescaleClient]:
    """Serve the Rescale router alone with uvicorn on a free 127.0.0.1 port, in a thread."""
    counters = Counters()
    app = FastAPI()
    app.include_router(create_rescale_router(config, counters))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, timeout=10)
    session = requests.Session()
    session.headers["Authorization"] = f"Token {KEY}"
    try:
        yield RescaleClient(f"http://127.0.0.1:{sock.getsockname()[1]}", session, counters, config)
    finally:
        session.close()
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
