"""koubou's overhead against bare Celery on the same broker, in the same run.

1. Sync round trip: `POST /task/delegate` with `sync: true` vs `send_task(...).get()` of a bare Celery
   task making the same backend call (bench/bare_celery.py), samples alternating; p50/p99, the
   difference in ms and the ratio. A direct call to the server is shown for scale.
2. Throughput: a batch of async tasks submitted as fast as possible, timed until every one is final
   (koubou: every row final in the SQL mirror; bare: every result ready); rounds alternate.
Both run against the fake Ollama server at ~0 latency, with the same worker pool (prefork,
--autoscale=W,W). Starts its own system (`koubou up` on free ports) and bare worker, stops both by PID.
Run: .venv/bin/python bench/overhead.py [--n 200] [--tasks 200] [--rounds 3] [--workers 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bare_celery import QUEUE, TASK, chat, make_app  # noqa: E402
from tests.fakes.llm_server import FakeLLMServer  # noqa: E402
from tests.harness import REPO, System, clean_env, make_system  # noqa: E402

MODEL = "fake-model:1b"
FINAL = ("completed", "failed", "cancelled")
#: The issue's targets: koubou adds at most this much p50 latency, and keeps this share of throughput.
TARGET_ADDED_P50_MS = 3.0
TARGET_THROUGHPUT_RATIO = 0.8


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


class Api:
    """A keep-alive HTTP connection to koubou's API (one per thread), as a real client would hold."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._local = threading.local()

    def post(self, path: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, Any]:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        # One send for headers and body (http.client joins them): no Nagle/delayed-ACK stall.
        connection.request("POST", path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())


class BareWorker:
    """`celery worker` for the bare app, on its own queue; stopped by PID."""

    def __init__(self, broker: str, ollama_host: str, workers: int, log_path: Path) -> None:
        env = clean_env(BARE_BROKER_URL=broker, BARE_OLLAMA_HOST=ollama_host, BARE_MODEL=MODEL, PYTHONPATH=str(REPO))
        argv = [sys.executable, "-m", "celery", "-A", "bench.bare_celery", "worker", "-Q", QUEUE,
                f"--autoscale={workers},{workers}", "-n", f"bare-{os.getpid()}@%h", "--loglevel=WARNING"]  # fmt: skip
        with open(log_path, "ab") as out:
            self.process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left of its group
        except ProcessLookupError:
            pass
        self.process.wait()


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def koubou_sync(api: Api) -> None:
    code, body = api.post("/task/delegate", {"prompt": "bench", "sync": True, "options": {"timeout": 30}})
    assert code == 200 and body["status"] == "completed", body


def all_final(db_path: Path, ids: list[str]) -> int:
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        marks = ",".join("?" * len(ids))
        query = f"SELECT status FROM task_master WHERE task_id IN ({marks})"  # noqa: S608 (only placeholders)
        statuses = [row[0] for row in connection.execute(query, ids)]
    finally:
        connection.close()
    assert "failed" not in statuses and "cancelled" not in statuses, statuses
    return sum(status in FINAL for status in statuses)


def koubou_batch(system: System, api: Api, count: int, timeout: float = 300) -> float:
    """Tasks per second: submit `count` async delegations (8 client threads), until every row is final."""
    start = time.perf_counter()

    def submit(i: int) -> str:
        code, body = api.post("/task/delegate", {"prompt": f"batch {i}", "options": {"timeout": 120}})
        assert code == 202, body
        return str(body["task_id"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(submit, range(count)))
    deadline = time.monotonic() + timeout
    while all_final(system.db_path, ids) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"koubou: not every task final after {timeout}s")
        time.sleep(0.02)
    return count / (time.perf_counter() - start)


def bare_batch(app: Any, count: int, timeout: float = 300) -> float:
    """Tasks per second: send `count` bare tasks (one thread: Celery's result consumer is not thread-safe), until all results are ready."""
    start = time.perf_counter()
    results = [app.send_task(TASK, args=[f"batch {i}"], queue=QUEUE) for i in range(count)]
    for result in results:
        result.get(timeout=timeout)
    return count / (time.perf_counter() - start)


def row(name: str, *cells: str) -> str:
    return f"  {name:<46}" + "".join(f"{cell:>11}" for cell in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="sync round trips per side")
    parser.add_argument("--tasks", type=int, default=200, help="async tasks per throughput batch")
    parser.add_argument("--rounds", type=int, default=3, help="throughput batches per side")
    parser.add_argument("--workers", type=int, default=4, help="worker processes, both sides")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()

    with FakeLLMServer(models=(MODEL,)) as fake, tempfile.TemporaryDirectory() as home:
        # As many backend slots as worker processes: the fake has no limit and the bare side none
        # either, so leases are taken and given back (their cost counts) but never make a task wait.
        system = make_system(Path(home), OLLAMA_HOST=fake.url, KOUBOU_DEFAULT_MODEL=MODEL,
                             KOUBOU_OLLAMA_SLOTS=str(args.workers),
                             KOUBOU_WORKER_AUTOSCALE=f"{args.workers},{args.workers}")  # fmt: skip
        system.start()
        broker = f"redis://127.0.0.1:{system.redis_port}/0"
        bare_worker = BareWorker(broker, fake.url, args.workers, Path(home) / "bare-worker.log")
        app = make_app(broker)
        api = Api(system.api_port)
        try:
            app.send_task(TASK, args=["ready?"], queue=QUEUE).get(timeout=120)  # the bare worker is up
            bare = lambda: app.send_task(TASK, args=["bench"], queue=QUEUE).get(timeout=30)  # noqa: E731
            direct = lambda: chat(fake.url, MODEL, "bench")  # noqa: E731
            koubou = lambda: koubou_sync(api)  # noqa: E731
            for _ in range(10):  # warm every path (connections, imports, model lists)
                direct(), bare(), koubou()
            samples: dict[str, list[float]] = {"direct": [], "bare": [], "koubou": []}
            calls = {"direct": direct, "bare": bare, "koubou": koubou}
            for i in range(args.n):  # rotate the order, so drift and noise hit every side alike
                names = list(calls)
                for name in names[i % 3:] + names[: i % 3]:
                    samples[name].append(timed(calls[name]))

            rates: dict[str, list[float]] = {"bare": [], "koubou": []}
            if not args.skip_throughput:
                koubou_batch(system, api, 20), bare_batch(app, 20)  # warm
                for i in range(args.rounds):
                    order = ("koubou", "bare") if i % 2 == 0 else ("bare", "koubou")
                    for name in order:
                        rate = koubou_batch(system, api, args.tasks) if name == "koubou" else bare_batch(app, args.tasks)
                        rates[name].append(rate)
        finally:
            bare_worker.stop()
            survivors = system.stop()
            assert not survivors, f"left running: {survivors}"

    p = {name: (statistics.median(s), percentile(s, 99)) for name, s in samples.items()}
    added = (p["koubou"][0] - p["bare"][0], p["koubou"][1] - p["bare"][1])
    print(f"sync round trip, {args.n} samples each, interleaved ({args.workers} worker processes each side)")
    print(row("", "p50 ms", "p99 ms"))
    print(row("direct call to the server (ollama client)", f"{p['direct'][0]:.2f}", f"{p['direct'][1]:.2f}"))
    print(row("bare Celery: send_task().get()", f"{p['bare'][0]:.2f}", f"{p['bare'][1]:.2f}"))
    print(row("koubou: POST /task/delegate sync", f"{p['koubou'][0]:.2f}", f"{p['koubou'][1]:.2f}"))
    print(row("koubou - bare (ms)", f"{added[0]:+.2f}", f"{added[1]:+.2f}"))
    print(row("koubou / bare", f"{p['koubou'][0] / p['bare'][0]:.2f}x", f"{p['koubou'][1] / p['bare'][1]:.2f}x"))
    verdict = "met" if added[0] <= TARGET_ADDED_P50_MS else "MISSED"
    print(f"  target: koubou adds <= {TARGET_ADDED_P50_MS:g} ms p50 over bare Celery: {verdict}")
    if rates["bare"]:
        k, b = statistics.median(rates["koubou"]), statistics.median(rates["bare"])
        print(f"\nthroughput, {args.tasks} async tasks per batch, {args.rounds} batches each, alternating (median)")
        print(row("", "tasks/s", "batches"))
        print(row("bare Celery (until every result is ready)", f"{b:.1f}", " ".join(f"{r:.0f}" for r in rates["bare"])))
        print(row("koubou (until every SQL row is final)", f"{k:.1f}", " ".join(f"{r:.0f}" for r in rates["koubou"])))
        print(row("koubou / bare", f"{k / b:.2f}", ""))
        verdict = "met" if k / b >= TARGET_THROUGHPUT_RATIO else "MISSED"
        print(f"  target: koubou throughput >= {TARGET_THROUGHPUT_RATIO:g} x bare Celery: {verdict}")


if __name__ == "__main__":
    main()
