"""Reading a delegation's state from Celery's result backend (shared by the API and the mirror)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from celery import states
from celery.backends.redis import RedisBackend

from .constants import TaskStatus
from .jobs import DelegationFailed

log = logging.getLogger(__name__)

#: `error_type` of a delegation its client cancelled.
CANCELLED = "Cancelled"


@dataclass(frozen=True)
class BackendView:
    """A task's state as the result backend knows it."""

    status: TaskStatus
    result: dict[str, Any] | None
    worker: str | None
    completed_at: datetime | None = None


class ResultBackend(RedisBackend):
    """Celery's Redis result backend without the subscription it makes for every task it sends.

    Celery subscribes to a task's result channel when the task is sent, for a later
    `AsyncResult.get()`. koubou never joins results that way (ResultWaiter wakes the API's waits), and
    the SUBSCRIBE and UNSUBSCRIBE were two broker round trips on every delegation's path.
    `AsyncResult.get()` still works: it subscribes itself, then reads the stored state.
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        pass


def read_view(app: Any, task_id: str) -> BackendView | None:
    """The task's state from `app`'s result backend; None when it knows nothing or is unreachable."""
    try:
        return view_from_meta(app.backend.get_task_meta(task_id))
    except Exception:  # the result backend being away must not break a status read or the mirror
        log.warning("cannot read the result of %s from the result backend", task_id, exc_info=True)
        return None


def failure_result(error: BaseException | Any) -> dict[str, Any]:
    """The `result` JSON for a failed task, from the exception Celery stored."""
    if isinstance(error, DelegationFailed) and error.outcome:
        return dict(error.outcome)
    if isinstance(error, BaseException):
        text = str(error) or type(error).__name__
        kind = type(error).__name__
    else:
        text, kind = str(error), "Error"
    if kind in {"TimeLimitExceeded", "SoftTimeLimitExceeded"}:
        text = f"timed out: {text}"
    elif kind == "WorkerLostError":
        text = f"worker lost: {text}"
    return {"success": False, "output": None, "error": text, "error_type": kind}


def view_from_meta(meta: dict[str, Any]) -> BackendView | None:
    """Map Celery's stored meta to koubou's status; None when the backend knows nothing yet."""
    state = meta.get("status")
    worker = meta.get("worker")
    done = _naive_utc(meta.get("date_done"))
    if state == states.SUCCESS:
        result = meta.get("result")
        if not isinstance(result, dict):
            result = {"success": True, "output": str(result), "error": None}
        status = TaskStatus.COMPLETED if result.get("success", True) else TaskStatus.FAILED
        return BackendView(status, result, worker or result.get("worker"), done)
    if state == states.FAILURE:
        result = failure_result(meta.get("result"))
        status = TaskStatus.CANCELLED if result.get("error_type") == CANCELLED else TaskStatus.FAILED
        return BackendView(status, result, worker or result.get("worker"), done)
    if state == states.REVOKED:
        return BackendView(TaskStatus.CANCELLED, {"success": False, "output": None, "error": "cancelled"}, worker, done)
    if state in (states.STARTED, states.RETRY):
        return BackendView(TaskStatus.IN_PROGRESS, None, worker)
    return None


def _naive_utc(value: Any) -> datetime | None:
    """Celery's `date_done` (a datetime or an ISO string) as naive UTC, like the table columns."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


class ResultWaiter:
    """Wakes threads waiting on a task when the result backend publishes a new state for it.

    Celery's Redis result backend publishes every state it stores on the task's key. One pattern
    subscription per process (on its own thread) hears them all, so a `sync` delegation answers as
    soon as its result is stored instead of at the next poll; with the subscription down (broker
    restart), `listening` is clear and waiters poll.
    """

    def __init__(self, client: redis.Redis, key_prefix: str | bytes) -> None:
        self.client = client
        self.prefix = key_prefix.encode() if isinstance(key_prefix, str) else key_prefix
        self.listening = threading.Event()
        self._waiters: dict[str, set[threading.Event]] = {}
        self._latest: dict[str, bytes] = {}  # the last state published for each watched task
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @contextmanager
    def watching(self, task_id: str) -> Iterator[threading.Event]:
        """An event set whenever the task's stored state changes, while the block runs."""
        self._start()
        changed = threading.Event()
        with self._lock:
            self._waiters.setdefault(task_id, set()).add(changed)
        try:
            yield changed
        finally:
            with self._lock:
                waiting = self._waiters.get(task_id, set())
                waiting.discard(changed)
                if not waiting:
                    self._waiters.pop(task_id, None)
                    self._latest.pop(task_id, None)

    def latest(self, task_id: str) -> bytes | None:
        """The last state the backend published for a watched task (as stored), if any."""
        with self._lock:
            return self._latest.get(task_id)

    def stop(self) -> None:
        self._stopping.set()

    def _start(self) -> None:
        # Started on first use, in the process that serves requests (gunicorn forks after import).
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._listen, name="koubou-result-waiter", daemon=True)
                self._thread.start()

    def _listen(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            pubsub = self.client.pubsub()
            try:
                pubsub.psubscribe(self.prefix + b"*")
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["type"] == "psubscribe":
                        # Only now does Redis deliver: a waiter that reads the state after this misses nothing.
                        self.listening.set()
                        backoff = 0.1
                    elif message["type"] == "pmessage":
                        self._wake(message["channel"][len(self.prefix) :].decode(), message["data"])
            except Exception as error:  # broker restart, network: waiters poll meanwhile
                self.listening.clear()
                log.warning("result waiter: subscription lost (%s); again in %.1fs", error, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self.listening.clear()
                try:
                    pubsub.close()
                except Exception:  # closing a broken connection must not stop the loop
                    pass

    def _wake(self, task_id: str, data: bytes) -> None:
        with self._lock:
            waiting = list(self._waiters.get(task_id, ()))
            if waiting:
                self._latest[task_id] = data
        for changed in waiting:
            changed.set()


def wait_until_final(
    app: Any, waiter: ResultWaiter, task_id: str, timeout: float, fallback_poll: float = 1.0
) -> BackendView | None:
    """The task's view once final (or the last one seen when `timeout` passes).

    Woken by the backend's publication, whose payload is the stored state (no read needed); reads
    the backend first, and every `fallback_poll` seconds in case a publication is missed, and from
    5 ms (backing off) while the subscription is down.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    with waiter.watching(task_id) as changed:
        published: bytes | None = None
        while True:
            view = _published_view(app, published) if published is not None else read_view(app, task_id)
            if view is not None and view.status.is_final:
                return view
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return view
            if waiter.listening.is_set():
                woke = changed.wait(min(remaining, fallback_poll))
            else:
                woke = changed.wait(min(remaining, delay))
                delay = min(delay * 1.3, 0.1)
            changed.clear()  # before taking the payload: a newer publication sets it again
            published = waiter.latest(task_id) if woke else None


def _published_view(app: Any, payload: bytes) -> BackendView | None:
    try:
        return view_from_meta(app.backend.decode_result(payload))
    except Exception:  # not a state we can read: ask the backend instead
        log.warning("cannot decode a published state; reading the result backend", exc_info=True)
        return None
