"""Printing figures: the machine, tables, ratios and targets."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def machine() -> dict[str, Any]:
    """Describe the machine and the software the figures were measured on."""
    import aiohttp

    try:
        from importlib.metadata import version

        airflow_version = version("apache-airflow")
        http_version = version("apache-airflow-providers-http")
    except Exception:  # the figures are still worth printing without versions
        airflow_version = http_version = "?"
    mem_kib = 0
    model = platform.processor() or "?"
    try:
        with open("/proc/meminfo") as meminfo:
            mem_kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "cpu": model,
        "load_average": tuple(round(x, 2) for x in os.getloadavg()),
        "python": sys.version.split()[0],
        "airflow": airflow_version,
        "providers_http": http_version,
        "aiohttp": aiohttp.__version__,
    }


def print_machine(info: dict[str, Any]) -> None:
    """Print the machine header."""
    print(
        f"machine: {info['nproc']} cores ({info['cpu']}), {info['memory_gib']} GiB, "
        f"load average at start {info['load_average']}; {info['date']}"
    )
    print(
        f"software: Python {info['python']}, Airflow {info['airflow']}, "
        f"apache-airflow-providers-http {info['providers_http']}, aiohttp {info['aiohttp']}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return a plain-text table with right-aligned figures."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for index, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"
    return str(value)


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """Return the ``fraction`` percentile of ``values`` (nearest rank), or ``None`` if empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def median(values: Sequence[float]) -> float | None:
    """Return the median, or ``None`` if empty."""
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """Return ``numerator / denominator``, or ``None`` when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


@dataclass
class Target:
    """
    One target of the issue, and whether this run met it.

    :param name: what is aimed at, in words.
    :param measured: the figure measured, in words (with its unit).
    :param met: ``True``, ``False``, or ``None`` when this run did not measure it.
    :param note: what limits it, or why it was not measured.
    :param judged_at: the smaller size this run judged it at, when not the target's own (the quick mode's).
    """

    name: str
    measured: str
    met: bool | None
    note: str = ""
    judged_at: str = ""

    @property
    def result(self) -> str:
        """``met``, ``MISSED`` or ``not measured``, with the size judged when it is not the target's."""
        word = {True: "met", False: "MISSED", None: "not measured"}[self.met]
        return f"{word} at {self.judged_at}" if self.judged_at and self.met is not None else word


@dataclass
class Report:
    """Everything a run measured, for printing at the end and for ``--json``."""

    machine: dict[str, Any]
    mode: str
    sections: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)

    def print_targets(self) -> None:
        """Print the targets, met or missed."""
        print("\n== Targets")
        rows = [
            (t.name, t.measured, t.result, t.note)
            for t in self.targets
        ]
        print(table(("target", "measured", "result", "note"), rows))
