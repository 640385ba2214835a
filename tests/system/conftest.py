"""
The system tests' shared deployment: PostgreSQL, Redis, CeleryExecutor with two workers, two
triggerers, S3 (moto) and the emulator, started once for the whole session (``make test-system``).

These tests need the operating system's PostgreSQL and Redis servers, so plain ``pytest`` (``make
test``) never collects them: they run when ``HPC_SYSTEM_TESTS=1`` (set by ``make test-system``)
or when ``tests/system`` is named on the command line. Missing servers fail the session loudly
with the command that installs them. A failing test shows the end of every service's log.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpc_emulator import EmulatorConfig, EmulatorServer
from hpc_emulator.config import MuseUser
from system_support import SYSTEM_KEY, SYSTEM_PASSWORD

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ENABLE_ENV = "HPC_SYSTEM_TESTS"


def _enabled(config: pytest.Config) -> bool:
    if os.environ.get(ENABLE_ENV) == "1":
        return True
    # Named explicitly (pytest tests/system, or one of its files): the user asked for them.
    return any(Path(str(arg).split("::")[0]).resolve().is_relative_to(HERE) for arg in config.args)


def pytest_configure(config: pytest.Config) -> None:
    """Let a terminated run (SIGTERM: a CI time limit, ``timeout``) stop its deployment, as Ctrl-C does."""
    if _enabled(config):
        # pytest tears its fixtures down on KeyboardInterrupt, not on SIGTERM: without this, the
        # deployment's servers and Airflow processes outlive the run and load the machine.
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Leave the system tests out of a plain ``pytest`` run: they need PostgreSQL and Redis."""
    if collection_path.name.startswith("test_") and collection_path.is_relative_to(HERE) and not _enabled(config):
        return True
    return None


@pytest.fixture(scope="session")
def system_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorServer]:
    """The emulator the deployment talks to, with distinctive secrets and room for 200 runs at once."""
    config = EmulatorConfig(
        data_dir=tmp_path_factory.mktemp("system-emulator"),
        muse_users={"alice": MuseUser(SYSTEM_PASSWORD, "user")},
        rescale_api_keys=frozenset({SYSTEM_KEY}),
        time_scale=0.2,
        pending_seconds=0.5,
        seed=23,
        muse_max_running=256,
    )
    # One line per Muse submission is noise with 200 of them in a scenario; warnings still show.
    logging.getLogger("hpc_emulator").setLevel(logging.WARNING)
    with EmulatorServer(config) as server:
        yield server


@pytest.fixture(scope="session")
def issued_muse_tokens(system_emulator: EmulatorServer) -> list[str]:
    """Every Muse JWT the emulator issues in the session (recorded from before the deployment starts), for secret scans."""
    from dev.soak.secret_scan import record_issued_tokens

    return record_issued_tokens(system_emulator)


@pytest.fixture(scope="session")
def soak_plan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the soak scenario writes the plan of the soak DAG (``HPC_SOAK_PLAN``); until then that DAG is absent."""
    return tmp_path_factory.mktemp("soak-plan") / "soak_plan.json"


@pytest.fixture(scope="session")
def cluster(system_emulator: EmulatorServer, issued_muse_tokens: list[str], soak_plan_path: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The running deployment (a :class:`dev.cluster.cluster.LocalCluster`) serving the example DAGs and ``dags/``."""
    from dev.cluster.cluster import LocalCluster
    from dev.cluster.prerequisites import MissingPrerequisites

    env = {
        **system_emulator.airflow_conn_env(),
        # The example DAGs' waits: the emulator's runs last seconds.
        "RESCALE_EXAMPLE_POLL_SECONDS": "1",
        "CHAIN_EXAMPLE_POLL_SECONDS": "1",
        "HPC_SOAK_PLAN": str(soak_plan_path),
    }
    bundles = {
        "hpc_examples": REPO / "example_dags",
        "hpc_system_tests": HERE / "dags",
        "hpc_soak": REPO / "dev" / "soak" / "dags",
    }
    try:
        deployment = LocalCluster(tmp_path_factory.mktemp("cluster-home"), bundles, env)
    except MissingPrerequisites as missing:
        pytest.fail(str(missing), pytrace=False)
    deployment.start()
    try:
        yield deployment
    finally:
        leftovers = deployment.stop()
    assert not leftovers, f"processes outlived the deployment's stop: {leftovers}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Add the end of every service's log to a failing system test's report."""
    report = yield
    deployment = getattr(item, "funcargs", {}).get("cluster")
    if report.failed and deployment is not None and deployment.airflow is not None:
        report.sections.append(("cluster service logs", deployment.airflow.service_log_tails()))
    return report
