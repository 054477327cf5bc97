"""koubou's autoscaler in a real worker: grows to the backend's slots (not MAX), shrinks without killing a task."""

import threading
from pathlib import Path
from typing import Any

from celery import Celery

from tests.fakes.llm_server import FakeLLMServer
from tests.harness import System, alive, make_system
from tests.integration.test_pipeline import answer, wait_until

MODEL = "fake-model:1b"


def pool_size(worker_pid: int) -> int:
    """Live pool processes: the worker main process's children, read from /proc."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == worker_pid and alive(int(entry.name)):
            count += 1
    return count


class PoolWatch:
    """Samples the pool size every 0.1 s on a thread; remembers the largest seen."""

    def __init__(self, worker_pid: int) -> None:
        self.worker_pid = worker_pid
        self.peak = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping.wait(0.1):
            self.peak = max(self.peak, pool_size(self.worker_pid))

    def __enter__(self) -> "PoolWatch":
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


def celery_stats(system: System) -> dict[str, Any]:
    """`celery inspect stats` of the one worker, through koubou's control exchange."""
    app = Celery("probe", broker=f"redis://127.0.0.1:{system.redis_port}/0")
    app.conf.control_exchange = "koubou.control"
    try:
        # limit=1: answer as soon as the one worker has (without it, every call waits the whole timeout).
        replies = app.control.inspect(timeout=3, limit=1).stats() or {}
    finally:
        app.close()
    assert len(replies) == 1, replies
    return next(iter(replies.values()))


def test_the_pool_grows_to_the_backend_slots_not_max_and_shrinks_without_killing_a_task(tmp_path: Path) -> None:
    with FakeLLMServer(models=(MODEL,), slots=2, latency=1.0) as fake:
        system = make_system(tmp_path, OLLAMA_HOST=fake.url, KOUBOU_DEFAULT_MODEL=MODEL, KOUBOU_OLLAMA_SLOTS="2",
                             KOUBOU_WORKER_AUTOSCALE="6,1", AUTOSCALE_KEEPALIVE="3").start()  # fmt: skip
        try:
            worker = system.child("worker")
            assert worker is not None
            wait_until(lambda: pool_size(worker) == 1, 30)  # MIN at start
            prompts = [f"backlog {i}" for i in range(10)]
            with PoolWatch(worker) as watch:
                ids = [system.delegate(prompt=prompt, options={"timeout": 60})[1]["task_id"] for prompt in prompts]
                finals = [system.wait_final(task_id, timeout=120) for task_id in ids]
            grown = celery_stats(system)

            # Scale down while a task runs: the idle process goes, the busy one finishes its task.
            fake.set_latency(15)  # outlasts the keepalive (3 s), the shrink and the checks below
            long_id = system.delegate(prompt="the long one", options={"timeout": 60})[1]["task_id"]
            wait_until(lambda: system.status(long_id)[1]["status"] == "in_progress", 20)
            wait_until(lambda: pool_size(worker) == 1, 20)
            # Celery lists a stopped process until billiard reaps it: a moment later.
            wait_until(lambda: len(celery_stats(system)["pool"]["processes"]) == 1, 10)
            shrunk = celery_stats(system)
            running_when_shrunk = system.status(long_id)[1]["status"]
            long_final = system.wait_final(long_id, timeout=60)
        finally:
            survivors = system.stop()
    assert not survivors
    assert all(final["status"] == "completed" for final in finals), finals
    assert [final["result"]["output"] for final in finals] == [answer(MODEL, prompt) for prompt in prompts]
    assert watch.peak == 2, f"the pool reached {watch.peak} processes for a backend of 2 slots"
    assert fake.peak_concurrency == 2
    assert grown["autoscaler"]["capacity"] == 2 and grown["autoscaler"]["max"] == 6

    assert running_when_shrunk == "in_progress"
    assert len(shrunk["pool"]["processes"]) == 1 and shrunk["autoscaler"]["current"] == 1
    assert long_final["status"] == "completed", long_final
    assert long_final["result"]["output"] == answer(MODEL, "the long one")
    # Run once: a killed process would have had its task redelivered and sent again.
    assert sum("the long one" in str(body) for _, _, body in fake.chat_requests()) == 1
    log = (tmp_path / "logs" / "workers" / "worker.log").read_text(errors="replace")
    assert "WorkerLostError" not in log and "exited prematurely" not in log
    assert "Scaling down 1 processes" in log
    assert "Traceback" not in log
