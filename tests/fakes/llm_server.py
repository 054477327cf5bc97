"""A fake LLM server speaking the real Ollama and OpenAI HTTP APIs, for tests.

Answers are a pure function of the request (`fake_answer`), so a test can tell every
call's answer apart. It also speaks OpenAI's Responses API (`POST /v1/responses`, server-sent
events), which the Codex CLI uses, with a deterministic tool protocol (`fake_tool_command`). Run it alone with
`python -m tests.fakes.llm_server --port N --models a,b --latency 0.1 [--slots K]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

OLLAMA_VERSION = "0.13.5"
OLLAMA_BUSY = "server busy, please try again.  maximum pending requests exceeded"
OLLAMA_ROLES = frozenset({"system", "user", "assistant", "tool"})
#: Ollama's context window (num_ctx) when neither the request nor the server sets one.
OLLAMA_DEFAULT_NUM_CTX = 4096
OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})

#: (message, param, code) of an OpenAI-style 400, or a plain message for Ollama.
Problem = tuple[str, str | None, str | None]
RecordedRequest = tuple[str, str, Any]


def content_text(content: object) -> str:
    """The text of a message's content: a string, or OpenAI's list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def fake_answer(model: str, messages: Sequence[Mapping[str, Any]]) -> str:
    """The fake's answer: `fake:<model>: ` and the last user message's text reversed."""
    last = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), "")
    return f"fake:{model}: {content_text(last)[::-1]}"


def fake_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """The prompt tokens the fake reports: whitespace-separated words over all messages."""
    return sum(len(content_text(m.get("content")).split()) for m in messages)


def fake_completion_tokens(answer: str) -> int:
    """The completion tokens the fake reports for an answer: its whitespace-separated words."""
    return len(answer.split())


def fake_chunks(text: str) -> list[str]:
    """The pieces the fake streams an answer in: one word and its trailing whitespace each."""
    return [piece for piece in re.findall(r"\S*\s*", text) if piece]


#: In a Responses prompt, everything after this mark is a shell command the fake has Codex run.
TOOL_MARK = "RUN:"
#: The tool Codex 0.169 offers for commands (its `apply_patch` is run through it as a heredoc).
EXEC_TOOL = "exec_command"


def fake_tool_command(prompt: str) -> str | None:
    """The command the fake's first Responses answer asks Codex to run: the prompt after `RUN:`."""
    if TOOL_MARK not in prompt:
        return None
    return prompt.split(TOOL_MARK, 1)[1].strip() or None


def fake_tool_answer(model: str, tool_output: str) -> str:
    """The fake's answer once a tool ran: `fake:<model>: ran it: ` and the output's last line."""
    lines = [line.strip() for line in tool_output.splitlines() if line.strip()]
    return f"fake:{model}: ran it: {lines[-1] if lines else '(no output)'}"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ollama_name(name: str) -> str:
    # Ollama resolves a name without a tag to its ":latest" tag.
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _check_ollama(kind: str, body: object) -> str | None:
    """Why an /api/chat or /api/generate body is malformed, or None."""
    if not isinstance(body, dict):
        return "invalid request body: expected a JSON object"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model is required"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "json: cannot unmarshal into field stream of type bool"
    options = body.get("options")
    if options is not None:
        if not isinstance(options, dict):
            return "json: cannot unmarshal into field options of type map[string]interface {}"
        if "temperature" in options and not _is_number(options["temperature"]):
            return "invalid option: temperature must be a number"
        if "num_ctx" in options and (not isinstance(options["num_ctx"], int) or options["num_ctx"] < 1):
            return "invalid option: num_ctx must be a positive integer"
    if kind == "generate":
        for key in ("prompt", "system"):
            if key in body and not isinstance(body[key], str):
                return f"json: cannot unmarshal into field {key} of type string"
        return None
    messages = body.get("messages")
    if not isinstance(messages, list):
        return "messages is required and must be a list of {role, content} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages[{i}] must be an object"
        if message.get("role") not in OLLAMA_ROLES:
            return f"messages[{i}].role must be one of {sorted(OLLAMA_ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"messages[{i}].content must be a string"
    return None


def _check_openai(body: object) -> Problem | None:
    """Why a /v1/chat/completions body is malformed, as OpenAI would word it, or None."""
    if not isinstance(body, dict):
        return ("We could not parse the JSON body of your request. The OpenAI API expects a JSON object.", None, None)
    if not isinstance(body.get("model"), str) or not body["model"]:
        return ("you must provide a model parameter", None, None)
    if "messages" not in body:
        return ("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    messages = body["messages"]
    if not isinstance(messages, list):
        return ("Invalid type for 'messages': expected an array.", "messages", "invalid_type")
    if not messages:
        return ("Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages", "empty_array")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return (f"Invalid type for 'messages[{i}]': expected an object.", f"messages[{i}]", "invalid_type")
        if message.get("role") not in OPENAI_ROLES:
            return (f"Invalid value for 'messages[{i}].role'.", f"messages[{i}].role", "invalid_value")
        content = message.get("content")
        parts_ok = isinstance(content, list) and all(isinstance(p, dict) and "type" in p for p in content)
        if not (isinstance(content, str) or parts_ok or (content is None and message["role"] == "assistant")):
            return (f"Invalid type for 'messages[{i}].content'.", f"messages[{i}].content", "invalid_type")
    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        return ("Invalid 'temperature': expected a number between 0 and 2.", "temperature", "invalid_value")
    if "stream" in body and not isinstance(body["stream"], (bool, type(None))):
        return ("Invalid type for 'stream': expected a boolean.", "stream", "invalid_type")
    if body.get("stream_options") is not None:
        if not isinstance(body["stream_options"], dict):
            return ("Invalid type for 'stream_options': expected an object.", "stream_options", "invalid_type")
        if not body.get("stream"):
            return ("The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options", None)
    return None


def _openai_error(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Aborted(Exception):
    """The server is stopping: drop the connection without an answer."""


class FakeLLMServer:
    """An Ollama- and OpenAI-compatible HTTP server with deterministic answers and test controls."""

    #: Ollama side: like Ollama with the `truncate` field, a request with `truncate: false` whose prompt is over
    #: num_ctx gets HTTP 400 naming the sizes. False (the default): like older servers, which ignore
    #: the field, cut the prompt to num_ctx tokens, report `prompt_eval_count` = num_ctx and answer.
    honours_truncate: bool = False
    #: OpenAI side: the context size of a llama.cpp server; a prompt over it gets llama.cpp's HTTP 400
    #: `exceed_context_size_error`. None: no limit.
    openai_n_ctx: int | None = None

    def __init__(
        self,
        models: Iterable[str] = ("fake-model:1b",),
        latency: float = 0.0,
        slots: int | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        usage: bool = True,
    ) -> None:
        self.models = tuple(models)
        #: Whether answers report token counts; False mimics servers that send none.
        self.usage = usage
        self.slots = slots
        self.host = host
        self.port = port
        self._latency = latency
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._in_flight = 0
        self._peak = 0
        self._failures: list[int] = []
        self._hangs = 0
        self._served = 0
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._accepted = 0
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> FakeLLMServer:
        """Bind (port 0 picks a free port; a restart reuses the port) and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer((self.host, self.port), _Handler)
        httpd.fake = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, name=f"fake-llm-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release hanging calls and drop every open connection."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            # Like a killed process: clients with pooled keep-alive connections see them die.
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:PORT (OpenAI clients append /v1)."""
        return f"http://{self.host}:{self.port}"

    # -- observation

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received: (method, path, parsed JSON body or None)."""
        with self._lock:
            return list(self._requests)

    @property
    def peak_concurrency(self) -> int:
        """The most chat/generate calls that were in flight at once."""
        with self._lock:
            return self._peak

    @property
    def connections_accepted(self) -> int:
        """TCP connections clients opened so far (a client keeping its connection alive opens one)."""
        with self._lock:
            return self._accepted

    @property
    def in_flight(self) -> int:
        """Chat/generate calls being answered right now."""
        with self._lock:
            return self._in_flight

    def chat_requests(self) -> list[RecordedRequest]:
        """The recorded chat/generate calls only."""
        return [r for r in self.requests if r[0] == "POST" and r[1] in _CHAT_PATHS]

    # -- control

    @property
    def latency(self) -> float:
        with self._lock:
            return self._latency

    def set_latency(self, seconds: float) -> None:
        """Seconds each later chat call waits before answering (spread over stream pieces)."""
        with self._lock:
            self._latency = seconds

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next `count` chat calls with HTTP `status` and an error body."""
        with self._lock:
            self._failures.extend([status] * count)

    def hang_next(self, count: int = 1) -> None:
        """Accept the next `count` chat calls but never answer them until stop()."""
        with self._lock:
            self._hangs += count

    # Responses API and /api/create state (class defaults; each is replaced, never mutated).
    _context_limit: int | None = None
    _created: dict[str, dict[str, Any]] = {}

    def responses_requests(self) -> list[RecordedRequest]:
        """The recorded Responses API calls only (what Codex sent)."""
        return [r for r in self.requests if r[0] == "POST" and r[1] in _RESPONSES_PATHS]

    def set_context_limit(self, tokens: int | None) -> None:
        """Refuse Responses calls whose prompt has more tokens, as llama.cpp's server does (HTTP 400)."""
        with self._lock:
            self._context_limit = tokens

    @property
    def created_models(self) -> dict[str, dict[str, Any]]:
        """Models made with Ollama's /api/create: name -> the request's body."""
        with self._lock:
            return dict(self._created)

    def _create_model(self, name: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._created = {**self._created, name: body}
            if name not in self.models:
                self.models = (*self.models, name)

    # -- used by the handler

    def _track(self, conn: socket.socket, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._connections.add(conn)
                self._accepted += 1
            else:
                self._connections.discard(conn)

    def _record(self, method: str, path: str, body: Any) -> None:
        with self._lock:
            self._requests.append((method, path, body))

    def _take_failure(self) -> int | None:
        with self._lock:
            return self._failures.pop(0) if self._failures else None

    def _take_hang(self) -> bool:
        with self._lock:
            if self._hangs:
                self._hangs -= 1
                return True
            return False

    def _acquire(self) -> bool:
        with self._lock:
            if self.slots is not None and self._in_flight >= self.slots:
                return False
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
            self._served += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _calls_served(self) -> int:
        with self._lock:
            return self._served

    def _has_model(self, api: str, name: str) -> bool:
        if api == "openai":
            return name in self.models
        return _ollama_name(name) in {_ollama_name(m) for m in self.models}


_CHAT_PATHS = frozenset({"/api/chat", "/api/generate", "/v1/chat/completions", "/chat/completions"})
_RESPONSES_PATHS = frozenset({"/v1/responses", "/responses"})


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128
    fake: FakeLLMServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts) and stop() dropping connections are expected.
        if self.fake._stopping.is_set() or isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeLLM/1.0"
    # Headers and body go out in separate writes; with Nagle on, the client's delayed ACK holds the
    # second one back (~40 ms), which would swamp the overheads the benchmarks measure.
    disable_nagle_algorithm = True
    server: _HTTPServer
    _holding_slot = False

    def setup(self) -> None:
        super().setup()
        self.server.fake._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- plumbing

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        path = self.path.split("?", 1)[0]
        raw = self._read_body() if method == "POST" else b""
        body: Any = None
        parse_error: str | None = None
        if method == "POST":
            if not raw.strip():
                parse_error = "missing request body"
            else:
                try:
                    body = json.loads(raw)
                except ValueError as exc:
                    parse_error = f"invalid JSON: {exc}"
        fake._record(method, path, body)
        try:
            self._route(method, path, body, parse_error)
        except _Aborted:
            self.close_connection = True
        except (ConnectionError, TimeoutError):
            # The client gave up (e.g. its timeout) while we were answering.
            self.close_connection = True

    def _route(self, method: str, path: str, body: Any, parse_error: str | None) -> None:
        fake = self.server.fake
        if (method, path) == ("GET", "/"):
            self._send(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif (method, path) == ("GET", "/api/version"):
            self._json(200, {"version": OLLAMA_VERSION})
        elif (method, path) == ("GET", "/api/tags"):
            self._json(200, {"models": [_ollama_model(m) for m in fake.models]})
        elif method == "POST" and path in ("/api/chat", "/api/generate"):
            self._chat("ollama", path.rsplit("/", 1)[1], body, parse_error)
        elif method == "GET" and path in ("/v1/models", "/models"):
            created = 1_700_000_000
            data = [{"id": m, "object": "model", "created": created, "owned_by": "koubou-fake"} for m in fake.models]
            self._json(200, {"object": "list", "data": data})
        elif method == "POST" and path in ("/v1/chat/completions", "/chat/completions"):
            self._chat("openai", "chat", body, parse_error)
        elif method == "POST" and path in _RESPONSES_PATHS:
            self._responses(body, parse_error)
        elif (method, path) == ("POST", "/api/create"):
            self._create(body, parse_error)
        elif path.startswith("/v1/"):
            self._json(404, _openai_error(f"Invalid URL ({method} {path})", "invalid_request_error"))
        else:
            self._send(404, b"404 page not found", "text/plain")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                data += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, obj: object) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def _start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _write_chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _sleep(self, seconds: float) -> None:
        if seconds > 0 and self.server.fake._stopping.wait(seconds):
            raise _Aborted

    def _error(self, api: str, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        if api == "ollama":
            self._json(status, {"error": message})
        else:
            type_ = "server_error" if status >= 500 else "invalid_request_error"
            self._json(status, _openai_error(message, type_, param, code))

    # -- chat calls

    def _chat(self, api: str, kind: str, body: Any, parse_error: str | None) -> None:
        fake = self.server.fake
        status = fake._take_failure()
        if status is not None:
            self._error(api, status, f"fake failure: HTTP {status}")
            return
        if api == "ollama":
            problem = parse_error or _check_ollama(kind, body)
            if problem:
                self._error(api, 400, problem)
                return
        else:
            found = (parse_error, None, None) if parse_error else _check_openai(body)
            if found:
                self._error(api, 400, *found)
                return
        model = body["model"]
        if not fake._has_model(api, model):
            if api == "ollama":
                self._error(api, 404, f'model "{model}" not found, try pulling it first')
            else:
                message = f"The model `{model}` does not exist or you do not have access to it."
                self._error(api, 404, message, "model", "model_not_found")
            return
        if api == "ollama":
            self._in_a_slot(api, lambda: self._ollama_answer(kind, body, model, fake.latency))
        else:
            self._in_a_slot(api, lambda: self._openai_answer(body, model, fake.latency))

    def _in_a_slot(self, api: str, answer: Callable[[], None]) -> None:
        """Answer while holding one of the fake's slots; 503 (in the API's own words) when none is free."""
        fake = self.server.fake
        if not fake._acquire():
            if api == "ollama":
                self._error(api, 503, OLLAMA_BUSY)
            else:
                self._error(api, 503, f"server busy: all {fake.slots} slots are in use", None, "server_busy")
            return
        self._holding_slot = True
        try:
            if fake._take_hang():
                fake._stopping.wait()
                raise _Aborted
            answer()
        finally:
            self._free_slot()

    def _free_slot(self) -> None:
        # Called before an answer's last bytes: once a client has its answer, the call
        # no longer counts, so a next call made right away never sees a stale 503.
        if self._holding_slot:
            self._holding_slot = False
            self.server.fake._release()

    def _ollama_answer(self, kind: str, body: dict[str, Any], model: str, latency: float) -> None:
        started = time.monotonic_ns()
        if kind == "chat":
            messages = body["messages"]
        else:
            system = [{"role": "system", "content": body["system"]}] if body.get("system") else []
            messages = [*system, {"role": "user", "content": body.get("prompt", "")}]
        answer = fake_answer(model, messages)
        prompt_tokens, completion_tokens = fake_prompt_tokens(messages), fake_completion_tokens(answer)
        num_ctx = (body.get("options") or {}).get("num_ctx") or OLLAMA_DEFAULT_NUM_CTX
        if prompt_tokens > num_ctx:
            if body.get("truncate") is False and self.server.fake.honours_truncate:
                self._error("ollama", 400, json.dumps(_llama_cpp_overflow(prompt_tokens, num_ctx)))
                return
            prompt_tokens = num_ctx  # what Ollama's runner keeps and reports; it answers anyway

        def piece(text: str) -> dict[str, Any]:
            head = {"model": model, "created_at": _now()}
            if kind == "chat":
                return {**head, "message": {"role": "assistant", "content": text}}
            return {**head, "response": text}

        def final(text: str) -> dict[str, Any]:
            done: dict[str, Any] = {**piece(text), "done": True, "done_reason": "stop"}
            if kind == "generate":
                done["context"] = list(range(1, prompt_tokens + completion_tokens + 1))
            done["total_duration"] = time.monotonic_ns() - started + 1_000_000
            done["load_duration"] = 1_000_000
            # Ollama's Go structs use omitempty: a zero count is left out, not sent as 0.
            if prompt_tokens and self.server.fake.usage:
                done["prompt_eval_count"] = prompt_tokens
                done["prompt_eval_duration"] = prompt_tokens * 100_000
            if completion_tokens and self.server.fake.usage:
                done["eval_count"] = completion_tokens
                done["eval_duration"] = completion_tokens * 1_000_000
            return done

        if body.get("stream") is False:
            self._sleep(latency)
            self._free_slot()
            self._json(200, final(answer))
            return
        pieces = fake_chunks(answer)
        delay = latency / max(1, len(pieces))
        streaming = False
        for text in pieces:
            self._sleep(delay)
            if not streaming:
                self._start_stream("application/x-ndjson")
                streaming = True
            self._write_chunk(json.dumps({**piece(text), "done": False}) + "\n")
        if not streaming:
            self._sleep(latency)
            self._start_stream("application/x-ndjson")
        self._free_slot()
        self._write_chunk(json.dumps(final("")) + "\n")
        self._end_stream()

    def _openai_answer(self, body: dict[str, Any], model: str, latency: float) -> None:
        messages = body["messages"]
        answer = fake_answer(model, messages)
        prompt_tokens, completion_tokens = fake_prompt_tokens(messages), fake_completion_tokens(answer)
        n_ctx = self.server.fake.openai_n_ctx
        if n_ctx is not None and prompt_tokens > n_ctx:
            self._json(400, _llama_cpp_overflow(prompt_tokens, n_ctx))
            return
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        head = {
            "id": f"chatcmpl-fake{self.server.fake._calls_served()}",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
        }
        if not body.get("stream"):
            self._sleep(latency)
            message = {"role": "assistant", "content": answer, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
            answer_body = {**head, "object": "chat.completion", "choices": [choice]}
            if self.server.fake.usage:
                answer_body["usage"] = usage
            self._free_slot()
            self._json(200, answer_body)
            return

        options = body.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) and self.server.fake.usage

        def event(delta: dict[str, Any], finish: str | None = None) -> str:
            chunk: dict[str, Any] = {**head, "object": "chat.completion.chunk"}
            chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            if include_usage:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk)}\n\n"

        pieces = fake_chunks(answer)
        delay = latency / max(1, len(pieces))
        self._sleep(delay)
        self._start_stream("text/event-stream; charset=utf-8")
        self._write_chunk(event({"role": "assistant", "content": "", "refusal": None}))
        for i, text in enumerate(pieces):
            if i:
                self._sleep(delay)
            self._write_chunk(event({"content": text}))
        self._free_slot()
        self._write_chunk(event({}, "stop"))
        if include_usage:
            chunk = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            self._write_chunk(f"data: {json.dumps(chunk)}\n\n")
        self._write_chunk("data: [DONE]\n\n")
        self._end_stream()

    # -- the Responses API (Codex) and Ollama's /api/create

    def _responses(self, body: Any, parse_error: str | None) -> None:
        fake = self.server.fake
        status = fake._take_failure()
        if status is not None:
            self._error("openai", status, f"fake failure: HTTP {status}")
            return
        problem = parse_error or _check_responses(body)
        if problem:
            self._error("openai", 400, problem, None, "invalid_value")
            return
        model = body["model"]
        if not (fake._has_model("openai", model) or fake._has_model("ollama", model)):
            self._error("openai", 404, f"The model `{model}` does not exist.", "model", "model_not_found")
            return
        items = body["input"]
        prompt_tokens = len(_responses_text(body).split())
        limit = fake._context_limit
        if limit is not None and prompt_tokens > limit:
            # llama.cpp's server: HTTP 400 with the sizes in the error object.
            error = {"code": 400, "message": "the request exceeds the available context size, try increasing it",
                     "type": "exceed_context_size_error", "n_prompt_tokens": prompt_tokens, "n_ctx": limit}  # fmt: skip
            self._json(400, {"error": error})
            return
        self._in_a_slot("openai", lambda: self._responses_answer(model, items, prompt_tokens, fake.latency))

    def _responses_answer(self, model: str, items: list[Any], prompt_tokens: int, latency: float) -> None:
        fake = self.server.fake
        outputs = [str(i.get("output", "")) for i in items if i.get("type") == "function_call_output"]
        prompt = next((_item_text(i) for i in reversed(items) if i.get("role") == "user"), "")
        command = None if outputs else fake_tool_command(prompt)
        served = fake._calls_served()
        response_id = f"resp_fake{served}"
        sequence = iter(range(1, 1_000_000))

        def send(kind: str, **fields: Any) -> None:
            data = {"type": kind, "sequence_number": next(sequence), **fields}
            self._write_chunk(f"event: {kind}\ndata: {json.dumps(data)}\n\n")

        self._sleep(latency / 2)
        self._start_stream("text/event-stream; charset=utf-8")
        head = {"id": response_id, "object": "response", "created_at": int(time.time()), "model": model}
        send("response.created", response={**head, "status": "in_progress", "output": []})
        if command is not None:
            arguments = json.dumps({"cmd": command, "yield_time_ms": 30000})
            item = {"type": "function_call", "id": f"fc_fake{served}", "call_id": f"call_fake{served}",
                    "name": EXEC_TOOL, "arguments": arguments, "status": "completed"}  # fmt: skip
            send("response.output_item.added", output_index=0, item={**item, "status": "in_progress"})
            send("response.output_item.done", output_index=0, item=item)
            answer = arguments
        else:
            answer = fake_tool_answer(model, outputs[-1]) if outputs else fake_answer(model, [{"role": "user", "content": prompt}])
            item_id = f"msg_fake{served}"
            message = {"type": "message", "id": item_id, "role": "assistant", "status": "in_progress", "content": []}
            send("response.output_item.added", output_index=0, item=message)
            pieces = fake_chunks(answer)
            for text in pieces:
                self._sleep(latency / 2 / max(1, len(pieces)))
                send("response.output_text.delta", item_id=item_id, output_index=0, content_index=0, delta=text)
            part = {"type": "output_text", "text": answer, "annotations": []}
            send("response.output_item.done", output_index=0, item={**message, "status": "completed", "content": [part]})
        self._free_slot()
        completion_tokens = fake_completion_tokens(answer)
        usage = {"input_tokens": prompt_tokens, "output_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens,
                 "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}  # fmt: skip
        done = {**head, "status": "completed"}
        if fake.usage:
            done["usage"] = usage
        send("response.completed", response=done)
        self._end_stream()

    def _create(self, body: Any, parse_error: str | None) -> None:
        """Ollama's /api/create from an existing model (`from`) with `parameters`: a new name for it."""
        fake = self.server.fake
        if parse_error or not isinstance(body, dict):
            self._error("ollama", 400, parse_error or "invalid request body")
            return
        name, source = body.get("model"), body.get("from")
        if not isinstance(name, str) or not name or not isinstance(source, str):
            self._error("ollama", 400, "model and from are required")
            return
        if not fake._has_model("ollama", source):
            self._error("ollama", 404, f"model '{source}' not found")
            return
        if not isinstance(body.get("parameters", {}), dict):
            self._error("ollama", 400, "parameters must be an object")
            return
        fake._create_model(_ollama_name(name), body)
        self._json(200, {"status": "success"})


def _item_text(item: Mapping[str, Any]) -> str:
    """The text of a Responses input item: a string, or its input_text/output_text parts."""
    content = item.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _responses_text(body: Mapping[str, Any]) -> str:
    """Everything a Responses call asks the model to read: instructions, messages, tool calls and outputs."""
    parts = [str(body.get("instructions") or "")]
    for item in body["input"]:
        parts.append(_item_text(item))
        parts.append(str(item.get("arguments", "")) + str(item.get("output", "")))
    return " ".join(parts)


def _check_responses(body: object) -> str | None:
    """Why a /v1/responses body is malformed (as Codex 0.169 sends it: streamed, input items, tools), or None."""
    if not isinstance(body, dict):
        return "We could not parse the JSON body of your request."
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "Missing required parameter: 'model'."
    items = body.get("input")
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        return "Invalid 'input': expected a non-empty array of items."
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") not in OPENAI_ROLES:
            return f"Invalid value for 'input[{i}].role'."
        if kind in ("function_call", "function_call_output") and not isinstance(item.get("call_id"), str):
            return f"Missing required parameter: 'input[{i}].call_id'."
    if body.get("stream") is not True:
        return "This fake answers streamed Responses calls only ('stream': true)."
    tools = body.get("tools", [])
    if not isinstance(tools, list) or not all(isinstance(t, dict) and "type" in t for t in tools):
        return "Invalid 'tools': expected an array of tool objects."
    return None


def _llama_cpp_overflow(prompt_tokens: int, n_ctx: int) -> dict[str, Any]:
    """llama.cpp server's answer to a prompt over its context (Ollama passes it on as its error text)."""
    message = f"request ({prompt_tokens} tokens) exceeds the available context size ({n_ctx} tokens), try increasing it"
    error = {"code": 400, "message": message, "type": "exceed_context_size_error", "n_prompt_tokens": prompt_tokens, "n_ctx": n_ctx}
    return {"error": error}


def _ollama_model(name: str) -> dict[str, Any]:
    digest = hashlib.sha256(name.encode()).hexdigest()
    family = re.split(r"[^a-z]", name.lower(), maxsplit=1)[0] or "llama"
    return {
        "name": _ollama_name(name),
        "model": _ollama_name(name),
        "modified_at": "2025-01-07T10:14:32.123456789+01:00",
        "size": 1_000_000 + int(digest[:6], 16),
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": "1.2B",
            "quantization_level": "Q4_K_M",
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.llm_server", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--models", default="fake-model:1b", help="comma-separated model names")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--slots", type=int, default=None, help="concurrent chat calls before HTTP 503")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with FakeLLMServer(models, latency=args.latency, slots=args.slots, host=args.host, port=args.port) as server:
        print(f"listening on {server.url}", flush=True)
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
