"""The mirror's rules: state precedence, late events, derived counters, reconciliation."""

import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from koubou.db.models import SystemLogRow, TaskRow, WorkerRow
from koubou.db.session import make_engine, make_session_factory, utcnow
from koubou.jobs import DelegationFailed
from koubou.constants import WORKER_TYPES_KEY
from koubou.mirror import Mirror

WORKER = "celery@box"


class ResultStore:
    """Stands in for Celery's result backend: `get_task_meta` over a dict."""

    def __init__(self) -> None:
        self.metas: dict[str, dict[str, Any]] = {}

    def get_task_meta(self, task_id: str) -> dict[str, Any]:
        return self.metas.get(task_id, {"status": "PENDING", "result": None})


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    return make_session_factory(make_engine(f"sqlite:///{tmp_path / 'k.db'}"))


@pytest.fixture
def store() -> ResultStore:
    return ResultStore()


@pytest.fixture
def mirror(sessions: sessionmaker[Session], store: ResultStore) -> Mirror:
    return Mirror(SimpleNamespace(backend=store), sessions)  # type: ignore[arg-type]


def add_pending(sessions: sessionmaker[Session], task_id: str) -> None:
    now = utcnow()
    with sessions.begin() as session:
        session.add(TaskRow(task_id=task_id, task_type="general", status="pending", priority=5, content={},
                            created_at=now, updated_at=now))  # fmt: skip


def row(sessions: sessionmaker[Session], task_id: str) -> TaskRow:
    with sessions() as session:
        found = session.get(TaskRow, task_id)
        assert found is not None
        return found


def event(kind: str, task_id: str | None = None, ts: float | None = None, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"type": kind, "hostname": WORKER, "timestamp": ts or time.time()}
    if task_id:
        base["uuid"] = task_id
    return {**base, **fields}


def succeeded(store: ResultStore, task_id: str, output: str) -> None:
    store.metas[task_id] = {
        "status": "SUCCESS",
        "result": {"success": True, "output": output, "error": None, "model": "m:1b", "worker": WORKER},
    }


def test_events_move_a_task_through_its_states(mirror: Mirror, sessions, store) -> None:
    add_pending(sessions, "t1")
    t0 = time.time()
    mirror.apply([event("task-received", "t1", t0)])
    assert row(sessions, "t1").status == "pending"
    mirror.apply([event("task-started", "t1", t0 + 1)])
    assert row(sessions, "t1").status == "in_progress"
    assert row(sessions, "t1").assigned_worker_type == WORKER
    succeeded(store, "t1", "the full answer")
    mirror.apply([event("task-succeeded", "t1", t0 + 2, result="'trunc...")])
    final = row(sessions, "t1")
    assert final.status == "completed"
    assert final.result is not None and final.result["output"] == "the full answer"
    assert final.started_at is not None and final.completed_at is not None


def test_a_late_event_never_turns_a_final_row_back(mirror: Mirror, sessions, store) -> None:
    add_pending(sessions, "t2")
    t0 = time.time()
    succeeded(store, "t2", "done")
    # Delivered out of order: the finish first, then the older start and receipt.
    mirror.apply([event("task-succeeded", "t2", t0 + 2), event("task-started", "t2", t0 + 1)])
    mirror.apply([event("task-received", "t2", t0)])
    assert row(sessions, "t2").status == "completed"


def test_an_older_non_final_event_is_ignored(mirror: Mirror, sessions) -> None:
    add_pending(sessions, "t3")
    t0 = time.time()
    mirror.apply([event("task-started", "t3", t0 + 1)])
    mirror.apply([event("task-received", "t3", t0)])
    assert row(sessions, "t3").status == "in_progress"
    mirror.apply([event("task-retried", "t3", t0 + 2)])
    assert row(sessions, "t3").status == "pending"


def test_a_failure_keeps_the_outcome_the_task_raised(mirror: Mirror, sessions, store) -> None:
    add_pending(sessions, "t4")
    outcome = {"success": False, "output": None, "error": "model 'x' not found", "error_type": "ModelNotFound"}
    store.metas["t4"] = {"status": "FAILURE", "result": DelegationFailed("model 'x' not found", outcome)}
    mirror.apply([event("task-failed", "t4", exception="DelegationFailed(...)")])
    final = row(sessions, "t4")
    assert final.status == "failed"
    assert final.result == outcome


def test_a_success_whose_result_says_failure_is_failed(mirror: Mirror, sessions, store) -> None:
    add_pending(sessions, "t5")
    store.metas["t5"] = {"status": "SUCCESS", "result": {"success": False, "output": None, "error": "nope"}}
    mirror.apply([event("task-succeeded", "t5")])
    assert row(sessions, "t5").status == "failed"


def test_worker_rows_follow_heartbeats_and_counters_are_derived(mirror: Mirror, sessions, store) -> None:
    for task_id in ("a", "b", "c"):
        add_pending(sessions, task_id)
    mirror.apply([event("worker-online", active=0, pid=123)])
    with sessions() as session:
        worker = session.get(WorkerRow, WORKER)
        assert worker is not None and worker.status == "idle" and worker.pid == 123
    mirror.apply([event("worker-heartbeat", active=2)])
    with sessions() as session:
        assert session.get(WorkerRow, WORKER).status == "busy"  # type: ignore[union-attr]
    succeeded(store, "a", "A")
    succeeded(store, "b", "B")
    store.metas["c"] = {"status": "FAILURE", "result": RuntimeError("boom")}
    mirror.apply([event("task-succeeded", "a"), event("task-succeeded", "b"), event("task-failed", "c")])
    # The same event twice (redelivery) must not count twice.
    mirror.apply([event("task-succeeded", "a")])
    mirror.apply([event("worker-heartbeat", active=0)])
    with sessions() as session:
        worker = session.get(WorkerRow, WORKER)
        assert worker is not None
        assert (worker.status, worker.tasks_completed, worker.tasks_failed) == ("idle", 2, 1)
        assert worker.model_name == "m:1b"
    mirror.apply([event("worker-offline")])
    with sessions() as session:
        assert session.get(WorkerRow, WORKER).status == "offline"  # type: ignore[union-attr]


def test_a_worker_is_busy_from_its_task_start_and_idle_from_its_last_task_end(mirror: Mirror, sessions, store) -> None:
    def worker() -> tuple[str, int]:
        with sessions() as session:
            found = session.get(WorkerRow, WORKER)
            assert found is not None
            return found.status, found.active_tasks

    for task_id in ("r1", "r2"):
        add_pending(sessions, task_id)
    mirror.apply([event("worker-online", active=0, pid=7)])
    mirror.apply([event("task-started", "r1")])
    assert worker() == ("busy", 1)  # at once, not at the next heartbeat
    mirror.apply([event("worker-heartbeat", active=1)])  # the heartbeat that counts r1 too
    mirror.apply([event("task-started", "r2")])
    mirror.apply([event("worker-heartbeat", active=2)])
    assert worker() == ("busy", 2)
    succeeded(store, "r1", "one")
    mirror.apply([event("task-succeeded", "r1")])
    assert worker() == ("busy", 1)
    mirror.apply([event("task-succeeded", "r1")])  # redelivered: counts down once only
    assert worker() == ("busy", 1)
    store.metas["r2"] = {"status": "FAILURE", "result": RuntimeError("boom")}
    mirror.apply([event("task-failed", "r2")])
    assert worker() == ("idle", 0)


def test_silent_workers_go_offline(mirror: Mirror, sessions) -> None:
    mirror.apply([event("worker-heartbeat", ts=time.time() - 60, active=0)])
    mirror.mark_offline()
    with sessions() as session:
        assert session.get(WorkerRow, WORKER).status == "offline"  # type: ignore[union-attr]


def counters(sessions: sessionmaker[Session], worker: str = WORKER) -> tuple[int, int]:
    with sessions() as session:
        found = session.get(WorkerRow, worker)
        assert found is not None
        return found.tasks_completed, found.tasks_failed


def test_every_way_a_task_finishes_counts_once_on_its_worker(sessions, store) -> None:
    mirror = reaper(sessions, store, requeued=set(), queued=set(), alive=set())
    for task_id in ("by-event", "by-reconcile", "by-reaper"):
        add_pending(sessions, task_id)
    t0 = time.time() - 60
    mirror.apply([event("worker-heartbeat", ts=t0, pid=1)] + [event("task-started", t, t0 + 1) for t in ("by-event", "by-reconcile", "by-reaper")])
    succeeded(store, "by-event", "one")
    mirror.apply([event("task-succeeded", "by-event", t0 + 2)])
    assert counters(sessions) == (1, 0)
    succeeded(store, "by-reconcile", "two")  # its task-succeeded event was lost
    assert mirror.reconcile() == 1 and counters(sessions) == (2, 0)
    mirror.apply([event("task-succeeded", "by-reconcile", t0 + 3)])  # arrives late: counted already
    mirror.mark_offline()
    assert mirror.reap() == 1 and row(sessions, "by-reaper").status == "failed"
    assert counters(sessions) == (2, 1)


def test_recount_derives_counters_from_the_rows(mirror: Mirror, sessions, store) -> None:
    add_pending(sessions, "x")
    mirror.apply([event("worker-online", pid=1)])
    with sessions.begin() as session:  # rows written before this mirror's time (an older koubou, by hand)
        session.get(TaskRow, "x").status, session.get(TaskRow, "x").assigned_worker_type = "completed", WORKER  # type: ignore[union-attr]
        session.get(WorkerRow, WORKER).tasks_failed = 7  # type: ignore[union-attr]
    mirror.recount()
    assert counters(sessions) == (1, 0)


def test_reconcile_finishes_rows_whose_events_were_lost(mirror: Mirror, sessions, store) -> None:
    for task_id in ("r1", "r2", "r3"):
        add_pending(sessions, task_id)
    succeeded(store, "r1", "one")
    store.metas["r2"] = {"status": "STARTED", "result": None, "worker": WORKER}
    assert mirror.reconcile() == 2
    assert row(sessions, "r1").status == "completed" and row(sessions, "r1").result["output"] == "one"  # type: ignore[index]
    assert row(sessions, "r2").status == "in_progress"
    assert row(sessions, "r3").status == "pending"
    with sessions() as session:
        assert session.query(SystemLogRow).filter_by(component="mirror").count() == 1
    assert mirror.reconcile() == 0


def test_events_for_a_task_the_api_never_saw_create_its_row(mirror: Mirror, sessions) -> None:
    mirror.apply([event("task-received", "foreign", name="koubou.delegate", args="({...},)")])
    assert row(sessions, "foreign").status == "pending"
    assert row(sessions, "foreign").created_at <= utcnow() + timedelta(seconds=1)


def test_a_row_finished_by_reconcile_ignores_events_that_arrive_later(mirror: Mirror, sessions, store) -> None:
    add_pending(sessions, "t6")
    succeeded(store, "t6", "done")
    assert mirror.reconcile() == 1
    mirror.apply([event("task-received", "t6"), event("task-started", "t6"), event("task-retried", "t6")])
    assert row(sessions, "t6").status == "completed"


def reaper(sessions, store, requeued: set[str], queued: set[str], alive: set[str]) -> Mirror:
    return Mirror(
        SimpleNamespace(backend=store), sessions,  # type: ignore[arg-type]
        requeue=lambda _app, ids: set(ids) & requeued, queued=lambda _app: queued,
        answering=lambda _app, workers: set(workers) & alive,
        free_slots=lambda _app, ids: None,
    )  # fmt: skip


def test_tasks_of_a_restarted_worker_are_requeued(sessions, store) -> None:
    mirror = reaper(sessions, store, requeued={"lost"}, queued=set(), alive=set())
    add_pending(sessions, "lost")
    t0 = time.time()
    mirror.apply([event("worker-online", ts=t0 - 10, pid=1), event("task-started", "lost", t0 - 5)])
    assert mirror.reap() == 0  # same incarnation: nothing to do
    mirror.apply([event("worker-online", ts=t0, pid=2)])  # the node came back: a new process
    assert mirror.reap() == 1
    requeued = row(sessions, "lost")
    assert requeued.status == "pending" and requeued.started_at is None
    mirror.apply([event("task-started", "lost", t0 + 1)])  # runs again on the new incarnation
    assert mirror.reap() == 0 and row(sessions, "lost").status == "in_progress"


def test_a_silent_worker_that_still_answers_keeps_its_tasks(sessions, store) -> None:
    mirror = reaper(sessions, store, requeued={"t"}, queued=set(), alive={WORKER})
    add_pending(sessions, "t")
    t0 = time.time() - 60
    mirror.apply([event("worker-heartbeat", ts=t0, pid=1), event("task-started", "t", t0 + 1)])
    mirror.mark_offline()
    assert mirror.reap() == 0 and row(sessions, "t").status == "in_progress"


def test_a_lost_task_no_broker_holds_fails_and_one_still_queued_goes_back_to_pending(sessions, store) -> None:
    mirror = reaper(sessions, store, requeued=set(), queued={"waiting"}, alive=set())
    add_pending(sessions, "gone")
    add_pending(sessions, "waiting")
    t0 = time.time() - 60
    mirror.apply([event("worker-heartbeat", ts=t0, pid=1), event("task-started", "gone", t0 + 1),
                  event("task-started", "waiting", t0 + 1)])  # fmt: skip
    mirror.mark_offline()
    assert mirror.reap() == 2
    assert row(sessions, "gone").status == "failed" and row(sessions, "gone").result["error_type"] == "WorkerLost"  # type: ignore[index]
    assert row(sessions, "waiting").status == "pending"


def orphan_sweeper(sessions, store, delivered: dict[str, float], held: set[str] | None, requeued: list[str],
                   freed: list[str], asked: list[list[str]]) -> Mirror:  # fmt: skip
    def held_by(_app: object, workers: list[str], ids: set[str]) -> set[str] | None:
        asked.append(sorted(workers))
        return None if held is None else held & ids

    return Mirror(
        SimpleNamespace(backend=store), sessions,  # type: ignore[arg-type]
        delivered=lambda _app: delivered, held_by_workers=held_by,
        requeue=lambda _app, ids: (requeued.extend(sorted(ids)), set(ids))[1],
        free_slots=lambda _app, ids: freed.extend(sorted(ids)),
    )  # fmt: skip


def test_a_pending_task_delivered_to_a_worker_that_is_gone_is_requeued(sessions, store) -> None:
    # The worker was killed before its batched task events left: the rows never left `pending`.
    now = time.time()
    delivered = {"orphan": now - 60, "reserved": now - 60, "fresh": now - 1, "done": now - 60, "running": now - 60}
    for task_id in delivered:
        add_pending(sessions, task_id)
    succeeded(store, "done", "finished")
    requeued: list[str] = []
    freed: list[str] = []
    asked: list[list[str]] = []
    mirror = orphan_sweeper(sessions, store, delivered, {"reserved"}, requeued, freed, asked)
    mirror.apply([event("worker-online", ts=now - 2, pid=2), event("task-started", "running", now - 1)])
    assert mirror.requeue_orphans() == 1
    # not "reserved" (a live worker holds it), "fresh" (just delivered), "done" (finished), "running" (reap's)
    assert requeued == ["orphan"] and freed == ["orphan"] and asked == [[WORKER]]
    with sessions() as session:
        logged = [(r.component, r.task_id) for r in session.query(SystemLogRow).all()]
    assert logged == [("reaper", "orphan")]


def test_nothing_is_requeued_while_a_live_worker_has_not_answered(sessions, store) -> None:
    add_pending(sessions, "t")
    requeued: list[str] = []
    mirror = orphan_sweeper(sessions, store, {"t": time.time() - 60}, None, requeued, [], [])
    assert mirror.requeue_orphans() == 0 and requeued == []


def test_no_worker_is_asked_when_no_pending_task_waits_long_on_one(sessions, store) -> None:
    add_pending(sessions, "fresh")
    asked: list[list[str]] = []
    mirror = orphan_sweeper(sessions, store, {"fresh": time.time() - 1, "unknown": time.time() - 60}, set(), [], [], asked)
    assert mirror.requeue_orphans() == 0 and asked == []


def test_a_pending_row_whose_message_the_broker_lost_fails_after_two_looks(sessions, store) -> None:
    held = {"queued", "unacked"}
    mirror = Mirror(SimpleNamespace(backend=store), sessions, held=lambda _app: held, unsent_after=0)  # type: ignore[arg-type]
    for task_id in ("queued", "unacked", "ghost", "started"):
        add_pending(sessions, task_id)
    store.metas["started"] = {"status": "STARTED", "result": {"hostname": "w@h"}}  # a worker has it: not a ghost
    assert mirror.fail_unsent() == 0  # first look: only suspected
    held.discard("unacked")  # acked meanwhile: it finished, or its result is about to be stored
    store.metas["unacked"] = {"status": "SUCCESS", "result": {"success": True, "output": "ok"}}
    assert mirror.fail_unsent() == 1
    ghost = row(sessions, "ghost")
    assert ghost.status == "failed" and ghost.result["error_type"] == "MessageLost"  # type: ignore[index]
    assert {row(sessions, t).status for t in ("queued", "unacked", "started")} == {"pending"}


def test_a_row_missing_only_once_is_not_failed(sessions, store) -> None:
    held: set[str] = set()
    mirror = Mirror(SimpleNamespace(backend=store), sessions, held=lambda _app: held, unsent_after=0)  # type: ignore[arg-type]
    add_pending(sessions, "moving")
    assert mirror.fail_unsent() == 0
    held.add("moving")  # seen in the broker at the second look (it was between two lists)
    assert mirror.fail_unsent() == 0
    held.clear()
    assert mirror.fail_unsent() == 0  # suspected anew, not failed on a stale suspicion
    assert row(sessions, "moving").status == "pending"


def test_worker_rows_show_the_task_types_their_workers_announced(sessions, store) -> None:
    import fakeredis

    store.client = fakeredis.FakeRedis()
    mirror = Mirror(SimpleNamespace(backend=store), sessions)  # type: ignore[arg-type]
    mirror.apply([event("worker-online", pid=1), event("worker-online", pid=2, hostname="coder@gpu")])
    assert mirror.label_workers() == 0 and counters(sessions) == (0, 0)  # nothing announced: stays "celery"
    store.client.hset(WORKER_TYPES_KEY, mapping={WORKER: "general+code", "coder@gpu": "code"})
    assert mirror.label_workers() == 2 and mirror.label_workers() == 0
    mirror.apply([event("worker-online", pid=3, hostname="late@box")])
    store.client.hset(WORKER_TYPES_KEY, "late@box", "general")
    mirror.label_workers()
    with sessions() as session:
        types = {row.worker_id: row.worker_type for row in session.query(WorkerRow)}
    assert types == {WORKER: "general+code", "coder@gpu": "code", "late@box": "general"}
