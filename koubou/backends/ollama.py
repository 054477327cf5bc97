"""The Ollama backend, spoken to through the official `ollama` client."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import ollama
import pydantic

from koubou.backends.base import (
    BackendError,
    BackendRejected,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
    ChatRequest,
    ChatResult,
    DeltaCallback,
    PerProcess,
    PromptTruncated,
    error_for_status,
    prompt_too_long,
)

#: Seconds to wait for a TCP connection, however long the call may take in all.
CONNECT_TIMEOUT = 10.0
_STATS = ("done_reason", "total_duration", "load_duration", "prompt_eval_duration", "eval_duration")
T = TypeVar("T")


def _limits(timeout: float) -> httpx.Timeout:
    return httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT))


@cache
def _ssl_context() -> ssl.SSLContext:
    # httpx builds a new context per client (~20 ms): one for every client of the process.
    return httpx.create_ssl_context()


def _reason(exc: BaseException) -> str:
    # ollama turns httpx.ConnectError into a generic ConnectionError "from None";
    # the original, which says what went wrong, is still its __context__.
    inner = exc.__cause__ or exc.__context__
    if isinstance(exc, ConnectionError) and isinstance(inner, httpx.TransportError):
        exc = inner
    return str(exc) or type(exc).__name__


class OllamaBackend:
    """An Ollama server."""

    kind = "ollama"

    def __init__(self, url: str, name: str | None = None) -> None:
        self.url = url.rstrip("/")
        # Ollama accepts a bare "host:port"; urlsplit needs a scheme to find the host.
        netloc = urlsplit(self.url if "://" in self.url else f"http://{self.url}").netloc
        self.name = name or f"{self.kind}@{netloc}"
        self._clients: PerProcess[ollama.Client] | None = None

    def __repr__(self) -> str:
        return f"OllamaBackend({self.url!r}, name={self.name!r})"

    def list_models(self, timeout: float = 5.0) -> list[str]:
        """Names of the models the server has pulled (`/api/tags`)."""
        with self._errors(None, timeout):
            listing = self._client().get()._request(ollama.ListResponse, "GET", "/api/tags", timeout=_limits(timeout))
        return [m.model for m in listing.models if m.model]

    def chat(self, request: ChatRequest, on_delta: DeltaCallback | None = None) -> ChatResult:
        """Run one chat completion; stream through `on_delta` when given."""
        started = time.monotonic()
        if not request.model:
            raise BackendRejected(f"no model named for ollama at {self.url}")
        client = self._client().get()
        if on_delta is None:
            with self._errors(request.model, request.timeout):
                final = self._send(client, request, stream=False)
            output = final.message.content or ""
        else:
            with self._errors(request.model, request.timeout):
                stream = self._send(client, request, stream=True)
            output, final = self._consume(stream, request, started + request.timeout, on_delta)
        self._check_truncation(request, final.prompt_eval_count)
        stats = {key: getattr(final, key) for key in _STATS if getattr(final, key) is not None}
        return ChatResult(
            output=output,
            model=final.model or request.model,
            prompt_tokens=final.prompt_eval_count,
            completion_tokens=final.eval_count,
            duration_ms=(time.monotonic() - started) * 1000,
            extra=stats,
        )

    @staticmethod
    def _send(client: ollama.Client, request: ChatRequest, stream: bool) -> Any:
        """POST /api/chat with `truncate: false`.

        Ollama cuts a prompt that does not fit num_ctx and answers anyway. Servers that know the
        `truncate` field (ollama/ollama#12519) answer HTTP 400 naming the sizes instead; older
        servers ignore the field and truncate to exactly num_ctx tokens, which _check_truncation
        catches. ollama-python's chat() has no `truncate` argument (0.6.3), so the body is built
        here and sent through the client's own request method (its errors and stream parsing).
        """
        options: dict[str, Any] = {}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.num_ctx is not None:
            options["num_ctx"] = request.num_ctx
        if request.max_tokens is not None:
            options["num_predict"] = request.max_tokens
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": stream,
            "truncate": False,
        }
        if options:
            body["options"] = options
        return client._request(
            ollama.ChatResponse, "POST", "/api/chat", json=body, stream=stream, timeout=_limits(request.timeout)
        )

    def _check_truncation(self, request: ChatRequest, prompt_tokens: int | None) -> None:
        """Raise PromptTruncated when the prompt filled the whole context window.

        Ollama's runner cuts an over-long prompt to exactly num_ctx tokens and reports that count;
        a prompt that really fills the window leaves no room for an answer either, so both fail.
        """
        if request.num_ctx is None or prompt_tokens is None or prompt_tokens < request.num_ctx:
            return
        estimate = request.prompt_tokens_estimate
        raise PromptTruncated(
            f"ollama at {self.url} cut the prompt to fit its context window and answered from the rest: "
            f"it reported {prompt_tokens} prompt tokens, all of num_ctx {request.num_ctx}"
            + (f", for a prompt koubou estimated at about {estimate} tokens" if estimate is not None else "")
            + ". Send fewer or smaller files or a shorter prompt, or a larger options.num_ctx (up to what the model supports)."
        )

    def _consume(
        self, stream: Iterator[ollama.ChatResponse], request: ChatRequest, deadline: float, on_delta: DeltaCallback
    ) -> tuple[str, ollama.ChatResponse]:
        parts: list[str] = []
        chunks = self._translated(stream, request.model, request.timeout)
        try:
            for chunk in chunks:
                if text := chunk.message.content:
                    parts.append(text)
                    on_delta(text)
                if chunk.done:
                    return "".join(parts), chunk
                if time.monotonic() > deadline:
                    raise BackendTimeout(self._timeout_message(request.timeout))
        finally:
            chunks.close()
        raise BackendServerError(f"ollama at {self.url} ended its answer stream before it was done")

    def _translated(self, stream: Iterable[T], model: str, timeout: float) -> Iterator[T]:
        # Only the stream's own errors get translated, not those of the caller's on_delta.
        with self._errors(model, timeout):
            try:
                yield from stream
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()

    def _client(self) -> PerProcess[ollama.Client]:
        # One client per backend and process; each request carries its own time limit.
        if self._clients is None:
            self._clients = PerProcess(lambda: ollama.Client(host=self.url, verify=_ssl_context()))
        return self._clients

    @contextmanager
    def _errors(self, model: str | None, timeout: float) -> Iterator[None]:
        """Turn the ollama client's and httpx's errors into koubou's BackendError family."""
        where = f"ollama at {self.url}"
        try:
            yield
        except BackendError:
            raise
        except ollama.ResponseError as exc:
            raise self._status_error(exc, model) from exc
        except httpx.TimeoutException as exc:
            raise BackendTimeout(self._timeout_message(timeout)) from exc
        except (httpx.TransportError, ConnectionError) as exc:
            raise BackendUnavailable(f"cannot reach {where}: {_reason(exc)}") from exc
        except (json.JSONDecodeError, pydantic.ValidationError) as exc:
            raise BackendServerError(f"{where} sent an answer that is not Ollama's API: {exc}") from exc

    def _status_error(self, exc: ollama.ResponseError, model: str | None) -> BackendError:
        where, status, detail = f"ollama at {self.url}", exc.status_code, exc.error
        if status < 0:
            # An {"error": ...} line in the middle of a streamed answer.
            return prompt_too_long(where, detail) or BackendServerError(f"{where} failed while answering: {detail}")
        return error_for_status(status, where, detail, model)

    def _timeout_message(self, timeout: float) -> str:
        return f"ollama at {self.url} timed out after {timeout:g}s"
