"""Retries, fallback, permanent errors, deadlines and cancel, against real clients and the fake server."""

import threading
import time
from collections.abc import Iterator

import fakeredis
import redis
import pytest

from koubou.backends.ollama import OllamaBackend
from koubou.backends.openai import OpenAIBackend
from koubou.delegation import Delegation, RetryPolicy
from koubou.jobs import DelegationFailed, DelegationJob
from koubou.routing import Router
from koubou.slots import SlotLeases, released_key
from koubou.streaming import TokenPublisher, stream_key
from tests.fakes.llm_server import FakeLLMServer, fake_answer
from tests.harness import free_port

MODEL = "shared-model:1b"
FAST = RetryPolicy(max_retries=2, window=10.0, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def first() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(models=(MODEL, "only-first:1b")) as server:
        yield server


@pytest.fixture
def second() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(models=(MODEL,)) as server:
        yield server


def job(prompt: str = "hello", model: str = MODEL, timeout: float = 10.0) -> DelegationJob:
    return DelegationJob(task_id="t", prompt=prompt, model=model, timeout=timeout)


def failure(run: Delegation) -> dict:
    with pytest.raises(DelegationFailed) as caught:
        run.run()
    return caught.value.outcome


def chats(server: FakeLLMServer) -> int:
    return len(server.chat_requests())


def test_transient_errors_are_retried_then_succeed(first: FakeLLMServer) -> None:
    first.fail_next(503, count=2)
    outcome = Delegation(job(), Router([OllamaBackend(first.url)]), FAST).run()
    assert outcome.success and outcome.output == fake_answer(MODEL, [{"role": "user", "content": "hello"}])
    assert [(a["ok"], a["error_type"]) for a in outcome.attempts] == [
        (False, "BackendBusy"), (False, "BackendBusy"), (True, None)
    ]  # fmt: skip
    assert chats(first) == 3


@pytest.mark.parametrize("status", [400, 422])
def test_permanent_errors_fail_after_exactly_one_call(first: FakeLLMServer, second: FakeLLMServer, status: int) -> None:
    first.fail_next(status)
    router = Router([OllamaBackend(first.url), OpenAIBackend(f"{second.url}/v1")])
    outcome = failure(Delegation(job(), router, FAST))
    assert outcome["error_type"] == "BackendRejected"
    assert chats(first) == 1 and chats(second) == 0


def test_a_missing_model_fails_without_retrying(first: FakeLLMServer) -> None:
    outcome = failure(Delegation(job(model="nope:1b"), Router([OllamaBackend(first.url)]), FAST))
    assert outcome["error_type"] == "ModelNotFound" and chats(first) == 0
    assert len(outcome["attempts"]) == 1


def test_after_retries_it_falls_back_to_another_backend_serving_the_model(
    first: FakeLLMServer, second: FakeLLMServer
) -> None:
    first.fail_next(500, count=100)
    router = Router([OllamaBackend(first.url), OpenAIBackend(f"{second.url}/v1")])
    outcome = Delegation(job(), router, FAST).run()
    assert outcome.success and outcome.backend and outcome.backend.startswith("openai@")
    assert chats(first) == 1 + FAST.max_retries and chats(second) == 1
    assert [a["error_type"] for a in outcome.attempts[:-1]] == ["BackendServerError"] * 3


def test_unreachable_everywhere_fails_within_the_retry_bounds() -> None:
    router = Router([OllamaBackend(f"http://127.0.0.1:{free_port()}")])
    began = time.monotonic()
    outcome = failure(Delegation(job(), router, FAST))
    assert outcome["error_type"] == "BackendUnavailable"
    assert len(outcome["attempts"]) == 1 + FAST.max_retries
    assert time.monotonic() - began < 5


def test_the_deadline_bounds_a_slow_backend(first: FakeLLMServer) -> None:
    first.set_latency(5)
    began = time.monotonic()
    outcome = failure(Delegation(job(timeout=1.0), Router([OllamaBackend(first.url)]), FAST))
    assert "timed out" in outcome["error"]
    assert time.monotonic() - began < 3


def test_cancel_stops_a_streaming_call(first: FakeLLMServer) -> None:
    first.set_latency(4)  # spread across the streamed pieces
    flag = threading.Event()
    threading.Timer(0.5, flag.set).start()
    began = time.monotonic()
    outcome = failure(Delegation(job(prompt="a b c d e f g h"), Router([OllamaBackend(first.url)]), FAST,
                                 is_cancelled=flag.is_set))  # fmt: skip
    assert outcome["error_type"] == "Cancelled"
    assert time.monotonic() - began < 3


def test_a_task_cancelled_before_it_starts_never_calls_a_backend(first: FakeLLMServer) -> None:
    outcome = failure(Delegation(job(), Router([OllamaBackend(first.url)]), FAST, is_cancelled=lambda: True))
    assert outcome["error_type"] == "Cancelled" and chats(first) == 0


def test_the_lease_script_sees_a_cancel_flag_and_takes_no_slot(first: FakeLLMServer) -> None:
    client = fakeredis.FakeRedis()
    leases, backend = SlotLeases(client), OllamaBackend(first.url)
    client.set("cancel:t", 1)
    asked: list[bool] = []
    run = Delegation(job(), Router([backend], {backend.name: 1}), FAST, leases=leases, cancel_flag="cancel:t",
                     is_cancelled=lambda: asked.append(True) or False)  # fmt: skip
    assert failure(run)["error_type"] == "Cancelled"
    assert chats(first) == 0 and leases.in_use(backend.name) == 0
    assert not asked  # the flag was read by the lease script, not by a separate look


def test_a_cancel_while_waiting_for_a_slot_is_seen_by_the_next_lease_attempt(first: FakeLLMServer) -> None:
    client = fakeredis.FakeRedis()
    leases, backend = SlotLeases(client), OllamaBackend(first.url)
    assert leases.acquire(backend.name, 1, 60)  # another worker's call holds the only slot
    threading.Timer(0.3, client.set, args=("cancel:t", 1)).start()
    began = time.monotonic()
    run = Delegation(job(), Router([backend], {backend.name: 1}), FAST, leases=leases, cancel_flag="cancel:t")
    assert failure(run)["error_type"] == "Cancelled"
    assert time.monotonic() - began < 2 and chats(first) == 0


def test_the_last_live_output_goes_with_the_lease_release_in_one_pipeline(first: FakeLLMServer) -> None:
    client = fakeredis.FakeRedis()
    publisher = TokenPublisher(client, "t", clock=lambda: 0.0)  # never flushes on time: all left for the end
    leases, backend = SlotLeases(client), OllamaBackend(first.url)
    sent: list[list[str]] = []

    def on_release(pipe) -> None:  # type: ignore[no-untyped-def]
        publisher.flush_into(pipe)
        sent.append([command[0][0] for command in pipe.command_stack])

    asked: list[bool] = []
    outcome = Delegation(job(prompt="a b c"), Router([backend], {backend.name: 1}), FAST, leases=leases,
                         on_text=publisher, on_release=on_release, cancel_flag="cancel:t",
                         is_cancelled=lambda: asked.append(True) or False).run()  # fmt: skip
    assert outcome.success and leases.in_use(backend.name) == 0
    assert not asked  # a short call needs no look at the flag beyond the lease script's
    assert sent == [["EVAL", "EVAL"]]  # the release and the flush, one command each, one round trip
    assert client.llen(released_key(backend.name)) == 1  # the release left a wake-up for a waiting worker
    streamed = "".join(fields[b"text"].decode() for _, fields in client.xrange(stream_key("t")))
    assert streamed == outcome.output


def test_a_successful_calls_lease_goes_back_with_the_result_and_a_failed_ones_at_once(first: FakeLLMServer) -> None:
    client = fakeredis.FakeRedis()
    leases, backend = SlotLeases(client), OllamaBackend(first.url)
    riders: list = []
    first.fail_next(503)  # the first attempt fails: its lease must be free before the retry
    outcome = Delegation(job(), Router([backend], {backend.name: 1}), FAST, leases=leases,
                         release_with_result=riders.append).run()  # fmt: skip
    assert outcome.success and len(outcome.attempts or []) == 2  # with one slot, the retry got the lease again
    assert leases.in_use(backend.name) == 1 and len(riders) == 1  # held until the result is stored
    pipe = client.pipeline()
    riders[0](pipe)
    pipe.execute()
    assert leases.in_use(backend.name) == 0


def test_it_waits_for_a_free_slot_held_elsewhere(first: FakeLLMServer) -> None:
    leases = SlotLeases(fakeredis.FakeRedis())
    backend = OllamaBackend(first.url)
    held = leases.acquire(backend.name, 1, 60)  # another worker's call
    assert held
    threading.Timer(0.5, leases.release, args=(backend.name, held)).start()
    began = time.monotonic()
    outcome = Delegation(job(), Router([backend], {backend.name: 1}), FAST, leases=leases).run()
    assert outcome.success and time.monotonic() - began >= 0.45
    assert leases.in_use(backend.name) == 0  # given back after the call


def test_no_free_slot_before_the_deadline_fails_saying_so(first: FakeLLMServer) -> None:
    leases = SlotLeases(fakeredis.FakeRedis())
    backend = OllamaBackend(first.url)
    assert leases.acquire(backend.name, 1, 60)
    outcome = failure(Delegation(job(timeout=1.0), Router([backend], {backend.name: 1}), FAST, leases=leases))
    assert "free slot" in outcome["error"] and chats(first) == 0


def test_the_least_busy_backend_serving_the_model_is_chosen(first: FakeLLMServer, second: FakeLLMServer) -> None:
    leases = SlotLeases(fakeredis.FakeRedis())
    one, two = OllamaBackend(first.url), OpenAIBackend(f"{second.url}/v1")
    assert leases.acquire(one.name, 4, 60)  # the first backend is busier
    outcome = Delegation(job(), Router([one, two], {one.name: 4, two.name: 4}), FAST, leases=leases).run()
    assert outcome.backend == two.name


def test_a_lease_is_given_back_even_through_a_broker_hiccup(first: FakeLLMServer) -> None:
    class Hiccup(SlotLeases):
        failures = 2

        def release(self, backend: str, lease: str, also: object = None) -> None:
            if self.failures:
                self.failures -= 1
                raise redis.ConnectionError("broker restarting")
            super().release(backend, lease, also)  # type: ignore[arg-type]

    leases = Hiccup(fakeredis.FakeRedis())
    backend = OllamaBackend(first.url)
    assert Delegation(job(), Router([backend], {backend.name: 1}), FAST, leases=leases, sleep=lambda _: None).run().success
    assert leases.in_use(backend.name) == 0


def test_a_backend_failing_every_retry_fails_with_its_own_error(first: FakeLLMServer) -> None:
    first.fail_next(500, count=100)
    outcome = failure(Delegation(job(), Router([OllamaBackend(first.url)]), FAST))
    assert outcome["error_type"] == "BackendServerError" and "500" in outcome["error"]
    assert chats(first) == 1 + FAST.max_retries
