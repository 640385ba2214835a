"""
The soak's fault plan: the faults the emulator injects on every request the provider makes.
"""

from __future__ import annotations

from typing import Any

import requests
from hpc_emulator import EmulatorServer

PROVIDER_ROUTES = ("GET /api/*", "POST /api/software/muse/run/*", "POST /api/jwt/obtain/")


def fault_rules(scale: float = 1.0) -> list[dict[str, Any]]:
    """The soak's fault rules: one set per provider route; the first rule that fires decides."""
    wanted: list[tuple[float, dict[str, Any]]] = [
        (0.025, {"status": 500}),
        (0.025, {"status": 502}),
        (0.025, {"status": 503}),
        (0.025, {"status": 504}),
        (0.05, {"status": 429, "retry_after": 1}),
        (0.02, {"drop": True}),
        (0.04, {"delay": 0.05}),
        (0.04, {"delay": 0.3}),
        (0.02, {"delay": 1.0}),
    ]
    rules = []
    for route in PROVIDER_ROUTES:
        taken = 0.0
        for share, action in wanted:
            share *= scale
            # Rules are tried in order: each one's probability is conditional on the earlier ones passing.
            rules.append({"route": route, "probability": min(1.0, share / (1.0 - taken)), "action": action})
            taken += share
    return rules



def set_faults(server: EmulatorServer, rules: list[dict[str, Any]]) -> None:
    """Replace the emulator's fault rules (``POST /_emulator/faults``)."""
    requests.post(f"{server.base_url}/_emulator/faults", json=rules, timeout=30).raise_for_status()

