"""Faults injected into the real system: every accepted task still ends in exactly one final state."""

import os
import signal
import time

from tests.fakes.llm_server import FakeLLMServer, fake_answer
from tests.harness import System
from tests.integration.conftest import SLOW_MODEL
from tests.integration.test_pipeline import wait_until


def test_a_worker_killed_mid_task_loses_nothing(system: System, openai_fake: FakeLLMServer) -> None:
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
