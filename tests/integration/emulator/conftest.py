"""Fixtures of the emulator's own tests: a Muse client of the test's running emulator."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from emulator_client import MuseClient

from hpc_emulator import EmulatorServer


@pytest.fixture
def muse(emulator: EmulatorServer) -> Iterator[MuseClient]:
    """A Muse client of the test's running emulator."""
    client = MuseClient(emulator)
    try:
        yield client
    finally:
        client.session.close()
