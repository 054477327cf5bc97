"""Live output: workers append the model's streamed text to a Redis stream; the API serves it as SSE.

One Redis stream per task (`koubou:stream:<id>`, entries `{"text", "n"}`, where n counts the
pieces the backend sent) and one progress hash (`koubou:progress:<id>`: tokens, first/last piece
time). Both live in the result backend's Redis and expire with a day's margin.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import Pipeline

#: A worker flushes its buffer at least this often, and when it holds this many characters.
FLUSH_INTERVAL = 0.1
FLUSH_CHARS = 512
KEY_TTL = 24 * 3600
STREAM_MAXLEN = 50_000
#: SSE: how long one XREAD waits, and how often an idle stream gets a keep-alive comment.
READ_BLOCK_MS = 1000
KEEPALIVE_SECONDS = 15.0


def stream_key(task_id: str) -> str:
    return f"koubou:stream:{task_id}"


def progress_key(task_id: str) -> str:
    return f"koubou:progress:{task_id}"


#: One flush of live output as one command (it rides with the result or a lease's release, whose
#: round trip it shares; six commands were six to encode, send and append to the broker's log).
#: KEYS: the stream, the progress hash. ARGV: text, pieces, now, the stream's max length, the keys' TTL.
#: EVAL, not EVALSHA: a broker that restarted and forgot the script cannot make a flush fail.
_FLUSH = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '*', 'text', ARGV[1], 'n', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'tokens', ARGV[2])
redis.call('HSETNX', KEYS[2], 'first_at', ARGV[3])
redis.call('HSET', KEYS[2], 'last_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
"""


class TokenPublisher:
    """Worker side: batches streamed pieces and appends them to the task's stream."""

    def __init__(self, client: redis.Redis, task_id: str, clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.task_id = task_id
        self.clock = clock
        self._parts: list[str] = []
        self._pieces = 0
        self._size = 0
        self._last_flush = clock()
        self.failed = False

    def __call__(self, text: str) -> None:
        self._parts.append(text)
        self._pieces += 1
        self._size += len(text)
        if self._size >= FLUSH_CHARS or self.clock() - self._last_flush >= FLUSH_INTERVAL:
            self.flush()

    def flush(self) -> None:
        if not self._parts or self.failed:
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            self.flush_into(pipe)
            pipe.execute()
        except redis.RedisError:
            # Live output is a convenience: losing it must never fail the delegation.
            self.failed = True

    def flush_into(self, pipe: Pipeline) -> None:
        """Queue the buffered text on `pipe` (sent with another command: one round trip for both)."""
        if not self._parts or self.failed:
            return
        now = self.clock()
        text, pieces = "".join(self._parts), self._pieces
        self._parts, self._pieces, self._size, self._last_flush = [], 0, 0, now
        keys = (stream_key(self.task_id), progress_key(self.task_id))
        pipe.eval(_FLUSH, len(keys), *keys, text, pieces, repr(now), STREAM_MAXLEN, KEY_TTL)


@dataclass(frozen=True)
class Progress:
    tokens: int
    tokens_per_second: float | None


def read_progress(client: redis.Redis, task_id: str) -> Progress:
    """Tokens streamed so far and their rate; zeros when nothing streamed (or Redis is away)."""
    try:
        raw = client.hgetall(progress_key(task_id))
    except redis.RedisError:
        return Progress(0, None)
    values = {key.decode(): value.decode() for key, value in raw.items()}
    tokens = int(values.get("tokens", 0))
    first, last = float(values.get("first_at", 0) or 0), float(values.get("last_at", 0) or 0)
    rate = round(tokens / (last - first), 1) if tokens > 1 and last > first else None
    return Progress(tokens, rate)


def sse(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    """One server-sent event."""
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def read_deltas(client: redis.Redis, task_id: str, after: str, block_ms: int | None) -> list[tuple[str, str]]:
    """Stream entries after `after` as (id, text); blocks up to `block_ms` when given."""
    answer = client.xread({stream_key(task_id): after}, count=500, block=block_ms)
    entries: list[tuple[str, str]] = []
    for _key, items in answer or []:
        for entry_id, fields in items:
            entries.append((entry_id.decode(), fields.get(b"text", b"").decode()))
    return entries


def event_stream(
    client: redis.Redis,
    task_id: str,
    current: Callable[[], tuple[str, dict[str, Any] | None]],
    last_event_id: str | None,
    deadline: float,
) -> Iterator[str]:
    """SSE for one task: `status` on each change, `delta`s as they come, then `done`, then the end.

    `current()` returns the task's status and, once final, the done payload. A task already final
    when the client connects gets `status` and `done` only.
    """
    status, done = current()
    yield sse("status", {"task_id": task_id, "status": status})
    after = last_event_id or "0-0"
    if done is not None and last_event_id is None:
        yield sse("done", done)
        return
    last_sent = time.monotonic()
    while time.monotonic() < deadline:
        try:
            entries = read_deltas(client, task_id, after, READ_BLOCK_MS if done is None else None)
        except redis.RedisError:
            entries = []
            time.sleep(READ_BLOCK_MS / 1000)
        for entry_id, text in entries:
            after = entry_id
            yield sse("delta", {"text": text}, entry_id)
            last_sent = time.monotonic()
        if done is not None and not entries:
            yield sse("done", done)
            return
        new_status, done = current()
        if new_status != status:
            status = new_status
            yield sse("status", {"task_id": task_id, "status": status})
            last_sent = time.monotonic()
        if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
            yield ": ping\n\n"
            last_sent = time.monotonic()
    # Past the bound: the client may reconnect with Last-Event-ID and carry on.
    yield sse("status", {"task_id": task_id, "status": status})
