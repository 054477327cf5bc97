"""Python client of koubou's HTTP API (used by the CLI and the MCP server).

    with KoubouClient() as client:                      # KOUBOU_API_URL, KOUBOU_API_TOKEN
        task = client.delegate("Summarise ...", model="llama3")
        for event in client.stream(task["task_id"]):    # status / delta / done
            ...

Every call has a timeout. Errors: `KoubouUnavailable` (cannot connect, timed out) and
`KoubouAPIError` (a 4xx/5xx answer, with the API's `error` and `detail`), both `KoubouError`s.
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

#: Task statuses after which nothing changes.
FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
#: What the API waits for a task when a delegation names no timeout (TaskOptions.timeout).
DEFAULT_TASK_TIMEOUT = 120.0
#: Seconds added to a sync delegation's own timeout for the HTTP read.
SYNC_READ_MARGIN = 10.0


class KoubouError(Exception):
    """Base of every error this client raises."""


class KoubouUnavailable(KoubouError):
    """The API could not be reached (connection refused, DNS, timeout, dropped connection)."""


class KoubouAPIError(KoubouError):
    """The API answered 4xx/5xx; `error` and `detail` are its JSON `{"error", "detail"}`."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        self.status, self.error, self.detail = status, error, detail
        super().__init__(f"{status} {error}" + (f": {format_detail(detail)}" if detail not in (None, "", [], {}) else ""))


def format_detail(detail: Any) -> str:
    """An API error's `detail` on one line: field errors as `field: message`, dicts as k=v."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if isinstance(item, dict) and "message" in item:
                field = item.get("field")
                parts.append(f"{field}: {item['message']}" if field else str(item["message"]))
            else:
                parts.append(format_detail(item))
        return "; ".join(parts)
    if isinstance(detail, dict):
        return ", ".join(f"{key}={value}" for key, value in detail.items())
    return " ".join(str(detail).split())


@dataclass(frozen=True)
class StreamEvent:
    """One server-sent event of `GET /task/<id>/stream`.

    `kind` is the SSE event type (`status`, `delta`, `done`; `message` when the server named
    none). `id` is the stream's last event id when the event was dispatched (as in the
    browser's EventSource: it persists until the server sends another), the value to pass
    back as `last_event_id` to resume. `data` is the event's JSON data (`{"raw": text}` when
    it was not a JSON object).
    """

    kind: str
    id: str | None
    data: dict[str, Any]


@dataclass(frozen=True)
class RawEvent:
    """An event as the SSE parser dispatches it, before its data is decoded."""

    event: str
    data: str
    id: str | None
    comment: bool = False  # a `:` line, reported only by SSEParser(comments=True)


class SSEParser:
    """Incremental parser of a `text/event-stream` body, per the HTML Living Standard.

    Feed it bytes as they arrive; it returns the events each chunk completes. Lines end with
    CRLF, LF or CR (a CR at the end of one chunk and an LF at the start of the next are one
    line end); `:` lines are comments; fields are `event`, `data` (repeated lines join with
    LF), `id` (ignored when it holds NUL; persists across events) and `retry`; a blank line
    dispatches; an event with no data is not dispatched; an unfinished event at the end of the
    stream is dropped. With `comments`, comment lines (keep-alives) come out too, as
    `RawEvent(comment=True)`, so a reader can notice time passing on a quiet stream.
    """

    def __init__(self, comments: bool = False) -> None:
        self._comments = comments
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._started = False
        self._skip_lf = False
        self._event = ""
        self._data: list[str] = []
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None

    def feed(self, chunk: bytes | str) -> list[RawEvent]:
        text = chunk if isinstance(chunk, str) else self._decoder.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        events: list[RawEvent] = []
        for line in self._lines(text):
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _lines(self, text: str) -> Iterator[str]:
        if self._skip_lf and text:
            self._skip_lf = False
            if text[0] == "\n":
                text = text[1:]
        buffer = self._buffer + text
        start = 0
        length = len(buffer)
        while True:
            cr, lf = buffer.find("\r", start), buffer.find("\n", start)
            if cr == -1 and lf == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                yield buffer[start:cr]
                if cr + 1 < length:
                    start = cr + 2 if buffer[cr + 1] == "\n" else cr + 1
                else:  # the LF of a CRLF may come in the next chunk
                    start = cr + 1
                    self._skip_lf = True
            else:
                yield buffer[start:lf]
                start = lf + 1
        self._buffer = buffer[start:]

    def _line(self, line: str) -> RawEvent | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            if self._comments:
                return RawEvent(event="", data=line[1:].removeprefix(" "), id=self.last_event_id or None, comment=True)
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry_ms = int(value)
        return None

    def _dispatch(self) -> RawEvent | None:
        event, data = self._event or "message", self._data
        self._event, self._data = "", []
        if not data:
            return None
        return RawEvent(event=event, data="\n".join(data), id=self.last_event_id or None)


def parse_sse(chunks: Iterable[bytes | str]) -> Iterator[RawEvent]:
    """The events of a whole stream given as chunks."""
    parser = SSEParser()
    for chunk in chunks:
        yield from parser.feed(chunk)


def _stream_event(raw: RawEvent) -> StreamEvent:
    if raw.comment:
        return StreamEvent(kind="keepalive", id=raw.id, data={"comment": raw.data})
    try:
        data = json.loads(raw.data)
    except ValueError:
        data = None
    return StreamEvent(kind=raw.event, id=raw.id, data=data if isinstance(data, dict) else {"raw": raw.data})


class KoubouClient:
    """A connection to one koubou API. Thread-safe for concurrent calls (httpx.Client is)."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0) -> None:
        if url is None or token is None:
            from .config import get_settings

            settings = get_settings()
            url = url if url is not None else settings.api_url
            token = token if token is not None else settings.api_token
        if "://" not in url:
            url = f"http://{url}"
        self.url = url.rstrip("/")
        self.timeout = timeout
        headers = {"Accept": "application/json", "User-Agent": "koubou-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=self._timeout(timeout))

    @staticmethod
    def _timeout(read: float) -> httpx.Timeout:
        return httpx.Timeout(read, connect=min(read, 10.0))

    # -- plumbing ------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
        accept: tuple[int, ...] = (),
    ) -> Any:
        try:
            response = self._http.request(
                method, path, json=json_body, params=params, headers=headers,
                timeout=self._timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )  # fmt: skip
        except httpx.TimeoutException as error:
            raise KoubouUnavailable(f"{method} {self.url}{path} timed out ({type(error).__name__})") from None
        except httpx.TransportError as error:
            raise KoubouUnavailable(f"cannot reach the koubou API at {self.url}: {_reason(error)}") from None
        if response.status_code >= 400 and response.status_code not in accept:
            raise _api_error(response)
        try:
            return response.json()
        except ValueError:
            raise KoubouAPIError(response.status_code, "invalid answer", f"not JSON: {response.text[:200]!r}") from None

    # -- the API -------------------------------------------------------------------------------

    def delegate(
        self,
        prompt: str,
        *,
        type: str = "general",  # noqa: A002 - the API's field name
        priority: int = 5,
        model: str | None = None,
        timeout: float | None = None,
        temperature: float | None = None,
        num_ctx: int | None = None,
        max_tokens: int | None = None,
        files: list[str] | None = None,
        sync: bool = False,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """`POST /task/delegate`; the API's answer `{"task_id", "status", "result"}`.

        With `sync`, the call waits up to the task's timeout (plus a margin) for the answer.
        `files` go as given: paths on the API's machine (a relative one is taken against its first
        workspace root; the CLI and MCP server make them absolute against their own directory first).
        """
        options = {"model": model, "timeout": timeout, "temperature": temperature, "num_ctx": num_ctx, "max_tokens": max_tokens}
        body: dict[str, Any] = {"type": type, "prompt": prompt, "priority": priority, "sync": sync}
        if files is not None:
            body["files"] = list(files)
        body["options"] = {key: value for key, value in options.items() if value is not None}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        read = None
        if sync:
            read = max(self.timeout, (timeout if timeout is not None else DEFAULT_TASK_TIMEOUT) + SYNC_READ_MARGIN)
        return self._request("POST", "/task/delegate", json_body=body, headers=headers, timeout=read)

    def status(self, task_id: str) -> dict[str, Any]:
        """`GET /task/<id>/status`."""
        return self._request("GET", f"/task/{_segment(task_id)}/status")

    def wait(
        self,
        task_id: str,
        max_wait: float | None = None,
        poll: float = 0.5,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the status until it is final or `max_wait` seconds pass; the last status.

        `max_wait=None` waits until the task is final (the server bounds every task's run
        time). `on_progress` gets every status read.
        """
        deadline = None if max_wait is None else time.monotonic() + max_wait
        while True:
            current = self.status(task_id)
            if on_progress is not None:
                on_progress(current)
            if current.get("status") in FINAL_STATUSES:
                return current
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return current
                time.sleep(min(poll, remaining))
            else:
                time.sleep(poll)

    def stream(
        self, task_id: str, last_event_id: str | None = None, *, keepalives: bool = False, read_timeout: float | None = None
    ) -> Iterator[StreamEvent]:
        """`GET /task/<id>/stream`: the task's events as they come (status, delta, done).

        Ends when the server closes the stream (after `done`). With `keepalives`, the server's
        `: ping` comments come out too, as `StreamEvent("keepalive", ...)`, so a caller can
        enforce its own deadline while the task sits in the queue (the server pings every 15 s);
        `read_timeout` (default: the client's timeout) bounds the silence between two reads. `KoubouAPIError` for a 4xx/5xx
        answer (404: unknown task, or an API without the endpoint), `KoubouUnavailable` when
        the connection fails or stays silent for `timeout` seconds (the server pings).
        """
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        path = f"/task/{_segment(task_id)}/stream"
        try:
            timeout = self._timeout(read_timeout) if read_timeout is not None else httpx.USE_CLIENT_DEFAULT
            with self._http.stream("GET", path, headers=headers, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _api_error(response)
                content_type = response.headers.get("content-type", "")
                if not content_type.startswith("text/event-stream"):
                    raise KoubouAPIError(response.status_code, "invalid answer", f"not an event stream: {content_type!r}")
                parser = SSEParser(comments=keepalives)
                for chunk in response.iter_bytes():
                    for raw in parser.feed(chunk):
                        yield _stream_event(raw)
        except httpx.TimeoutException as error:
            raise KoubouUnavailable(f"GET {self.url}{path} timed out ({type(error).__name__})") from None
        except httpx.TransportError as error:
            raise KoubouUnavailable(f"stream from {self.url} broke: {_reason(error)}") from None

    def cancel(self, task_id: str) -> dict[str, Any]:
        """`DELETE /task/<id>`: `{"task_id", "status": "cancelled"|"cancelling"}`; 409 (final) raises."""
        return self._request("DELETE", f"/task/{_segment(task_id)}")

    def tasks(self, status: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """`GET /tasks`: recent tasks, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = status
        return list(self._request("GET", "/tasks", params=params)["tasks"])

    def workers(self) -> list[dict[str, Any]]:
        """`GET /workers`."""
        return list(self._request("GET", "/workers")["workers"])

    def backends(self) -> list[dict[str, Any]]:
        """`GET /backends`."""
        return list(self._request("GET", "/backends")["backends"])

    def health(self) -> dict[str, Any]:
        """`GET /health`; the body whether the system is ok (200) or degraded (503)."""
        return self._request("GET", "/health", accept=(503,))

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> KoubouClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()


def _segment(task_id: str) -> str:
    """A task id as one URL path segment."""
    from urllib.parse import quote

    return quote(task_id, safe="")


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _api_error(response: httpx.Response) -> KoubouAPIError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return KoubouAPIError(response.status_code, body["error"], body.get("detail"))
    text = " ".join(response.text.split())[:200]
    return KoubouAPIError(response.status_code, response.reason_phrase.lower() or "error", text or None)
