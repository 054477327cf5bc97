"""What the client commands of `koubou` print: tables, task details, progress lines, errors.

stdout carries only what a command is asked for (a task id, an answer, JSON, a table), so it
pipes; progress and errors go to stderr, one line each.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .client import FINAL_STATUSES, KoubouAPIError, KoubouError, format_detail


def say(message: str) -> None:
    """One line on stderr, prefixed with `koubou: `."""
    print(f"koubou: {message}", file=sys.stderr, flush=True)


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False), flush=True)


def api_error_line(error: KoubouAPIError, task_id: str | None = None) -> str:
    """An API error as one readable line."""
    if error.status == 409 and isinstance(error.detail, dict) and "status" in error.detail:
        return f"task {error.detail.get('task_id') or task_id} is already {error.detail['status']}: nothing to cancel"
    if error.status == 401:
        return f"{error.error}: the API wants a valid bearer token (set KOUBOU_API_TOKEN; `koubou agent add NAME` makes one)"
    detail = format_detail(error.detail) if error.detail not in (None, "", [], {}) else ""
    return f"{error.error}: {detail}" if detail else f"{error.error} (HTTP {error.status})"


def write_answer(text: str, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    out.write(text)
    out.flush()


def end_answer(answer: str, out: TextIO | None = None) -> None:
    """On a terminal, end the answer with a newline so the prompt does not glue to it; a pipe gets it exact."""
    out = out or sys.stdout
    if answer and not answer.endswith("\n") and out.isatty():
        out.write("\n")
        out.flush()


def result_error(final: dict[str, Any]) -> str:
    result = final.get("result") or {}
    return str(result.get("error") or "no error message")


# -- progress --------------------------------------------------------------------------------


class Progress:
    """Progress of one task on stderr: status changes at once, otherwise a line every few seconds."""

    def __init__(
        self, task_id: str, quiet_while_streaming: bool = False, fetch: Callable[[], dict[str, Any]] | None = None
    ) -> None:
        self.task_id = task_id
        self.fetch = fetch  # reads the status (for its token count) when a line is due
        self.started = time.monotonic()
        self.status: str | None = None
        self.pieces = 0
        # A terminal showing the answer as it streams needs no token counter in between.
        self.quiet_while_streaming = quiet_while_streaming
        self.every = 3.0 if sys.stderr.isatty() else 10.0
        self._last_line = self.started

    def _line(self, text: str) -> None:
        say(text)
        self._last_line = time.monotonic()

    def changed(self, status: str | None) -> None:
        if status and status != self.status:
            self.status = status
            if status not in FINAL_STATUSES:  # the end gets its own line, from finished()
                self._line(f"task {self.task_id} {status}")

    def delta(self) -> None:
        self.pieces += 1
        self.tick()

    def tick(self, tokens: int | None = None, rate: float | None = None) -> None:
        """Called often; prints a line only every `every` seconds."""
        now = time.monotonic()
        if now - self._last_line < self.every:
            return
        if self.quiet_while_streaming and self.pieces:
            return
        if tokens is None and self.fetch is not None:
            try:
                progress = self.fetch().get("progress") or {}
                tokens, rate = progress.get("tokens"), progress.get("tokens_per_second")
            except KoubouError:
                pass
        parts = [f"task {self.task_id} {self.status or 'waiting'}", f"{now - self.started:.0f}s"]
        if tokens is not None:
            parts.append(f"{tokens} tokens" + (f" at {rate:.1f}/s" if rate else ""))
        self._line(", ".join(parts))

    def polled(self, status: dict[str, Any]) -> None:
        """`on_progress` for KoubouClient.wait."""
        self.changed(status.get("status"))
        progress = status.get("progress") or {}
        self.tick(progress.get("tokens"), progress.get("tokens_per_second"))

    def finished(self, final: dict[str, Any]) -> None:
        """A summary line for a completed task (a failed or cancelled one gets its error line instead)."""
        if final.get("status") != "completed":
            return
        result = final.get("result") or {}
        parts = [f"task {self.task_id} {final.get('status')}"]
        if result.get("model"):
            parts.append(str(result["model"]))
        if result.get("completion_tokens") is not None:
            parts.append(f"{result['completion_tokens']} tokens")
        parts.append(f"{time.monotonic() - self.started:.1f}s")
        self._line(", ".join(parts))


# -- tables and details ----------------------------------------------------------------------


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max(len(str(h)), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(value.ljust(w) for value, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return " ".join(str(value).split())


def tasks_table(tasks: list[dict[str, Any]]) -> str:
    if not tasks:
        return "no tasks"
    rows = [
        (t.get("task_id"), t.get("status"), t.get("type"), t.get("priority"), (t.get("result") or {}).get("model"),
         t.get("created_at"), t.get("worker"))
        for t in tasks
    ]  # fmt: skip
    return table(rows, ("task", "status", "type", "prio", "model", "created", "worker"))


def workers_table(workers: list[dict[str, Any]]) -> str:
    if not workers:
        return "no workers seen yet"
    rows = [
        (w.get("worker_id"), w.get("worker_type"), w.get("status"), w.get("active_tasks"), w.get("tasks_completed"),
         w.get("tasks_failed"), w.get("last_heartbeat"))
        for w in workers
    ]  # fmt: skip
    return table(rows, ("worker", "serves", "status", "active", "completed", "failed", "heartbeat"))


def backends_table(backends: list[dict[str, Any]]) -> str:
    if not backends:
        return "no backends"
    rows = [
        (b.get("name"), b.get("kind"), b.get("reachable"), b.get("url"),
         ", ".join(b.get("models") or []) or b.get("error"))
        for b in backends
    ]  # fmt: skip
    return table(rows, ("backend", "kind", "up", "url", "models"))


def task_details(status: dict[str, Any]) -> str:
    result = status.get("result") or {}
    progress = status.get("progress") or {}
    fields: list[tuple[str, Any]] = [
        ("task", status.get("task_id")),
        ("status", status.get("status")),
        ("type", status.get("type")),
        ("priority", status.get("priority")),
        ("worker", status.get("worker")),
        ("created", status.get("created_at")),
        ("started", status.get("started_at")),
        ("completed", status.get("completed_at")),
    ]
    if progress:
        rate = progress.get("tokens_per_second")
        fields.append(("progress", f"{progress.get('tokens', 0)} tokens" + (f" at {rate:.1f}/s" if rate else "")))
    if result:
        fields += [("model", result.get("model")), ("backend", result.get("backend"))]
        if result.get("prompt_tokens") is not None or result.get("completion_tokens") is not None:
            fields.append(("tokens", f"{result.get('prompt_tokens')} prompt, {result.get('completion_tokens')} completion"))
        if result.get("duration_ms") is not None:
            fields.append(("duration", f"{float(result['duration_ms']) / 1000:.2f}s"))
        if result.get("error"):
            fields.append(("error", result["error"]))
    width = max(len(name) for name, _ in fields)
    lines = [f"{name.ljust(width)}  {_cell(value)}" for name, value in fields if value is not None]
    if result.get("output") is not None:
        lines += ["output:", str(result["output"])]
    return "\n".join(lines)
