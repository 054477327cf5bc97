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
# Three priority classes. Their names sort in priority order and the broker is read with kombu's
# 'sorted' strategy, so every worker (also a plain `celery -A koubou worker`) takes the urgent
# queue first: strict priority, not Celery's emulated priorities (celery#8967).
URGENT_QUEUE = "koubou.1-urgent"
NORMAL_QUEUE = "koubou.2-normal"
LOW_QUEUE = "koubou.3-low"
QUEUES = (URGENT_QUEUE, NORMAL_QUEUE, LOW_QUEUE)
DEFAULT_QUEUE = NORMAL_QUEUE


def queue_for_priority(priority: int) -> str:
    """Priority 8-10 is urgent, 4-7 normal, 1-3 low (10 most urgent, as in the original system)."""
    if priority >= 8:
        return URGENT_QUEUE
    return NORMAL_QUEUE if priority >= 4 else LOW_QUEUE

# Redis key the mirror refreshes while it runs; /health reads it.
MIRROR_ALIVE_KEY = "koubou:mirror:alive"
MIRROR_ALIVE_TTL = 15


def idempotency_key(digest: str) -> str:
    """Redis key holding the task id an Idempotency-Key (hashed with its agent) was first used for."""
    return f"koubou:idempotency:{digest}"


def cancel_key(task_id: str) -> str:
    """Redis key (in the result backend) set when a client cancels the task."""
    return f"koubou:cancel:{task_id}"
