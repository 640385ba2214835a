"""
The emulator's human pages: what the provider's "Rescale job" and "Muse job state" links open in a
browser. Every value a client sent is HTML-escaped; API clients keep their JSON.
"""

from __future__ import annotations

import requests
from emulator_client import MuseClient, wait_for
from rescale_client import RescaleClient

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
HOSTILE = '<script>alert("x")</script> & co'
ESCAPED = "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co"


def test_the_rescale_job_link_opens_a_page_with_name_statuses_and_runs(rescale: RescaleClient) -> None:
    job_id = rescale.start_job("true", name=HOSTILE)
    rescale.wait_job_completed(job_id)

    # The link the provider builds (RescaleHook.job_url): the platform's origin, then jobs/{id}/.
    page = requests.get(f"{rescale.base_url}/jobs/{job_id}/", headers=BROWSER, timeout=10)

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert ESCAPED in page.text and "<script>" not in page.text
    history = [s["status"] for s in rescale.sorted_statuses(job_id)]
    positions = [page.text.index(f"<td>{status}</td>") for status in dict.fromkeys(history)]
    assert positions == sorted(positions), "the status history is shown in date order"
    assert "Completed successfully" in page.text and "<td>1</td>" in page.text  # run 1


def test_an_unknown_job_s_page_is_a_404(rescale: RescaleClient) -> None:
    assert requests.get(f"{rescale.base_url}/jobs/NOPE1/", headers=BROWSER, timeout=10).status_code == 404


def test_the_muse_state_link_opens_a_page_for_a_browser_and_json_for_a_client(muse: MuseClient) -> None:
    key = muse.submit_json(cmd=f"echo '{HOSTILE}'")["url"].rstrip("/").rsplit("/", 1)[-1]
    wait_for(lambda: muse.state(key)["info"]["report"]["cr"] != "WAIT")

    page = muse.get(f"software/muse/state/sw_example/{key}/", headers=BROWSER)
    answer = muse.get(f"software/muse/state/sw_example/{key}/")

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f"Muse run sw_example/{key}" in page.text
    assert ESCAPED in page.text and "<script>" not in page.text
    assert "<th>cr</th><td>OK</td>" in page.text and "COMPLETED" in page.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["info"]["report"]["cr"] == "OK"
