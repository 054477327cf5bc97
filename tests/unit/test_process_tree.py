"""Killing a child with everything below it, also processes that left its group and session."""

import subprocess
import sys
import time
from pathlib import Path

from koubou.process_tree import ProcessTree, descendants

# A child that starts a grandchild in a session of its own (as Codex's sandbox does), then waits.
SCRIPT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_reaches_descendants_in_other_sessions() -> None:
    process = subprocess.Popen([sys.executable, "-c", SCRIPT], start_new_session=True)
    tree = ProcessTree(process)
    deadline = time.monotonic() + 30
    while not descendants(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchildren = descendants(process.pid)
    assert grandchildren, "the grandchild did not start"
    tree.kill()
    assert process.returncode is not None
    time.sleep(0.2)
    assert not [pid for pid in grandchildren if alive(pid)]


def test_descendants_seen_while_running_are_killed_once_orphaned() -> None:
    process = subprocess.Popen([sys.executable, "-c", SCRIPT], start_new_session=True)
    tree = ProcessTree(process)
    deadline = time.monotonic() + 30
    while not descendants(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    tree.watch()
    orphans = descendants(process.pid)
    process.kill()  # the grandchild, in its own session, lives on as an orphan
    process.wait()
    assert all(alive(pid) for pid in orphans)
    tree.kill()
    time.sleep(0.2)
    assert not [pid for pid in orphans if alive(pid)]
