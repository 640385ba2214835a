"""The py-spy profile of a process tree that ``python -m benchmarks --profile`` takes of the real triggerer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks.process_profile import TreeProfile, summary

# A parent that forks a child, both busy in a function of their own for a second, as the
# triggerer's supervisor and its trigger runner are.
TREE = textwrap.dedent("""
    import subprocess, sys, time

    def parent_work():
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            sum(range(1000))

    child = subprocess.Popen([sys.executable, "-c", '''
    import time
    def child_work():
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            sum(range(1000))
    child_work()
    '''])
    parent_work()
    child.wait()
""")


def test_the_summary_says_per_process_which_functions_ran_and_under_which() -> None:
    text = "\n".join([
        'process 10:"airflow triggerer";main (cli.py:1);_service_subprocess (triggerer.py:9) 30',
        'process 10:"airflow triggerer";main (cli.py:1);load_triggers (triggerer.py:20);ids (trigger.py:5) 40',
        'process 10:"airflow triggerer";main (cli.py:1);load_triggers (triggerer.py:20) 20',
        # A child's stacks start with its parent's process; a command line may span lines.
        'process 10:"airflow triggerer";process 11:"python -c "import x\nx.run()"";run_trigger (triggerer.py:40);poll (muse.py:7) 10',
        'process 10:"airflow triggerer";process 11:"python -c "import x\nx.run()"" 2',
    ])
    out = summary(text, root_pid=10, top=2)
    assert out[0] == "profile: 102 samples at 50/s"
    assert out[1] == "  process 10, the process profiled (airflow triggerer): 90 samples"
    assert out[2].split() == ["self", "44.4%", "ids", "(trigger.py:5)"]
    assert out[3].split() == ["self", "33.3%", "_service_subprocess", "(triggerer.py:9)"]
    # main is on every stack: an entry point, left out of the totals.
    assert out[4].split() == ["total", "66.7%", "load_triggers", "(triggerer.py:20)"]
    assert out[5].split() == ["total", "44.4%", "ids", "(trigger.py:5)"]
    assert out[6] == '  process 11, a child (python -c "import x x.run()"): 12 samples'
    assert out[7].split() == ["self", "83.3%", "poll", "(muse.py:7)"]
    assert out[8].split() == ["self", "16.7%", "(no", "Python", "frame)"]
    # run_trigger and poll are on the same stacks: the innermost, poll, stands for both.
    assert out[9].split() == ["total", "83.3%", "poll", "(muse.py:7)"]


def test_a_long_command_line_keeps_its_arguments_and_says_where_it_was_cut() -> None:
    command = "/opt/very/long/prefix/of/a/virtual/environment/bin/python /opt/very/long/prefix/bin/airflow triggerer --capacity 10000"
    out = summary(f'process 7:"{command}";run (runner.py:3) 5', root_pid=7)
    # The paths lose their folders, not the arguments: the capacity is read whole.
    assert out[1] == "  process 7, the process profiled (python airflow triggerer --capacity 10000): 5 samples"
    long_argument = "x" * 100
    out = summary(f'process 7:"python {long_argument}";run (runner.py:3) 5', root_pid=7)
    assert out[1] == f"  process 7, the process profiled (python {'x' * 70}...): 5 samples"


def test_a_profile_covers_the_process_and_its_children(tmp_path: Path) -> None:
    tree = subprocess.Popen([sys.executable, "-c", TREE])
    profile = TreeProfile(tree.pid, tmp_path / "tree.txt").start()
    assert tree.wait(timeout=30) == 0
    lines = profile.stop(timeout=30)
    text = "\n".join(lines)
    assert lines[0].startswith("profile: ")
    assert "parent_work" in text and "child_work" in text
    # One block per process: the parent and its child, each with its own samples.
    assert [line.split(",")[1].split("(")[0].strip() for line in lines if line.startswith("  process ")] in (
        ["the process profiled", "a child"], ["a child", "the process profiled"],
    )


def test_without_py_spy_nothing_is_profiled_and_the_run_goes_on(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr("benchmarks.process_profile.py_spy", lambda: None)
    profile = TreeProfile(1, tmp_path / "none.txt").start()
    assert profile.stop() == []
    assert "needs py-spy" in capsys.readouterr().out
    assert not (tmp_path / "none.txt").exists()
