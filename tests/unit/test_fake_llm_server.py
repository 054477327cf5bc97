"""The fake LLM server, checked over raw HTTP: framing, shapes, errors and test controls."""

from __future__ import annotations

import http.client as http_client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.llm_server import (
    OLLAMA_BUSY,
    FakeLLMServer,
    fake_answer,
    fake_chunks,
    fake_completion_tokens,
    fake_prompt_tokens,
)

MODEL = "fake-model:1b"
REPO = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name three colours"}]
ANSWER = fake_answer(MODEL, MESSAGES)
# No proxy from the environment may stand between a test and its local server.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http(url: str, body: object = None, raw: bytes | None = None) -> tuple[int, str, bytes]:
    """One request; returns (status, content type, body). POSTs when given a body."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _opener.open(request, timeout=5) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def http_quietly(url: str, body: object) -> None:
    """A request whose connection may be dropped (by stop()), in a thread."""
    try:
        http(url, body)
    except (OSError, http_client.HTTPException):
        pass


def ndjson(data: bytes) -> list[dict[str, Any]]:
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode().splitlines()]


def sse(data: bytes) -> list[str]:
    """The data fields of a server-sent event stream, checking its framing."""
    text = data.decode()
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events)
    return [event[len("data: ") :] for event in events]


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(models=(MODEL, "llama3")) as fake:
        yield fake


def wait_for(condition: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never came true"
        time.sleep(0.01)


# -- the deterministic answers


def test_fake_answer_is_a_pure_function_of_its_input() -> None:
    assert fake_answer("m", [{"role": "user", "content": "abc def"}]) == "fake:m: fed cba"
    assert fake_answer("m", MESSAGES) == fake_answer("m", [dict(m) for m in MESSAGES])
    assert fake_answer("m", MESSAGES) != fake_answer("n", MESSAGES)
    assert fake_prompt_tokens(MESSAGES) == 5
    assert fake_completion_tokens("fake:m: fed cba") == 3
    assert "".join(fake_chunks(ANSWER)) == ANSWER and len(fake_chunks(ANSWER)) == 4


# -- Ollama


def test_ollama_version_and_root(server: FakeLLMServer) -> None:
    assert json.loads(http(server.url + "/api/version")[2]) == {"version": "0.13.5"}
    assert http(server.url + "/")[2] == b"Ollama is running"


def test_ollama_tags(server: FakeLLMServer) -> None:
    status, content_type, data = http(server.url + "/api/tags")
    assert (status, content_type.split(";")[0]) == (200, "application/json")
    models = json.loads(data)["models"]
    assert [m["name"] for m in models] == [MODEL, "llama3:latest"]
    assert set(models[0]) == {"name", "model", "modified_at", "size", "digest", "details"}
    assert set(models[0]["details"]) >= {"format", "family", "parameter_size", "quantization_level"}


def test_ollama_chat_streams_ndjson_by_default(server: FakeLLMServer) -> None:
    status, content_type, data = http(server.url + "/api/chat", {"model": MODEL, "messages": MESSAGES})
    assert (status, content_type) == (200, "application/x-ndjson")
    lines = ndjson(data)
    assert len(lines) == len(fake_chunks(ANSWER)) + 1
    assert all(not line["done"] and line["model"] == MODEL for line in lines[:-1])
    assert "".join(line["message"]["content"] for line in lines) == ANSWER
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["prompt_eval_count"] == fake_prompt_tokens(MESSAGES)
    assert final["eval_count"] == fake_completion_tokens(ANSWER)
    assert {"total_duration", "load_duration", "prompt_eval_duration", "eval_duration", "created_at"} <= set(final)


def test_ollama_chat_without_streaming(server: FakeLLMServer) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": False, "options": {"temperature": 0, "num_ctx": 512}}
    status, _, data = http(server.url + "/api/chat", body)
    answer = json.loads(data)
    assert status == 200
    assert answer["message"] == {"role": "assistant", "content": ANSWER}
    assert answer["done"] is True and answer["eval_count"] == fake_completion_tokens(ANSWER)
    assert server.requests[-1] == ("POST", "/api/chat", body)


def test_ollama_generate(server: FakeLLMServer) -> None:
    url = server.url + "/api/generate"
    expected = fake_answer("llama3", [{"role": "user", "content": "a b c"}])
    assert json.loads(http(url, {"model": "llama3", "prompt": "a b c", "stream": False})[2])["response"] == expected
    lines = ndjson(http(url, {"model": "llama3", "prompt": "a b c"})[2])
    assert "".join(line["response"] for line in lines) == expected
    assert lines[-1]["done"] and isinstance(lines[-1]["context"], list)


def test_ollama_unknown_model(server: FakeLLMServer) -> None:
    status, _, data = http(server.url + "/api/chat", {"model": "nope", "messages": MESSAGES})
    assert status == 404
    assert json.loads(data) == {"error": 'model "nope" not found, try pulling it first'}


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b'{"model": "fake-model:1b"}',
        b'{"model": "fake-model:1b", "messages": "hi"}',
        b'{"model": "fake-model:1b", "messages": [{"role": "robot", "content": "hi"}]}',
        b'{"model": "fake-model:1b", "messages": [{"role": "user", "content": ["hi"]}]}',
        b'{"model": "fake-model:1b", "messages": [], "options": {"num_ctx": "big"}}',
        b'{"messages": []}',
    ],
)
def test_ollama_malformed_requests(server: FakeLLMServer, raw: bytes) -> None:
    status, _, data = http(server.url + "/api/chat", raw=raw)
    assert status == 400
    assert isinstance(json.loads(data)["error"], str)


# -- OpenAI


def test_openai_models(server: FakeLLMServer) -> None:
    listing = json.loads(http(server.url + "/v1/models")[2])
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == [MODEL, "llama3"]
    assert set(listing["data"][0]) == {"id", "object", "created", "owned_by"}


def test_openai_chat(server: FakeLLMServer) -> None:
    status, _, data = http(server.url + "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES})
    completion = json.loads(data)
    assert status == 200 and completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == ANSWER
    assert completion["choices"][0]["finish_reason"] == "stop"
    prompt, answer = fake_prompt_tokens(MESSAGES), fake_completion_tokens(ANSWER)
    usage = {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}
    assert completion["usage"] == usage


@pytest.mark.parametrize("include_usage", [True, False])
def test_openai_chat_streams_sse(server: FakeLLMServer, include_usage: bool) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    status, content_type, data = http(server.url + "/v1/chat/completions", body)
    assert (status, content_type.split(";")[0]) == (200, "text/event-stream")
    events = sse(data)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    with_choices = [chunk for chunk in chunks if chunk["choices"]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices) == ANSWER
    assert with_choices[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
    usage = [chunk for chunk in chunks if chunk.get("usage")]
    if include_usage:
        assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0]["choices"] == []
        assert usage[0]["usage"]["completion_tokens"] == fake_completion_tokens(ANSWER)
    else:
        assert not usage


def test_openai_unknown_model(server: FakeLLMServer) -> None:
    status, _, data = http(server.url + "/v1/chat/completions", {"model": "gpt-9", "messages": MESSAGES})
    assert status == 404
    error = json.loads(data)["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert "gpt-9" in error["message"]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b'{"model": "fake-model:1b"}', "messages"),
        (b'{"model": "fake-model:1b", "messages": []}', "messages"),
        (b'{"model": "fake-model:1b", "messages": [{"role": "robot", "content": "x"}]}', "messages[0].role"),
        (
            b'{"model": "fake-model:1b", "messages": [{"role": "user", "content": "x"}], "temperature": 7}',
            "temperature",
        ),
        (
            b'{"model": "fake-model:1b", "messages": [{"role": "user", "content": "x"}], '
            b'"stream_options": {"include_usage": true}}',
            "stream_options",
        ),
    ],
)
def test_openai_malformed_requests(server: FakeLLMServer, raw: bytes, param: str | None) -> None:
    status, _, data = http(server.url + "/v1/chat/completions", raw=raw)
    assert status == 400
    error = json.loads(data)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_unknown_paths(server: FakeLLMServer) -> None:
    assert http(server.url + "/api/nothing")[0] == 404
    status, _, data = http(server.url + "/v1/embeddings", {"model": MODEL})
    assert status == 404 and "error" in json.loads(data)


# -- controls


def test_fail_next(server: FakeLLMServer) -> None:
    server.fail_next(500, count=2)
    body = {"model": MODEL, "messages": MESSAGES, "stream": False}
    assert http(server.url + "/api/chat", body)[0] == 500
    status, _, data = http(server.url + "/v1/chat/completions", body)
    assert status == 500 and json.loads(data)["error"]["type"] == "server_error"
    assert http(server.url + "/api/chat", body)[0] == 200


def test_latency(server: FakeLLMServer) -> None:
    server.set_latency(0.3)
    started = time.monotonic()
    http(server.url + "/api/chat", {"model": MODEL, "messages": MESSAGES})
    assert 0.3 <= time.monotonic() - started < 1.3


def test_slots_answer_busy_and_bound_concurrency() -> None:
    with FakeLLMServer(models=(MODEL,), slots=2) as fake:
        fake.hang_next(2)
        body = {"model": MODEL, "messages": MESSAGES, "stream": False}
        hung = [threading.Thread(target=http_quietly, args=(fake.url + "/api/chat", body)) for _ in range(2)]
        for thread in hung:
            thread.start()
        wait_for(lambda: fake.in_flight == 2)
        status, _, data = http(fake.url + "/api/chat", body)
        assert (status, json.loads(data)) == (503, {"error": OLLAMA_BUSY})
        status, _, data = http(fake.url + "/v1/chat/completions", body)
        assert status == 503 and json.loads(data)["error"]["message"]
        started = time.monotonic()
        fake.stop()  # releases the hanging calls
        for thread in hung:
            thread.join(5)
        assert time.monotonic() - started < 2
        assert fake.peak_concurrency == 2


def test_peak_concurrency_counts_calls_in_flight(server: FakeLLMServer) -> None:
    server.set_latency(0.3)
    body = {"model": MODEL, "messages": MESSAGES, "stream": False}
    threads = [threading.Thread(target=http, args=(server.url + "/api/chat", body)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert server.peak_concurrency == 3 and server.in_flight == 0


def test_a_call_right_after_an_answer_is_never_busy() -> None:
    with FakeLLMServer(models=(MODEL,), slots=1) as fake:
        for stream in (False, True, False, True) * 5:
            body = {"model": MODEL, "messages": MESSAGES, "stream": stream}
            assert http(fake.url + "/api/chat", body)[0] == 200
            assert http(fake.url + "/v1/chat/completions", body)[0] == 200


def test_requests_are_recorded(server: FakeLLMServer) -> None:
    http(server.url + "/api/tags")
    http(server.url + "/api/chat", raw=b"{oops")
    assert server.requests == [("GET", "/api/tags", None), ("POST", "/api/chat", None)]


def test_stop_refuses_new_connections() -> None:
    fake = FakeLLMServer().start()
    url = fake.url
    fake.stop()
    fake.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        http(url + "/api/version")


def test_restart_keeps_the_port() -> None:
    with FakeLLMServer() as fake:
        url = fake.url
        fake.stop()
        fake.start()
        assert fake.url == url
        assert http(url + "/api/version")[0] == 200


def test_runs_as_a_process() -> None:
    command = [sys.executable, "-m", "tests.fakes.llm_server", "--port", "0", "--models", "a,b:7b", "--slots", "2"]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("listening on http://127.0.0.1:")
            url = line.removeprefix("listening on ")
            models = json.loads(http(url + "/api/tags")[2])["models"]
            assert [m["name"] for m in models] == ["a:latest", "b:7b"]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=5) == 0
        finally:
            if process.poll() is None:
                process.kill()
