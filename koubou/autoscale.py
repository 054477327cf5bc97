"""koubou's pool autoscaler: grow under backlog up to the backend slots this worker can use; stop
only idle processes.

Celery's stock autoscaler sizes the pool by the messages the worker has reserved, and with
`--autoscale=MAX,MIN` the worker reserves up to MAX (times the prefetch multiplier) of them: any
backlog sends the pool straight to MAX, although a process beyond the backends' slots can only wait
for a lease, and the extra reserved messages are held back from other workers and from more urgent
work arriving later. This one keeps the worker's prefetch at its pool size, grows while every
process is taken and messages wait in the queues it reads, never past the slots of its backends,
and shrinks after `AUTOSCALE_KEEPALIVE` seconds without new work.

Scaling down never stops a process that runs a task: billiard's `Pool.shrink` stops the processes
no accepted job names, which includes one a job was just written to but that has not acknowledged
it yet (celery#7266, billiard#323: the task dies with WorkerLostError). So this autoscaler shrinks
only when every job in the pool has been acknowledged, on the worker's event loop, the thread that
hands jobs over, so nothing changes between the check and the shrink.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic
from typing import Any

import redis
from celery.worker.autoscale import AUTOSCALE_KEEPALIVE, Autoscaler

from .broker import queue_depths
from .config import Settings, get_settings
from .routing import build_router

log = logging.getLogger(__name__)

#: Seconds between two decisions: Celery's event loop calls the autoscaler every `keepalive`.
TICK = 1.0
#: Longest a look at the queue depths may block the worker's event loop.
BROKER_TIMEOUT = 0.25
#: After a failed look, the autoscaler does not ask the broker again for this long.
BROKER_BACKOFF = 5.0


def slot_capacity(settings: Settings) -> int | None:
    """Requests the backends this worker can use serve at once (their slots); None when unlimited."""
    router = build_router(settings)
    slots = [router.slots_of(backend) for backend in router.backends]
    if not slots or any(count is None for count in slots):
        return None
    return sum(count for count in slots if count is not None)


def plan(
    processes: int,
    held: int,
    *,
    low: int,
    high: int,
    capacity: int | None,
    quiet_for: float,
    keepalive: float,
    waiting: Callable[[], int],
    idle: Callable[[], int],
) -> int:
    """How many processes to start (> 0) or stop (< 0) now.

    `held`: tasks the worker holds (running or reserved); `waiting()`: messages in the queues it
    reads (asked only when it matters); `idle()`: processes that may be stopped safely.
    """
    ceiling = high if capacity is None else max(low, min(high, capacity))
    if processes < low:
        return low - processes
    if held >= processes and processes < ceiling:
        wanted = min(ceiling, held + waiting())
        return max(0, wanted - processes)
    wanted = max(low, min(ceiling, held))
    if processes > wanted and quiet_for > keepalive:
        return -min(processes - wanted, idle())
    return 0


class SlotAwareAutoscaler(Autoscaler):
    """`worker_autoscaler` for koubou (see the module docstring)."""

    def __init__(
        self,
        pool: Any,
        max_concurrency: int,
        min_concurrency: int = 0,
        worker: Any = None,
        keepalive: float = AUTOSCALE_KEEPALIVE,
        mutex: Any = None,
        *,
        settings: Settings | None = None,
        capacity: int | None = None,
        waiting: Callable[[], int] | None = None,
    ) -> None:
        # The event loop calls maybe_scale every `self.keepalive` seconds (celery.worker.autoscale
        # WorkerComponent), so that is the tick; the idle delay before a shrink is kept apart.
        super().__init__(pool, max_concurrency, min_concurrency, worker, keepalive=TICK, mutex=mutex)
        self.idle_after = keepalive
        self.settings = settings or get_settings()
        # Computed once, as the worker's router is (a changed backends file needs a restart).
        self.capacity = capacity if capacity is not None else slot_capacity(self.settings)
        self._waiting = waiting or self._waiting_in_broker
        self._redis: redis.Redis | None = None
        self._broker_quiet_until = 0.0
        # (Not `_started`: this is a threading.Thread, which has its own.)
        self._created = monotonic()
        log.info(
            "autoscaler: %d to %d processes, at most %s for the backends' slots, idle ones stop after %.0fs",
            min_concurrency, max_concurrency, self.capacity if self.capacity is not None else "any", keepalive,
        )  # fmt: skip

    # -- the decision ----------------------------------------------------------------------

    def _maybe_scale(self, req: Any = None) -> bool:
        self._sync_prefetch()
        change = plan(
            self.processes, self.qty, low=self.min_concurrency, high=self.max_concurrency, capacity=self.capacity,
            quiet_for=self._quiet_for(), keepalive=self.idle_after, waiting=self._waiting, idle=self.idle_processes,
        )  # fmt: skip
        if change > 0:
            self.scale_up(change)
        elif change < 0:
            self._shrink(-change)
        else:
            return False
        self._sync_prefetch(grown=max(change, 0))
        return True

    def _quiet_for(self) -> float:
        """Seconds since the worker last received a task or grew (since start when neither)."""
        moments = [m for m in (self._last_task_received, self._last_scale_up) if m is not None]
        return monotonic() - max(moments, default=self._created)

    # -- what it looks at ------------------------------------------------------------------

    def idle_processes(self) -> int:
        """Processes that may be stopped: those running nothing, or 0 while a job is handed over.

        A job written to a process that has not acknowledged it names no process yet, and billiard's
        shrink would take that process for an idle one.
        """
        if self.worker is not None and not getattr(self.worker, "use_eventloop", False):
            return 0  # jobs are handed over on another thread: no moment is safe to shrink
        billiard_pool = getattr(self.pool, "_pool", None)
        jobs = list(getattr(billiard_pool, "_cache", {}).values())
        if billiard_pool is None or any(not job.accepted() for job in jobs):
            return 0
        busy = {pid for job in jobs for pid in job.worker_pids()}
        return sum(1 for process in billiard_pool._pool if process.pid not in busy)

    def _waiting_in_broker(self) -> int:
        """Messages waiting in the queues this worker reads; 0 when the broker does not answer at once."""
        now = monotonic()
        if now < self._broker_quiet_until or self.worker is None:
            return 0
        try:
            if self._redis is None:
                self._redis = redis.Redis.from_url(
                    self.settings.broker, socket_timeout=BROKER_TIMEOUT, socket_connect_timeout=BROKER_TIMEOUT
                )
            return sum(queue_depths(self._redis, self.worker.app.amqp.queues.consume_from).values())
        except (redis.RedisError, OSError, ValueError) as error:
            log.warning("autoscaler: cannot read the queue depths (%s); not growing for %.0fs", error, BROKER_BACKOFF)
            self._broker_quiet_until = now + BROKER_BACKOFF
            return 0

    def _sync_prefetch(self, grown: int = 0) -> None:
        """Let the worker hold at most one message per process (times the prefetch multiplier).

        Celery starts an autoscaling worker with the prefetch of MAX processes and leaves it there.
        The prefetch rises only with the pool: after a broker reconnection Celery lowers it and
        raises it back step by step as running tasks finish, which this must not undo.
        """
        consumer = getattr(self.worker, "consumer", None)
        qos = getattr(consumer, "qos", None)
        if qos is None or not consumer.initial_prefetch_count:
            return  # not connected yet, or prefetch disabled
        wanted = max(self.processes, 1) * consumer.prefetch_multiplier
        consumer.initial_prefetch_count = wanted  # what a reconnection starts from
        if qos.value > wanted:
            qos.decrement_eventually(qos.value - wanted)
        elif grown:
            qos.increment_eventually(min(grown * consumer.prefetch_multiplier, wanted - qos.value))

    def info(self) -> dict[str, Any]:
        return {**super().info(), "capacity": self.capacity, "idle_after": self.idle_after}
