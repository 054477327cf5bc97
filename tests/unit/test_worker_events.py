"""The worker's task events leave in batches on a short timer (koubou.worker_events)."""

from __future__ import annotations

from typing import Any

from koubou.worker_events import EVENT_FLUSH_INTERVAL, BatchingConsumer


class Hub:
    def __init__(self) -> None:
        self.later: list[tuple[float, Any]] = []

    def call_later(self, delay: float, callback: Any) -> None:
        self.later.append((delay, callback))

    def run_timers(self) -> None:
        due, self.later = self.later, []
        for _, callback in due:
            callback()


class Dispatcher:
    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def consumer() -> tuple[BatchingConsumer, Hub, Dispatcher]:
    made = object.__new__(BatchingConsumer)  # only the parts under test, not a whole worker
    hub, dispatcher = Hub(), Dispatcher()
    made.hub, made.event_dispatcher = hub, dispatcher  # type: ignore[assignment]
    return made, hub, dispatcher


def test_the_events_of_a_moment_leave_in_one_flush() -> None:
    made, hub, dispatcher = consumer()
    for _ in range(3):  # received, started, succeeded of a fast task
        made.on_send_event_buffered()
    assert [delay for delay, _ in hub.later] == [EVENT_FLUSH_INTERVAL] and dispatcher.flushes == 0
    hub.run_timers()
    assert dispatcher.flushes == 1
    made.on_send_event_buffered()  # the next event asks for the next flush
    assert len(hub.later) == 1


def test_a_flush_whose_timer_was_lost_is_asked_for_again() -> None:
    made, hub, _ = consumer()
    made.on_send_event_buffered()
    hub.later.clear()  # the timer went away (a reconnect, say)
    made._flush_asked -= 60  # type: ignore[operator]
    made.on_send_event_buffered()
    assert len(hub.later) == 1
