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
from redis.client import Pipeline

LEASE_MARGIN = 30.0  # seconds a lease outlives its task's deadline
HOLDER_SEP = "|"


#: Wake-up tokens kept per backend: a release adds one and a waiting worker takes one (BLPOP), so a
#: freed slot is taken at once instead of at a waiter's next poll. Tokens nobody took are few and
#: harmless: a waiter that takes one just asks for a lease again.
WAKE_TOKENS = 8
WAKE_TTL = 60


def slots_key(backend: str) -> str:
    return f"koubou:slots:{backend}"


def released_key(backend: str) -> str:
    return f"koubou:slots-released:{backend}"


#: Take a lease if fewer than `slots` live ones exist, in one atomic step (one round trip: every reply
#: from the broker waits for its fsync). KEYS[1]: the backend's lease set; KEYS[2], when given, the
#: task's cancel flag, looked at in the same trip. ARGV: now, slots, lease, the lease's expiry, the
#: set's TTL in seconds. Returns 1 when taken, 0 when every slot is busy, -1 when the task is cancelled.
_ACQUIRE = """
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
if redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[1], '+inf') >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
-- Only ever extend the set's lifetime: a short task must not cut a longer task's lease short.
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[5]) then
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
return 1
"""

#: Give a lease back and leave a wake-up token, as one command (it rides in the result's round trip).
#: KEYS: the lease set, the wake-up list. ARGV: the lease, the tokens kept, the list's TTL.
#: EVAL, not EVALSHA: a broker that restarted and forgot the script cannot keep a slot taken.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('LPUSH', KEYS[2], 1)
redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
"""


class CancelFlagSet(Exception):
    """The task's cancel flag was set when it asked for a lease (no lease was taken)."""


class SlotLeases:
    """Acquire, release and count backend slot leases."""

    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.clock = clock
        self._acquire = client.register_script(_ACQUIRE)

    def acquire(
        self, backend: str, slots: int, hold_for: float, holder: str = "", cancel_flag: str | None = None
    ) -> str | None:
        """A lease id when one of the backend's `slots` is free, else None. Atomic across workers.

        The lease id starts with `holder` (the task id), so release_held_by() can free the slots
        of tasks whose worker died without waiting for the leases to expire. With `cancel_flag`
        (a key), raises CancelFlagSet instead of taking a lease when that key exists.
        """
        lease = f"{holder}{HOLDER_SEP}{uuid.uuid4().hex}"
        now = self.clock()
        ttl = int(hold_for + LEASE_MARGIN) + 60  # the set outlives its longest lease
        keys = [slots_key(backend)] + ([cancel_flag] if cancel_flag else [])
        args = [repr(now), slots, lease, repr(now + hold_for + LEASE_MARGIN), ttl]
        taken = int(self._acquire(keys=keys, args=args))
        if taken < 0:
            raise CancelFlagSet(cancel_flag)
        return lease if taken else None

    def release(self, backend: str, lease: str, also: Callable[[Pipeline], object] | None = None) -> None:
        """Give the lease back; `also` adds commands to the same round trip (the live output's last flush)."""
        pipe = self.client.pipeline(transaction=False)
        self.queue_release(pipe, backend, lease)
        if also is not None:
            also(pipe)
        pipe.execute()

    @staticmethod
    def queue_release(pipe: Pipeline, backend: str, lease: str) -> None:
        """Add the lease's release, and a wake-up for a worker waiting on the backend, to `pipe`."""
        pipe.eval(_RELEASE, 2, slots_key(backend), released_key(backend), lease, WAKE_TOKENS, WAKE_TTL)

    def wait_for_release(self, backends: list[str], timeout: float) -> None:
        """Block until a lease on one of `backends` is given back, or `timeout` seconds pass."""
        self.client.blpop([released_key(b) for b in backends], timeout=max(timeout, 0.01))

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
                backend = key.decode().removeprefix(slots_key(""))
                self.client.lpush(released_key(backend), *([1] * min(len(stale), WAKE_TOKENS)))
                self.client.expire(released_key(backend), WAKE_TTL)
        return freed

    def in_use(self, backend: str) -> int:
        return int(self.client.zcount(slots_key(backend), f"({self.clock()}", "+inf"))
