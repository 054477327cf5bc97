"""Backend slots enforced cluster-wide: a Redis sorted set of leases per backend.

A backend serves `slots` requests at once (Ollama: OLLAMA_NUM_PARALLEL, 1 by default; LM Studio:
4). Every worker on every machine takes a lease before calling a backend and gives it back after,
so the backend never sees more than its slots and never answers 503 because of koubou. A lease
expires on its own (its task's deadline plus a margin) when the worker holding it dies.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable

import redis

LEASE_MARGIN = 30.0  # seconds a lease outlives its task's deadline
HOLDER_SEP = "|"


def slots_key(backend: str) -> str:
    return f"koubou:slots:{backend}"


class SlotLeases:
    """Acquire, release and count backend slot leases."""

    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.clock = clock

    def acquire(self, backend: str, slots: int, hold_for: float, holder: str = "") -> str | None:
        """A lease id when one of the backend's `slots` is free, else None. Atomic across workers.

        The lease id starts with `holder` (the task id), so release_held_by() can free the slots
        of tasks whose worker died without waiting for the leases to expire.
        """
        key = slots_key(backend)
        lease = f"{holder}{HOLDER_SEP}{uuid.uuid4().hex}"
        with self.client.pipeline() as pipe:
            for _ in range(20):  # WATCH retries under contention; bounded
                try:
                    pipe.watch(key)
                    now = self.clock()
                    if pipe.zcount(key, f"({now}", "+inf") >= slots:
                        pipe.unwatch()
                        return None
                    pipe.multi()
                    pipe.zremrangebyscore(key, "-inf", now)  # leases of dead workers
                    pipe.zadd(key, {lease: now + hold_for + LEASE_MARGIN})
                    pipe.expire(key, int(hold_for + LEASE_MARGIN) + 60)
                    pipe.execute()
                    return lease
                except redis.WatchError:
                    continue
        return None

    def release(self, backend: str, lease: str) -> None:
        self.client.zrem(slots_key(backend), lease)

    def release_held_by(self, holders: Iterable[str]) -> int:
        """Free every lease, on every backend, held by these holders; return how many."""
        prefixes = tuple(f"{holder}{HOLDER_SEP}" for holder in holders)
        if not prefixes:
            return 0
        freed = 0
        for key in self.client.scan_iter(match=slots_key("*")):
            stale = [m for m in self.client.zrange(key, 0, -1) if m.decode().startswith(prefixes)]
            if stale:
                freed += int(self.client.zrem(key, *stale))
        return freed

    def in_use(self, backend: str) -> int:
        return int(self.client.zcount(slots_key(backend), f"({self.clock()}", "+inf"))
