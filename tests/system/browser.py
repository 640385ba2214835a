"""
A headless Chromium driven by Selenium, for the UI tests: the operating system's browser and driver.

The flags keep a machine without internet quiet: no background networking, component updates,
sync or QUIC, each of which would otherwise open connections that are refused many at a time.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_COMMAND = "apt-get update && apt-get install -y chromium chromium-driver"
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1000",
)
#: Seconds an explicit wait allows by default: the machine may be loaded by other test sessions.
WAIT_SECONDS = 60


def missing_browser() -> str | None:
    """Return what to run when Chromium or its driver is not installed, else ``None``."""
    absent = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if not absent:
        return None
    return f"{' and '.join(absent)} not found; install them with: {INSTALL_COMMAND}"


class Browser:
    """
    One headless Chromium with a fresh profile; :meth:`quit` ends it and its driver.

    :param base_url: the Airflow UI's address, which :meth:`open` paths are relative to.
    """

    def __init__(self, base_url: str) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.base_url = base_url.rstrip("/")
        self.profile = Path(tempfile.mkdtemp(prefix="hpc-ui-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.profile}")
        self.driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)

    def open(self, path: str) -> None:
        """Load a page of the UI (``/connections``, ``/dags/...``)."""
        self.driver.get(f"{self.base_url}/{path.lstrip('/')}")

    def wait(self, condition: Callable[[Any], Any], what: str, timeout: float = WAIT_SECONDS) -> Any:
        """Wait (explicitly, polling the page) until ``condition(driver)`` is truthy; return its value."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        # An element gone stale mid-poll means React re-rendered (or unmounted) it: poll again.
        waiting = WebDriverWait(
            self.driver, timeout, poll_frequency=0.25, ignored_exceptions=(StaleElementReferenceException,)
        )
        return waiting.until(condition, message=f"waiting for {what}")

    def find(self, by: str, value: str, timeout: float = WAIT_SECONDS) -> Any:
        """Return the first element matching, once it is displayed."""
        def shown(driver: Any) -> Any:
            return next((e for e in driver.find_elements(by, value) if e.is_displayed()), None)

        return self.wait(shown, f"{by}={value!r}", timeout)

    def body_text(self) -> str:
        """Return the page's visible text."""
        return self.driver.find_element("tag name", "body").text

    def screenshot(self, path: Path) -> Path:
        """Save what the page shows now as a PNG."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path

    def quit(self) -> None:
        """End the browser and its driver, and remove the profile."""
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)
