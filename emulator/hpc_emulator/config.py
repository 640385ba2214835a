"""Settings of the local Muse + Rescale emulator, with zero-config defaults for the demo."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


#: The default Muse account and Rescale API key. Long enough for Airflow's secrets masker, which
#: leaves alone a secret shorter than ``[logging] min_length_masked_secret`` (5 by default) and warns.
DEMO_USER = "demo"
DEMO_PASSWORD = "demo-muse-password"
DEMO_API_KEY = "demo-rescale-api-key"


@dataclass(frozen=True)
class MuseUser:
    """A Muse account: its password and access level (visitor, user, superuser, admin)."""

    password: str
    level: str = "user"


@dataclass
class EmulatorConfig:
    """
    What the emulator serves and how.

    :param data_dir: where run folders, uploads and results live (one sub-folder per service).
    :param muse_users: Muse accounts by username.
    :param token_lifetime: seconds a Muse JWT stays valid.
    :param rescale_api_keys: accepted Rescale API keys (``Authorization: Token <key>``).
    :param time_scale: multiplies every emulated delay (queue wait, status steps); 0 makes them instant.
    :param pending_seconds: how long a new run stays PENDING / Queued before it starts.
    :param seed: seeds the random choices (probability faults, Muse job ids) so a run can be repeated.
    :param faults: fault rules applied from start (see ``faults.py``).
    :param tls: serve HTTPS with a self-signed certificate made at start.
    :param software_dirs: extra Muse software catalogues: folders holding ``NAME/image/`` folders,
        served beside the built-in ``sw_example``.
    :param muse_max_running: Muse jobs running at once; later ones stay PENDING, as in a busy queue.
    :param rescale_max_upload_bytes: the largest Rescale input file ``POST files/contents/`` takes
        (2 GiB by default); a larger one answers 413.
    """

    data_dir: Path
    muse_users: dict[str, MuseUser] = field(default_factory=lambda: {DEMO_USER: MuseUser(DEMO_PASSWORD, "user")})
    token_lifetime: float = 3600.0
    rescale_api_keys: frozenset[str] = frozenset({DEMO_API_KEY})
    time_scale: float = 1.0
    pending_seconds: float = 0.5
    seed: int | None = None
    faults: list[dict[str, Any]] = field(default_factory=list)
    tls: bool = False
    software_dirs: list[Path] = field(default_factory=list)
    muse_max_running: int = 32
    rescale_max_upload_bytes: int = 2 * 1024**3

    def delay(self, seconds: float) -> float:
        """Return an emulated delay scaled by ``time_scale``."""
        return max(0.0, seconds * self.time_scale)


class Counters:
    """Thread-safe counters the admin endpoint exposes: requests per route, submissions, stops..."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {}

    def incr(self, name: str, key: str = "") -> None:
        """Add one to counter ``name`` under ``key`` (e.g. ``incr("requests", "GET /api/...")``)."""
        with self._lock:
            self._counts.setdefault(name, Counter())[key] += 1

    def get(self, name: str, key: str = "") -> int:
        """Return one count."""
        with self._lock:
            return self._counts.get(name, Counter())[key]

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Return every counter as plain dicts."""
        with self._lock:
            return {name: dict(counts) for name, counts in self._counts.items()}

    def reset(self) -> None:
        """Forget every count."""
        with self._lock:
            self._counts.clear()
