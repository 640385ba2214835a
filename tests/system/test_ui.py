"""
What an Airflow user sees in the real UI (Airflow 3's React app in a headless Chromium): the
connection forms of both types, their Test button, the extra link of a deferred task, the
followed Rescale lines in the task log, and the provider's "HPC runs" view while a job is
watched and after.

Run with ``HPC_SYSTEM_TESTS=1 pytest tests/system/test_ui.py`` (``make test-system`` runs them too);
they need ``chromium`` and ``chromium-driver`` from the operating system.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium.common.exceptions import TimeoutException

from airflow_provider_hpc.hooks import _forms
from browser import Browser
from dev.ui_stack import UiDeployment, ui_connection
from ui_support import browser, doc_screenshot, rest, screenshot_on_failure, ui_deployment  # noqa: F401 (fixtures)

HARVEST_DAG = "example_rescale_harvest"
EXAMPLE_DAGS = sorted(path.stem for path in (Path(__file__).resolve().parents[2] / "example_dags").glob("example_*.py"))
#: Rounds of "trigger every example from its page"; the acceptance run of ``make ui`` used 3.
EXAMPLE_ROUNDS = int(os.environ.get("HPC_UI_EXAMPLE_ROUNDS", "1"))
#: The trigger dialog offers the current minute as the logical date, which a DAG run must not
#: share with another run of its DAG: rounds start at least this far apart.
ROUND_SPACING = 61.0
#: Long enough (about two minutes) for the watch task to be seen deferred on a loaded machine.
HARVEST_STEPS = 240
HARVEST_STEP_SECONDS = 0.5

EXPECTED_FORMS = {
    "muse": {
        "type_name": "Muse (INRAE cluster web service)",
        "labels": ["Base URL", "Username", "Password", _forms.MUSE_PORT_LABEL],
        "placeholders": {
            "host": _forms.MUSE_DOC_URL,
            "login": "your Muse username",
            "password": "your Muse password (or leave empty and give a ready token)",
            "port": _forms.PORT_PLACEHOLDER,
        },
        "hidden": ["schema"],
        "extra_labels": ["Ready JWT (instead of username/password)", "Verify TLS certificate", "Read timeout (s)"],
    },
    "rescale": {
        "type_name": "Rescale",
        "labels": ["Platform URL", "API key", _forms.RESCALE_PORT_LABEL],
        "placeholders": {
            "host": _forms.RESCALE_FORM["ui-field-behaviour"]["placeholders"]["host"],
            "password": "your Rescale API key",
            "port": "443",
        },
        "hidden": ["schema", "login"],
        "extra_labels": ["API version", "Verify TLS certificate", "Attempts per request"],
    },
}


# ----- helpers -----------------------------------------------------------------------------------


def open_add_connection(browser: Browser, conn_type: str) -> Any:
    """Open Admin -> Connections -> Add Connection, pick the type; return the dialog."""
    browser.open("/connections")
    browser.find("xpath", "//button[normalize-space()='Add Connection']").click()
    dialog = browser.find("css selector", "[role=dialog]")
    combo = dialog.find_element("css selector", "input[role=combobox]")
    combo.click()
    type_name = EXPECTED_FORMS[conn_type]["type_name"]
    combo.send_keys(type_name)
    browser.find("xpath", f"//*[@role='option' and normalize-space()={json.dumps(type_name)}]").click()
    first_label = EXPECTED_FORMS[conn_type]["labels"][0]
    browser.wait(lambda d: first_label in dialog.text, f"the {conn_type} form's fields")
    return dialog


def field(dialog: Any, name: str) -> Any | None:
    """Return the form's displayed input (or textarea) named ``name``, or ``None``."""
    return next((e for e in dialog.find_elements("css selector", f"[name={name}]") if e.is_displayed()), None)


#: Records the text of every toast the page shows from now on: a toast lasts seconds, and a loaded
#: machine may not poll the page often enough to see it otherwise.
RECORD_TOASTS_JS = """
window.hpcToasts = [];
const record = () => {
  for (const t of document.querySelectorAll('[data-scope="toast"][data-part="root"], [role="status"], [role="alert"]')) {
    const text = t.innerText;
    if (text && !window.hpcToasts.includes(text)) window.hpcToasts.push(text);
  }
};
new MutationObserver(record).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


def click_test(browser: Browser, conn_id: str) -> None:
    """Click the Test icon of one connection in Admin -> Connections, recording the toasts that follow."""
    browser.open("/connections")
    row = browser.find("xpath", f"//tr[.//*[normalize-space()={json.dumps(conn_id)}]]")
    browser.driver.execute_script(RECORD_TOASTS_JS)
    row.find_element("css selector", "button[aria-label='Test Connection']").click()


def wait_toast(browser: Browser, title: str, *words: str) -> str:
    """Wait for a toast titled ``title`` holding every one of ``words`` (since the click); return its text."""
    def toast(driver: Any) -> str | None:
        shown = driver.execute_script("return window.hpcToasts || [];")
        return next((text for text in shown if title in text and all(word in text for word in words)), None)

    return browser.wait(toast, f"a toast {title!r} with {words}")


def trigger(deployment: UiDeployment, dag_id: str, conf: dict[str, Any]) -> str:
    """Trigger a DAG through the REST API, as the UI's Trigger button does; return the run id."""
    return rest(deployment, "POST", f"dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]


def task_state(deployment: UiDeployment, dag_id: str, run_id: str, task_id: str) -> str | None:
    """Return a task instance's state, from the REST API."""
    return rest(deployment, "GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}").get("state")


def wait_state(deployment: UiDeployment, dag_id: str, run_id: str, task_id: str, states: set[str], timeout: float) -> str:
    """Wait until a task instance reaches one of ``states``; fail early on ``failed``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = task_state(deployment, dag_id, run_id, task_id)
        except (AssertionError, requests.RequestException):
            # One API worker on a machine shared with other test sessions may answer late: ask again.
            state = None
        if state in states:
            return state
        assert state not in ("failed", "upstream_failed"), f"{task_id} is {state}"
        assert time.monotonic() < deadline, f"{task_id} still {state} after {timeout:.0f}s"
        time.sleep(1)


#: Reads the lines the log view renders now: it renders only those near the viewport, each with
#: an anchor to its number. The argument scrolls first: ``'top'`` or ``'bottom'`` to an end,
#: ``'down'`` or ``'up'`` by most of a screen (so that two screens overlap), ``null`` not at all.
COLLECT_LINES_JS = """
const numbered = () => [...document.querySelectorAll('a[href*="try_number="]')].filter(a => /^\\d+$/.test(a.textContent.trim()));
const scroller = (a) => {
  let box = a.parentElement;
  while (box && !(box.scrollHeight > box.clientHeight + 2 && /(auto|scroll)/.test(getComputedStyle(box).overflowY))) box = box.parentElement;
  return box;
};
const first = numbered()[0];
const box = first ? scroller(first) : null;
if (box) {
  const step = Math.max(1, Math.floor(box.clientHeight * 0.7));
  if (arguments[0] === 'top') box.scrollTop = 0;
  else if (arguments[0] === 'bottom') box.scrollTop = box.scrollHeight;
  else if (arguments[0] === 'down') box.scrollTop = box.scrollTop + step;
  else if (arguments[0] === 'up') box.scrollTop = Math.max(0, box.scrollTop - step);
}
const lines = {};
for (const a of numbered()) {
  let row = a.parentElement;
  while (row && row.parentElement && row.innerText.trim() === a.textContent.trim()) row = row.parentElement;
  lines[a.textContent.trim()] = row ? row.innerText : '';
}
const atBottom = !box || box.scrollTop + box.clientHeight >= box.scrollHeight - 2;
const atTop = !box || box.scrollTop === 0;
return [lines, atBottom, atTop];
"""


def read_log_view(browser: Browser) -> list[str]:
    """
    Return every line of the task log view in order, read a screen at a time down from the top, then up from the end.

    Each step scrolls by most of a screen and waits until lines not seen on the screen before are
    rendered, so no line is skipped however slowly the page renders. The view scrolls itself to
    the end once its log has loaded, which can cut the way down short: the way up from the end
    reads what it missed.
    """
    collected: dict[int, str] = {}

    def read(driver: Any, move: str | None) -> tuple[set[int], bool, bool]:
        lines, at_bottom, at_top = driver.execute_script(COLLECT_LINES_JS, move)
        collected.update({int(number): text for number, text in lines.items()})
        return {int(number) for number in lines}, at_bottom, at_top

    # The first lines may sit in a folded group ("Log message source details"): no line 1.
    browser.wait(lambda d: read(d, "top")[0] and read(d, None)[2], "the log view scrolled to its first lines")
    for move, end_index in (("down", 1), ("up", 2)):
        if move == "up":
            browser.wait(lambda d: read(d, "bottom")[1], "the log view scrolled to its last lines")
        shown, *ends = read(browser.driver, None)
        for _ in range(5000):
            if ends[end_index - 1]:
                break
            before = shown
            read(browser.driver, move)  # one step, then wait for what it brings into view

            def moved(driver: Any, before: set[int] = before) -> tuple | None:
                now, *now_ends = read(driver, None)
                return (now, now_ends) if (now - before) or now_ends[end_index - 1] else None

            try:
                shown, ends = browser.wait(moved, f"the log view to scroll {move}", timeout=15)
            except TimeoutException:
                break  # it would not move further: the other direction reads the rest
    return [collected[number] for number in sorted(collected)]


# ----- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("conn_type", ["muse", "rescale"])
def test_connection_form_shows_the_providers_fields(browser: Browser, conn_type: str) -> None:
    """Admin -> Connections -> Add: the type's labels and placeholders show, its unused fields do not."""
    expected = EXPECTED_FORMS[conn_type]
    dialog = open_add_connection(browser, conn_type)
    for label in expected["labels"]:
        assert label in dialog.text, f"label {label!r} not in the form:\n{dialog.text}"
    for name, placeholder in expected["placeholders"].items():
        element = field(dialog, name)
        assert element is not None, f"no {name} field shown"
        assert element.get_attribute("placeholder") == placeholder
    for name in expected["hidden"]:
        assert field(dialog, name) is None, f"the {name} field is shown"
    # The provider's own fields are under a fold.
    browser.find("xpath", "//*[@role='dialog']//button[normalize-space()='Extra Fields']").click()
    for label in expected["extra_labels"]:
        browser.wait(lambda d, label=label: label in dialog.text, f"extra field {label!r}")
    doc_screenshot(browser, f"connection-form-{conn_type}")


def test_test_button_passes_on_a_connection_made_in_the_form(browser: Browser, ui_deployment: UiDeployment) -> None:
    """A Rescale connection typed into the form (port as asked) passes the list's Test against the emulator."""
    good = ui_deployment.connections()["rescale_default"]
    dialog = open_add_connection(browser, "rescale")
    field(dialog, "connection_id").send_keys("rescale_typed")
    field(dialog, "host").send_keys(good["host"])
    field(dialog, "password").send_keys(good["password"])
    field(dialog, "port").send_keys(str(good["port"]))
    browser.find("xpath", "//*[@role='dialog']//button[normalize-space()='Save']").click()
    browser.wait(lambda d: not [e for e in d.find_elements("css selector", "[role=dialog]") if e.is_displayed()], "the form to close")
    click_test(browser, "rescale_typed")
    wait_toast(browser, "Test Connection Successful", "with the API key")


@pytest.mark.parametrize("conn_id", ["muse_default", "rescale_default"])
def test_test_button_passes_on_the_default_connections(browser: Browser, conn_id: str) -> None:
    """The connections ``make ui`` stores pass the list's Test."""
    click_test(browser, conn_id)
    wait_toast(browser, "Test Connection Successful", "Connected to")
    doc_screenshot(browser, f"test-button-{conn_id}")


@pytest.mark.parametrize(("conn_type", "words"), [("muse", ("401", "jwt/obtain")), ("rescale", ("401", "Invalid token"))])
def test_test_button_fails_clearly_on_a_wrong_password(
    browser: Browser, ui_deployment: UiDeployment, conn_type: str, words: tuple[str, ...]
) -> None:
    """A wrong password or API key fails the Test with the service's answer, never showing the secret."""
    wrong = f"wrong-secret-{conn_type}-0000"
    conn_id = f"{conn_type}_wrong_password"
    form = {**ui_deployment.connections()[f"{conn_type}_default"], "password": wrong}
    ui_deployment.add_connection(conn_id, ui_connection(form))
    click_test(browser, conn_id)
    text = wait_toast(browser, "Test Connection Failed", *words)
    assert wrong not in text


@pytest.fixture(scope="module")
def harvest_run(ui_deployment: UiDeployment) -> str:
    """A run of the Rescale example with a solver of about a minute; its id."""
    return trigger(ui_deployment, HARVEST_DAG, {"steps": HARVEST_STEPS, "step_seconds": HARVEST_STEP_SECONDS})


def test_deferred_task_shows_its_extra_link(browser: Browser, ui_deployment: UiDeployment, harvest_run: str) -> None:
    """While ``watch`` is deferred, its page offers the "Rescale job" link to the job on the platform."""
    wait_state(ui_deployment, HARVEST_DAG, harvest_run, "watch", {"deferred"}, timeout=300)
    browser.open(f"/dags/{HARVEST_DAG}/runs/{harvest_run}/tasks/watch/details")
    link = browser.find("xpath", "//a[normalize-space()='Rescale job']")
    href = link.get_attribute("href")
    doc_screenshot(browser, "deferred-task-details")
    assert ui_deployment.emulator is not None
    assert re.fullmatch(rf"{re.escape(ui_deployment.emulator.rescale_url)}/jobs/\w+/", href), href
    assert task_state(ui_deployment, HARVEST_DAG, harvest_run, "watch") == "deferred", "the run ended before the link was seen"


def hpc_runs_rows(browser: Browser, dag_id: str) -> list[dict[str, str]]:
    """Open Browse -> HPC runs filtered on one DAG; return its table's rows, column -> text."""
    browser.open("/plugin/hpc-runs")
    frame = browser.find("css selector", "iframe")
    browser.driver.switch_to.frame(frame)
    try:
        browser.find("css selector", "table#hpc-runs")
        # The filter form, as a user fills it in.
        dag_field = browser.find("css selector", "input[name=dag_id]")
        dag_field.clear()
        dag_field.send_keys(dag_id)
        browser.find("css selector", "form button, form input[type=submit]").click()
        browser.wait(lambda d: f"dag_id={dag_id}" in d.current_url, "the filtered page")
        head = [th.text for th in browser.driver.find_elements("css selector", "table#hpc-runs thead th")]
        return [dict(zip(head, (td.text for td in tr.find_elements("css selector", "td")), strict=True))
                for tr in browser.driver.find_elements("css selector", "table#hpc-runs tbody tr.hpc-run")]
    finally:
        browser.driver.switch_to.default_content()


def harvest_job_id(ui_deployment: UiDeployment, run_id: str) -> str:
    """The Rescale job the harvest example's ``start`` task made (its XCom ``job_id``)."""
    path = f"dags/{HARVEST_DAG}/dagRuns/{run_id}/taskInstances/start/xcomEntries/job_id"
    return str(rest(ui_deployment, "GET", path)["value"])


def test_hpc_runs_view_lists_the_watched_job_while_deferred_and_after(
    browser: Browser, ui_deployment: UiDeployment, harvest_run: str
) -> None:
    """Browse -> HPC runs shows the example's Rescale job while ``watch`` waits, then its outcome and result."""
    wait_state(ui_deployment, HARVEST_DAG, harvest_run, "watch", {"deferred"}, timeout=300)
    job_id = harvest_job_id(ui_deployment, harvest_run)

    def watch_row() -> dict[str, str]:
        rows = [r for r in hpc_runs_rows(browser, HARVEST_DAG) if r["key or job id"] == job_id and "/ watch" in r["task instance"]]
        assert len(rows) == 1, rows
        return rows[0]

    row = watch_row()
    assert row["service"] == "rescale", row
    assert row["state as last seen"] == "waiting (deferred to the triggerer)", row
    assert "(deferred)" in row["task instance"] and row["remote job"] == "open", row
    doc_screenshot(browser, "hpc-runs-view")
    assert task_state(ui_deployment, HARVEST_DAG, harvest_run, "watch") == "deferred", "the run ended before the view was read"
    wait_state(ui_deployment, HARVEST_DAG, harvest_run, "harvest", {"success"}, timeout=600)
    row = watch_row()
    assert "(success)" in row["task instance"], row
    assert row["state as last seen"] not in ("", "unknown") and not row["state as last seen"].startswith("waiting"), row
    harvest = [r for r in hpc_runs_rows(browser, HARVEST_DAG) if r["key or job id"] == job_id and "/ harvest" in r["task instance"]]
    assert harvest and harvest[0]["result"], harvest


def test_task_log_shows_every_followed_line(browser: Browser, ui_deployment: UiDeployment, harvest_run: str) -> None:
    """Once ``watch`` succeeded, its log view holds every ``step N of M`` line and ``solver converged``."""
    wait_state(ui_deployment, HARVEST_DAG, harvest_run, "watch", {"success"}, timeout=600)
    browser.open(f"/dags/{HARVEST_DAG}/runs/{harvest_run}/tasks/watch?try_number=1")
    lines = read_log_view(browser)
    text = "\n".join(lines)
    steps = {int(m.group(1)) for m in re.finditer(rf"step (\d+) of {HARVEST_STEPS}\b", text)}
    missing = sorted(set(range(1, HARVEST_STEPS + 1)) - steps)
    assert not missing, f"{len(missing)} step lines missing from the log view ({len(lines)} lines read): {missing[:20]}"
    assert f"solver converged after {HARVEST_STEPS} steps" in text
    doc_screenshot(browser, "followed-log-end")


def trigger_from_dag_page(browser: Browser, ui_deployment: UiDeployment, dag_id: str) -> str:
    """Click the DAG page's Trigger button and the dialog's Trigger, as a user does; return the new run's id."""
    def run_ids() -> set[str]:
        return {r["dag_run_id"] for r in rest(ui_deployment, "GET", f"dags/{dag_id}/dagRuns?limit=100")["dag_runs"]}

    before = run_ids()
    browser.open(f"/dags/{dag_id}")
    browser.find("css selector", "button[aria-label='Trigger Dag']").click()
    button = browser.find("xpath", "//*[@role='dialog']//button[normalize-space()='Trigger']")
    # A parameter the form marks required with an empty default keeps the button disabled.
    try:
        browser.wait(lambda d: button.is_enabled(), f"the Trigger button of {dag_id}'s form", timeout=20)
    except TimeoutException:
        dialogs = "\n".join(d.text for d in browser.driver.find_elements("css selector", "[role=dialog]"))
        pytest.fail(f"the trigger form of {dag_id} refuses its own defaults:\n{dialogs}")
    button.click()
    return browser.wait(lambda d: next(iter(run_ids() - before), None), f"the new run of {dag_id}")


def test_every_example_triggered_from_its_page_succeeds_first_time(browser: Browser, ui_deployment: UiDeployment) -> None:
    """Each example DAG, triggered from its page with its defaults, succeeds on that run with no task retried, round after round."""
    for round_number in range(1, EXAMPLE_ROUNDS + 1):
        started = time.monotonic()
        runs = {dag_id: trigger_from_dag_page(browser, ui_deployment, dag_id) for dag_id in EXAMPLE_DAGS}
        outcome = {}
        for dag_id, run_id in runs.items():
            deadline = time.monotonic() + 600
            while (state := rest(ui_deployment, "GET", f"dags/{dag_id}/dagRuns/{run_id}")["state"]) not in ("success", "failed"):
                assert time.monotonic() < deadline, f"{dag_id} {run_id} still {state}"
                time.sleep(2)
            tis = rest(ui_deployment, "GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
            outcome[dag_id] = (state, sorted((ti["task_id"], ti["try_number"]) for ti in tis if ti["try_number"] > 1))
        print(f"\nround {round_number}: " + ", ".join(f"{dag} {state}" + (f" (retried: {retried})" if retried else "")
                                                   for dag, (state, retried) in outcome.items()))
        # First time means no task needed a retry either (the examples keep clear of the deferral race).
        assert all(state == "success" and not retried for state, retried in outcome.values()), outcome
        if round_number < EXAMPLE_ROUNDS:
            time.sleep(max(0.0, ROUND_SPACING - (time.monotonic() - started)))
