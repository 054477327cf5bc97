"""Reading a delegation's state from Celery's result backend (shared by the API and the mirror)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.client import Pipeline
from redis.exceptions import NoScriptError

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


#: A command for a pipeline (e.g. giving a slot lease back), queued to go with a task's result.
Rider = Callable[[Pipeline], object]
#: This process's riders, by result key (a worker process runs one task at a time; a thread pool
#: runs several, hence the lock).
_riders: dict[str, list[Rider]] = {}
_riders_lock = threading.Lock()


def _key_text(key: str | bytes) -> str:
    return key.decode() if isinstance(key, bytes) else key


def ride_with_result(backend: Any, task_id: str, rider: Rider) -> None:
    """Send `rider`'s commands in the same MULTI/EXEC that stores the task's result (ResultBackend)."""
    with _riders_lock:
        _riders.setdefault(_key_text(backend.get_key_for_task(task_id)), []).append(rider)


def send_riders_now(backend: Any, task_id: str) -> None:
    """Send, on their own, the riders no result store took (it failed, or the backend is another
    one). Best effort: a lease left behind expires by itself."""
    with _riders_lock:
        riders = _riders.pop(_key_text(backend.get_key_for_task(task_id)), None)
    if not riders:
        return
    try:
        pipe = backend.client.pipeline(transaction=False)
        for rider in riders:
            rider(pipe)
        pipe.execute()
    except redis.RedisError:
        log.warning("could not send what should have gone with the result of %s", task_id, exc_info=True)


#: Store and publish a task's state unless a SUCCESS is stored already. KEYS[1]: the result key;
#: ARGV: the encoded meta (JSON), its lifetime in seconds (0: none). Returns 1 when stored.
_SET_UNLESS_SUCCEEDED = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
_SET_UNLESS_SUCCEEDED_SHA = hashlib.sha1(_SET_UNLESS_SUCCEEDED.encode()).hexdigest()  # noqa: S324 (Redis's script id)


class ResultBackend(RedisBackend):
    """Celery's Redis result backend, without a subscription per task sent, and with riders.

    Celery subscribes to a task's result channel when the task is sent, for a later
    `AsyncResult.get()`. koubou never joins results that way (ResultWaiter wakes the API's waits), and
    the SUBSCRIBE and UNSUBSCRIBE were two broker round trips on every delegation's path.
    `AsyncResult.get()` still works: it subscribes itself, then reads the stored state.

    The result goes out with the commands its task queued (`ride_with_result`): the slot lease given
    back and the last live output. One round trip, and the slot is free the moment the answer is.
    """

    def on_task_call(self, producer: Any, task_id: str) -> None:
        pass

    _script_loaded = False

    def _store_result(
        self, task_id: str, result: Any, state: str, traceback: Any = None, request: Any = None, **_: Any
    ) -> Any:
        # Celery reads the stored state first and keeps a SUCCESS already there (a redelivered
        # duplicate must not overwrite it), then writes: two round trips. Here the check and the
        # write are one script, in the same round trip as the riders, and atomic.
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        try:
            self._set_with_state(self.get_key_for_task(task_id), self.encode(meta), state)
        except BackendStoreError as error:
            raise BackendStoreError(str(error), state=state, task_id=task_id) from error
        return result

    def _set(self, key: str | bytes, value: Any, expires: int | None = None) -> None:
        # Celery's own _set, plus the riders; they are dropped only once stored (ensure() may retry).
        if expires is None:
            expires = self.expires
        with _riders_lock:
            riders = list(_riders.get(_key_text(key), ()))
        args = (key, value, int(expires) if expires else 0)
        if not self._script_loaded:
            self.client.script_load(_SET_UNLESS_SUCCEEDED)
            self._script_loaded = True
        with self.client.pipeline() as pipe:
            # EVALSHA by hand: redis-py's Script in a pipeline sends SCRIPT EXISTS first, every time.
            pipe.evalsha(_SET_UNLESS_SUCCEEDED_SHA, 1, *args)
            for rider in riders:
                rider(pipe)
            stored = pipe.execute(raise_on_error=False)[0]
        if isinstance(stored, NoScriptError):  # the broker restarted and forgot it; the riders went
            self.client.script_load(_SET_UNLESS_SUCCEEDED)
            self.client.evalsha(_SET_UNLESS_SUCCEEDED_SHA, 1, *args)
        elif isinstance(stored, Exception):
            raise stored
        if riders:
            with _riders_lock:
                _riders.pop(_key_text(key), None)


def read_view(app: Any, task_id: str) -> BackendView | None:
    """The task's state from `app`'s result backend; None when it knows nothing or is unreachable."""
    try:
        return view_from_meta(app.backend.get_task_meta(task_id))
    except Exception:  # the result backend being away must not break a status read or the mirror
        log.warning("cannot read the result of %s from the result backend", task_id, exc_info=True)
        return None


#: Tasks read per MGET: a backlog's reconcile reads up to a thousand rows' results.
MGET_CHUNK = 200


def read_views(app: Any, task_ids: Iterable[str]) -> dict[str, BackendView]:
    """Several tasks' states, one MGET per chunk instead of a GET each (every reply from a broker
    that fsyncs waits its turn); tasks the backend knows nothing of are left out, and an unreachable
    backend gives an empty answer."""
    ids = list(dict.fromkeys(task_ids))
    backend = app.backend
    if not isinstance(backend, RedisBackend):
        return {task_id: view for task_id in ids if (view := read_view(app, task_id)) is not None}
    views: dict[str, BackendView] = {}
    try:
        for start in range(0, len(ids), MGET_CHUNK):
            chunk = ids[start : start + MGET_CHUNK]
            values = backend.mget([backend.get_key_for_task(task_id) for task_id in chunk])
            for task_id, value in zip(chunk, values):
                view = view_from_meta(backend.decode_result(value)) if value else None
                if view is not None:
                    views[task_id] = view
    except Exception:  # as read_view: the result backend being away must not break the mirror
        log.warning("cannot read %d results from the result backend", len(ids), exc_info=True)
        return {}
    return views


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
