"""Names shared across processes: statuses, task types, queue and task names."""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    """A delegation's state as the API and `task_master.status` show it."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class TaskType(StrEnum):
    GENERAL = "general"
    CODE = "code"


class WorkerStatus(StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    OFFLINE = "offline"


# koubou's own names, so another Celery app sharing a Redis never takes its messages.
DELEGATE_TASK = "koubou.delegate"
DEFAULT_QUEUE = "koubou.default"

# Redis key the mirror refreshes while it runs; /health reads it.
MIRROR_ALIVE_KEY = "koubou:mirror:alive"
MIRROR_ALIVE_TTL = 15


def idempotency_key(digest: str) -> str:
    """Redis key holding the task id an Idempotency-Key (hashed with its agent) was first used for."""
    return f"koubou:idempotency:{digest}"


def cancel_key(task_id: str) -> str:
    """Redis key (in the result backend) set when a client cancels the task."""
    return f"koubou:cancel:{task_id}"
