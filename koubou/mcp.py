"""`koubou mcp`: koubou as a Model Context Protocol server, for Claude Code and other MCP clients.

A thin client of koubou's HTTP API (`koubou.client.KoubouClient`): the API at KOUBOU_API_URL, the
bearer token KOUBOU_API_TOKEN when set, and the API's own validation and error messages. Served
over stdio (`koubou mcp`, for `claude mcp add koubou -- koubou mcp`) or streamable HTTP
(`koubou mcp --http`, at http://127.0.0.1:KOUBOU_MCP_PORT/mcp).

The tools never block longer than MAX_WAIT_CAP seconds, well under an MCP client's tool timeout
(Claude Code's is about a minute): a long task is `delegate`d, then `wait`ed on in a loop.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from . import __version__
from .client import FINAL_STATUSES, KoubouAPIError, KoubouClient, KoubouError, KoubouUnavailable

#: `wait` blocks this long when the caller names no max_wait ...
DEFAULT_MAX_WAIT = 45.0
#: ... and never longer than this, whatever it asks: Claude Code gives a tool call about 60 s.
MAX_WAIT_CAP = 50.0
#: Seconds between two status reads while waiting.
POLL_SECONDS = 0.5
#: Seconds between two progress notifications while waiting (when the client asked for them).
PROGRESS_SECONDS = 1.0
#: Where `koubou mcp --http` serves MCP.
HTTP_PATH = "/mcp"

T = TypeVar("T")

INSTRUCTIONS = """\
koubou runs LLM work on local models (Ollama, LM Studio, vLLM, llama.cpp) through a task queue.
Delegate work that is long, self-contained and needs no access to this conversation or the
repository beyond what you paste into the prompt or name in `files` (text files, absolute paths:
koubou reads them and gives them to the model with their paths): summaries of long text or logs,
first drafts of docs, commit messages or release notes, boilerplate and test scaffolding,
translations, reviews of code. It saves your own context and tokens while you go on with other
work. Do not delegate tiny questions (answering them yourself is faster), or work that needs
tools, the whole repository, or your judgement on the whole task.
Use: delegate(prompt=...) returns a task id at once; then call wait(task_id=...) in a loop until
its status is final (completed, failed or cancelled): each wait blocks at most ~45 s. result(task_id)
gives the answer again later. Check the answer before you use it: local models are smaller than you.
"""

DELEGATE_DESCRIPTION = """\
Hand a self-contained LLM job to a local model via koubou; returns the task id at once.
Worth it for long, self-contained work: summarising long text or logs, drafting docs, commit
messages or release notes, boilerplate, test scaffolding, translation, reviewing code you paste
into the prompt. Not worth it for tiny questions you can answer at once, or work that needs
tools or the whole repository: the model sees only the prompt and the `files` you name (UTF-8
text files inside koubou's workspace roots, at most 20, 1 MiB each, 4 MiB in all; give absolute
paths). Then call `wait(task_id)` in a loop until the status is final, or pass
`wait: true` to wait here (up to max_wait seconds, at most 50) for a short job.
"""

WAIT_DESCRIPTION = """\
Wait for a delegated task: blocks until it ends or max_wait seconds pass (default 45, at most 50),
then returns its current state, with the answer once completed. While the status is still
pending or in_progress, call wait again with the same task_id (loop until completed, failed or
cancelled); do other work in between if you like.
"""


def _text_result(text: str, data: dict[str, Any] | None = None) -> CallToolResult:
    """A tool answer: `text` for the model, `data` as structured content for programs."""
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)


class KoubouTools:
    """The tools' logic over one KoubouClient; every client call runs in a worker thread."""

    def __init__(self, client: KoubouClient) -> None:
        self.client = client

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a client call off the event loop; koubou errors become tool errors (isError results)."""
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))
        except KoubouUnavailable as error:
            where = "" if self.client.url in str(error) else f" (API at {self.client.url})"
            raise ToolError(
                f"koubou API unreachable: {error}{where}. Is koubou running? Start it with `koubou up`, "
                "or point KOUBOU_API_URL at the API."
            ) from None
        except KoubouAPIError as error:
            raise ToolError(self._refusal(error)) from None
        except KoubouError as error:
            raise ToolError(f"koubou API at {self.client.url}: {error}") from None

    def _refusal(self, error: KoubouAPIError) -> str:
        if error.status == 401:
            return (
                f"the koubou API at {self.client.url} refused the request ({error}): set KOUBOU_API_TOKEN "
                "for `koubou mcp` to an agent's token (`koubou agent add NAME` prints one)."
            )
        return f"koubou refused: {error}"

    async def wait_for(self, task_id: str, max_wait: float, ctx: Context | None) -> tuple[dict[str, Any], float]:
        """Poll the task until it is final or `max_wait` passes; (last state, seconds waited).

        Sends a progress notification about every PROGRESS_SECONDS (the SDK drops them when the
        client supplied no progress token). Progress is the seconds waited, which always grows.
        """
        started = time.monotonic()
        deadline = started + max_wait
        last_report: float | None = None
        while True:
            state = await self.call(self.client.status, task_id)
            now = time.monotonic()
            if state.get("status") in FINAL_STATUSES or now >= deadline:
                return state, now - started
            if ctx is not None and (last_report is None or now - last_report >= PROGRESS_SECONDS):
                last_report = now
                await ctx.report_progress(round(now - started, 1), None, _progress_message(state, now - started))
            await anyio.sleep(min(POLL_SECONDS, max(0.0, deadline - now)))


def _check_task_id(task_id: str) -> str:
    task_id = task_id.strip()
    if not task_id:
        raise ToolError("task_id is empty: pass the id `delegate` returned (task_YYYYMMDD_HHMMSS_...).")
    return task_id


def _max_wait(value: float | None) -> tuple[float, str]:
    """The wait to use and a note when the asked one was changed."""
    if value is None:
        return DEFAULT_MAX_WAIT, ""
    if value != value or value < 0:  # NaN or negative
        raise ToolError(f"max_wait must be 0-{MAX_WAIT_CAP:g} seconds (got {value}).")
    if value > MAX_WAIT_CAP:
        return MAX_WAIT_CAP, f" (max_wait capped at {MAX_WAIT_CAP:g} s)"
    return float(value), ""


def _progress(state: dict[str, Any]) -> dict[str, Any]:
    progress = state.get("progress")
    return progress if isinstance(progress, dict) else {}


def _progress_message(state: dict[str, Any], waited: float | None) -> str:
    progress = _progress(state)
    parts = [str(state.get("status", "?"))]
    tokens = progress.get("tokens")
    if tokens is not None:
        parts.append(f"{tokens} tokens")
        rate = progress.get("tokens_per_second")
        if rate:
            parts.append(f"{rate:.1f} tok/s")
    if progress.get("running_ms") is not None and state.get("status") == "in_progress":
        parts.append(f"running {progress['running_ms'] / 1000:.1f} s")
    if waited is not None:
        parts.append(f"waited {waited:.1f} s")
    return ", ".join(parts)


def _output(state: dict[str, Any]) -> str | None:
    result = state.get("result")
    return result.get("output") if isinstance(result, dict) else None


def _error(state: dict[str, Any]) -> str:
    result = state.get("result")
    if isinstance(result, dict) and result.get("error"):
        return str(result["error"])
    return "no error message"


def _about(state: dict[str, Any]) -> str:
    """`model, 1.2 s, 40 tokens` for a finished task, from what its result holds."""
    result = state.get("result") if isinstance(state.get("result"), dict) else {}
    parts = []
    if result.get("model"):
        parts.append(str(result["model"]))
    if result.get("duration_ms") is not None:
        parts.append(f"{result['duration_ms'] / 1000:.1f} s")
    if result.get("completion_tokens") is not None:
        parts.append(f"{result['completion_tokens']} tokens")
    return f" ({', '.join(parts)})" if parts else ""


def _state_result(state: dict[str, Any], waited: float | None = None, note: str = "") -> CallToolResult:
    """What `wait` (and `delegate` with wait) answer: the answer when done, else how to go on."""
    task_id = state.get("task_id", "?")
    status = state.get("status", "?")
    data = {**state, "final": status in FINAL_STATUSES}
    if waited is not None:
        data["waited_seconds"] = round(waited, 1)
    if status == "completed":
        text = f"Task {task_id} completed{_about(state)}. Answer:\n\n{_output(state) or ''}"
    elif status == "failed":
        text = f"Task {task_id} failed{_about(state)}: {_error(state)}\nIt will not run again: delegate anew or do it yourself."
    elif status == "cancelled":
        text = f"Task {task_id} was cancelled."
    else:
        how_long = f" after waiting {waited:.1f} s{note}" if waited is not None else ""
        text = (
            f"Task {task_id} is not finished yet{how_long}: {_progress_message(state, None)}. "
            f'Call wait(task_id="{task_id}") again to keep waiting, or cancel(task_id="{task_id}").'
        )
    return _text_result(text, data)


def build_server(client: KoubouClient | None = None) -> MCPServer:
    """The MCP server with koubou's tools, talking to the API through `client` (default: settings)."""
    tools = KoubouTools(client or KoubouClient())
    server = MCPServer(
        "koubou",
        title="koubou",
        instructions=INSTRUCTIONS,
        version=__version__,
        log_level="WARNING",
    )

    @server.tool(
        description=DELEGATE_DESCRIPTION,
        annotations=ToolAnnotations(title="Delegate to a local model", read_only_hint=False, destructive_hint=False, open_world_hint=False),
    )
    async def delegate(
        prompt: Annotated[str, Field(description="Everything the model needs: instructions plus the text or code to work on.")],
        ctx: Context,
        type: Annotated[str, Field(description='"general" or "code".')] = "general",  # noqa: A002 - the API's name
        priority: Annotated[int, Field(description="1-10, 10 most urgent.")] = 5,
        model: Annotated[str | None, Field(description="Model name (see list_backends); default: koubou's default model.")] = None,
        timeout: Annotated[float | None, Field(description="Seconds the task may run (default 120).")] = None,
        temperature: Annotated[float | None, Field(description="0-2.")] = None,
        num_ctx: Annotated[int | None, Field(description="Context window in tokens (Ollama's num_ctx).")] = None,
        max_tokens: Annotated[int | None, Field(description="Longest answer, in tokens.")] = None,
        files: Annotated[
            list[str] | None,
            Field(description="Text files the model gets with the prompt, each with its path: absolute paths "
                  "(relative ones are taken against this server's directory), inside koubou's workspace roots."),
        ] = None,
        idempotency_key: Annotated[str | None, Field(description="Same key on a retry returns the same task instead of a new one.")] = None,
        wait: Annotated[bool, Field(description="Wait here for the answer, up to max_wait seconds.")] = False,
        max_wait: Annotated[float | None, Field(description=f"With wait: seconds to wait (default {DEFAULT_MAX_WAIT:g}, at most {MAX_WAIT_CAP:g}).")] = None,
    ) -> CallToolResult:
        seconds, note = _max_wait(max_wait)
        answer = await tools.call(
            tools.client.delegate, prompt, type=type, priority=priority, model=model, timeout=timeout,
            temperature=temperature, num_ctx=num_ctx, max_tokens=max_tokens,
            # As the CLI does: a relative path means one here, not one under the API's first root.
            files=[os.path.abspath(path) for path in files] if files is not None else None,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        task_id = answer["task_id"]
        if wait:
            state, waited = await tools.wait_for(task_id, seconds, ctx)
            return _state_result(state, waited, note)
        text = (
            f"Delegated as task {task_id} (status {answer.get('status')}). "
            f'Call wait(task_id="{task_id}") to get the answer: it blocks up to {DEFAULT_MAX_WAIT:g} s; '
            "call it again until the status is final."
        )
        return _text_result(text, {**answer, "final": False})

    @server.tool(
        description=WAIT_DESCRIPTION,
        annotations=ToolAnnotations(title="Wait for a task", read_only_hint=True, open_world_hint=False),
    )
    async def wait(
        task_id: Annotated[str, Field(description="The id delegate returned.")],
        ctx: Context,
        max_wait: Annotated[float | None, Field(description=f"Seconds to wait (default {DEFAULT_MAX_WAIT:g}, at most {MAX_WAIT_CAP:g}; 0 just looks).")] = None,
    ) -> CallToolResult:
        seconds, note = _max_wait(max_wait)
        state, waited = await tools.wait_for(_check_task_id(task_id), seconds, ctx)
        return _state_result(state, waited, note)

    @server.tool(
        description="A task's current state without waiting: status, worker, timestamps, progress "
        "(tokens so far) and, once final, its result.",
        annotations=ToolAnnotations(title="Task status", read_only_hint=True, open_world_hint=False),
    )
    async def status(task_id: Annotated[str, Field(description="The id delegate returned.")]) -> CallToolResult:
        state = await tools.call(tools.client.status, _check_task_id(task_id))
        return _text_result(json.dumps(state, indent=1), state)

    @server.tool(
        description="The answer text of a finished task (e.g. to read it again). If the task is not "
        "finished yet it says so: then call wait.",
        annotations=ToolAnnotations(title="Task answer", read_only_hint=True, open_world_hint=False),
    )
    async def result(task_id: Annotated[str, Field(description="The id delegate returned.")]) -> CallToolResult:
        task_id = _check_task_id(task_id)
        state = await tools.call(tools.client.status, task_id)
        status = state.get("status")
        if status == "completed":
            return _text_result(_output(state) or "", state)
        if status == "failed":
            raise ToolError(f"task {task_id} failed{_about(state)}: {_error(state)}")
        if status == "cancelled":
            raise ToolError(f"task {task_id} was cancelled; it has no answer.")
        return _text_result(
            f'Task {task_id} is not finished yet ({status}): call wait(task_id="{task_id}") to wait for it.',
            {**state, "final": False},
        )

    @server.tool(
        description="Cancel a queued or running task (its worker is freed). Fails for a task that already ended.",
        annotations=ToolAnnotations(title="Cancel a task", read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False),
    )
    async def cancel(task_id: Annotated[str, Field(description="The id delegate returned.")]) -> CallToolResult:
        task_id = _check_task_id(task_id)
        answer = await tools.call(tools.client.cancel, task_id)
        if answer.get("status") == "cancelling":
            text = f'Task {task_id} is being cancelled (its model call is being stopped); wait(task_id="{task_id}") shows when it is.'
        else:
            text = f"Task {task_id}: {answer.get('status')}."
        return _text_result(text, answer)

    @server.tool(
        description="Recent tasks, newest first: id, status, worker, created time. Filter by status "
        "(pending, in_progress, completed, failed, cancelled).",
        annotations=ToolAnnotations(title="List tasks", read_only_hint=True, open_world_hint=False),
    )
    async def list_tasks(
        status: Annotated[str | None, Field(description="Only tasks in this status.")] = None,
        limit: Annotated[int, Field(description="How many (1-200).")] = 20,
    ) -> CallToolResult:
        found = await tools.call(tools.client.tasks, status=status, limit=limit)
        lines = [
            f"{task.get('task_id')}  {task.get('status')}  {task.get('type', '')}  created {task.get('created_at')}"
            + (f"  worker {task['worker']}" if task.get("worker") else "")
            for task in found
        ]
        text = "\n".join(lines) if lines else "No tasks" + (f" with status {status}." if status else ".")
        return _text_result(text, {"tasks": found})

    @server.tool(
        description="koubou's LLM backends: reachable or not, and the models each serves (names to pass as `model`).",
        annotations=ToolAnnotations(title="List backends and models", read_only_hint=True, open_world_hint=False),
    )
    async def list_backends() -> CallToolResult:
        found = await tools.call(tools.client.backends)
        lines = []
        for backend in found:
            if backend.get("reachable"):
                models = ", ".join(backend.get("models") or []) or "no models"
                lines.append(f"{backend.get('name')} ({backend.get('kind')}, {backend.get('url')}): reachable; models: {models}")
            else:
                lines.append(f"{backend.get('name')} ({backend.get('kind')}, {backend.get('url')}): UNREACHABLE: {backend.get('error')}")
        return _text_result("\n".join(lines) or "No backends configured.", {"backends": found})

    return server


def serve(http: bool = False, port: int | None = None) -> None:
    """Serve over stdio, or over streamable HTTP on 127.0.0.1:`port` (default KOUBOU_MCP_PORT)."""
    from .config import get_settings

    settings = get_settings()
    client = KoubouClient(settings.api_url, settings.api_token)
    server = build_server(client)
    if not http:
        server.run("stdio")
        return
    port = port or settings.mcp_port
    print(f"koubou MCP server: http://127.0.0.1:{port}{HTTP_PATH} (API {client.url})", file=sys.stderr, flush=True)
    server.run("streamable-http", host="127.0.0.1", port=port, streamable_http_path=HTTP_PATH)
