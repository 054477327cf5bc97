"""Reading a delegation's state from Celery's result backend (shared by the API and the mirror)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from celery import states

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
