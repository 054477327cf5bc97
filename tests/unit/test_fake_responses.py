"""The fake LLM server's Responses API (what Codex speaks) and Ollama's /api/create."""

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.llm_server import EXEC_TOOL, FakeLLMServer, fake_answer, fake_tool_answer, fake_tool_command

MODEL = "coder:1b"


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(models=(MODEL,)) as fake:
        yield fake


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def call(server: FakeLLMServer, **body: Any) -> tuple[int, list[dict[str, Any]] | dict[str, Any]]:
    full = {"model": MODEL, "stream": True, "input": [user("hello world")], "tools": [], **body}
    response = httpx.post(f"{server.url}/v1/responses", json=full, timeout=10)
    if not response.headers["content-type"].startswith("text/event-stream"):
        return response.status_code, response.json()
    events = []
    for block in response.text.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            data = json.loads(lines["data"])
            assert data["type"] == lines["event"]
            events.append(data)
    return response.status_code, events


def test_a_message_answer_streams_its_text_and_usage(server: FakeLLMServer) -> None:
    status, events = call(server)
    assert status == 200 and isinstance(events, list)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds[1] == "response.output_item.added" and kinds[-2] == "response.output_item.done"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == fake_answer(MODEL, [{"role": "user", "content": "hello world"}])
    assert events[-2]["item"]["content"][0]["text"] == text
    usage = events[-1]["response"]["usage"]
    assert usage["input_tokens"] == 2 and usage["output_tokens"] == len(text.split())
    assert [e["sequence_number"] for e in events] == list(range(1, len(events) + 1))


def test_a_run_mark_asks_for_the_exec_tool_then_answers_with_its_output(server: FakeLLMServer) -> None:
    prompt = "Do it.\nRUN: echo hi\necho there"
    assert fake_tool_command(prompt) == "echo hi\necho there"
    _, events = call(server, input=[user(prompt)])
    assert isinstance(events, list)
    item = events[-2]["item"]
    assert item["type"] == "function_call" and item["name"] == EXEC_TOOL
    assert json.loads(item["arguments"])["cmd"] == "echo hi\necho there"
    output = {"type": "function_call_output", "call_id": item["call_id"], "output": "Output:\nhi\nthere\n"}
    _, events = call(server, input=[user(prompt), item, output])
    assert isinstance(events, list)
    assert events[-2]["item"]["content"][0]["text"] == fake_tool_answer(MODEL, "hi\nthere") == f"fake:{MODEL}: ran it: there"


@pytest.mark.parametrize(
    "change",
    [{"model": ""}, {"input": []}, {"input": "hello"}, {"stream": False}, {"tools": "x"},
     {"input": [{"type": "message", "role": "robot", "content": []}]}, {"input": [{"type": "function_call_output"}]}],
)  # fmt: skip
def test_malformed_calls_are_refused(server: FakeLLMServer, change: dict[str, Any]) -> None:
    status, body = call(server, **change)
    assert status == 400 and isinstance(body, dict) and body["error"]["type"] == "invalid_request_error"


def test_unknown_model_failures_and_the_context_limit(server: FakeLLMServer) -> None:
    assert call(server, model="nope")[0] == 404
    server.fail_next(503)
    assert call(server)[0] == 503
    server.set_context_limit(1)
    status, body = call(server)
    assert status == 400 and isinstance(body, dict)
    assert body["error"]["type"] == "exceed_context_size_error" and body["error"]["n_ctx"] == 1
    assert body["error"]["n_prompt_tokens"] == 2
    assert len(server.responses_requests()) == 3


def test_api_create_makes_a_listed_variant(server: FakeLLMServer) -> None:
    body = {"model": "coder:1b-big", "from": MODEL, "parameters": {"num_ctx": 8192}, "stream": False}
    response = httpx.post(f"{server.url}/api/create", json=body, timeout=10)
    assert response.status_code == 200 and response.json() == {"status": "success"}
    assert server.created_models == {"coder:1b-big": body}
    tags = httpx.get(f"{server.url}/api/tags", timeout=10).json()
    assert "coder:1b-big" in {m["name"] for m in tags["models"]}
    missing = httpx.post(f"{server.url}/api/create", json={**body, "from": "nope:1b"}, timeout=10)
    assert missing.status_code == 404
