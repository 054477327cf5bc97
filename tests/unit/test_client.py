"""koubou.client: the SSE parser on tricky input, and the client against a tiny local HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from koubou.client import (
    KoubouAPIError,
    KoubouClient,
    KoubouUnavailable,
    RawEvent,
    SSEParser,
    StreamEvent,
    parse_sse,
)
from koubou.config import get_settings
from tests.harness import free_port

# -- the SSE parser ----------------------------------------------------------------------------

TRICKY = (
    "\ufeff"  # a BOM is skipped
    ": a comment, then a retry\r\n"
    "retry: 1500\r\n"
    "retry: 15x\r\n"  # not all digits: ignored
    "event: status\r\n"
    'data: {"status": "pending"}\r\n'
    "\r\n"
    "id: 1-0\r"  # CR alone ends a line
    "event:delta\r"  # no space after the colon
    "data:  two spaces keep one\r"
    "data\r"  # a field with no colon: empty value
    "data: last line\r"
    "\r"
    "event: ignored-no-data\n"  # an event with no data is not dispatched, and its type resets
    "\n"
    "unknown: field\n"
    "data: after an id-less event the id persists\n"
    "\n"
    "id: bad\x00id\n"  # an id holding NUL is ignored
    "id\n"  # an empty id resets it
    "data: ümlaut – and € in UTF-8\n"
    "\n"
    "data: unfinished at the end of the stream is dropped\n"
)

EXPECTED = [
    RawEvent(event="status", data='{"status": "pending"}', id=None),
    RawEvent(event="delta", data=" two spaces keep one\n\nlast line", id="1-0"),
    RawEvent(event="message", data="after an id-less event the id persists", id="1-0"),
    RawEvent(event="message", data="ümlaut – and € in UTF-8", id=None),
]


def test_sse_parser_whole_stream() -> None:
    parser = SSEParser()
    assert parser.feed(TRICKY.encode()) == EXPECTED
    assert parser.retry_ms == 1500


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_sse_parser_gives_the_same_events_for_any_chunking(size: int) -> None:
    # Splits land inside CRLF pairs and inside multi-byte UTF-8 characters.
    raw = TRICKY.encode()
    assert list(parse_sse(raw[i : i + size] for i in range(0, len(raw), size))) == EXPECTED


def test_sse_parser_crlf_split_across_chunks_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the LF of the CRLF, not an empty line
    assert parser.feed(b"data: b\r") == []
    assert parser.feed(b"\r") == [RawEvent("message", "a\nb", None)]  # CR then CR: a blank line


def test_sse_parser_reports_comments_only_when_asked() -> None:
    assert list(parse_sse([b": ping\n\n"])) == []
    parser = SSEParser(comments=True)
    assert parser.feed(b": ping\n\n") == [RawEvent(event="", data="ping", id=None, comment=True)]


# -- a tiny API ----------------------------------------------------------------------------------

Route = Callable[[BaseHTTPRequestHandler, bytes], None]


class FakeAPI:
    """A stdlib HTTP server whose answers each test sets per (method, path)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Route] = {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                api.requests.append((self.command, self.path, dict(self.headers), body))
                route = api.routes.get((self.command, self.path.split("?")[0]))
                if route is None:
                    send_json(self, 404, {"error": "not found", "detail": "no such route"})
                else:
                    route(self, body)

            do_GET = do_POST = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)

    def client(self, **kwargs: Any) -> KoubouClient:
        return KoubouClient(self.url, token=kwargs.pop("token", ""), **kwargs)


def send_json(handler: BaseHTTPRequestHandler, status: int, body: Any, delay: float = 0.0) -> None:
    time.sleep(delay)
    payload = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def answer(status: int, body: Any, delay: float = 0.0) -> Route:
    return lambda handler, _: send_json(handler, status, body, delay)


@pytest.fixture
def api() -> Iterator[FakeAPI]:
    fake = FakeAPI()
    fake.thread.start()
    try:
        yield fake
    finally:
        fake.server.shutdown()
        fake.server.server_close()


def test_api_errors_carry_status_error_and_detail(api: FakeAPI) -> None:
    detail = [{"field": "priority", "message": "Input should be less than or equal to 10"}]
    api.routes["POST", "/task/delegate"] = answer(400, {"error": "invalid request", "detail": detail})
    with api.client() as client, pytest.raises(KoubouAPIError) as raised:
        client.delegate("hi", priority=11)
    assert (raised.value.status, raised.value.error, raised.value.detail) == (400, "invalid request", detail)
    assert "priority: Input should be less than or equal to 10" in str(raised.value)
    refused = {"path": "/etc/hosts", "reason": "resolves to /etc/hosts, outside the workspace roots"}
    api.routes["POST", "/task/delegate"] = answer(400, {"error": "file outside the workspace", "detail": refused})
    with api.client() as client, pytest.raises(KoubouAPIError) as raised:
        client.delegate("hi", files=["/etc/hosts"])
    assert raised.value.detail == refused
    assert str(raised.value) == "400 file outside the workspace: path=/etc/hosts, reason=resolves to /etc/hosts, outside the workspace roots"


def test_cancel_of_a_final_task_raises_409(api: FakeAPI) -> None:
    api.routes["DELETE", "/task/t1"] = answer(409, {"error": "task already final", "detail": {"task_id": "t1", "status": "completed"}})
    with api.client() as client, pytest.raises(KoubouAPIError) as raised:
        client.cancel("t1")
    assert raised.value.status == 409 and raised.value.detail["status"] == "completed"


def test_an_answer_that_is_not_json_is_still_an_api_error(api: FakeAPI) -> None:
    def html(handler: BaseHTTPRequestHandler, _: bytes) -> None:
        handler.send_response(502)
        handler.send_header("Content-Length", "18")
        handler.end_headers()
        handler.wfile.write(b"<h1>Bad gateway</h1>"[:18])

    api.routes["GET", "/workers"] = html
    with api.client() as client, pytest.raises(KoubouAPIError) as raised:
        client.workers()
    assert raised.value.status == 502 and raised.value.error == "bad gateway"


def test_health_returns_the_body_when_degraded(api: FakeAPI) -> None:
    api.routes["GET", "/health"] = answer(503, {"status": "degraded", "components": {}})
    with api.client() as client:
        assert client.health()["status"] == "degraded"


def test_unreachable_and_slow_apis_are_unavailable(api: FakeAPI) -> None:
    with KoubouClient(f"http://127.0.0.1:{free_port()}", token="") as client, pytest.raises(KoubouUnavailable):
        client.status("t1")
    api.routes["GET", "/task/t1/status"] = answer(200, {"status": "pending"}, delay=1.0)
    started = time.monotonic()
    with api.client(timeout=0.2) as client, pytest.raises(KoubouUnavailable, match="timed out"):
        client.status("t1")
    assert time.monotonic() - started < 0.9


def test_bearer_token_and_delegate_body(api: FakeAPI) -> None:
    api.routes["POST", "/task/delegate"] = answer(202, {"task_id": "t1", "status": "delegated", "result": None})
    with api.client(token="s3cret") as client:
        assert client.delegate("hi", model="m:1b", max_tokens=5, idempotency_key="k1")["task_id"] == "t1"
    with api.client() as client:
        client.delegate("again")
    (_, _, headers, body), (_, _, bare_headers, bare_body) = api.requests
    assert headers["Authorization"] == "Bearer s3cret" and headers["Idempotency-Key"] == "k1"
    assert json.loads(body) == {"type": "general", "prompt": "hi", "priority": 5, "sync": False, "options": {"model": "m:1b", "max_tokens": 5}}
    assert "Authorization" not in bare_headers and json.loads(bare_body)["options"] == {}


def test_a_sync_delegation_waits_past_the_client_timeout(api: FakeAPI) -> None:
    done = {"task_id": "t1", "status": "completed", "result": {"success": True, "output": "ok"}}
    api.routes["POST", "/task/delegate"] = answer(200, done, delay=0.6)
    with api.client(timeout=0.2) as client:
        assert client.delegate("hi", sync=True, timeout=1)["result"]["output"] == "ok"


def test_wait_polls_until_final_or_max_wait(api: FakeAPI) -> None:
    answers = iter(["pending", "in_progress", "completed"])
    api.routes["GET", "/task/t1/status"] = lambda h, _: send_json(h, 200, {"task_id": "t1", "status": next(answers)})
    seen: list[str] = []
    with api.client() as client:
        final = client.wait("t1", poll=0.01, on_progress=lambda s: seen.append(s["status"]))
        assert final["status"] == "completed" and seen == ["pending", "in_progress", "completed"]
        api.routes["GET", "/task/t2/status"] = answer(200, {"task_id": "t2", "status": "pending"})
        started = time.monotonic()
        assert client.wait("t2", max_wait=0.3, poll=0.05)["status"] == "pending"
        assert time.monotonic() - started < 1.0


def test_stream_parses_events_and_sends_last_event_id(api: FakeAPI) -> None:
    def stream(handler: BaseHTTPRequestHandler, _: bytes) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Connection", "close")
        handler.end_headers()
        for piece in (
            b'event: status\ndata: {"task_id": "t1", "status": "in_progress"}\n\n',
            b": ping\n\n",
            b'id: 5-0\nevent: delta\ndata: {"text": "Hel',  # one event split across writes
            b'lo"}\n\n',
            b'event: done\ndata: {"task_id": "t1", "status": "completed", "result": {"output": "Hello"}}\n\n',
        ):
            handler.wfile.write(piece)
            handler.wfile.flush()
            time.sleep(0.01)
        handler.close_connection = True

    api.routes["GET", "/task/t1/stream"] = stream
    with api.client() as client:
        events = list(client.stream("t1", last_event_id="4-0"))
        with_pings = [e.kind for e in client.stream("t1", keepalives=True)]
    assert events == [
        StreamEvent("status", None, {"task_id": "t1", "status": "in_progress"}),
        StreamEvent("delta", "5-0", {"text": "Hello"}),
        StreamEvent("done", "5-0", {"task_id": "t1", "status": "completed", "result": {"output": "Hello"}}),
    ]
    assert with_pings == ["status", "keepalive", "delta", "done"]
    assert api.requests[0][2]["Last-Event-ID"] == "4-0" and "Last-Event-ID" not in api.requests[1][2]


def test_stream_errors_are_api_errors(api: FakeAPI) -> None:
    api.routes["GET", "/task/nope/stream"] = answer(404, {"error": "task not found", "detail": "no task with id 'nope'"})
    with api.client() as client, pytest.raises(KoubouAPIError) as raised:
        list(client.stream("nope"))
    assert raised.value.status == 404 and raised.value.error == "task not found"


def test_url_and_token_default_to_the_settings(monkeypatch: pytest.MonkeyPatch, api: FakeAPI) -> None:
    api.routes["GET", "/workers"] = answer(200, {"workers": [{"worker_id": "w1"}]})
    monkeypatch.setenv("KOUBOU_API_URL", api.url.removeprefix("http://") + "/")
    monkeypatch.setenv("KOUBOU_API_TOKEN", "from-env")
    get_settings.cache_clear()
    try:
        with KoubouClient() as client:
            assert client.workers() == [{"worker_id": "w1"}]
    finally:
        get_settings.cache_clear()
    assert api.requests[0][2]["Authorization"] == "Bearer from-env"
