"""
Fixtures of the browser tests (``test_ui.py``): the ``make ui`` deployment and a headless Chromium.

The deployment is the light one of ``make ui`` (SQLite, LocalExecutor, one API worker), not the
production-shaped cluster: the UI tests need a real API server, scheduler and triggerer, nothing
more. A failing test leaves a screenshot and the page's text under ``tests/system/artifacts/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from browser import Browser, missing_browser
from dev.ui_stack import UiDeployment

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
#: When set (``HPC_UI_SCREENSHOTS=docs/img``), the tests also save there the pictures docs/ui.md shows.
DOC_SCREENSHOTS = os.environ.get("HPC_UI_SCREENSHOTS")


@pytest.fixture(scope="session")
def ui_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiDeployment]:
    """The emulator and a private Airflow serving the example DAGs, connections in place, Test enabled."""
    deployment = UiDeployment(tmp_path_factory.mktemp("ui-home")).start()
    try:
        yield deployment
    finally:
        leftovers = deployment.stop()
    assert not leftovers, f"processes outlived the UI deployment's stop: {leftovers}"


@pytest.fixture(scope="session")
def browser(ui_deployment: UiDeployment) -> Iterator[Browser]:
    """One headless Chromium for the session (fails, saying what to install, when there is none)."""
    missing = missing_browser()
    if missing:
        pytest.fail(missing, pytrace=False)
    chromium = Browser(ui_deployment.url)
    try:
        yield chromium
    finally:
        chromium.quit()


@pytest.fixture(autouse=True)
def screenshot_on_failure(request: pytest.FixtureRequest, browser: Browser) -> Iterator[None]:
    """Save a screenshot and the page's text when the test's body fails; print where."""
    failed_before = request.session.testsfailed
    yield
    # The call's report is logged before teardown: a higher count means this test's body failed.
    if request.session.testsfailed > failed_before:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
        shot = browser.screenshot(ARTIFACTS / f"{name}.png")
        (ARTIFACTS / f"{name}.txt").write_text(f"{browser.driver.current_url}\n\n{browser.body_text()}")
        print(f"\nscreenshot of the failing page: {shot}")


def rest(deployment: UiDeployment, method: str, path: str, body: Any = None) -> Any:
    """Call the deployment's REST API (every user is an admin there)."""
    assert deployment.airflow is not None
    return deployment.airflow.api(method, path, body)


def doc_screenshot(browser: Browser, name: str) -> None:
    """Save what the page shows as ``{name}.png`` for the docs, when ``HPC_UI_SCREENSHOTS`` names a folder."""
    if DOC_SCREENSHOTS:
        browser.screenshot(Path(DOC_SCREENSHOTS) / f"{name}.png")
