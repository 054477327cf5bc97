"""Celery events → `task_master` / `workers` rows, from one writer, with reconciliation.

Events are best effort (a slow or reconnecting receiver misses some) and arrive out of
order, so rows follow two rules: a final row never changes, and a non-final event only
applies if it is newer than the last one applied. Every few seconds each non-final row is
checked against the result backend, which has the truth for every finished task.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import Celery
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from .broker import delivered_task_ids, held_task_ids, promote, queued_task_ids, requeue_unacked
from .constants import MIRROR_ALIVE_KEY, MIRROR_ALIVE_TTL, WORKER_TYPES_KEY, TaskStatus, WorkerStatus
from .db.models import SystemLogRow, TaskRow, WorkerRow
from .db.session import utcnow
from .results import BackendView, read_view, read_views
from .slots import SlotLeases

log = logging.getLogger(__name__)

Event = dict[str, Any]

#: Task events and the status each implies (None: read it from the result backend).
TASK_EVENT_STATUS: dict[str, TaskStatus | None] = {
    "task-sent": TaskStatus.PENDING,
    "task-received": TaskStatus.PENDING,
    "task-retried": TaskStatus.PENDING,
    "task-started": TaskStatus.IN_PROGRESS,
    "task-succeeded": None,
    "task-failed": None,
    "task-revoked": TaskStatus.CANCELLED,
}
WORKER_EVENTS = frozenset({"worker-online", "worker-heartbeat", "worker-offline"})
NON_FINAL = (TaskStatus.PENDING.value, TaskStatus.IN_PROGRESS.value)
#: `workers.worker_type` of a worker that announced no task types (not a koubou worker, or an older one).
UNKNOWN_WORKER_TYPE = "celery"


#: Seconds a pending row may go without a message in the broker before it is checked as lost.
UNSENT_AFTER = 30.0
#: Seconds after its delivery that a pending task's message is checked for a worker still holding it
#: (well past the worker's event batching and a restarted worker's boot).
ORPHAN_AFTER = 10.0


def _free_slots(app: Celery, task_ids: Iterable[str]) -> int:
    return SlotLeases(app.backend.client).release_held_by(task_ids)


def _answering(app: Celery, workers: list[str]) -> set[str]:
    replies = app.control.ping(destination=workers, timeout=1.0) or []
    return {name for reply in replies for name in reply}


def _held_by_workers(app: Celery, workers: list[str], task_ids: set[str]) -> set[str] | None:
    """Which of these tasks the workers hold, running or reserved; None unless every worker answered."""
    if not workers:
        return set()
    inspect = app.control.inspect(destination=workers, timeout=1.0, limit=len(workers))
    replies = inspect.query_task(*sorted(task_ids)) or {}
    if not set(workers) <= set(replies):
        return None
    return {task_id for reply in replies.values() for task_id in (reply or {})}


def _when(timestamp: float | None) -> datetime:
    if timestamp is None:
        return utcnow()
    return datetime.fromtimestamp(timestamp, UTC).replace(tzinfo=None)


class Mirror:
    """Receives events on a thread; applies them in batches on the caller's thread."""

    def __init__(
        self,
        celery: Celery,
        sessions: sessionmaker[Session],
        redis_client: redis.Redis | None = None,
        *,
        flush_interval: float = 0.2,
        batch_window: float = 0.05,
        batch_size: int = 500,
        reconcile_interval: float = 5.0,
        offline_after: float = 10.0,
        requeue: Callable[[Celery, Iterable[str]], set[str]] = requeue_unacked,
        queued: Callable[[Celery], set[str]] = queued_task_ids,
        answering: Callable[[Celery, list[str]], set[str]] | None = None,
        ageing: float = 120.0,
        promote: Callable[[Celery, Iterable[str]], set[str]] = promote,
        free_slots: Callable[[Celery, Iterable[str]], object] | None = None,
        held: Callable[[Celery], set[str]] = held_task_ids,
        unsent_after: float = UNSENT_AFTER,
        delivered: Callable[[Celery], dict[str, float]] = delivered_task_ids,
        held_by_workers: Callable[[Celery, list[str], set[str]], set[str] | None] = _held_by_workers,
        orphan_after: float = ORPHAN_AFTER,
    ) -> None:
        self.celery = celery
        self.sessions = sessions
        self.redis = redis_client
        self.flush_interval = flush_interval
        self.batch_window = batch_window
        self.batch_size = batch_size
        self.reconcile_interval = reconcile_interval
        self.offline_after = offline_after
        self.requeue = requeue
        self.queued = queued
        self.answering = answering or _answering
        self.ageing = ageing
        self.promote = promote
        self.free_slots = free_slots or _free_slots
        self.held = held
        self.unsent_after = unsent_after
        self.delivered = delivered
        self.held_by_workers = held_by_workers
        self.orphan_after = orphan_after
        # Pending rows the broker did not hold at the last look; failed when still missing at the next.
        self._unsent_suspects: set[str] = set()
        self._next_unsent_look = 0.0
        #: What each worker announced it serves (koubou.celery.announce_served_types), last read.
        self._worker_types: dict[str, str] = {}
        self.started = time.monotonic()
        self.events: queue.Queue[Event] = queue.Queue()
        self.stopping = threading.Event()
        self._receiver: Any = None

    # -- receiving -------------------------------------------------------------------------

    def _receive_forever(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                with self.celery.connection_for_read() as connection:
                    self._receiver = self.celery.events.Receiver(connection, handlers={"*": self.events.put})
                    log.info("mirror: receiving events from %s", connection.as_uri())
                    for _ in self._receiver.itercapture(limit=None, timeout=None, wakeup=True):
                        backoff = 0.5
                        if self.stopping.is_set():
                            break
            except Exception as error:  # broker restarts, network errors: reconnect with backoff
                if self.stopping.is_set():
                    break
                log.warning("mirror: event stream lost (%s); reconnecting in %.1fs", error, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    # -- the writer loop -------------------------------------------------------------------

    def run(self) -> None:
        """Run until stop(): reconcile first (rows left behind while down), then follow events."""
        receiver = threading.Thread(target=self._receive_forever, name="mirror-receiver", daemon=True)
        receiver.start()
        next_reconcile = 0.0
        self._guarded(self.recount)
        while not self.stopping.is_set():
            batch = self._drain()
            if batch:
                self.apply(batch)
            if time.monotonic() >= next_reconcile:
                self._guarded(self.reconcile)
                self._guarded(self.label_workers)
                self._guarded(self.age_queued)
                self._guarded(self.fail_unsent)
                # Heartbeats only count once the receiver had time to hear them.
                if time.monotonic() - self.started > self.offline_after * 1.5:
                    self._guarded(self.mark_offline)
                    self._guarded(self.reap)
                    self._guarded(self.requeue_orphans)
                self._guarded(self._announce)
                next_reconcile = time.monotonic() + self.reconcile_interval
        if self._receiver is not None:
            self._receiver.should_stop = True
        receiver.join(timeout=5)
        remaining = self._drain(block=False)
        if remaining:
            self.apply(remaining)

    def stop(self) -> None:
        self.stopping.set()

    def _guarded(self, step: Any) -> None:
        try:
            step()
        except Exception:  # the database or broker being briefly away must not kill the mirror
            log.exception("mirror: %s failed; retrying next round", getattr(step, "__name__", step))

    def _drain(self, block: bool = True) -> list[Event]:
        batch: list[Event] = []
        try:
            if block:
                batch.append(self.events.get(timeout=self.flush_interval))
        except queue.Empty:
            return batch
        # Gather what arrives in the next moment too: a task sends four events within milliseconds,
        # and one transaction per few events costs the mirror most of its CPU under load.
        until = time.monotonic() + (self.batch_window if block else 0.0)
        while len(batch) < self.batch_size:
            try:
                batch.append(self.events.get(timeout=max(0.0, until - time.monotonic())) if block else self.events.get_nowait())
            except queue.Empty:
                break
        return batch

    def _announce(self) -> None:
        if self.redis is not None:
            self.redis.set(MIRROR_ALIVE_KEY, str(time.time()), ex=MIRROR_ALIVE_TTL)

    # -- applying events -------------------------------------------------------------------

    def apply(self, events: Iterable[Event]) -> None:
        """Apply a batch of events in one transaction."""
        events = list(events)
        views = self._final_views(events)
        for attempt in range(3):
            try:
                with self.sessions.begin() as session:
                    # Rows are read in two queries and changed in memory, then written at once: SQLite
                    # has one writer, and the API's inserts wait while a batch holds the write lock.
                    with session.no_autoflush:
                        loaded = self._load_rows(session, events)  # noqa: F841 (held: see _load_rows)
                        for event in events:
                            kind = event.get("type", "")
                            if kind in TASK_EVENT_STATUS:
                                self._apply_task_event(session, event, views)
                            elif kind in WORKER_EVENTS:
                                self._apply_worker_event(session, event)
                return
            except Exception:
                if attempt == 2:
                    log.exception("mirror: dropping a batch of %d events (reconcile will catch up)", len(events))
                    return
                time.sleep(0.2 * (attempt + 1))

    @staticmethod
    def _load_rows(session: Session, events: list[Event]) -> list[object]:
        """Load the batch's task and worker rows, so session.get() finds them without SQL.

        The session's identity map holds rows weakly: keep the returned list while using them.
        """
        task_ids = {e["uuid"] for e in events if e.get("type") in TASK_EVENT_STATUS and e.get("uuid")}
        workers = {e["hostname"] for e in events if e.get("hostname")}
        loaded: list[object] = []
        if task_ids:
            loaded += session.scalars(select(TaskRow).where(TaskRow.task_id.in_(task_ids))).all()
        if workers:
            loaded += session.scalars(select(WorkerRow).where(WorkerRow.worker_id.in_(workers))).all()
        return loaded

    def _final_views(self, events: list[Event]) -> dict[str, BackendView]:
        """Full results of finished tasks: event payloads are truncated reprs."""
        finished = [e["uuid"] for e in events if e.get("type") in ("task-succeeded", "task-failed") and e.get("uuid")]
        return read_views(self.celery, finished) if finished else {}

    def _finished_in_backend(self, task_ids: Iterable[str]) -> set[str]:
        """Those of these tasks whose final state the result backend holds (reconcile finishes their rows)."""
        return {task_id for task_id in task_ids if (v := self._backend_view(task_id)) and v.status.is_final}

    def _backend_view(self, task_id: str) -> BackendView | None:
        return read_view(self.celery, task_id)

    def _apply_task_event(self, session: Session, event: Event, views: dict[str, BackendView]) -> None:
        task_id = event.get("uuid")
        if not task_id:
            return
        kind = event["type"]
        stamp = float(event.get("timestamp") or time.time())
        worker = event.get("hostname") if kind != "task-sent" else None
        row = session.get(TaskRow, task_id)
        if row is None:
            row = self._adopt(session, task_id, event)
        if TaskStatus(row.status).is_final:
            return
        status = TASK_EVENT_STATUS[kind]
        result: dict[str, Any] | None = None
        if status is None:
            view = views.get(task_id)
            if view is not None and view.status.is_final:
                status, result = view.status, view.result
                worker = view.worker or worker
            elif kind == "task-failed":
                status = TaskStatus.FAILED
                result = {"success": False, "output": None, "error": event.get("exception") or "failed"}
            else:
                return  # succeeded, but the result is unreadable now: reconcile will finish it
        elif row.last_event_at is not None and stamp < row.last_event_at:
            return  # an older event arriving late
        before = row.status
        self._set_status(session, row, status, result, worker, _when(stamp))
        row.last_event_at = max(stamp, row.last_event_at or 0.0)
        if worker:
            worker_row = self._ensure_worker(session, worker, stamp=stamp)
            self._follow_task(worker_row, before, status)
            if status == TaskStatus.COMPLETED and result and result.get("model"):
                worker_row.model_name = result["model"]

    def _adopt(self, session: Session, task_id: str, event: Event) -> TaskRow:
        """A task the API did not create (sent with the Celery API directly)."""
        now = utcnow()
        row = TaskRow(
            task_id=task_id,
            task_type="general",
            status=TaskStatus.PENDING.value,
            priority=5,
            content={"name": event.get("name"), "args": event.get("args")},
            created_at=_when(event.get("timestamp")),
            updated_at=now,
        )
        session.add(row)
        session.flush()
        return row

    def _set_status(
        self,
        session: Session,
        row: TaskRow,
        status: TaskStatus,
        result: dict[str, Any] | None,
        worker: str | None,
        when: datetime,
    ) -> None:
        """Move the row; a task finishing counts once on its worker's row (a final row never changes)."""
        was_final = TaskStatus(row.status).is_final
        row.status = status.value
        row.updated_at = utcnow()
        if worker:
            row.assigned_worker_type = worker
        if status == TaskStatus.IN_PROGRESS and (row.started_at is None or row.status == TaskStatus.PENDING.value):
            row.started_at = when  # a redelivered task starts anew
        if status.is_final:
            row.completed_at = when
            row.result = result
        if status.is_final and not was_final and row.assigned_worker_type:
            counted = self._ensure_worker(session, row.assigned_worker_type, stamp=time.time())
            if status == TaskStatus.COMPLETED:
                counted.tasks_completed = (counted.tasks_completed or 0) + 1
            elif status == TaskStatus.FAILED:
                counted.tasks_failed = (counted.tasks_failed or 0) + 1

    def _ensure_worker(self, session: Session, worker_id: str, stamp: float) -> WorkerRow:
        row = session.get(WorkerRow, worker_id)
        if row is None:
            row = WorkerRow(
                online_since=_when(stamp),
                worker_id=worker_id,
                worker_type=self._worker_types.get(worker_id, UNKNOWN_WORKER_TYPE),
                status=WorkerStatus.IDLE.value,
                tasks_completed=0,
                tasks_failed=0,
                hostname=worker_id.partition("@")[2] or worker_id,
                active_tasks=0,
                first_seen=_when(stamp),
                last_heartbeat=_when(stamp),
            )
            session.add(row)
            session.flush()
        return row

    @staticmethod
    def _follow_task(worker: WorkerRow, before: str, after: TaskStatus) -> None:
        """A task starting or ending moves its worker's row at once; the next heartbeat (2 s) has the exact count."""
        running = TaskStatus.IN_PROGRESS.value
        if after == TaskStatus.IN_PROGRESS and before != running:
            # The heartbeat that counts this task may already be applied: at least one, never counted twice.
            worker.status, worker.active_tasks = WorkerStatus.BUSY.value, max(worker.active_tasks or 0, 1)
        elif before == running and after != TaskStatus.IN_PROGRESS:
            worker.active_tasks = max((worker.active_tasks or 0) - 1, 0)
            if worker.active_tasks == 0 and worker.status == WorkerStatus.BUSY.value:
                worker.status = WorkerStatus.IDLE.value

    def _apply_worker_event(self, session: Session, event: Event) -> None:
        worker_id = event.get("hostname")
        if not worker_id:
            return
        stamp = float(event.get("timestamp") or time.time())
        row = self._ensure_worker(session, worker_id, stamp=stamp)
        if row.last_heartbeat is not None and _when(stamp) < row.last_heartbeat:
            return
        pid = event.get("pid")
        # A new incarnation of the node (restarted, or back after going silent): whatever the
        # old one had started is lost, and the reaper gives it back to the queue.
        if (
            event["type"] == "worker-online"
            or row.online_since is None
            or row.status == WorkerStatus.OFFLINE.value
            or (pid and row.pid and pid != row.pid)
        ):
            row.online_since = _when(stamp)
        row.last_heartbeat = _when(stamp)
        row.pid = pid or row.pid
        if event["type"] == "worker-offline":
            row.status, row.active_tasks = WorkerStatus.OFFLINE.value, 0
            return
        active = int(event.get("active") or 0)
        row.active_tasks = active
        row.status = (WorkerStatus.BUSY if active else WorkerStatus.IDLE).value

    def label_workers(self) -> int:
        """Set `workers.worker_type` to the task types each worker announced it serves; return how many changed."""
        announced = self.celery.backend.client.hgetall(WORKER_TYPES_KEY)
        self._worker_types = {key.decode(): value.decode() for key, value in announced.items()}
        if not self._worker_types:
            return 0
        changed = 0
        with self.sessions.begin() as session:
            rows = session.scalars(select(WorkerRow).where(WorkerRow.worker_id.in_(self._worker_types))).all()
            for row in rows:
                if row.worker_type != self._worker_types[row.worker_id]:
                    row.worker_type = self._worker_types[row.worker_id]
                    changed += 1
        return changed

    def recount(self) -> None:
        """Derive every worker's counters from task_master once (at start): from then on each task
        finishing adds one, and a database written by an older koubou or by hand starts consistent."""
        with self.sessions.begin() as session:
            counts: dict[str, dict[str, int]] = {}
            for worker_id, status, n in session.execute(
                select(TaskRow.assigned_worker_type, TaskRow.status, func.count())
                .where(TaskRow.assigned_worker_type.is_not(None))
                .where(TaskRow.status.in_((TaskStatus.COMPLETED.value, TaskStatus.FAILED.value)))
                .group_by(TaskRow.assigned_worker_type, TaskRow.status)
            ).all():
                counts.setdefault(worker_id, {})[status] = n
            for worker in session.scalars(select(WorkerRow)).all():
                mine = counts.get(worker.worker_id, {})
                worker.tasks_completed = mine.get(TaskStatus.COMPLETED.value, 0)
                worker.tasks_failed = mine.get(TaskStatus.FAILED.value, 0)

    # -- reconciliation --------------------------------------------------------------------

    def reconcile(self, limit: int = 1000) -> int:
        """Bring non-final rows up to date from the result backend; return how many changed."""
        with self.sessions() as session:
            rows = session.execute(
                select(TaskRow.task_id, TaskRow.status)
                .where(TaskRow.status.in_(NON_FINAL))
                .order_by(TaskRow.created_at)
                .limit(limit)
            ).all()
        changes: list[tuple[str, BackendView]] = []
        views = read_views(self.celery, [task_id for task_id, _ in rows])
        for task_id, status in rows:
            view = views.get(task_id)
            if view is None:
                continue
            if view.status.is_final or (view.status == TaskStatus.IN_PROGRESS and status == TaskStatus.PENDING.value):
                changes.append((task_id, view))
        if not changes:
            return 0
        with self.sessions.begin() as session:
            for task_id, view in changes:
                row = session.get(TaskRow, task_id)
                if row is None or TaskStatus(row.status).is_final:
                    continue
                self._set_status(session, row, view.status, view.result, view.worker, view.completed_at or utcnow())
            session.add(
                SystemLogRow(
                    timestamp=utcnow(),
                    level="INFO",
                    component="mirror",
                    message=f"reconciled {len(changes)} task(s) from the result backend",
                    details={"task_ids": [task_id for task_id, _ in changes][:100]},
                )
            )
        log.info("mirror: reconciled %d task(s) from the result backend", len(changes))
        return len(changes)

    def reap(self) -> int:
        """Tasks left `in_progress` by a worker that died: requeue their messages, or fail them.

        A task is lost when its worker is offline, or came online again after the task started
        (same name, new incarnation). Its unacknowledged message goes back to the queue at once
        instead of after the visibility timeout; with no message left anywhere, it fails.
        """
        with self.sessions() as session:
            suspects = session.execute(
                select(TaskRow.task_id, TaskRow.assigned_worker_type, WorkerRow.status)
                .join(WorkerRow, WorkerRow.worker_id == TaskRow.assigned_worker_type)
                .where(TaskRow.status == TaskStatus.IN_PROGRESS.value)
                .where(
                    (WorkerRow.status == WorkerStatus.OFFLINE.value)
                    | (WorkerRow.online_since > TaskRow.started_at)
                )
            ).all()
        # Events are best effort: a silent worker may still be alive; a ping settles it.
        silent = sorted({worker for _, worker, status in suspects if status == WorkerStatus.OFFLINE.value})
        alive = self.answering(self.celery, silent) if silent else set()
        lost = [(task_id, worker) for task_id, worker, status in suspects if worker not in alive]
        if not lost:
            return 0
        ids = {task_id for task_id, _ in lost}
        ids -= self._finished_in_backend(ids)  # reconcile finishes those
        self.free_slots(self.celery, ids)  # a dead worker's leases: the slots are free now, not at expiry
        requeued = self.requeue(self.celery, ids) if ids else set()
        waiting = self.queued(self.celery) if ids - requeued else set()
        with self.sessions.begin() as session:
            for task_id, worker in lost:
                if task_id not in ids:
                    continue
                row = session.get(TaskRow, task_id)
                if row is None or row.status != TaskStatus.IN_PROGRESS.value:
                    continue
                if task_id in requeued or task_id in waiting:
                    row.status, row.started_at = TaskStatus.PENDING.value, None
                    message = f"worker {worker} was lost; task {task_id} requeued"
                else:
                    result = {"success": False, "output": None, "error": f"worker lost: {worker} stopped while "
                              "running it and the broker no longer holds it", "error_type": "WorkerLost"}  # fmt: skip
                    self._set_status(session, row, TaskStatus.FAILED, result, worker, utcnow())
                    message = f"worker {worker} was lost; task {task_id} failed"
                row.updated_at = utcnow()
                session.add(SystemLogRow(timestamp=utcnow(), level="WARNING", component="reaper",
                                         message=message, task_id=task_id))  # fmt: skip
                log.warning("reaper: %s", message)
        return len(ids)

    def requeue_orphans(self) -> int:
        """Requeue delivered messages of pending tasks that no live worker holds.

        A worker sends its task events in batches (koubou.worker_events): killed moments after it
        took tasks, it takes their `task-received`/`task-started` with it, so their rows stay pending
        and reap() never sees them, while their messages sit unacknowledged until the visibility
        timeout (twice the longest task). A message delivered a while ago whose task no live worker
        reports (running or reserved, asked by broadcast) belonged to a worker that is gone.
        """
        cutoff = time.time() - self.orphan_after
        old = {task_id for task_id, at in self.delivered(self.celery).items() if at < cutoff}
        if not old:
            return 0
        with self.sessions() as session:
            pending = set(
                session.scalars(
                    select(TaskRow.task_id).where(TaskRow.task_id.in_(old), TaskRow.status == TaskStatus.PENDING.value)
                ).all()
            )
            live = list(
                session.scalars(select(WorkerRow.worker_id).where(WorkerRow.status != WorkerStatus.OFFLINE.value)).all()
            )
        if not pending:
            return 0
        held = self.held_by_workers(self.celery, live, pending)
        if held is None:  # a live worker did not answer: it may hold them; look again next time
            return 0
        orphans = pending - held - self._finished_in_backend(pending - held)
        if not orphans:
            return 0
        self.free_slots(self.celery, orphans)
        requeued = self.requeue(self.celery, orphans)
        with self.sessions.begin() as session:
            for task_id in sorted(requeued):
                message = f"task {task_id} was delivered to a worker that is gone before it reported the task; requeued"
                session.add(SystemLogRow(timestamp=utcnow(), level="WARNING", component="reaper",
                                         message=message, task_id=task_id))  # fmt: skip
                log.warning("reaper: %s", message)
        return len(requeued)

    def fail_unsent(self) -> int:
        """Fail pending rows whose message the broker no longer holds and no worker ran (the API
        writes a row only once its message is queued, so the broker lost it: its data was reset, or
        a power cut took writes it had not yet synced): no worker will ever run them, so they must
        not stay pending.

        A row counts only when it is older than `unsent_after`, has no state in the result
        backend, and the broker held no message for it at two looks in a row (a message moves
        between a queue and the unacked hash in separate steps)."""
        cutoff = utcnow() - timedelta(seconds=self.unsent_after)
        with self.sessions() as session:
            old = set(
                session.scalars(
                    select(TaskRow.task_id)
                    .where(TaskRow.status == TaskStatus.PENDING.value, TaskRow.created_at < cutoff)
                    .limit(1000)
                ).all()
            )
        if not old:
            self._unsent_suspects = set()
            return 0
        now = time.monotonic()
        if now < self._next_unsent_look:
            return 0
        # Reading every queued message is not free under a backlog: look at most every few seconds.
        self._next_unsent_look = now + self.unsent_after / 3
        try:
            missing = old - self.held(self.celery)
            # An unreachable result backend must not read as "no result": then nothing is failed.
            missing = {t for t in missing if self.celery.backend.get_task_meta(t).get("status") == "PENDING"}
        except Exception:
            log.warning("mirror: cannot tell which pending tasks the broker holds", exc_info=True)
            return 0
        unsent, self._unsent_suspects = missing & self._unsent_suspects, missing
        if not unsent:
            return 0
        result = {"success": False, "output": None, "error_type": "MessageLost",
                  "error": "the broker no longer holds this task's message and no worker ran it; submit it again"}  # fmt: skip
        failed = 0
        with self.sessions.begin() as session:
            for task_id in sorted(unsent):
                row = session.get(TaskRow, task_id)
                if row is None or row.status != TaskStatus.PENDING.value:
                    continue
                self._set_status(session, row, TaskStatus.FAILED, result, None, utcnow())
                row.updated_at = utcnow()
                session.add(SystemLogRow(timestamp=utcnow(), level="WARNING", component="mirror",
                                         message=f"the message of task {task_id} was lost; failed", task_id=task_id))  # fmt: skip
                failed += 1
        self._unsent_suspects -= unsent
        log.warning("mirror: failed %d task(s) whose message the broker lost", failed)
        return failed

    def age_queued(self) -> int:
        """Move tasks queued longer than `ageing` up one priority class, so none starves forever."""
        cutoff = utcnow() - timedelta(seconds=self.ageing)
        with self.sessions() as session:
            old = session.scalars(
                select(TaskRow.task_id)
                .where(TaskRow.status == TaskStatus.PENDING.value, TaskRow.created_at < cutoff)
                .order_by(TaskRow.created_at)
                .limit(500)
            ).all()
        moved = self.promote(self.celery, old) if old else set()
        if moved:
            with self.sessions.begin() as session:
                session.add(SystemLogRow(timestamp=utcnow(), level="INFO", component="scheduler",
                                         message=f"aged {len(moved)} waiting task(s) up one priority class",
                                         details={"task_ids": sorted(moved)[:100]}))  # fmt: skip
            log.info("mirror: aged %d waiting task(s) up one priority class", len(moved))
        return len(moved)

    def mark_offline(self) -> None:
        """Workers whose heartbeats stopped are offline."""
        cutoff = utcnow() - timedelta(seconds=self.offline_after)
        with self.sessions.begin() as session:
            session.execute(
                update(WorkerRow)
                .where(WorkerRow.status != WorkerStatus.OFFLINE.value)
                .where(WorkerRow.last_heartbeat < cutoff)
                .values(status=WorkerStatus.OFFLINE.value, active_tasks=0)
            )
