"""Waiting for a task's result: woken by the result backend's publication, polling as the fallback."""

import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import fakeredis

from koubou.constants import TaskStatus
from koubou.celery import app as koubou_app
from koubou.results import ResultBackend, ResultWaiter, ride_with_result, send_riders_now, wait_until_final

PREFIX = "celery-task-meta-"


class Backend:
    """Stands in for Celery's Redis result backend: stores a meta and publishes it on the task's key."""

    def __init__(self, client: fakeredis.FakeRedis) -> None:
        self.client = client
        self.metas: dict[str, dict[str, Any]] = {}

    def get_task_meta(self, task_id: str) -> dict[str, Any]:
        return self.metas.get(task_id, {"status": "PENDING", "result": None})

    def decode_result(self, payload: bytes) -> dict[str, Any]:
        return dict(json.loads(payload))

    def store(self, task_id: str, meta: dict[str, Any], published: dict[str, Any] | None = None) -> None:
        self.metas[task_id] = meta
        self.client.publish(PREFIX + task_id, json.dumps(published or meta))


def test_a_stored_result_wakes_the_waiter_at_once() -> None:
    client = fakeredis.FakeRedis()
    backend = Backend(client)
    waiter = ResultWaiter(client, PREFIX)
    app = SimpleNamespace(backend=backend)
    try:
        with waiter.watching("warm-up"):
            assert waiter.listening.wait(5)
        done = {"status": "SUCCESS", "result": {"success": True, "output": "hi"}}
        threading.Timer(0.2, backend.store, ("t1", done)).start()
        began = time.monotonic()
        view = wait_until_final(app, waiter, "t1", timeout=10, fallback_poll=5.0)
        took = time.monotonic() - began
    finally:
        waiter.stop()
    assert view is not None and view.status == TaskStatus.COMPLETED and view.result == done["result"]
    assert 0.15 < took < 2.0  # woken by the publication, not by the 5 s fallback poll


def test_the_published_state_is_used_without_reading_the_backend_again() -> None:
    client = fakeredis.FakeRedis()
    backend = Backend(client)
    waiter = ResultWaiter(client, PREFIX)
    try:
        with waiter.watching("warm-up"):
            assert waiter.listening.wait(5)
        stored = {"status": "SUCCESS", "result": {"success": True, "output": "stored"}}
        published = {"status": "SUCCESS", "result": {"success": True, "output": "published"}}
        threading.Timer(0.2, backend.store, ("t5", stored, published)).start()
        view = wait_until_final(SimpleNamespace(backend=backend), waiter, "t5", timeout=10, fallback_poll=5.0)
    finally:
        waiter.stop()
    assert view is not None and view.result == published["result"]


def test_a_result_already_stored_returns_without_waiting() -> None:
    client = fakeredis.FakeRedis()
    backend = Backend(client)
    backend.metas["t2"] = {"status": "FAILURE", "result": "boom"}
    waiter = ResultWaiter(client, PREFIX)
    try:
        view = wait_until_final(SimpleNamespace(backend=backend), waiter, "t2", timeout=10)
    finally:
        waiter.stop()
    assert view is not None and view.status == TaskStatus.FAILED


def test_without_a_subscription_the_waiter_polls_and_times_out_with_the_last_view() -> None:
    client = fakeredis.FakeRedis()
    backend = Backend(client)
    backend.metas["t3"] = {"status": "STARTED", "result": None, "worker": "w"}
    waiter = ResultWaiter(client, PREFIX)
    waiter._start = lambda: None  # type: ignore[method-assign]  # the listener never comes up
    done = {"status": "SUCCESS", "result": {"success": True, "output": "late"}}
    threading.Timer(0.2, backend.metas.__setitem__, ("t3", done)).start()
    view = wait_until_final(SimpleNamespace(backend=backend), waiter, "t3", timeout=5)
    assert view is not None and view.status == TaskStatus.COMPLETED  # found by polling
    began = time.monotonic()
    view = wait_until_final(SimpleNamespace(backend=backend), waiter, "never", timeout=0.3)
    assert view is None and time.monotonic() - began < 1.0


def test_koubou_sends_tasks_without_subscribing_to_their_results() -> None:
    backend = koubou_app.backend
    assert isinstance(backend, ResultBackend)
    assert backend.as_uri().startswith(("redis://", "rediss://"))
    backend.on_task_call(None, "t4")
    assert not backend.result_consumer.subscribed_to  # nothing subscribed, no round trip made


def result_backend(client: fakeredis.FakeRedis) -> ResultBackend:
    backend = ResultBackend(app=koubou_app, url="redis://127.0.0.1:1/0")
    backend.__dict__["client"] = client  # Celery's client is a cached property: this one is fakeredis
    return backend


def test_riders_go_in_the_round_trip_that_stores_the_result() -> None:
    client = fakeredis.FakeRedis()
    backend = result_backend(client)
    client.zadd("koubou:slots:b", {"lease": 1e12})
    ride_with_result(backend, "t1", lambda pipe: pipe.zrem("koubou:slots:b", "lease"))
    executed: list[list[str]] = []
    execute = fakeredis.FakeRedis.pipeline

    def recording_pipeline(self, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        pipe = execute(self, *args, **kwargs)
        real = pipe.execute

        def run(*a: Any, **k: Any) -> Any:
            executed.append([command[0][0] for command in pipe.command_stack])
            return real(*a, **k)

        pipe.execute = run
        return pipe

    fakeredis.FakeRedis.pipeline = recording_pipeline  # type: ignore[method-assign]
    try:
        backend.store_result("t1", {"success": True}, "SUCCESS")
    finally:
        fakeredis.FakeRedis.pipeline = execute  # type: ignore[method-assign]
    assert executed == [["EVALSHA", "ZREM"]]
    assert client.zcard("koubou:slots:b") == 0
    send_riders_now(backend, "t1")  # nothing left over: sends nothing, raises nothing
    assert backend.get_task_meta("t1")["status"] == "SUCCESS"


def test_riders_a_failed_store_did_not_carry_are_sent_on_their_own() -> None:
    client = fakeredis.FakeRedis()
    backend = result_backend(client)
    client.zadd("koubou:slots:b", {"lease": 1e12})
    ride_with_result(backend, "t2", lambda pipe: pipe.zrem("koubou:slots:b", "lease"))
    send_riders_now(backend, "t2")  # what the task_postrun hook does when no store took them
    assert client.zcard("koubou:slots:b") == 0


def test_a_stored_success_is_never_overwritten_and_every_store_is_published() -> None:
    client = fakeredis.FakeRedis()
    backend = result_backend(client)
    pubsub = client.pubsub()
    pubsub.subscribe(backend.get_key_for_task("t3"))
    backend.store_result("t3", {"success": True, "output": "first"}, "SUCCESS")
    backend.store_result("t3", RuntimeError("a redelivered duplicate failed"), "FAILURE")  # must not win
    meta = backend.get_task_meta("t3")
    assert meta["status"] == "SUCCESS" and meta["result"]["output"] == "first"
    published = [m for m in iter(lambda: pubsub.get_message(timeout=0.2), None) if m["type"] == "message"]
    assert len(published) == 1 and json.loads(published[0]["data"])["status"] == "SUCCESS"
    backend.store_result("t4", RuntimeError("boom"), "FAILURE")
    backend.store_result("t4", {"success": True, "output": "retried"}, "SUCCESS")  # a failure may be replaced
    assert backend.get_task_meta("t4")["status"] == "SUCCESS"


def test_a_broker_that_forgot_the_script_still_gets_the_result_and_the_riders_once() -> None:
    client = fakeredis.FakeRedis()
    backend = result_backend(client)
    backend.store_result("t5", {"success": True}, "SUCCESS")  # loads the script
    client.script_flush()  # a restarted broker has no scripts
    ride_with_result(backend, "t6", lambda pipe: pipe.lpush("riders-ran", 1))
    backend.store_result("t6", {"success": True, "output": "after the restart"}, "SUCCESS")
    assert backend.get_task_meta("t6")["result"]["output"] == "after the restart"
    assert client.llen("riders-ran") == 1
