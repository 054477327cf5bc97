"""Workers limited to task types: code tasks reach only workers that serve `code`, priority stays strict."""

import subprocess
from pathlib import Path

from tests.codex_cli import codex_cli
from tests.fakes.llm_server import FakeLLMServer
from tests.harness import System, http, make_system, start_worker, stop_worker
from tests.integration.test_pipeline import wait_until

MODEL = "fake-model:1b"


def queue_depths(system: System) -> dict[str, int]:
    code, body = http("GET", f"{system.api}/backends", timeout=10)
    assert code == 200, body
    return body["queues"]


def start_code_capable_worker(system: System, fake: FakeLLMServer, tmp_path: Path, name: str, **env: str) -> subprocess.Popen[bytes]:
    """An extra worker that can run Codex: the broker URL, a backend and the Codex CLI."""
    return start_worker(system, tmp_path / f"{name}-home", name, "-c", "1", OLLAMA_HOST=fake.url,
                        KOUBOU_CODEX_BIN=str(codex_cli()), **env)  # fmt: skip


def test_a_general_worker_never_takes_a_code_task_and_a_code_worker_does(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    with FakeLLMServer(models=(MODEL,), latency=0.3) as fake:
        system = make_system(tmp_path / "home", OLLAMA_HOST=fake.url, KOUBOU_DEFAULT_MODEL=MODEL,
                             KOUBOU_OLLAMA_SLOTS="4", KOUBOU_WORKER_AUTOSCALE="2,2", KOUBOU_WORKER_TYPES="general",
                             KOUBOU_PRIORITY_AGEING="1").start()  # fmt: skip
        coder = None
        try:
            code_task = system.delegate(type="code", prompt="refactor me", priority=1)[1]["task_id"]
            general = system.delegate(prompt="plain work", priority=1)[1]["task_id"]
            assert system.wait_final(general, timeout=60)["status"] == "completed"
            # Ageing moves the waiting code task up its own type's classes, never into a general
            # queue, where the idle general worker would take it.
            wait_until(lambda: queue_depths(system)["koubou.1-urgent.code"] == 1, 40)
            depths = queue_depths(system)
            assert sum(depths.values()) == 1, depths
            assert system.status(code_task)[1]["status"] == "pending"
            aged = system.sql("SELECT details FROM system_logs WHERE component = 'scheduler'")
            assert sum(code_task in row["details"] for row in aged) >= 2  # low -> normal -> urgent

            coder = start_code_capable_worker(system, fake, tmp_path, "coder", KOUBOU_WORKER_TYPES="code")
            final = system.wait_final(code_task, timeout=90)
            assert final["status"] == "completed", final
            assert final["result"]["worker"].startswith("coder@")
            # Code tasks run Codex, whose final message is the fake's answer to the prompt it passed on.
            assert final["result"]["output"].endswith("refactor me"[::-1]), final["result"]

            # The code worker, idle, takes none of a burst of general tasks.
            burst = [system.delegate(prompt=f"burst {i}", priority=9)[1]["task_id"] for i in range(6)]
            finals = [system.wait_final(task_id, timeout=60) for task_id in burst]

            # `workers.worker_type` says what each serves; the coder has no database, only the broker.
            def worker_types() -> dict[str, str]:
                return {r["worker_id"].split("@")[0]: r["worker_type"] for r in system.sql("SELECT worker_id, worker_type FROM workers")}

            wait_until(lambda: worker_types() == {"celery": "general", "coder": "code"}, 20)
        finally:
            if coder is not None:
                stop_worker(coder)
            survivors = system.stop()
    assert not survivors
    assert all(f["status"] == "completed" for f in finals), finals
    assert {f["result"]["worker"].split("@")[0] for f in finals} == {"celery"}
    assert "koubou.1-urgent.code" in (tmp_path / "coder-home.log").read_text()  # its banner names its queues
    assert "koubou.1-urgent " not in (tmp_path / "coder-home.log").read_text()


def test_priority_stays_strict_across_task_types(tmp_path: Path) -> None:
    with FakeLLMServer(models=(MODEL,), latency=0.5) as fake:
        system = make_system(tmp_path, OLLAMA_HOST=fake.url, KOUBOU_DEFAULT_MODEL=MODEL, KOUBOU_OLLAMA_SLOTS="1",
                             KOUBOU_WORKER_AUTOSCALE="1,1", KOUBOU_CODEX_BIN=str(codex_cli())).start()  # fmt: skip
        try:
            blocker = system.delegate(prompt="blocker", priority=10)[1]["task_id"]
            wait_until(lambda: system.status(blocker)[1]["status"] == "in_progress", 30)
            sent = [("general", 1), ("code", 1), ("code", 5), ("code", 9), ("general", 5), ("general", 10)]
            ids = {
                (kind, priority): system.delegate(type=kind, prompt=f"{kind} {priority}", priority=priority)[1]["task_id"]
                for kind, priority in sent
            }
            for task_id in ids.values():
                assert system.wait_final(task_id, timeout=60)["status"] == "completed"
            wait_until(lambda: all(system.sql("SELECT started_at FROM task_master WHERE task_id = ? AND started_at "
                                              "IS NOT NULL", t) for t in ids.values()), 30)  # fmt: skip
            started = {r["task_id"]: r["started_at"] for r in system.sql("SELECT task_id, started_at FROM task_master")}
        finally:
            assert not system.stop()
    order = sorted(ids, key=lambda key: started[ids[key]])
    # Class first whatever the type; within a class general, then code (queue name order).
    assert order == [("general", 10), ("code", 9), ("general", 5), ("code", 5), ("general", 1), ("code", 1)], order
