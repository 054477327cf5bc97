"""Backend capacity: slots are enforced cluster-wide, so a backend never sees more than it serves."""

from pathlib import Path

from tests.fakes.llm_server import FakeLLMServer
from tests.harness import make_system, start_worker, stop_worker
from tests.integration.test_pipeline import wait_until


def test_two_workers_never_send_a_backend_more_than_its_slots(tmp_path: Path) -> None:
    # The fake answers 503 past 2 requests at once, as Ollama does past its queue.
    with FakeLLMServer(models=("fake-model:1b",), slots=2, latency=0.4) as fake:
        (tmp_path / "home").mkdir()
        system = make_system(tmp_path / "home", OLLAMA_HOST=fake.url, KOUBOU_DEFAULT_MODEL="fake-model:1b",
                             KOUBOU_OLLAMA_SLOTS="2", KOUBOU_WORKER_AUTOSCALE="3,3").start()  # fmt: skip
        second = start_worker(system, tmp_path / "second", "second", "-c", "3", OLLAMA_HOST=fake.url, KOUBOU_OLLAMA_SLOTS="2")
        try:
            wait_until(lambda: any(r["worker_id"].startswith("second@") for r in system.sql("SELECT worker_id FROM workers")), 60)
            ids = [system.delegate(prompt=f"capacity {i}", options={"timeout": 60})[1]["task_id"] for i in range(16)]
            finals = [system.wait_final(task_id, timeout=90) for task_id in ids]
        finally:
            stop_worker(second)
            survivors = system.stop()
        assert not survivors
        assert all(final["status"] == "completed" for final in finals), finals
        assert fake.peak_concurrency == 2  # six worker processes, two slots: never more, and used in full
        busy = [a for final in finals for a in final["result"]["attempts"] if a["error_type"] == "BackendBusy"]
        assert not busy, "the backend answered 503: koubou sent it more than its slots"
        workers = {final["result"]["worker"].split("@")[0] for final in finals}
        assert workers == {"celery", "second"}, workers  # both machines took part


def test_a_low_task_is_aged_up_instead_of_starving(tmp_path: Path) -> None:
    with FakeLLMServer(models=("fake-model:1b",), latency=1.0) as fake:
        system = make_system(tmp_path, OLLAMA_HOST=fake.url, KOUBOU_DEFAULT_MODEL="fake-model:1b",
                             KOUBOU_OLLAMA_SLOTS="1", KOUBOU_WORKER_AUTOSCALE="1,1",
                             KOUBOU_PRIORITY_AGEING="2").start()  # fmt: skip
        try:
            first = system.delegate(prompt="first", priority=10)[1]["task_id"]
            low = system.delegate(prompt="low and patient", priority=1)[1]["task_id"]
            urgent = [system.delegate(prompt=f"urgent {i}", priority=10)[1]["task_id"] for i in range(14)]
            for task_id in [first, low, *urgent]:
                assert system.wait_final(task_id, timeout=120)["status"] == "completed"
            wait_until(lambda: all(system.sql("SELECT started_at FROM task_master WHERE task_id = ? AND status = "
                                              "'completed'", t) for t in [low, *urgent]), 30)  # fmt: skip
            started = {r["task_id"]: r["started_at"] for r in system.sql("SELECT task_id, started_at FROM task_master")}
            aged = system.sql("SELECT details FROM system_logs WHERE component = 'scheduler'")
        finally:
            assert not system.stop()
    after_low = [t for t in urgent if started[t] > started[low]]
    # Strict priority alone would run it last, after all 14 urgent tasks.
    assert len(after_low) >= 2, (started[low], sorted(started[t] for t in urgent))
    assert any(low in row["details"] for row in aged)


def test_a_backends_file_spreads_one_model_over_two_servers_within_their_slots(tmp_path: Path) -> None:
    with FakeLLMServer(models=("shared:7b",), slots=1, latency=0.5) as one, \
         FakeLLMServer(models=("shared:7b",), slots=1, latency=0.5) as two:  # fmt: skip
        (tmp_path / "config").mkdir()
        (tmp_path / "config" / "backends.yaml").write_text(
            f"backends:\n  - {{name: one, kind: ollama, url: '{one.url}', slots: 1}}\n"
            f"  - {{name: two, kind: openai, url: '{two.url}/v1', slots: 1}}\n"
        )
        system = make_system(tmp_path, KOUBOU_DEFAULT_MODEL="shared:7b", KOUBOU_WORKER_AUTOSCALE="3,3").start()
        try:
            assert "demo-model" not in system.output()
            ids = [system.delegate(prompt=f"spread {i}")[1]["task_id"] for i in range(8)]
            finals = [system.wait_final(task_id, timeout=60) for task_id in ids]
        finally:
            assert not system.stop()
    assert all(final["status"] == "completed" for final in finals), finals
    assert {final["result"]["backend"] for final in finals} == {"one", "two"}
    assert one.peak_concurrency == 1 and two.peak_concurrency == 1
    assert not [a for f in finals for a in f["result"]["attempts"] if a["error_type"] == "BackendBusy"]
