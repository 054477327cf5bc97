"""A child process and everything below it, killed together by PID.

A process group is not enough for Codex: each command it runs in its sandbox starts a session (and
a PID namespace) of its own. So the tree is read from /proc while it runs, and stopping it freezes
every process found (SIGSTOP: a stopped process cannot fork), then kills them all.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

#: Rounds of "find the descendants, freeze them" before the kill; a tree is rarely deeper than 6.
FREEZE_ROUNDS = 20
REAP_TIMEOUT = 10.0

#: Signals held while a tree is being killed.
_INTERRUPTING = {signal.SIGUSR1, signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGHUP}

#: A process's identity: its PID and its start time (clock ticks since boot), which tells a
#: reused PID apart.
Identity = tuple[int, int]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return stat.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot); None when it is gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of stat, counted after the name


def children_map() -> dict[int, list[int]]:
    """Every live process's children, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> set[int]:
    """PIDs of every process below `pid` now."""
    children = children_map()
    found: set[int] = set()
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ProcessTree:
    """A started child (in a session of its own) and every descendant seen while it ran."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self._seen: set[Identity] = set()

    def watch(self) -> None:
        """Remember the descendants alive now, so they can be killed even once orphaned."""
        for pid in descendants(self.process.pid):
            started = start_time(pid)
            if started is not None:
                self._seen.add((pid, started))

    @property
    def seen(self) -> set[int]:
        """PIDs of the child and of every descendant seen so far."""
        return {self.process.pid} | {pid for pid, _ in self._seen}

    def kill(self) -> None:
        """Freeze, then SIGKILL, the child's group and every descendant; reap the child."""
        # A signal whose handler raises (a cancel's SIGUSR1 in a worker) must not cut this short and
        # leave processes frozen: it is held until the tree is gone, then delivered.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTING)
        try:
            self._kill()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)

    def _kill(self) -> None:
        leader = self.process.pid
        # A group's id is never reused while a member lives: signalling it is safe even when the
        # leader has been reaped; the leader's own PID is signalled only while it is still ours.
        _killpg(leader, signal.SIGSTOP)
        frozen = {leader} if self.process.poll() is None else set()
        for _ in range(FREEZE_ROUNDS):
            self.watch()
            new = {pid for pid, started in self._seen if pid not in frozen and start_time(pid) == started}
            if not new:
                break
            for pid in new:
                _signal(pid, signal.SIGSTOP)
            frozen |= new
        _killpg(leader, signal.SIGKILL)
        for pid in frozen:  # SIGKILL ends a stopped process too
            _signal(pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=REAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
