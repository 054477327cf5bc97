"""Faults injected into the real system: every accepted task still ends in exactly one final state."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.fakes.llm_server import FakeLLMServer, fake_answer
from tests.harness import System, http, make_system
from tests.integration.conftest import SLOW_MODEL
from tests.integration.test_pipeline import wait_idle, wait_until


def test_a_worker_killed_mid_task_loses_nothing(system: System, openai_fake: FakeLLMServer) -> None:
    wait_idle(system)
    openai_fake.set_latency(3)
    try:
        prompts = [f"survive the kill {i}" for i in range(6)]
        ids = [system.delegate(prompt=p, options={"model": SLOW_MODEL, "timeout": 60})[1]["task_id"] for p in prompts]
        wait_until(lambda: openai_fake.in_flight >= 2, 20)  # both pool processes are mid-call
        worker = system.child("worker")
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        began = time.monotonic()
        finals = [system.wait_final(task_id, timeout=90) for task_id in ids]
    finally:
        openai_fake.set_latency(0)
    assert [f["status"] for f in finals] == ["completed"] * len(ids), finals
    for final, prompt in zip(finals, prompts):
        assert final["result"]["output"] == fake_answer(SLOW_MODEL, [{"role": "user", "content": prompt}])
    recovery = time.monotonic() - began
    assert recovery < 60, f"recovery took {recovery:.0f}s"
    wait_until(lambda: len(system.sql(
        f"SELECT 1 FROM task_master WHERE status = 'completed' AND task_id IN ({','.join('?' * len(ids))})", *ids
    )) == len(ids), 30)  # fmt: skip
    requeued = system.sql("SELECT task_id FROM system_logs WHERE component = 'reaper' AND message LIKE '%requeued'")
    assert {r["task_id"] for r in requeued} & set(ids), "the reaper requeued none of the killed tasks"


def test_a_worker_killed_before_its_task_events_left_loses_nothing(system: System, ollama_fake: FakeLLMServer) -> None:
    # Task events leave the worker in batches every 0.1 s: killed within that window, the worker
    # takes the task's received/started events with it and the row never leaves `pending`.
    wait_idle(system)
    ollama_fake.hang_next(1)  # the first call never answers: the task is mid-call when the worker dies
    task_id = system.delegate(prompt="killed before its events left", options={"timeout": 60})[1]["task_id"]
    deadline = time.monotonic() + 20
    while not any("killed before its events left" in str(body) for _, _, body in ollama_fake.chat_requests()):
        assert time.monotonic() < deadline, "the call never reached the backend"
        time.sleep(0.002)
    worker = system.child("worker")
    assert worker is not None
    os.kill(worker, signal.SIGKILL)
    final = system.wait_final(task_id, timeout=60)
    assert final["status"] == "completed", final
    logged = system.sql("SELECT message FROM system_logs WHERE component = 'reaper' AND task_id = ?", task_id)
    assert logged and "requeued" in logged[0]["message"], logged


def test_broker_killed_and_restarted_mid_load_loses_no_accepted_task(
    tmp_path: Path, ollama_fake: FakeLLMServer
) -> None:
    system = make_system(tmp_path, OLLAMA_HOST=ollama_fake.url, KOUBOU_DEFAULT_MODEL="fake-model:1b",
                         KOUBOU_WORKER_AUTOSCALE="2,2").start()  # fmt: skip
    try:
        ollama_fake.set_latency(0.5)
        accepted: dict[str, str] = {}

        def submit(prompt: str) -> None:
            try:
                code, body = system.delegate(prompt=prompt, options={"timeout": 60})
            except OSError:
                return  # the API itself could not answer: nothing was accepted
            if code == 202:
                accepted[body["task_id"]] = prompt
            else:
                assert code == 503 and body["error"] == "broker unavailable", body

        for i in range(10):
            submit(f"before the crash {i}")
        broker = system.child("broker")
        assert broker is not None
        os.kill(broker, signal.SIGKILL)
        for i in range(10):  # during the outage and the restart: accepted or a clear 503
            submit(f"during the outage {i}")
            time.sleep(0.3)
        wait_until(lambda: system.child("broker") not in (None, broker), 30)
        for i in range(5):
            submit(f"after the restart {i}")
        assert sum(p.startswith("before") for p in accepted.values()) == 10
        finals = {task_id: system.wait_final(task_id, timeout=120) for task_id in accepted}
    finally:
        ollama_fake.set_latency(0)
        survivors = system.stop()
    for task_id, final in finals.items():
        assert final["status"] == "completed", (accepted[task_id], final["result"])
        assert final["result"]["output"] == fake_answer("fake-model:1b", [{"role": "user", "content": accepted[task_id]}])
    assert not survivors


def test_a_backend_that_hangs_times_out_and_frees_the_worker(system: System, ollama_fake: FakeLLMServer) -> None:
    wait_idle(system)
    ollama_fake.hang_next(1)
    began = time.monotonic()
    code, body = system.delegate(prompt="never answered", sync=True, options={"timeout": 2})
    final = body if body["status"] == "failed" else system.wait_final(body["task_id"], timeout=30)
    assert final["status"] == "failed" and "timed out" in final["result"]["error"], final
    assert time.monotonic() - began < 15
    assert system.delegate(prompt="next one", sync=True, options={"timeout": 30})[1]["status"] == "completed"


def api_answers(system: System) -> bool:
    try:
        return http("GET", f"{system.api}/health", timeout=5)[0] in (200, 503)
    except OSError:
        return False


def test_the_api_killed_mid_load_loses_no_accepted_task(system: System) -> None:
    accepted: dict[str, str] = {}

    def submit(i: int) -> None:
        try:
            code, body = system.delegate(prompt=f"api crash load {i}")
        except OSError:
            return  # refused while the API restarts: not accepted, and the client knows it
        if code == 202:
            accepted[body["task_id"]] = f"api crash load {i}"

    api = system.child("api")
    assert api is not None
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(submit, i) for i in range(40)]
        time.sleep(0.2)
        os.kill(api, signal.SIGKILL)
        for future in futures:
            future.result()
    wait_until(lambda: system.child("api") not in (None, api), 30)
    wait_until(lambda: api_answers(system), 30)
    assert accepted
    for task_id, prompt in accepted.items():
        final = system.wait_final(task_id, timeout=60)
        assert final["status"] == "completed"
        assert final["result"]["output"] == fake_answer("fake-model:1b", [{"role": "user", "content": prompt}])
