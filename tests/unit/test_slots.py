import threading
import time
from concurrent.futures import ThreadPoolExecutor

import fakeredis

from koubou.slots import LEASE_MARGIN, SlotLeases


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_no_more_leases_than_slots_and_release_frees_one() -> None:
    leases = SlotLeases(fakeredis.FakeRedis())
    first, second = leases.acquire("ollama@a", 2, 60), leases.acquire("ollama@a", 2, 60)
    assert first and second and first != second
    assert leases.acquire("ollama@a", 2, 60) is None
    assert leases.in_use("ollama@a") == 2 and leases.in_use("openai@b") == 0
    leases.release("ollama@a", first)
    assert leases.acquire("ollama@a", 2, 60) is not None


def test_a_dead_workers_lease_expires() -> None:
    clock = Clock()
    leases = SlotLeases(fakeredis.FakeRedis(), clock=clock)
    assert leases.acquire("b", 1, hold_for=10)  # its worker dies holding it
    assert leases.acquire("b", 1, hold_for=10) is None
    clock.now += 10 + LEASE_MARGIN + 1
    assert leases.acquire("b", 1, hold_for=10) is not None


def test_concurrent_acquirers_never_exceed_the_slots() -> None:
    server = fakeredis.FakeServer()
    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(lambda _: SlotLeases(fakeredis.FakeRedis(server=server)).acquire("b", 3, 60), range(64)))
    assert sum(lease is not None for lease in got) == 3


def test_the_leases_of_a_dead_task_can_be_freed_at_once() -> None:
    leases = SlotLeases(fakeredis.FakeRedis())
    assert leases.acquire("a", 2, 60, holder="task_dead")
    assert leases.acquire("b", 2, 60, holder="task_dead")
    assert leases.acquire("a", 2, 60, holder="task_alive")
    assert leases.release_held_by(["task_dead"]) == 2
    assert (leases.in_use("a"), leases.in_use("b")) == (1, 0)


def test_a_short_task_never_shortens_the_lease_set_of_a_long_one() -> None:
    client = fakeredis.FakeRedis()
    leases = SlotLeases(client)
    assert leases.acquire("b", 2, hold_for=600)
    ttl_long = client.ttl("koubou:slots:b")
    assert leases.acquire("b", 2, hold_for=10)
    assert client.ttl("koubou:slots:b") >= ttl_long - 1  # the 600 s lease keeps its set alive


def test_a_worker_waiting_for_a_slot_wakes_when_a_lease_is_given_back() -> None:
    server = fakeredis.FakeServer()
    holder, waiter = SlotLeases(fakeredis.FakeRedis(server=server)), SlotLeases(fakeredis.FakeRedis(server=server))
    held = holder.acquire("b", 1, 60)
    assert held and waiter.acquire("b", 1, 60) is None
    threading.Timer(0.3, holder.release, args=("b", held)).start()
    began = time.monotonic()
    waiter.wait_for_release(["a", "b"], timeout=10)
    assert 0.25 <= time.monotonic() - began < 2  # woken by the release, not by the timeout
    assert waiter.acquire("b", 1, 60) is not None


def test_wake_up_tokens_nobody_took_stay_few() -> None:
    client = fakeredis.FakeRedis()
    leases = SlotLeases(client)
    for _ in range(50):
        leases.release("b", leases.acquire("b", 1, 60) or "")
    assert client.llen("koubou:slots-released:b") == 8 and client.ttl("koubou:slots-released:b") > 0
