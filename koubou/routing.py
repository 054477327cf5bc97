"""Which backend serves a model: the configured backends, their model lists, the choice."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .backends.base import Backend, BackendError, BackendUnavailable, ModelNotFound
from .backends.ollama import OllamaBackend
from .backends.openai import OpenAIBackend
from .config import ConfigError, Settings

MODELS_TTL = 10.0  # seconds a backend's model list is trusted
UNREACHABLE_TTL = 2.0  # seconds an unreachable backend is not asked again


@dataclass(frozen=True)
class BackendState:
    """What koubou last learned about one backend."""

    name: str
    kind: str
    url: str
    reachable: bool
    models: tuple[str, ...]
    error: str | None
    checked_at: float


def build_router(settings: Settings) -> Router:
    """The backends file's servers; without one, Ollama and (when set) the OpenAI-compatible server."""
    entries = settings.configured_backends()
    if entries:
        listed: list[Backend] = []
        slots: dict[str, int] = {}
        for entry in entries:
            backend: Backend = (
                OllamaBackend(entry.url, name=entry.name)
                if entry.kind == "ollama"
                else OpenAIBackend(entry.url, name=entry.name, api_key=entry.api_key)
            )
            if backend.name in slots:
                raise ConfigError(f"{settings.backends_file}: two backends are named {backend.name!r}")
            listed.append(backend)
            slots[backend.name] = entry.slots
        return Router(listed, slots)
    ollama = OllamaBackend(settings.ollama_host)
    backends: list[Backend] = [ollama]
    slots = {ollama.name: settings.ollama_slots}
    if settings.openai_api_base:
        openai = OpenAIBackend(settings.openai_api_base, api_key=settings.openai_api_key)
        backends.append(openai)
        slots[openai.name] = settings.openai_slots
    return Router(backends, slots)


def model_matches(requested: str, served: str) -> bool:
    """Ollama lists `llama3:latest` for a model asked for as `llama3`."""
    return requested == served or (":" not in requested and served == f"{requested}:latest")


class Router:
    """Picks the backend for a model from cached model lists."""

    def __init__(self, backends: list[Backend], slots: dict[str, int] | None = None) -> None:
        self.backends = backends
        self.slots = slots or {}
        self._states: dict[str, BackendState] = {}
        self._lock = threading.Lock()

    def state(
        self, backend: Backend, timeout: float = 3.0, refresh: bool = False, max_age: float = MODELS_TTL
    ) -> BackendState:
        """The backend's state, asking it again when the cached answer is older than allowed."""
        with self._lock:
            cached = self._states.get(backend.name)
        now = time.monotonic()
        if cached and not refresh:
            ttl = min(max_age, MODELS_TTL if cached.reachable else UNREACHABLE_TTL)
            if now - cached.checked_at < ttl:
                return cached
        try:
            models = tuple(backend.list_models(timeout=timeout))
            state = BackendState(backend.name, backend.kind, backend.url, True, models, None, now)
        except BackendError as error:
            state = BackendState(backend.name, backend.kind, backend.url, False, (), str(error), now)
        with self._lock:
            self._states[backend.name] = state
        return state

    def states(self, timeout: float = 3.0, max_age: float = MODELS_TTL) -> list[BackendState]:
        return [self.state(backend, timeout, max_age=max_age) for backend in self.backends]

    def slots_of(self, backend: Backend) -> int | None:
        """The backend's parallel capacity; None when unlimited."""
        return self.slots.get(backend.name)

    def forget(self, backend: Backend) -> None:
        """Drop what is known of a backend (it just failed), so the next pick asks it again."""
        with self._lock:
            self._states.pop(backend.name, None)

    def candidates(self, model: str) -> list[tuple[Backend, str]]:
        """Every reachable backend listing `model` (in configured order), with the model's name there.

        Raises ModelNotFound when every backend answered and none serves the model, and
        BackendUnavailable when a backend that might serve it could not be reached.
        """
        for refresh in (False, True):
            states = [(backend, self.state(backend, refresh=refresh)) for backend in self.backends]
            found = []
            for backend, state in states:
                served = next((name for name in state.models if model_matches(model, name)), None)
                if served is not None:
                    found.append((backend, served))
            if found:
                return found
        summary = "; ".join(_describe(state) for _, state in states)
        if not any(state.reachable for _, state in states):
            raise BackendUnavailable(f"no LLM backend is reachable ({summary})")
        if not all(state.reachable for _, state in states):
            raise BackendUnavailable(f"model {model!r} is not served by a reachable backend ({summary})")
        raise ModelNotFound(f"model {model!r} is not served by any backend ({summary})")


def _describe(state: BackendState) -> str:
    if not state.reachable:
        return f"{state.kind} at {state.url}: unreachable: {state.error}"
    shown = ", ".join(state.models[:10]) or "no models"
    return f"{state.kind} at {state.url} serves {shown}"
