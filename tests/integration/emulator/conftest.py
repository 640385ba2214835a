"""Fixtures of the emulator's own tests: a Muse client of the test's running emulator, a Rescale emulator."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from emulator_client import MuseClient
from rescale_client import KEY, RescaleClient, serve_rescale

from hpc_emulator import EmulatorConfig, EmulatorServer


@pytest.fixture
def muse(emulator: EmulatorServer) -> Iterator[MuseClient]:
    """A Muse client of the test's running emulator."""
    client = MuseClient(emulator)
    try:
        yield client
    finally:
        client.session.close()


@pytest.fixture
def rescale(tmp_path: Path) -> Iterator[RescaleClient]:
    """The Rescale router alone, served on 127.0.0.1 with delays scaled down, and a client of it."""
    config = EmulatorConfig(data_dir=tmp_path, rescale_api_keys=frozenset({KEY}), time_scale=0.02)
    with serve_rescale(config) as client:
        yield client
