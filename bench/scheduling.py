"""Backend utilisation and priority under load, against the fake server with fixed latency and slots.

1. Utilisation: backend busy time / (slots x span of the run), peak concurrency and 503s, for one
   backend and for two backends of different capacity serving one model.
2. Priority: completion time of 10 urgent tasks submitted behind 200 low ones, in backend latencies.
Starts its own systems (`koubou up` on free ports). Run: .venv/bin/python bench/scheduling.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import mirrored  # noqa: E402
from tests.fakes.llm_server import FakeLLMServer  # noqa: E402
from tests.harness import System, make_system  # noqa: E402

LATENCY = 0.3


def submit_all(system: System, count: int, priority: int = 5, prefix: str = "t") -> list[str]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = pool.map(lambda i: system.delegate(prompt=f"{prefix} {i}", priority=priority, options={"timeout": 300}),
                           range(count))  # fmt: skip
        return [body["task_id"] for _, body in replies]


def utilisation(servers: list[tuple[FakeLLMServer, int]], tasks: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as home:
        (Path(home) / "config").mkdir()
        lines = [f"  - {{name: b{i}, kind: ollama, url: '{s.url}', slots: {slots}}}" for i, (s, slots) in enumerate(servers)]
        (Path(home) / "config" / "backends.yaml").write_text("backends:\n" + "\n".join(lines) + "\n")
        system = make_system(Path(home), KOUBOU_DEFAULT_MODEL="m:1b", KOUBOU_WORKER_AUTOSCALE=f"{workers},{workers}").start()
        try:
            ids = submit_all(system, tasks)
            finals = [system.wait_final(task_id, timeout=600) for task_id in ids]
            rows = mirrored(system, ids)
        finally:
            system.stop()
    calls = [a for f in finals for a in f["result"]["attempts"] if a["ok"]]
    busy = sum(a["duration_ms"] for a in calls) / 1000
    span = (max(datetime.fromisoformat(rows[t]["completed_at"]) for t in ids)
            - min(datetime.fromisoformat(rows[t]["started_at"]) for t in ids)).total_seconds()  # fmt: skip
    slots = sum(n for _, n in servers)
    busy503 = sum(a["error_type"] == "BackendBusy" for f in finals for a in f["result"]["attempts"])
    peaks = ", ".join(f"b{i} {s.peak_concurrency}/{n}" for i, (s, n) in enumerate(servers))
    print(f"utilisation {busy / (slots * span):.3f} ({tasks} tasks, {workers} worker processes, "
          f"slots {slots}, span {span:.1f}s); peak concurrency {peaks}; 503s {busy503}")  # fmt: skip


def priority(slots: int) -> None:
    """10 urgent tasks behind 200 low ones, on `slots` slots fed by as many worker processes."""
    with FakeLLMServer(models=("m:1b",), slots=slots, latency=LATENCY) as fake, tempfile.TemporaryDirectory() as home:
        system = make_system(Path(home), OLLAMA_HOST=fake.url, KOUBOU_DEFAULT_MODEL="m:1b",
                             KOUBOU_OLLAMA_SLOTS=str(slots), KOUBOU_WORKER_AUTOSCALE=f"{slots},{slots}").start()  # fmt: skip
        try:
            lows = submit_all(system, 200, priority=1, prefix="low")
            time.sleep(2 * LATENCY)
            began = time.time()
            urgent = submit_all(system, 10, priority=10, prefix="urgent")
            finals = [system.wait_final(task_id, timeout=600) for task_id in urgent]
            # Done when its backend call ended (the attempt's own timestamp), not when a 0.1 s status poll saw it.
            ends = [datetime.fromisoformat(a["at"]).timestamp() for f in finals for a in f["result"]["attempts"] if a["ok"]]
            took = max(ends) - began
            for task_id in lows:
                system.wait_final(task_id, timeout=600)
        finally:
            system.stop()
    # Their own work: ceil(10 / slots) rounds; before the first, the low tasks already running finish.
    rounds = -(-10 // slots)
    print(f"priority, {slots} slots: 10 urgent behind 200 low done in {took:.2f}s = {took / LATENCY:.1f} backend latencies "
          f"(their own work alone: {rounds} latencies, plus up to 1 for the low tasks already running)")  # fmt: skip


def main() -> None:
    with FakeLLMServer(models=("m:1b",), slots=2, latency=LATENCY) as one:
        utilisation([(one, 2)], tasks=60, workers=4)
    # Twice: a 6 s run's ramp and tail (slots idle while the last calls end) weigh twice as much as a 12 s run's.
    for tasks in (80, 160):
        with FakeLLMServer(models=("m:1b",), slots=1, latency=LATENCY) as small, \
             FakeLLMServer(models=("m:1b",), slots=3, latency=LATENCY) as big:  # fmt: skip
            utilisation([(small, 1), (big, 3)], tasks=tasks, workers=6)
    priority(2)
    priority(5)


if __name__ == "__main__":
    main()
