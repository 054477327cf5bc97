"""`koubou mcp` driven by real MCP clients: the `mcp` SDK's own client over stdio and streamable
HTTP, and Claude Code's CLI (`claude mcp add` + `claude mcp list`), against the shared real system."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult

from koubou.mcp import DEFAULT_MAX_WAIT, MAX_WAIT_CAP, _max_wait
from tests.claude_cli import claude_code, claude_env
from tests.fakes.llm_server import FakeLLMServer, fake_answer
from tests.harness import REPO, System, clean_env, free_port
from tests.integration.conftest import SLOW_MODEL
from tests.tools import ToolUnavailable

pytestmark = pytest.mark.timeout(120)

TOOLS = {"delegate", "wait", "status", "result", "cancel", "list_tasks", "list_backends"}
FAST_MODEL = "fake-model:1b"
TRANSPORTS = ("stdio", "http")


def expected_answer(prompt: str, model: str = FAST_MODEL) -> str:
    return fake_answer(model, [{"role": "user", "content": prompt}])


def unique_prompt(words: str) -> str:
    return f"{words} [{uuid.uuid4().hex[:8]}]"


# -- the server, over either transport ----------------------------------------------------------


class HttpServer:
    """`koubou mcp --http --port PORT` as a subprocess, stopped by its PID."""

    def __init__(self, api_url: str, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "koubou", "mcp", "--http", "--port", str(self.port)],
                cwd=REPO, env=clean_env(KOUBOU_API_URL=api_url),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 30) -> HttpServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"koubou mcp --http exited with {self.process.returncode}: {self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise AssertionError(f"koubou mcp --http did not listen on {self.port} within {timeout}s: {self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def mcp_http(system: System, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    server = HttpServer(system.api, tmp_path_factory.mktemp("mcp-http") / "koubou-mcp.log").wait_ready()
    try:
        yield server
    finally:
        server.stop()
    # Tool errors are answers, not crashes: the SDK logs a crashing tool with its traceback.
    assert "Traceback" not in server.output(), server.output()


def stdio_params(api_url: str) -> StdioServerParameters:
    # The SDK passes only a safe base environment (PATH, HOME, ...) plus `env`.
    return StdioServerParameters(command=sys.executable, args=["-m", "koubou", "mcp"], env={"KOUBOU_API_URL": api_url}, cwd=REPO)


@pytest.fixture(params=TRANSPORTS)
def server(request: pytest.FixtureRequest, system: System) -> StdioServerParameters | str:
    """What `mcp.Client` connects to: the stdio command, or the HTTP server's URL."""
    if request.param == "stdio":
        return stdio_params(system.api)
    return request.getfixturevalue("mcp_http").url


@asynccontextmanager
async def connected(server: StdioServerParameters | str) -> AsyncIterator[Client]:
    async with Client(server, read_timeout_seconds=60) as client:
        yield client


def text(result: CallToolResult) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "type", None) == "text")


def ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, text(result)
    assert result.structured_content is not None, text(result)
    return result.structured_content


def refused(result: CallToolResult, *words: str) -> str:
    message = text(result)
    assert result.is_error, f"expected a tool error, got: {message}"
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in the error: {message}"
    return message


async def wait_until_final(client: Client, task_id: str, max_wait: float = 10, rounds: int = 10) -> tuple[dict[str, Any], str]:
    """The loop an agent runs: wait until the state is final."""
    for _ in range(rounds):
        result = await client.call_tool("wait", {"task_id": task_id, "max_wait": max_wait})
        state = ok(result)
        if state["final"]:
            return state, text(result)
        assert f'wait(task_id="{task_id}")' in text(result)
    raise AssertionError(f"{task_id} not final after {rounds} waits: {state}")


# -- the SDK's client, both transports ----------------------------------------------------------


def test_delegate_wait_result(server: StdioServerParameters | str) -> None:
    prompt = unique_prompt("Summarise the MCP round trip")

    async def scenario() -> None:
        async with connected(server) as client:
            tools = {tool.name: tool for tool in (await client.list_tools()).tools}
            assert set(tools) == TOOLS
            assert "wait" in tools["delegate"].description and "summar" in tools["delegate"].description.lower()
            assert "again" in tools["wait"].description

            delegated = await client.call_tool("delegate", {"prompt": prompt, "priority": 7})
            answer = ok(delegated)
            task_id = answer["task_id"]
            assert re.fullmatch(r"task_\d{8}_\d{6}_[A-Za-z0-9]{12}", task_id), answer
            assert answer["final"] is False and answer.get("result") is None
            assert expected_answer(prompt) not in text(delegated)
            assert f'wait(task_id="{task_id}")' in text(delegated)

            state, shown = await wait_until_final(client, task_id)
            assert state["status"] == "completed", state
            assert state["result"]["output"] == expected_answer(prompt)
            assert expected_answer(prompt) in shown

            again = await client.call_tool("result", {"task_id": task_id})
            assert text(again) == expected_answer(prompt) and not again.is_error

            status = ok(await client.call_tool("status", {"task_id": task_id}))
            assert status["status"] == "completed" and status["priority"] == 7

            listed = ok(await client.call_tool("list_tasks", {"status": "completed", "limit": 200}))
            assert task_id in {task["task_id"] for task in listed["tasks"]}

            backends = await client.call_tool("list_backends", {})
            assert FAST_MODEL in text(backends) and SLOW_MODEL in text(backends), text(backends)
            assert all(b["reachable"] for b in ok(backends)["backends"]), text(backends)

            # Cancelling a finished task is the API's 409, as a tool error.
            refused(await client.call_tool("cancel", {"task_id": task_id}), "409")

            # delegate with wait: the answer in one call.
            prompt2 = unique_prompt("Draft a one-line release note")
            direct = await client.call_tool("delegate", {"prompt": prompt2, "wait": True, "max_wait": 20})
            assert ok(direct)["status"] == "completed" and ok(direct)["final"] is True
            assert expected_answer(prompt2) in text(direct)

    anyio.run(scenario)


def test_bad_arguments_are_tool_errors(server: StdioServerParameters | str) -> None:
    async def scenario() -> None:
        async with connected(server) as client:
            # The API's own validation and messages.
            refused(await client.call_tool("delegate", {"prompt": "x", "priority": 42}), "400", "priority")
            refused(await client.call_tool("delegate", {"prompt": ""}), "400", "prompt")
            refused(await client.call_tool("delegate", {"prompt": "x", "type": "poem"}), "400", "type")
            refused(await client.call_tool("delegate", {"prompt": "x", "files": ["../outside.txt"]}), "400", "outside the workspace")
            refused(await client.call_tool("delegate", {"prompt": "x", "temperature": 9}), "400", "temperature")
            refused(await client.call_tool("list_tasks", {"status": "sleeping"}), "400", "status")
            refused(await client.call_tool("status", {"task_id": "task_20990101_000000_nonexistent0"}), "404")
            refused(await client.call_tool("cancel", {"task_id": "task_20990101_000000_nonexistent0"}), "404")
            # The tools' own checks and the SDK's schema validation.
            refused(await client.call_tool("delegate", {"priority": 5}), "prompt")
            refused(await client.call_tool("delegate", {"prompt": "x", "priority": "high"}), "priority")
            refused(await client.call_tool("wait", {"task_id": "  "}), "task_id")
            refused(await client.call_tool("wait", {"task_id": "task_x", "max_wait": -1}), "max_wait")
            refused(await client.call_tool("result", {}), "task_id")
            # Still serving.
            assert {tool.name for tool in (await client.list_tools()).tools} == TOOLS
            assert not (await client.call_tool("list_backends", {})).is_error

    anyio.run(scenario)


def test_progress_while_waiting_and_cancel(server: StdioServerParameters | str, openai_fake: FakeLLMServer) -> None:
    openai_fake.set_latency(3)
    try:
        prompt = unique_prompt("Review this slowly")
        notes: list[tuple[float, float | None, str | None]] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            notes.append((progress, total, message))

        async def scenario() -> None:
            async with connected(server) as client:
                task_id = ok(await client.call_tool("delegate", {"prompt": prompt, "model": SLOW_MODEL}))["task_id"]
                # A short wait returns the current state and says how to go on.
                early = await client.call_tool("wait", {"task_id": task_id, "max_wait": 0.5})
                assert ok(early)["final"] is False and ok(early)["status"] in ("pending", "in_progress")
                assert f'wait(task_id="{task_id}")' in text(early)
                unfinished = await client.call_tool("result", {"task_id": task_id})
                assert not unfinished.is_error and "not finished" in text(unfinished) and "wait" in text(unfinished)

                done = await client.call_tool("wait", {"task_id": task_id, "max_wait": 20}, progress_callback=on_progress)
                assert ok(done)["status"] == "completed", text(done)
                assert ok(done)["result"]["output"] == expected_answer(prompt, SLOW_MODEL)
                assert len(notes) >= 2, notes
                values = [value for value, _, _ in notes]
                assert values == sorted(values) and len(set(values)) == len(values), notes
                assert all(message and "waited" in message and "tokens" in message for _, _, message in notes), notes

                # Cancel a running slow task: it ends cancelled, and has no answer.
                doomed = ok(await client.call_tool("delegate", {"prompt": unique_prompt("Never mind"), "model": SLOW_MODEL}))
                cancelled = ok(await client.call_tool("cancel", {"task_id": doomed["task_id"]}))
                assert cancelled["status"] in ("cancelled", "cancelling"), cancelled
                state, shown = await wait_until_final(client, doomed["task_id"])
                assert state["status"] == "cancelled" and "cancelled" in shown
                refused(await client.call_tool("result", {"task_id": doomed["task_id"]}), "cancelled")

        anyio.run(scenario)
    finally:
        openai_fake.set_latency(0)


# -- API trouble, without the shared system -------------------------------------------------------


class _Refusing(BaseHTTPRequestHandler):
    """An 'API' that refuses every request as unauthorized and remembers the Authorization headers."""

    seen: list[str | None] = []

    def do_GET(self) -> None:
        type(self).seen.append(self.headers.get("Authorization"))
        body = json.dumps({"error": "unauthorized", "detail": None}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("WWW-Authenticate", "Bearer")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_api_unreachable_and_token() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    refusing = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=refusing.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{refusing.server_address[1]}"

    async def scenario() -> None:
        async with connected(stdio_params(closed)) as client:
            message = refused(await client.call_tool("list_backends", {}), "unreachable", closed)
            assert "koubou up" in message
            refused(await client.call_tool("wait", {"task_id": "task_x"}), closed)
        token_server = StdioServerParameters(
            command=sys.executable, args=["-m", "koubou", "mcp"],
            env={"KOUBOU_API_URL": api, "KOUBOU_API_TOKEN": "sekrit-token"}, cwd=REPO,
        )  # fmt: skip
        async with connected(token_server) as client:
            refused(await client.call_tool("list_tasks", {}), "401", "KOUBOU_API_TOKEN")

    try:
        anyio.run(scenario)
    finally:
        refusing.shutdown()
        refusing.server_close()
    assert _Refusing.seen == ["Bearer sekrit-token"]


def test_max_wait_bounds() -> None:
    assert _max_wait(None) == (DEFAULT_MAX_WAIT, "")
    assert _max_wait(0) == (0.0, "")
    assert _max_wait(500)[0] == MAX_WAIT_CAP and "capped" in _max_wait(500)[1]
    for bad in (-1, float("nan")):
        with pytest.raises(ToolError):
            _max_wait(bad)


# -- Claude Code's own client -------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_claude_code_connects(transport: str, system: System, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    try:
        claude = claude_code()
    except ToolUnavailable as error:
        pytest.fail(str(error))
    home, project = tmp_path / "home", tmp_path / "project"
    project.mkdir()
    env = claude_env(home)

    def run(*args: str) -> str:
        done = subprocess.run(
            [*claude, *args], cwd=project, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )
        assert done.returncode == 0, f"claude {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    if transport == "stdio":
        run("mcp", "add", "koubou", "-e", f"KOUBOU_API_URL={system.api}", "--", sys.executable, "-m", "koubou", "mcp")
    else:
        run("mcp", "add", "--transport", "http", "koubou", request.getfixturevalue("mcp_http").url)
    listed = run("mcp", "list")
    line = next((row for row in listed.splitlines() if row.startswith("koubou:")), None)
    assert line is not None and "✔ Connected" in line, listed
    # Claude's configuration went to the private home only.
    assert (home / ".claude" / ".claude.json").is_file() or (home / ".claude.json").is_file()
    assert "koubou" in "".join(p.read_text(errors="replace") for p in home.rglob("*.json") if p.is_file())
