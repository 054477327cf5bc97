"""Helpers the benchmarks share."""

from __future__ import annotations

import time
from typing import Any

from tests.harness import System


def mirrored(system: System, ids: list[str], timeout: float = 60) -> dict[str, Any]:
    """The tasks' rows once the mirror has written every one's completion (it may lag the API's answer)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = {r["task_id"]: r for r in system.sql("SELECT task_id, started_at, completed_at FROM task_master")}
        if all(rows.get(t) and rows[t]["completed_at"] and rows[t]["started_at"] for t in ids):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"the mirror has not finished every row after {timeout}s")
        time.sleep(0.2)
