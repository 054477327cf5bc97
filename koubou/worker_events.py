"""A worker sends its task events in batches on a short timer instead of one message per loop turn.

Celery's worker buffers task events and asks for a flush at the next turn of its event loop, so a
task's `task-received`, `task-started` and `task-succeeded` usually leave as three messages, and
every observer (the mirror, Flower) wakes up three times per task, on the same two cores that run
the API and the task. Flushing at most every EVENT_FLUSH_INTERVAL sends one message for all the
events of that moment (Celery still flushes at once when its buffer holds 24). Each event keeps
the time it was made, so rows and Flower show the same times, just up to that interval later.
"""

from __future__ import annotations

import time

from celery.worker.consumer import Consumer

#: Seconds a task event may wait in the worker's buffer for others to go with it.
EVENT_FLUSH_INTERVAL = 0.1


class BatchingConsumer(Consumer):
    """Celery's consumer (`worker_consumer`), with task events flushed on a timer."""

    #: When the pending flush was asked for (None: none is pending).
    _flush_asked: float | None = None

    def on_send_event_buffered(self) -> None:
        if self.hub is None:
            super().on_send_event_buffered()
            return
        now = time.monotonic()
        # A flush pending for much longer than asked was lost with its timer: ask again.
        if self._flush_asked is None or now - self._flush_asked > 10 * EVENT_FLUSH_INTERVAL:
            self._flush_asked = now
            self.hub.call_later(EVENT_FLUSH_INTERVAL, self._flush_batch)

    def _flush_batch(self) -> None:
        self._flush_asked = None
        self._flush_events()

    def shutdown(self) -> None:
        self._flush_events()  # what is still buffered goes out before the connection closes
        super().shutdown()
