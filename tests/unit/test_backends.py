"""One contract suite for every backend, run over the fake LLM server's real wire protocols."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from koubou.backends.base import (
    Backend,
    BackendBusy,
    BackendRejected,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    ChatRequest,
    ModelNotFound,
    PerProcess,
)
from koubou.backends.ollama import OllamaBackend
from koubou.backends.openai import OpenAIBackend
from tests.fakes.llm_server import FakeLLMServer, fake_answer, fake_completion_tokens, fake_prompt_tokens

MODEL = "fake-model:1b"
CHAT_PATHS = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}

Factory = Callable[[str], Backend]


def make_ollama(url: str) -> Backend:
    return OllamaBackend(url)


def make_openai(url: str) -> Backend:
    return OpenAIBackend(url + "/v1")


@pytest.fixture(params=[make_ollama, make_openai], ids=["ollama", "openai"])
def make_backend(request: pytest.FixtureRequest) -> Factory:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(models=(MODEL, "other:7b")) as fake:
        yield fake


@pytest.fixture
def backend(server: FakeLLMServer, make_backend: Factory) -> Backend:
    return make_backend(server.url)


def ask(text: str = "hello there world", **fields: Any) -> ChatRequest:
    messages = (ChatMessage("system", "answer briefly"), ChatMessage("user", text))
    return ChatRequest(model=fields.pop("model", MODEL), messages=messages, **fields)


def wire(request: ChatRequest) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in request.messages]


def last_chat_body(server: FakeLLMServer, backend: Backend) -> dict[str, Any]:
    bodies = [body for method, path, body in server.requests if path == CHAT_PATHS[backend.kind]]
    assert bodies, f"no request reached {CHAT_PATHS[backend.kind]}"
    return bodies[-1]  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_default_names() -> None:
    assert OllamaBackend("http://127.0.0.1:11434").name == "ollama@127.0.0.1:11434"
    assert OpenAIBackend("http://gpu-box:8080/v1/").name == "openai@gpu-box:8080"
    assert OpenAIBackend("http://gpu-box:8080/v1", name="big").name == "big"
    assert (OllamaBackend("http://h:1").kind, OpenAIBackend("http://h:1").kind) == ("ollama", "openai")


def test_list_models(backend: Backend) -> None:
    assert sorted(backend.list_models()) == [MODEL, "other:7b"]


def test_chat(backend: Backend, server: FakeLLMServer) -> None:
    request = ask()
    result = backend.chat(request)
    answer = fake_answer(MODEL, wire(request))
    assert result.output == answer
    assert result.model == MODEL
    assert result.prompt_tokens == fake_prompt_tokens(wire(request))
    assert result.completion_tokens == fake_completion_tokens(answer)
    assert result.duration_ms > 0
    assert (result.extra.get("done_reason") or result.extra.get("finish_reason")) == "stop"
    assert last_chat_body(server, backend)["messages"] == wire(request)


def test_answers_differ_per_prompt(backend: Backend) -> None:
    outputs = {backend.chat(ask(f"task number {i}")).output for i in range(3)}
    assert len(outputs) == 3


def test_chat_streaming(backend: Backend, server: FakeLLMServer) -> None:
    request = ask("one two three four five six")
    deltas: list[str] = []
    result = backend.chat(request, on_delta=deltas.append)
    assert len(deltas) > 3
    assert "".join(deltas) == result.output == fake_answer(MODEL, wire(request))
    assert result.prompt_tokens == fake_prompt_tokens(wire(request))
    assert result.completion_tokens == fake_completion_tokens(result.output)
    body = last_chat_body(server, backend)
    assert body["stream"] is True
    if backend.kind == "openai":
        assert body["stream_options"] == {"include_usage": True}


def test_non_streaming_is_not_streamed(backend: Backend, server: FakeLLMServer) -> None:
    backend.chat(ask())
    assert not last_chat_body(server, backend).get("stream")


def test_options_are_sent(backend: Backend, server: FakeLLMServer) -> None:
    backend.chat(ask(temperature=0.25, num_ctx=8192, max_tokens=64))
    body = last_chat_body(server, backend)
    if backend.kind == "ollama":
        assert body["options"] == {"temperature": 0.25, "num_ctx": 8192, "num_predict": 64}
    else:
        assert body["temperature"] == 0.25 and body["max_tokens"] == 64


def test_unset_options_are_not_sent(backend: Backend, server: FakeLLMServer) -> None:
    backend.chat(ask())
    body = last_chat_body(server, backend)
    assert "options" not in body and "temperature" not in body and "max_tokens" not in body


def test_missing_usage_gives_none_tokens(make_backend: Factory) -> None:
    with FakeLLMServer(models=(MODEL,), usage=False) as fake:
        backend = make_backend(fake.url)
        for on_delta in (None, lambda _: None):
            result = backend.chat(ask(), on_delta=on_delta)
            assert result.output == fake_answer(MODEL, wire(ask()))
            assert (result.prompt_tokens, result.completion_tokens) == (None, None)


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_unknown_model(backend: Backend, server: FakeLLMServer, streaming: bool) -> None:
    with pytest.raises(ModelNotFound) as caught:
        backend.chat(ask(model="missing:70b"), on_delta=(lambda _: None) if streaming else None)
    assert "missing:70b" in str(caught.value)
    assert server.url in str(caught.value)
    assert not caught.value.transient


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_unreachable(make_backend: Factory, streaming: bool) -> None:
    backend = make_backend(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackendUnavailable, match="cannot reach .*127.0.0.1") as caught:
        backend.chat(ask(timeout=5), on_delta=(lambda _: None) if streaming else None)
    assert "refused" in str(caught.value).lower()
    with pytest.raises(BackendUnavailable):
        backend.list_models()


def test_server_stopped_after_use(backend: Backend, server: FakeLLMServer) -> None:
    backend.chat(ask())
    server.stop()
    with pytest.raises(BackendUnavailable):
        backend.chat(ask(timeout=5))
    with pytest.raises(BackendUnavailable):
        backend.list_models()


@pytest.mark.parametrize("status", [503, 429])
def test_busy(backend: Backend, server: FakeLLMServer, status: int) -> None:
    server.fail_next(status)
    with pytest.raises(BackendBusy, match=str(status)) as caught:
        backend.chat(ask())
    assert caught.value.transient
    assert backend.chat(ask()).output  # the next call goes through


def test_busy_when_all_slots_are_taken(make_backend: Factory) -> None:
    with FakeLLMServer(models=(MODEL,), slots=1) as fake:
        backend = make_backend(fake.url)
        fake.hang_next()
        errors: list[Exception] = []

        def occupy() -> None:
            try:
                backend.chat(ask(timeout=5))
            except Exception as exc:
                errors.append(exc)

        occupant = threading.Thread(target=occupy)
        occupant.start()
        deadline = time.monotonic() + 5
        while fake.in_flight < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(BackendBusy, match="busy"):
            backend.chat(ask())
        fake.stop()  # releases the hanging call
        occupant.join(5)
    assert not occupant.is_alive()
    assert fake.peak_concurrency == 1
    assert len(errors) == 1 and isinstance(errors[0], BackendUnavailable)


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_server_error(backend: Backend, server: FakeLLMServer, streaming: bool) -> None:
    server.fail_next(500)
    with pytest.raises(BackendServerError, match="500") as caught:
        backend.chat(ask(), on_delta=(lambda _: None) if streaming else None)
    assert caught.value.transient


@pytest.mark.parametrize("status", [400, 401, 422])
def test_rejected(backend: Backend, server: FakeLLMServer, status: int) -> None:
    server.fail_next(status)
    with pytest.raises(BackendRejected, match=str(status)) as caught:
        backend.chat(ask())
    assert not caught.value.transient
    assert "fake failure" in str(caught.value)  # the server's own words reach the user


def test_error_messages_are_readable(backend: Backend, server: FakeLLMServer) -> None:
    server.fail_next(503)
    with pytest.raises(BackendBusy) as caught:
        backend.chat(ask())
    message = str(caught.value)
    assert server.url in message and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_slow_first_answer_times_out(backend: Backend, server: FakeLLMServer, streaming: bool) -> None:
    server.set_latency(5.0)
    started = time.monotonic()
    with pytest.raises(BackendTimeout, match="timed out after 0.3s"):
        backend.chat(ask("a b", timeout=0.3), on_delta=(lambda _: None) if streaming else None)
    assert time.monotonic() - started < 1.3


def test_slow_trickle_hits_the_total_deadline(backend: Backend, server: FakeLLMServer) -> None:
    # Each piece arrives well within the read timeout; only the total deadline can stop it.
    words = " ".join(f"w{i}" for i in range(40))
    server.set_latency(2.0)
    deltas: list[str] = []
    started = time.monotonic()
    with pytest.raises(BackendTimeout):
        backend.chat(ask(words, timeout=0.4), on_delta=deltas.append)
    assert time.monotonic() - started < 1.4
    assert deltas  # it did stream before giving up


def test_hanging_server_times_out(backend: Backend, server: FakeLLMServer) -> None:
    server.hang_next()
    started = time.monotonic()
    with pytest.raises(BackendTimeout) as caught:
        backend.chat(ask(timeout=0.3))
    assert time.monotonic() - started < 1.3
    assert caught.value.transient


def test_on_delta_errors_propagate_unchanged(backend: Backend) -> None:
    class Cancelled(Exception):
        pass

    def cancel(_: str) -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        backend.chat(ask(), on_delta=cancel)


def test_concurrent_calls(backend: Backend, server: FakeLLMServer) -> None:
    server.set_latency(0.2)
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = backend.chat(ask(f"job {i}")).output

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert results == {i: fake_answer(MODEL, wire(ask(f"job {i}"))) for i in range(4)}
    assert server.peak_concurrency > 1


def test_calls_reuse_one_kept_alive_connection_with_their_own_time_limits(server: FakeLLMServer, backend: Backend) -> None:
    backend.list_models(timeout=5)
    backend.chat(ask(timeout=30))
    backend.chat(ask(timeout=30), on_delta=lambda _: None)
    assert server.connections_accepted == 1  # a remote server would see one TLS handshake, not three
    server.set_latency(2)
    began = time.monotonic()
    with pytest.raises(BackendTimeout):
        backend.chat(ask(timeout=0.5))  # the shared client still applies this call's limit
    assert time.monotonic() - began < 1.8


def test_a_forked_child_never_shares_its_parents_client() -> None:
    made = PerProcess(object)
    parent = made.get()
    assert made.get() is parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a worker's pool process
        os.write(write, b"own" if made.get() is not parent else b"shared")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"own"
