"""koubou's autoscaler: the decision, what it counts as idle, the prefetch it keeps, the broker look."""

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
from celery.worker import state
from kombu.common import QoS

from koubou import autoscale
from koubou.autoscale import SlotAwareAutoscaler, plan, slot_capacity
from koubou.config import load_settings
from tests.harness import free_port


def decide(processes: int, held: int, waiting: int = 0, idle: int | None = None, **overrides: Any) -> int:
    asked: list[str] = []

    def count_waiting() -> int:
        asked.append("waiting")
        return waiting

    def count_idle() -> int:
        asked.append("idle")
        return processes - held if idle is None else idle

    options = {"low": 1, "high": 6, "capacity": 2, "quiet_for": 0.0, "keepalive": 30.0, **overrides}
    change = plan(processes, held, waiting=count_waiting, idle=count_idle, **options)
    decide.asked = asked  # type: ignore[attr-defined]
    return change


def test_grows_under_backlog_but_not_past_the_backend_slots() -> None:
    assert decide(1, held=1, waiting=9) == 1  # to 2, the slots; MAX (6) is never reached
    assert decide(2, held=2, waiting=9) == 0
    assert decide(1, held=1, waiting=9, capacity=None) == 5  # unlimited backends: up to MAX
    assert decide(1, held=1, waiting=1, capacity=8) == 1  # only what the backlog needs
    assert decide(2, held=2, waiting=9, capacity=4, high=3) == 1  # MAX bounds too


def test_no_backlog_no_growth_and_the_broker_is_not_asked_while_a_process_is_free() -> None:
    assert decide(1, held=1, waiting=0) == 0
    assert decide(2, held=1, waiting=5) == 0
    assert decide.asked == []  # type: ignore[attr-defined]


def test_min_wins_over_the_slots() -> None:
    assert decide(3, held=0, low=3, capacity=2, quiet_for=60) == 0
    assert decide(2, held=0, low=3, capacity=2) == 1


def test_shrinks_only_after_keepalive_and_only_idle_processes() -> None:
    assert decide(2, held=0, quiet_for=10) == 0  # not quiet for long enough
    assert decide(2, held=0, quiet_for=31) == -1  # back to MIN
    assert decide(4, held=1, quiet_for=31, capacity=None) == -3
    assert decide(4, held=1, quiet_for=31, capacity=None, idle=1) == -1  # the rest are busy
    assert decide(2, held=1, quiet_for=31, idle=0) == 0  # a hand-over in flight: wait
    assert decide(1, held=0, quiet_for=99) == 0  # never below MIN


def test_slot_capacity_sums_the_backends_this_worker_uses(tmp_path: Path) -> None:
    assert slot_capacity(load_settings({"KOUBOU_HOME": str(tmp_path), "KOUBOU_OLLAMA_SLOTS": "3"})) == 3
    both = load_settings({"KOUBOU_HOME": str(tmp_path), "OLLAMA_NUM_PARALLEL": "2",
                          "OPENAI_API_BASE": "http://127.0.0.1:1/v1", "KOUBOU_OPENAI_SLOTS": "5"})  # fmt: skip
    assert slot_capacity(both) == 7
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "backends.yaml").write_text(
        "backends:\n  - {kind: ollama, url: 'http://a:1', slots: 4}\n  - {kind: openai, url: 'http://b:2/v1', slots: 1}\n"
    )
    assert slot_capacity(load_settings({"KOUBOU_HOME": str(tmp_path)})) == 5


# -- the autoscaler wired to a pool -----------------------------------------------------------


class Job:
    def __init__(self, pid: int | None, accepted: bool = True) -> None:
        self.pid, self._accepted = pid, accepted

    def accepted(self) -> bool:
        return self._accepted

    def worker_pids(self) -> list[int]:
        return [self.pid] if self.pid and self._accepted else []


class FakeBilliardPool:
    """What billiard's Pool exposes: its processes, its job cache and shrink's choice of victims."""

    def __init__(self, pids: list[int]) -> None:
        self._pool = [SimpleNamespace(pid=pid) for pid in pids]
        self._cache: dict[int, Job] = {}
        self.stopped: list[int] = []

    def shrink(self, n: int) -> None:
        busy = {pid for job in self._cache.values() for pid in job.worker_pids()}
        victims = [p for p in self._pool if p.pid not in busy][:n]
        if len(victims) < n:
            raise ValueError("Can't shrink pool. All processes busy!")
        for victim in victims:
            self._pool.remove(victim)
            self.stopped.append(victim.pid)


class FakeTaskPool:
    """Celery's TaskPool facade over the billiard pool."""

    def __init__(self, pids: list[int]) -> None:
        self._pool = FakeBilliardPool(pids)
        self.next_pid = max(pids) + 1

    @property
    def num_processes(self) -> int:
        return len(self._pool._pool)

    def grow(self, n: int) -> None:
        for _ in range(n):
            self._pool._pool.append(SimpleNamespace(pid=self.next_pid))
            self.next_pid += 1

    def shrink(self, n: int) -> None:
        self._pool.shrink(n)

    def maintain_pool(self) -> None:
        pass


def make_scaler(pids: list[int], waiting: int = 0, capacity: int | None = 2, qos_value: int = 6) -> SlotAwareAutoscaler:
    prefetch: list[int] = []
    qos = QoS(lambda prefetch_count: prefetch.append(prefetch_count), qos_value)
    consumer = SimpleNamespace(qos=qos, initial_prefetch_count=qos_value, prefetch_multiplier=1)
    worker = SimpleNamespace(use_eventloop=True, consumer=consumer)
    scaler = SlotAwareAutoscaler(FakeTaskPool(pids), 6, 1, worker=worker, keepalive=5.0,
                                 settings=load_settings({}), capacity=capacity, waiting=lambda: waiting)  # fmt: skip
    return scaler


class Request:
    """Stands for a celery Request in the worker state (kept there by weak reference)."""


@pytest.fixture
def held_tasks() -> Any:
    """Put fake requests in the worker state Celery's `qty` counts; clean them up after."""
    added: list[Any] = []

    def hold(count: int) -> None:
        for _ in range(count):
            request = Request()
            state.reserved_requests.add(request)
            added.append(request)

    yield hold
    for request in added:
        state.reserved_requests.discard(request)


def test_it_ticks_every_second_and_keeps_the_idle_delay_apart() -> None:
    scaler = make_scaler([100])
    assert scaler.keepalive == autoscale.TICK == 1.0 and scaler.idle_after == 5.0


def test_the_prefetch_follows_the_pool_not_max() -> None:
    scaler = make_scaler([100], qos_value=6)
    scaler.maybe_scale()
    assert scaler.worker.consumer.qos.value == 1 and scaler.worker.consumer.initial_prefetch_count == 1


def test_a_prefetch_celery_lowered_after_a_reconnection_is_left_to_celery(held_tasks: Any) -> None:
    scaler = make_scaler([100, 101], capacity=4, qos_value=1)  # 2 processes, prefetch lowered to 1
    held_tasks(1)
    scaler.maybe_scale()
    assert scaler.worker.consumer.qos.value == 1  # no change: Celery restores it as tasks finish
    held_tasks(1)
    scaler._waiting = lambda: 5
    scaler.maybe_scale()
    assert scaler.processes == 4 and scaler.worker.consumer.qos.value == 3  # raised by what grew


def test_backlog_grows_the_pool_to_the_slots_and_the_prefetch_with_it(held_tasks: Any) -> None:
    scaler = make_scaler([100], waiting=9)
    held_tasks(1)
    scaler.maybe_scale()
    assert scaler.processes == 2 and scaler.worker.consumer.qos.value == 2
    held_tasks(1)
    scaler.maybe_scale()
    assert scaler.processes == 2  # the slots (2), not MAX (6)
    assert scaler.info()["capacity"] == 2


def test_a_quiet_worker_stops_only_idle_processes(held_tasks: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    scaler = make_scaler([100, 101, 102], capacity=None)
    billiard = scaler.pool._pool
    billiard._cache = {1: Job(101)}  # 101 runs a task
    held_tasks(1)
    clock = [1000.0]
    monkeypatch.setattr(autoscale, "monotonic", lambda: clock[0])
    scaler._created = scaler._last_task_received = clock[0]
    scaler.maybe_scale()
    assert scaler.processes == 3  # not quiet for long enough yet
    clock[0] += 6
    scaler.maybe_scale()
    assert scaler.processes == 1 and billiard.stopped == [100, 102]
    assert [p.pid for p in billiard._pool] == [101]
    assert scaler.worker.consumer.qos.value == 1


def test_no_shrink_while_a_job_is_handed_over(held_tasks: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    scaler = make_scaler([100, 101], capacity=None)
    billiard = scaler.pool._pool
    # Written to a process that has not acknowledged it: billiard would take that process for an idle one.
    billiard._cache = {1: Job(None, accepted=False)}
    scaler._created = 1000.0
    monkeypatch.setattr(autoscale, "monotonic", lambda: 1060.0)  # quiet for a minute
    scaler.maybe_scale()
    assert scaler.processes == 2 and billiard.stopped == []
    billiard._cache = {1: Job(101)}  # acknowledged: now billiard knows which one is busy
    scaler.maybe_scale()
    assert billiard.stopped == [100] and [p.pid for p in billiard._pool] == [101]


def test_without_the_event_loop_it_never_shrinks(monkeypatch: pytest.MonkeyPatch) -> None:
    scaler = make_scaler([100, 101], capacity=None)
    scaler._created = 1000.0
    monkeypatch.setattr(autoscale, "monotonic", lambda: 1060.0)  # quiet for a minute
    scaler.worker.use_eventloop = False
    scaler.maybe_scale()
    assert scaler.processes == 2
    scaler.worker.use_eventloop = True
    scaler.maybe_scale()
    assert scaler.processes == 1


def test_waiting_counts_the_queues_this_worker_reads() -> None:
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    client.rpush("koubou.1-urgent.code", "a", "b")
    client.rpush("koubou.2-normal", "c")  # not read by this worker
    scaler = SlotAwareAutoscaler(FakeTaskPool([100]), 4, 1, settings=load_settings({}), capacity=None,
                                 worker=SimpleNamespace(app=SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(
                                     consume_from={"koubou.1-urgent.code": None, "koubou.3-low.code": None})))))  # fmt: skip
    scaler._redis = client
    assert scaler._waiting_in_broker() == 2


def test_a_broker_that_does_not_answer_costs_one_short_timeout_then_is_left_alone() -> None:
    port = free_port()  # nothing listens there
    settings = load_settings({"KOUBOU_BROKER_URL": f"redis://127.0.0.1:{port}/0"})
    worker = SimpleNamespace(app=SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from={"q": None}))))
    scaler = SlotAwareAutoscaler(FakeTaskPool([100]), 4, 1, settings=settings, capacity=None, worker=worker)
    assert scaler._waiting_in_broker() == 0
    assert scaler._broker_quiet_until > 0
    scaler._redis = None
    assert scaler._waiting_in_broker() == 0 and scaler._redis is None  # not asked again during the backoff
