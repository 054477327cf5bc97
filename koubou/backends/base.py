"""The backend interface, its request/result types and its error hierarchy."""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

_Made = TypeVar("_Made")


class BackendError(Exception):
    """Base class for every error a backend call can raise."""

    #: Whether retrying the same call later could succeed.
    transient: bool = False


class BackendUnavailable(BackendError):
    """The server could not be reached (connection refused, reset, DNS)."""

    transient = True


class BackendBusy(BackendError):
    """The server is over capacity (HTTP 503 / 429)."""

    transient = True


class BackendTimeout(BackendError):
    """The server did not answer within the call's time limit."""

    transient = True


class BackendServerError(BackendError):
    """The server failed with a 5xx other than 503."""

    transient = True


class ModelNotFound(BackendError):
    """The server does not serve the requested model."""


class BackendRejected(BackendError):
    """The server refused the request as invalid (a 4xx other than 404/429)."""


class PromptTooLong(BackendRejected):
    """The server refused the prompt: it does not fit the model's context window."""


class PromptTruncated(BackendError):
    """The server cut the prompt to fit its context window and answered anyway: the answer is not
    about the whole prompt, so it must not pass as a success."""


# How servers word "the prompt does not fit": llama.cpp's server (and Ollama passing it on),
# vLLM and OpenAI, Ollama's own engine. The sizes, when given, come out of the first two.
_LLAMA_CPP_SIZES = re.compile(r"request \((\d+) tokens\) exceeds the available context size \((\d+) tokens\)")
_VLLM_SIZES = re.compile(r"maximum context length is (\d+) tokens.*?(?:requested|resulted in) (\d+) tokens", re.S)
_OVERFLOW = re.compile(r"exceed_context_size_error|context_length_exceeded|exceeds? the (?:available )?context|maximum context length", re.I)


def prompt_too_long(where: str, detail: str) -> PromptTooLong | None:
    """A PromptTooLong naming the sizes when `detail` is a server saying the prompt does not fit."""
    if not _OVERFLOW.search(detail):
        return None
    sizes = ""
    if found := _LLAMA_CPP_SIZES.search(detail):
        sizes = f" ({found[1]} prompt tokens, context window {found[2]})"
    elif found := _VLLM_SIZES.search(detail):
        sizes = f" ({found[2]} tokens asked for, context window {found[1]})"
    return PromptTooLong(
        f"{where} refused the prompt: it does not fit the model's context window{sizes}. "
        f"Send fewer or smaller files or a shorter prompt, or give the server a larger context. Server said: {detail[:300]}"
    )


def error_for_status(status: int, where: str, detail: str, model: str | None) -> BackendError:
    """The BackendError an HTTP error status means, the same for every server kind."""
    if status in (400, 413) and (too_long := prompt_too_long(where, detail)) is not None:
        return too_long
    if status == 404 and model is not None:
        return ModelNotFound(f"model {model!r} not found on {where} ({detail})")
    if status in (429, 503):
        return BackendBusy(f"{where} is busy (HTTP {status}): {detail}")
    if status >= 500:
        return BackendServerError(f"{where} failed (HTTP {status}): {detail}")
    return BackendRejected(f"{where} rejected the request (HTTP {status}): {detail}")


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class ChatRequest:
    """One chat call: what to send and how long it may take in all."""

    model: str
    messages: tuple[ChatMessage, ...]
    temperature: float | None = None
    num_ctx: int | None = None
    max_tokens: int | None = None
    timeout: float = 120.0
    #: The prompt's size in tokens as koubou estimated it (named in truncation errors).
    prompt_tokens_estimate: int | None = None


@dataclass(frozen=True)
class ChatResult:
    """A complete answer with the usage the server reported."""

    output: str
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    duration_ms: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)


#: Called with each piece of text as the model streams it.
DeltaCallback = Callable[[str], None]


class Backend(Protocol):
    """An LLM server koubou can send chat requests to."""

    name: str
    kind: str  # "ollama" | "openai"
    url: str

    def list_models(self, timeout: float = 5.0) -> list[str]:
        """Names of the models the server serves; raises BackendError when unreachable."""
        ...

    def chat(self, request: ChatRequest, on_delta: DeltaCallback | None = None) -> ChatResult:
        """Run one chat completion; stream through `on_delta` when given."""
        ...


class PerProcess(Generic[_Made]):
    """A value made once per process: an HTTP client whose pooled connections (kept alive between
    calls, so a remote server costs one TLS handshake, not one per call) must never be shared by a
    forked child with its parent."""

    def __init__(self, make: Callable[[], _Made]) -> None:
        self._make = make
        self._made: dict[int, _Made] = {}

    def get(self) -> _Made:
        pid = os.getpid()
        made = self._made.get(pid)
        if made is None:
            made = self._made.setdefault(pid, self._make())
            close = getattr(made, "close", None)
            if callable(close):
                # Its sockets are closed when its owner goes (or at exit), not left to the collector.
                weakref.finalize(self, close)
        return made
