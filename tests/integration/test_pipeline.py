"""The delegation pipeline end to end, driven over HTTP the way Claude Code drives it."""

import base64
import json
import os
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tests.fakes.llm_server import FakeLLMServer, fake_answer, fake_prompt_tokens
from tests.harness import System, http, start_worker, stop_worker
from tests.integration.conftest import SLOW_MODEL


def answer(model: str, prompt: str) -> str:
    return fake_answer(model, [{"role": "user", "content": prompt}])


def test_health_names_each_component_and_backend(system: System, ollama_fake: FakeLLMServer) -> None:
    code, body = http("GET", f"{system.api}/health")
    assert code == 200, body
    assert body["status"] == "ok"
    assert {name for name, part in body["components"].items() if part["ok"]} >= {"broker", "database", "workers"}
    assert len(body["workers"]) == 1
    backends = {backend["kind"]: backend for backend in body["backends"]}
    assert backends["ollama"]["reachable"] and backends["ollama"]["url"] == ollama_fake.url
    assert "fake-model:1b" in backends["ollama"]["models"]
    assert backends["openai"]["models"] == [SLOW_MODEL]


def test_sync_delegation_returns_the_answer_and_mirrors_the_row(system: System) -> None:
    prompt = "sync delegation number one"
    code, body = system.delegate(prompt=prompt, sync=True, options={"timeout": 30})
    assert code == 200, body
    assert body["status"] == "completed"
    result = body["result"]
    assert result["success"] is True and result["error"] is None
    assert result["output"] == answer("fake-model:1b", prompt)
    assert result["prompt_tokens"] == fake_prompt_tokens([{"role": "user", "content": prompt}])
    assert result["backend"].startswith("ollama@")
    code, status = system.status(body["task_id"])
    assert code == 200 and status["status"] == "completed" and status["result"]["output"] == result["output"]
    row = wait_row(system, body["task_id"])
    assert row["task_type"] == "general" and row["priority"] == 5 and row["status"] == "completed"
    assert '"output": "' + result["output"] in row["result"]
    assert row["assigned_worker_type"] == result["worker"]
    assert row["created_at"] <= row["started_at"] <= row["completed_at"] <= row["updated_at"]
    asked = system.sql("SELECT * FROM agent_communications WHERE task_id = ?", body["task_id"])
    assert [(a["sender"], a["message_type"]) for a in asked] == [("anonymous", "delegate")]
    assert prompt not in asked[0]["content"]  # stored once, in task_master.content


def test_the_worker_log_has_a_line_as_a_task_arrives_and_one_as_it_ends_no_more(system: System) -> None:
    code, body = system.delegate(prompt="log lines", sync=True, options={"timeout": 30})
    assert code == 200 and body["status"] == "completed", body
    worker_log = system.home / "logs" / "workers" / "worker.log"
    wait_until(lambda: f"{body['task_id']}] succeeded" in worker_log.read_text(errors="replace"), 10)
    lines = [line for line in worker_log.read_text(errors="replace").splitlines() if body["task_id"] in line]
    assert len(lines) == 2 and "received" in lines[0] and "succeeded" in lines[1], lines
    assert "HTTP Request:" not in worker_log.read_text(errors="replace")  # httpx's line per backend call


def test_the_api_opens_no_control_socket_shared_with_other_gunicorns(system: System) -> None:
    api_log = (system.home / "logs" / "system" / "api.log").read_text(errors="replace")
    assert "Booting worker" in api_log and "Control socket" not in api_log


def test_status_alias_path_answers_the_same(system: System) -> None:
    code, body = system.delegate(prompt="alias check", sync=True)
    assert code == 200
    first = http("GET", f"{system.api}/task/{body['task_id']}/status")
    second = http("GET", f"{system.api}/task/status/{body['task_id']}")
    assert first[0] == second[0] == 200
    assert first[1]["result"] == second[1]["result"]


def test_async_delegation_goes_through_every_state(system: System, openai_fake: FakeLLMServer) -> None:
    openai_fake.set_latency(1.5)
    try:
        code, body = system.delegate(prompt="slow async task", options={"model": SLOW_MODEL, "timeout": 30})
        assert code == 202 and body["status"] == "delegated" and body["result"] is None
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = system.status(body["task_id"])[1]
            if not seen or seen[-1] != status["status"]:
                seen.append(status["status"])
            if status["status"] == "completed":
                break
            time.sleep(0.05)
    finally:
        openai_fake.set_latency(0)
    assert seen[-1] == "completed" and "in_progress" in seen, seen
    assert seen.index("in_progress") < seen.index("completed")
    assert status["result"]["output"] == answer(SLOW_MODEL, "slow async task")
    assert status["result"]["backend"].startswith("openai@")
    assert status["completed_at"]
    row = wait_row(system, body["task_id"])
    assert row["created_at"] <= row["started_at"] <= row["completed_at"]


def test_sync_that_outlasts_its_wait_answers_202_and_the_task_goes_on(
    system: System, openai_fake: FakeLLMServer
) -> None:
    wait_idle(system)
    openai_fake.set_latency(3)
    try:
        # Fill both worker processes, so the next task has to wait in the queue.
        blockers = [system.delegate(prompt=f"blocker {i}", options={"model": SLOW_MODEL})[1]["task_id"] for i in range(2)]
        wait_until(lambda: all(system.status(t)[1]["status"] == "in_progress" for t in blockers), 20)
        code, body = system.delegate(prompt="queued behind blockers", sync=True, options={"timeout": 1})
        assert code == 202, body
        assert body["status"] == "in_progress"
    finally:
        openai_fake.set_latency(0)
    final = system.wait_final(body["task_id"], timeout=30)
    assert final["status"] == "completed"
    assert final["result"]["output"] == answer("fake-model:1b", "queued behind blockers")
    for task_id in blockers:
        assert system.wait_final(task_id)["status"] == "completed"


def test_options_reach_the_backend_on_the_wire(system: System, ollama_fake: FakeLLMServer) -> None:
    prompt = "options check"
    code, body = system.delegate(prompt=prompt, sync=True, options={"temperature": 0.25, "num_ctx": 8192, "max_tokens": 64})
    assert code == 200 and body["status"] == "completed"
    sent = [json for _, path, json in ollama_fake.requests if path == "/api/chat" and json and
            json["messages"][-1]["content"] == prompt]  # fmt: skip
    assert sent and sent[-1]["options"] == {"temperature": 0.25, "num_ctx": 8192, "num_predict": 64}


def test_a_model_asked_without_tag_finds_ollamas_latest(system: System) -> None:
    code, body = system.delegate(prompt="tagless", sync=True, options={"model": "llama3"})
    assert body["status"] == "completed", body
    assert body["result"]["model"] == "llama3:latest"


def test_a_missing_model_fails_with_a_clear_error(system: System) -> None:
    code, body = system.delegate(prompt="anything", sync=True, options={"model": "missing-model:70b"})
    assert code == 200 and body["status"] == "failed"
    assert body["result"]["success"] is False and body["result"]["output"] is None
    assert "missing-model:70b" in body["result"]["error"]
    assert "fake-model:1b" in body["result"]["error"]  # says what is available
    assert wait_row(system, body["task_id"])["status"] == "failed"


def test_a_backend_that_goes_down_fails_tasks_clearly_and_koubou_stays_healthy(
    system: System, openai_fake: FakeLLMServer
) -> None:
    openai_fake.stop()
    try:
        code, body = system.delegate(prompt="to a dead server", sync=True, options={"model": SLOW_MODEL, "timeout": 20})
        assert code == 200 and body["status"] == "failed", body
        assert body["result"]["error_type"] == "BackendUnavailable"
        assert openai_fake.url.split("//")[1] in body["result"]["error"]

        def health_shows_it() -> bool:
            code, health = http("GET", f"{system.api}/health")
            assert code == 200, health
            openai = next(b for b in health["backends"] if b["kind"] == "openai")
            return openai["reachable"] is False and bool(openai["error"])

        wait_until(health_shows_it, 10)
    finally:
        openai_fake.start()


def test_a_burst_ends_with_every_row_final_and_right_even_when_the_mirror_died(system: System) -> None:
    mirror = system.child("mirror")
    assert mirror is not None
    os.kill(mirror, signal.SIGKILL)  # events sent while it is down are lost for good
    prompts = [f"burst task {i}" for i in range(40)]
    models = ["fake-model:1b" if i % 4 else "missing:1b" for i in range(40)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        replies = list(pool.map(lambda pm: system.delegate(prompt=pm[0], options={"model": pm[1]}), zip(prompts, models)))
    assert all(code == 202 for code, _ in replies)
    ids = [body["task_id"] for _, body in replies]
    for task_id in ids:
        system.wait_final(task_id)
    wait_until(lambda: system.child("mirror") not in (None, mirror), 30)
    placeholders = ",".join("?" * len(ids))
    wait_until(
        lambda: len(system.sql(f"SELECT 1 FROM task_master WHERE task_id IN ({placeholders}) "
                               "AND status IN ('completed','failed')", *ids)) == len(ids),  # fmt: skip
        60,
    )
    rows = {row["task_id"]: row for row in system.sql(f"SELECT * FROM task_master WHERE task_id IN ({placeholders})", *ids)}
    for task_id, prompt, model in zip(ids, prompts, models):
        row = rows[task_id]
        if model == "missing:1b":
            assert row["status"] == "failed" and "missing:1b" in row["result"]
        else:
            assert row["status"] == "completed" and answer(model, prompt) in row["result"]
        assert row["assigned_worker_type"]
    assert "restarting mirror" in system.output()
    assert system.sql("SELECT count(*) AS n FROM system_logs WHERE component='mirror'")[0]["n"] >= 1


def test_worker_rows_reflect_the_worker(system: System) -> None:
    workers = http("GET", f"{system.api}/health")[1]["workers"]
    wait_until(lambda: system.sql("SELECT * FROM workers WHERE worker_id = ?", workers[0]), 20)

    def settled() -> bool:
        row = system.sql("SELECT * FROM workers WHERE worker_id = ?", workers[0])[0]
        counts = system.sql(
            "SELECT status, count(*) AS n FROM task_master WHERE assigned_worker_type = ? GROUP BY status", workers[0]
        )
        by_status = {c["status"]: c["n"] for c in counts}
        return (row["tasks_completed"], row["tasks_failed"]) == (by_status.get("completed", 0), by_status.get("failed", 0))

    wait_until(settled, 20)
    row = system.sql("SELECT * FROM workers WHERE worker_id = ?", workers[0])[0]
    assert row["status"] in ("idle", "busy")
    assert row["tasks_completed"] > 0 and row["tasks_failed"] > 0
    heartbeat = datetime.fromisoformat(row["last_heartbeat"])
    assert datetime.utcnow() - heartbeat < timedelta(seconds=15)  # noqa: DTZ003 (stored as naive UTC)
    # A worker with the default KOUBOU_WORKER_TYPES serves both task types, and says so.
    wait_until(lambda: {w["worker_id"]: w["worker_type"] for w in http("GET", f"{system.api}/workers")[1]["workers"]}.get(workers[0]) == "general+code", 20)


def wait_idle(system: System, timeout: float = 60) -> None:
    """No task pending or running: tests that steer the shared fake server go one at a time."""

    def idle() -> bool:
        return all(not http("GET", f"{system.api}/tasks?status={s}&limit=200")[1]["tasks"] for s in ("pending", "in_progress"))

    wait_until(idle, timeout)


def wait_row(system: System, task_id: str) -> dict:
    wait_until(lambda: system.sql("SELECT 1 FROM task_master WHERE task_id = ? AND status IN "
                                  "('completed','failed','cancelled')", task_id), 20)  # fmt: skip
    return dict(system.sql("SELECT * FROM task_master WHERE task_id = ?", task_id)[0])


def wait_until(condition, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout}s")


def test_an_extra_worker_with_only_the_broker_url_joins_the_cluster(
    system: System, ollama_fake: FakeLLMServer, tmp_path: Path
) -> None:
    home = tmp_path / "extra-home"
    # A database it cannot open: a worker must never touch the database.
    extra = start_worker(system, home, "extra", "-c", "1", OLLAMA_HOST=ollama_fake.url,
                         KOUBOU_DATABASE_URL="postgresql://nobody@192.0.2.1:1/none")  # fmt: skip
    try:
        wait_until(lambda: any(w.startswith("extra@") for w in http("GET", f"{system.api}/health")[1]["workers"]), 60)
        ollama_fake.set_latency(0.3)
        try:
            ids = [system.delegate(prompt=f"spread {i}")[1]["task_id"] for i in range(12)]
            finals = [system.wait_final(task_id) for task_id in ids]
        finally:
            ollama_fake.set_latency(0)
        assert all(final["status"] == "completed" for final in finals)
        by_extra = [f["task_id"] for f in finals if (f["result"]["worker"] or "").startswith("extra@")]
        assert by_extra, "the extra worker ran none of the tasks"
        row = wait_row(system, by_extra[0])
        assert row["assigned_worker_type"].startswith("extra@")
        wait_until(lambda: system.sql("SELECT 1 FROM workers WHERE worker_id LIKE 'extra@%'"), 20)
    finally:
        stop_worker(extra)
    assert not (home / "db" / "koubou.db").exists()
    wait_until(lambda: system.sql("SELECT status FROM workers WHERE worker_id LIKE 'extra@%'")[0]["status"] == "offline", 30)


def cancel(system: System, task_id: str, how: str = "DELETE") -> tuple[int, Any]:
    if how == "DELETE":
        return http("DELETE", f"{system.api}/task/{task_id}")
    return http("POST", f"{system.api}/task/{task_id}/cancel")


def test_cancel_stops_a_running_backend_call(system: System, ollama_fake: FakeLLMServer) -> None:
    wait_idle(system)  # so the next call to the fake is this task's
    ollama_fake.hang_next(1)  # accepts the call and never answers: only an interrupt ends it
    task_id = system.delegate(prompt="hang forever", options={"timeout": 120})[1]["task_id"]
    wait_until(lambda: any("hang forever" in str(body) for _, _, body in ollama_fake.chat_requests()), 20)
    began = time.monotonic()
    code, body = cancel(system, task_id)
    assert code in (200, 202), body
    final = system.wait_final(task_id, timeout=15)
    assert final["status"] == "cancelled", final
    # The task itself got out of the hung call (Celery alone would only have marked it revoked).
    worker_log = system.home / "logs" / "workers" / "worker.log"
    wait_until(lambda: f"{task_id}] raised unexpected: DelegationFailed('cancelled by the client'"
               in worker_log.read_text(errors="replace"), 10)  # fmt: skip
    assert time.monotonic() - began < 10
    assert wait_row(system, task_id)["status"] == "cancelled"
    # The worker is free again: a new task completes.
    code, body = system.delegate(prompt="after cancel", sync=True, options={"timeout": 30})
    assert body["status"] == "completed"


def test_cancel_drops_a_queued_task_before_it_starts(system: System, openai_fake: FakeLLMServer) -> None:
    wait_idle(system)
    openai_fake.set_latency(2)
    try:
        blockers = [system.delegate(prompt=f"hold {i}", options={"model": SLOW_MODEL})[1]["task_id"] for i in range(2)]
        wait_until(lambda: all(system.status(t)[1]["status"] == "in_progress" for t in blockers), 20)
        queued = system.delegate(prompt="never to run", options={"model": SLOW_MODEL})[1]["task_id"]
        code, body = cancel(system, queued, how="POST")
        assert (code, body["status"]) == (200, "cancelled"), body
    finally:
        openai_fake.set_latency(0)
    for task_id in blockers:
        assert system.wait_final(task_id)["status"] == "completed"
    time.sleep(2)
    assert system.status(queued)[1]["status"] == "cancelled"
    assert not [r for r in openai_fake.chat_requests() if "never to run" in str(r[2])]


def test_cancel_of_a_final_or_unknown_task(system: System) -> None:
    task_id = system.delegate(prompt="quick", sync=True)[1]["task_id"]
    system.wait_final(task_id)
    code, body = cancel(system, task_id)
    assert code == 409 and body["detail"] == {"task_id": task_id, "status": "completed"}
    assert cancel(system, "task_20200101_000000_unknown00")[0] == 404


def test_an_idempotency_key_returns_the_same_task(system: System) -> None:
    def send(key: str) -> str:
        request = urllib.request.Request(
            f"{system.api}/task/delegate", method="POST", data=json.dumps({"prompt": f"idem {key}"}).encode(),
            headers={"Content-Type": "application/json", "Idempotency-Key": key},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["task_id"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = set(pool.map(send, ["same-key"] * 8))
    assert len(ids) == 1
    assert send("other-key") not in ids
    (task_id,) = ids
    assert system.wait_final(task_id)["status"] == "completed"
    assert len(system.sql("SELECT 1 FROM task_master WHERE content LIKE ?", '%"idem same-key"%')) == 1


def test_tasks_workers_and_backends_lists(system: System) -> None:
    done = system.delegate(prompt="list me", sync=True)[1]["task_id"]
    failed = system.delegate(prompt="list me too", sync=True, options={"model": "absent:1b"})[1]["task_id"]
    wait_row(system, failed)
    code, body = http("GET", f"{system.api}/tasks?limit=200")
    assert code == 200
    listed = [task["task_id"] for task in body["tasks"]]
    assert listed.index(failed) < listed.index(done)  # newest first
    code, body = http("GET", f"{system.api}/tasks?status=failed&limit=200")
    assert failed in [t["task_id"] for t in body["tasks"]]
    assert all(t["status"] == "failed" for t in body["tasks"]), [(t["task_id"], t["status"]) for t in body["tasks"] if t["status"] != "failed"]
    code, body = http("GET", f"{system.api}/workers")
    assert code == 200 and any(w["status"] in ("idle", "busy") and w["tasks_completed"] > 0 for w in body["workers"])
    code, body = http("GET", f"{system.api}/backends")
    assert code == 200 and {b["kind"] for b in body["backends"]} == {"ollama", "openai"}
    assert {b["kind"]: b["slots"] for b in body["backends"]} == {"ollama": 2, "openai": 4}
    assert all(b["in_use"] == 0 for b in body["backends"])  # every lease given back
    assert set(body["queues"]) == {f"koubou.{c}{t}" for c in ("1-urgent", "2-normal", "3-low") for t in ("", ".code")}


def read_sse(url: str, last_event_id: str | None = None, stop_after_deltas: int | None = None) -> list[dict]:
    """Events of a server-sent-event stream, read with a plain HTTP client."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    events: list[dict] = []
    current: dict = {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for raw in response:
            line = raw.decode().rstrip("\n")
            if not line:
                if current:
                    events.append({**current, "data": json.loads(current["data"])})
                    current = {}
                    if stop_after_deltas and sum(e["event"] == "delta" for e in events) >= stop_after_deltas:
                        return events  # drop the connection mid-stream
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            current[field] = value
    return events


def test_live_output_streams_as_server_sent_events_and_resumes(system: System, openai_fake: FakeLLMServer) -> None:
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    expected = answer(SLOW_MODEL, prompt)
    openai_fake.set_latency(2.5)
    try:
        task_id = system.delegate(prompt=prompt, options={"model": SLOW_MODEL, "timeout": 60})[1]["task_id"]
        url = f"{system.api}/task/{task_id}/stream"
        first = read_sse(url, stop_after_deltas=2)
        resumed = read_sse(url, last_event_id=first[-1]["id"])
    finally:
        openai_fake.set_latency(0)
    assert first[0]["event"] == "status"
    kinds = [e["event"] for e in resumed]
    assert kinds[-1] == "done" and "delta" in kinds
    text = "".join(e["data"]["text"] for e in first + resumed if e["event"] == "delta")
    assert text == expected  # nothing lost, nothing repeated across the reconnect
    assert resumed[-1]["data"]["status"] == "completed" and resumed[-1]["data"]["result"]["output"] == expected
    assert "in_progress" in [e["data"]["status"] for e in first + resumed if e["event"] == "status"]
    progress = system.status(task_id)[1]["progress"]
    assert progress["tokens"] == len(expected.split()) and progress["running_ms"] > 1000
    assert progress["queued_ms"] is not None
    # A finished task's stream replays its state and closes.
    replay = read_sse(url)
    assert [e["event"] for e in replay] == ["status", "done"]
    assert replay[-1]["data"]["result"]["output"] == expected


def test_stream_of_an_unknown_task_is_404(system: System) -> None:
    assert http("GET", f"{system.api}/task/task_20200101_000000_nothere0/stream")[0] == 404


def test_urgent_tasks_overtake_a_backlog_of_low_ones(system: System, openai_fake: FakeLLMServer) -> None:
    wait_idle(system)
    openai_fake.set_latency(1.0)
    try:
        def send(prompt: str, priority: int) -> str:
            return system.delegate(prompt=prompt, priority=priority, options={"model": SLOW_MODEL})[1]["task_id"]

        blockers = [send(f"blocker {i}", 5) for i in range(2)]
        wait_until(lambda: all(system.status(t)[1]["status"] == "in_progress" for t in blockers), 20)
        lows = [send(f"low {i}", 1) for i in range(6)]
        urgent = [send(f"urgent {i}", 10) for i in range(4)]
        for task_id in blockers + lows + urgent:
            assert system.wait_final(task_id, timeout=60)["status"] == "completed"
    finally:
        openai_fake.set_latency(0)
    for task_id in lows + urgent:
        wait_row(system, task_id)
    started = {r["task_id"]: r["started_at"] for r in system.sql(
        f"SELECT task_id, started_at FROM task_master WHERE task_id IN ({','.join('?' * 10)})", *lows, *urgent)}  # fmt: skip
    last_urgent = max(started[t] for t in urgent)
    overtaken = [t for t in lows if started[t] < last_urgent]
    # The bound: once urgent work is accepted, at most one low task per worker process starts first.
    assert len(overtaken) <= 2, (overtaken, started)


def test_flower_asks_for_a_login_and_shows_koubou_tasks_readably(system: System) -> None:
    auth_file = system.home / "config" / "flower-auth"
    assert oct(auth_file.stat().st_mode & 0o777) == "0o600"
    user, password = auth_file.read_text().strip().split(":", 1)
    flower = f"http://127.0.0.1:{system.flower_port}"
    assert str(auth_file) in system.output() and password not in system.output()
    assert http("GET", f"{flower}/")[0] == 401
    token = base64.b64encode(f"{user}:{password}".encode()).decode()

    def get(path: str) -> str:
        request = urllib.request.Request(f"{flower}{path}", headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()

    task_id = system.delegate(prompt="shown in flower " + "x" * 200, sync=True)[1]["task_id"]
    wait_until(lambda: task_id in json.loads(get("/api/tasks")), 20)
    shown = json.loads(get("/api/tasks"))[task_id]
    assert shown["name"] == "koubou.delegate" and "shown in flower" in shown["args"] and "…" in shown["args"]
    assert len(shown["args"]) < 200
    assert "flower_events_total" in get("/metrics")
    for log in (system.home / "logs").rglob("*.log"):
        assert password not in log.read_text(errors="replace"), log


def test_the_result_store_keeps_a_success_on_the_real_broker(system: System) -> None:
    """koubou's one-trip result store (a Lua script with cjson) on the embedded Valkey, not a fake."""
    from koubou.celery import app as koubou_app
    from koubou.results import ResultBackend

    backend = ResultBackend(app=koubou_app, url=f"redis://127.0.0.1:{system.redis_port}/0")
    backend.store_result("t-real-1", {"success": True, "output": "first"}, "SUCCESS")
    backend.store_result("t-real-1", RuntimeError("a redelivered duplicate failed"), "FAILURE")
    meta = backend.get_task_meta("t-real-1")
    assert meta["status"] == "SUCCESS" and meta["result"]["output"] == "first"
    assert 0 < backend.client.ttl(backend.get_key_for_task("t-real-1")) <= koubou_app.conf.result_expires


def test_task_lists_agree_with_the_status_while_the_mirror_lags(system: System) -> None:
    mirror = system.child("mirror")
    assert mirror is not None
    os.kill(mirror, signal.SIGSTOP)  # its rows stay behind the result backend meanwhile
    try:
        code, body = system.delegate(prompt="listed while the mirror sleeps", sync=True)
        assert code == 200 and body["status"] == "completed", body
        task_id = body["task_id"]
        assert system.sql("SELECT status FROM task_master WHERE task_id = ?", task_id)[0]["status"] != "completed"
        code, completed = http("GET", f"{system.api}/tasks?status=completed&limit=200")
        assert code == 200 and task_id in {t["task_id"] for t in completed["tasks"]}
        assert all(t["status"] == "completed" for t in completed["tasks"])
        for waiting in ("pending", "in_progress"):
            code, listed = http("GET", f"{system.api}/tasks?status={waiting}&limit=200")
            assert code == 200 and task_id not in {t["task_id"] for t in listed["tasks"]}
    finally:
        os.kill(mirror, signal.SIGCONT)
