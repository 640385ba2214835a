"""What a followed file shows once its run completed: the lines the last tail missed, once, in order."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from airflow_provider_hpc.models.rescale import MAX_TAIL_LINES, TAIL_LINE_CHARS, text_lines_from_bytes
from airflow_provider_hpc.models.rescale_tail import TailFollower, missed_lines, same_path


class Lines:
    """A logger keeping each formatted line."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str, *args: Any) -> None:
        self.lines.append(message % args if args else message)

    warning = info


WHOLE = [f"step {i}" for i in range(1, 51)] + ["solver converged"]


@pytest.mark.parametrize(
    ("previous", "expected", "gap"),
    [
        (WHOLE[37:47], WHOLE[47:], False),  # the usual case: steps 48-50 and the last line
        (WHOLE[-10:], [], False),  # the last tail saw the end already
        ([], WHOLE, False),  # nothing shown: the whole file
        (["other", "lines"], WHOLE, True),  # the file was rewritten
    ],
    ids=["missed-end", "nothing-missed", "nothing-shown", "rewritten"],
)
def test_missed_lines_follow_the_last_tail(previous: list[str], expected: list[str], gap: bool) -> None:
    assert missed_lines(previous, WHOLE) == (expected, gap)


def test_missed_lines_take_the_last_occurrence_so_no_line_shows_twice() -> None:
    whole = ["a", "b", "a", "b", "c"]
    assert missed_lines(["a", "b"], whole) == (["c"], False)


def test_a_file_kept_from_inside_the_last_tail_uses_the_overlap() -> None:
    # The kept end of the file begins in the middle of the last tail.
    assert missed_lines(["x", "y", "z"], ["y", "z", "w"]) == (["w"], False)


def test_bytes_split_as_tail_answers_them() -> None:
    body = b"one\r\ntwo\n\nfour\xff\n"
    assert text_lines_from_bytes(body) == (["one", "two", "", "four\ufffd"], 0)
    assert text_lines_from_bytes(b"") == ([], 0)
    assert text_lines_from_bytes(b"no newline") == (["no newline"], 0)


def test_bytes_keep_the_last_lines_each_bounded() -> None:
    body = b"\n".join([b"x" * (TAIL_LINE_CHARS + 10)] * (MAX_TAIL_LINES + 5))
    lines, earlier = text_lines_from_bytes(body)
    assert len(lines) == MAX_TAIL_LINES and earlier == 5
    assert all(len(line) == TAIL_LINE_CHARS + 3 for line in lines)


def test_the_follower_shows_the_rest_once_and_says_when_the_start_is_cut() -> None:
    log = Lines()
    tail = TailFollower("solver.log", lines=10)
    tail.show(WHOLE[37:47], log)
    shown = tail.show_rest(("\n".join(WHOLE) + "\n").encode(), "1", log)
    assert shown == 4 and log.lines == [f"[solver.log] {line}" for line in WHOLE[37:]]
    assert tail.finished

    never_tailed, log = TailFollower("big.log"), Lines()
    never_tailed.show_rest(b"\n".join(b"%d" % i for i in range(MAX_TAIL_LINES + 1)), "1", log)
    assert log.lines[0].startswith("[big.log] ... (lines before the last 1000")
    assert log.lines[1] == "[big.log] 1" and len(log.lines) == MAX_TAIL_LINES + 1


def test_output_paths_compare_without_a_leading_dot_or_slash() -> None:
    assert same_path("./out/solver.log", "out/solver.log") and same_path("/solver.log", "solver.log")
    assert not same_path("other/solver.log", "solver.log")


def test_finding_the_followed_file_stops_at_its_page_or_at_the_bound(rescale_hook: Any, requests_mock: Any) -> None:
    files_url = "https://platform.rescale.com/api/jobs/QTVia/runs/1/files/"

    def page(request: Any, context: Any) -> dict[str, Any]:
        number = int(parse_qs(urlsplit(request.url).query)["page"][0])
        results = [{"id": f"f{number}-{i}", "relativePath": f"out/{number}/{i}.dat"} for i in range(100)]
        return {"count": 100_000, "next": f"{files_url}?page={number + 1}", "results": results}

    listing = requests_mock.get(files_url, json=page)
    found = rescale_hook.find_output_file("QTVia", "1", "./out/2/7.dat")
    assert found is not None and found.id == "f2-7" and listing.call_count == 2
    assert rescale_hook.find_output_file("QTVia", "1", "solver.log", limit=250) is None
    assert listing.call_count == 2 + 3  # 250 files looked at, not the 1000 pages announced
