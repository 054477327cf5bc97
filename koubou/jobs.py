"""The task message a worker receives and the outcome it returns (typed, JSON on the wire)."""

from __future__ import annotations

import secrets
import string
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from .constants import TaskType

_ID_ALPHABET = string.ascii_letters + string.digits


def new_task_id(now: datetime | None = None) -> str:
    """The seed's readable id, `task_YYYYMMDD_HHMMSS_<12 random [A-Za-z0-9]>` (~71 bits: unique)."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d_%H%M%S")
    # One read of 128 random bits, written in base 62 (the bias of the modulo is below 2^-56):
    # secrets.choice per character read the OS's random source a dozen times per delegation.
    number = int.from_bytes(secrets.token_bytes(16), "big")
    digits = []
    for _ in range(12):
        number, digit = divmod(number, 62)
        digits.append(_ID_ALPHABET[digit])
    return f"task_{stamp}_{''.join(digits)}"


class ShippedFile(BaseModel):
    """A file the API read at submit time; it travels with the task, so any worker has it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    #: The path relative to its workspace root, with `/` separators (how the model and Codex see it).
    path: str
    content: str


class DelegationJob(BaseModel):
    """Everything a worker needs to run one delegation; it never reads the database."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    task_id: str
    type: TaskType = TaskType.GENERAL
    prompt: str
    model: str
    priority: int = 5
    timeout: float = 120.0
    temperature: float | None = None
    num_ctx: int | None = None
    max_tokens: int | None = None
    files: tuple[ShippedFile, ...] = ()


class Outcome(BaseModel):
    """What a delegation produced: the seed's `result` plus model, usage and timings."""

    success: bool
    output: str | None = None
    error: str | None = None
    error_type: str | None = None
    model: str | None = None
    backend: str | None = None
    worker: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    duration_ms: float | None = None
    #: Code tasks: the unified diff of the workspace and the changed files' new contents.
    diff: str | None = None
    changed_files: dict[str, str] | None = None
    #: Every backend call (and routing failure) in order, with its error when it failed.
    attempts: list[dict[str, Any]] | None = None


class DelegationFailed(Exception):
    """Raised by the task so Celery (and Flower) record a failure; carries the outcome."""

    def __init__(self, message: str, outcome: dict[str, object] | None = None) -> None:
        super().__init__(message, outcome or {})
        self.message = message
        self.outcome = outcome or {}

    def __str__(self) -> str:
        return self.message
