"""The OpenAI-compatible backend (OpenAI, llama.cpp, vLLM, ...), through the official `openai` client."""

from __future__ import annotations

import ssl
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import TypeVar, cast
from urllib.parse import urlsplit

import httpx2
import openai
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionMessageParam

from koubou.backends.base import (
    BackendError,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
    ChatRequest,
    ChatResult,
    DeltaCallback,
    PerProcess,
    error_for_status,
    prompt_too_long,
)

#: Seconds to wait for a TCP connection, however long the call may take in all.
CONNECT_TIMEOUT = 10.0
T = TypeVar("T")
#: output, model, usage and extra of one answer.
_Answer = tuple[str, str, CompletionUsage | None, dict[str, object]]


@cache
def _ssl_context() -> ssl.SSLContext:
    # httpx builds a new context per client (~20 ms): one for every client of the process.
    return httpx2.create_ssl_context()


def _timeout(seconds: float) -> openai.Timeout:
    return openai.Timeout(seconds, connect=min(seconds, CONNECT_TIMEOUT))


def _messages(request: ChatRequest) -> list[ChatCompletionMessageParam]:
    return cast(list[ChatCompletionMessageParam], [{"role": m.role, "content": m.content} for m in request.messages])


def _temperature(request: ChatRequest) -> float | openai.Omit:
    return openai.omit if request.temperature is None else request.temperature


def _max_tokens(request: ChatRequest) -> int | openai.Omit:
    return openai.omit if request.max_tokens is None else request.max_tokens


def _detail(exc: openai.APIError) -> str:
    # The SDK's own message is "Error code: 404 - ..."; the server's words read better.
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    if isinstance(body, str) and body.strip():
        return body.strip()[:300]
    return exc.message


def _reason(exc: openai.APIConnectionError) -> str:
    # The SDK says only "Connection error."; the httpx error it wraps says why.
    cause = exc.__cause__
    if cause is None:
        return exc.message
    return str(cause) or type(cause).__name__


class OpenAIBackend:
    """A server speaking OpenAI's chat completions API."""

    kind = "openai"

    def __init__(self, url: str, name: str | None = None, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.name = name or f"{self.kind}@{urlsplit(self.url).netloc or self.url}"
        #: The key as configured (None: the server needs none); code tasks hand it to Codex.
        self.api_key = api_key
        # Local servers ignore the key, but the SDK refuses to run without one.
        self._api_key = api_key or "not-needed"
        self._clients: PerProcess[openai.OpenAI] | None = None

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.url!r}, name={self.name!r})"

    def list_models(self, timeout: float = 5.0) -> list[str]:
        """Ids of the models the server serves (`/models`)."""
        with self._errors(None, timeout):
            page = self._client().get().models.list(timeout=_timeout(timeout))
        return [model.id for model in page.data]

    def chat(self, request: ChatRequest, on_delta: DeltaCallback | None = None) -> ChatResult:
        """Run one chat completion; stream through `on_delta` when given."""
        started = time.monotonic()
        client = self._client().get()
        if on_delta is None:
            output, model, usage, extra = self._complete(client, request)
        else:
            output, model, usage, extra = self._stream(client, request, started, on_delta)
        return ChatResult(
            output=output,
            model=model or request.model,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            duration_ms=(time.monotonic() - started) * 1000,
            extra=extra,
        )

    def _complete(self, client: openai.OpenAI, request: ChatRequest) -> _Answer:
        with self._errors(request.model, request.timeout):
            completion = client.chat.completions.create(
                model=request.model,
                messages=_messages(request),
                temperature=_temperature(request),
                max_tokens=_max_tokens(request),
                timeout=_timeout(request.timeout),
            )
        choice = completion.choices[0] if completion.choices else None
        extra: dict[str, object] = {"finish_reason": choice.finish_reason if choice else None}
        # llama.cpp's server adds its own timings; keep them.
        if timings := (completion.model_extra or {}).get("timings"):
            extra["timings"] = timings
        output = (choice.message.content if choice else None) or ""
        return output, completion.model, completion.usage, extra

    def _stream(
        self, client: openai.OpenAI, request: ChatRequest, started: float, on_delta: DeltaCallback
    ) -> _Answer:
        with self._errors(request.model, request.timeout):
            stream = client.chat.completions.create(
                model=request.model,
                messages=_messages(request),
                temperature=_temperature(request),
                max_tokens=_max_tokens(request),
                stream=True,
                stream_options={"include_usage": True},
                timeout=_timeout(request.timeout),
            )
        parts: list[str] = []
        model, usage, finish = request.model, None, None
        chunks = self._translated(stream, request.model, request.timeout)
        try:
            for chunk in chunks:
                model = chunk.model or model
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    if choice.index != 0:
                        continue
                    if text := choice.delta.content:
                        parts.append(text)
                        on_delta(text)
                    finish = choice.finish_reason or finish
                # The read timeout only bounds each wait; this bounds the whole answer.
                if finish is None and time.monotonic() - started > request.timeout:
                    raise BackendTimeout(self._timeout_message(request.timeout))
        finally:
            chunks.close()
        return "".join(parts), model, usage, {"finish_reason": finish}

    def _client(self) -> PerProcess[openai.OpenAI]:
        # One client per backend and process (its connections kept alive); each request carries its
        # own time limit.
        if self._clients is None:
            self._clients = PerProcess(
                lambda: openai.OpenAI(
                    base_url=self.url,
                    api_key=self._api_key,
                    max_retries=0,
                    http_client=openai.DefaultHttpxClient(verify=_ssl_context()),
                )
            )
        return self._clients

    def _translated(self, stream: openai.Stream[T], model: str, timeout: float) -> Iterator[T]:
        # Only the stream's own errors get translated, not those of the caller's on_delta.
        with self._errors(model, timeout), stream:
            yield from cast(Iterable[T], stream)

    @contextmanager
    def _errors(self, model: str | None, timeout: float) -> Iterator[None]:
        """Turn the openai client's errors into koubou's BackendError family."""
        where = f"openai-compatible server at {self.url}"
        try:
            yield
        except BackendError:
            raise
        except openai.APITimeoutError as exc:  # before its base class APIConnectionError
            raise BackendTimeout(self._timeout_message(timeout)) from exc
        except openai.APIConnectionError as exc:
            raise BackendUnavailable(f"cannot reach {where}: {_reason(exc)}") from exc
        except openai.APIStatusError as exc:
            raise self._status_error(exc, model) from exc
        except openai.OpenAIError as exc:
            # An error event in the middle of a stream, or an answer of the wrong shape.
            # llama.cpp's server said "prompt too long" this way too, after an HTTP 200, until ggml-org/llama.cpp#16486.
            detail = _detail(exc) if isinstance(exc, openai.APIError) else str(exc)
            raise prompt_too_long(where, detail) or BackendServerError(f"{where} failed while answering: {detail}") from exc

    def _status_error(self, exc: openai.APIStatusError, model: str | None) -> BackendError:
        return error_for_status(exc.status_code, f"openai-compatible server at {self.url}", _detail(exc), model)

    def _timeout_message(self, timeout: float) -> str:
        return f"openai-compatible server at {self.url} timed out after {timeout:g}s"
