"""Names shared across processes: statuses, task types, queue and task names."""

from __future__ import annotations

from collections.abc import Iterable
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
# Queues: one per (priority class, task type). The general type keeps the original names
# (`koubou.1-urgent`, ...); another type appends its name (`koubou.1-urgent.code`). A prefix sorts
# before its extensions, so in name order every class comes before the next one whatever the
# type, and the broker is read with kombu's 'sorted' strategy: every worker (also a plain
# `celery -A koubou worker`) takes urgent work first, strict priority rather than Celery's emulated
# priorities (celery#8967). Within one class a worker serving both types takes general work first.
PRIORITY_CLASSES = ("1-urgent", "2-normal", "3-low")


def _queue_name(task_type: TaskType, priority_class: str) -> str:
    base = f"koubou.{priority_class}"
    return base if task_type is TaskType.GENERAL else f"{base}.{task_type.value}"


#: Each task type's queues, most urgent first.
QUEUES_BY_TYPE: dict[TaskType, tuple[str, ...]] = {
    task_type: tuple(_queue_name(task_type, name) for name in PRIORITY_CLASSES) for task_type in TaskType
}
#: Every koubou queue, in the order workers read them.
QUEUES = tuple(sorted(queue for queues in QUEUES_BY_TYPE.values() for queue in queues))
URGENT_QUEUE, NORMAL_QUEUE, LOW_QUEUE = QUEUES_BY_TYPE[TaskType.GENERAL]
DEFAULT_QUEUE = NORMAL_QUEUE
#: (queue, the next more urgent queue of the same type): where ageing moves a waiting task.
PROMOTIONS = tuple(
    (queues[index], queues[index - 1]) for queues in QUEUES_BY_TYPE.values() for index in range(1, len(queues))
)


def queue_for_priority(priority: int, task_type: TaskType | str = TaskType.GENERAL) -> str:
    """The task type's queue for a priority: 8-10 urgent, 4-7 normal, 1-3 low (10 most urgent)."""
    urgent, normal, low = QUEUES_BY_TYPE[TaskType(task_type)]
    if priority >= 8:
        return urgent
    return normal if priority >= 4 else low


def queues_for_types(task_types: Iterable[TaskType | str]) -> tuple[str, ...]:
    """The queues a worker serving these task types consumes, in the order it reads them."""
    return tuple(sorted(queue for task_type in set(map(TaskType, task_types)) for queue in QUEUES_BY_TYPE[task_type]))


def types_of_queues(queues: Iterable[str]) -> tuple[TaskType, ...]:
    """The task types a worker consuming `queues` serves (any of a type's queues counts: -Q may name a few)."""
    names = set(queues)
    return tuple(task_type for task_type in TaskType if names & set(QUEUES_BY_TYPE[task_type]))


def worker_type_label(task_types: Iterable[TaskType]) -> str:
    """`workers.worker_type`: the task types a worker serves, e.g. `general+code`, `code`."""
    return "+".join(task_type.value for task_type in task_types) or "none"


#: Redis hash (in the result backend): worker node name -> worker_type_label, written as it starts.
WORKER_TYPES_KEY = "koubou:worker-types"

# Redis key the mirror refreshes while it runs; /health reads it.
MIRROR_ALIVE_KEY = "koubou:mirror:alive"
MIRROR_ALIVE_TTL = 15


def idempotency_key(digest: str) -> str:
    """Redis key holding the task id an Idempotency-Key (hashed with its agent) was first used for."""
    return f"koubou:idempotency:{digest}"


def cancel_key(task_id: str) -> str:
    """Redis key (in the result backend) set when a client cancels the task."""
    return f"koubou:cancel:{task_id}"
