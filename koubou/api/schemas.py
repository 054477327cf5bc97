"""Request and response models of the HTTP API; /openapi.json is generated from these."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import MAX_FILES_CAP
from ..constants import TaskStatus, TaskType

MAX_PROMPT_CHARS = 1_000_000
#: The longest file path accepted (Linux's PATH_MAX).
MAX_PATH_CHARS = 4096


class TaskOptions(BaseModel):
    """Per-task options."""

    model_config = ConfigDict(extra="forbid", strict=True)

    timeout: float = Field(120.0, gt=0, le=86400, allow_inf_nan=False, description="Seconds the task may take; with sync, how long to wait.")
    model: str | None = Field(None, min_length=1, max_length=200, description="Model name; default KOUBOU_DEFAULT_MODEL.")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    num_ctx: int | None = Field(None, ge=256, le=1_048_576, description="Context window (Ollama's num_ctx); default: KOUBOU_NUM_CTX, or larger when the prompt and files need it.")
    max_tokens: int | None = Field(None, ge=1, le=1_048_576, description="Longest answer, in tokens.")


class DelegateRequest(BaseModel):
    """`POST /task/delegate` body (the seed's shape)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: TaskType = TaskType.GENERAL
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    priority: int = Field(5, ge=1, le=10, description="1-10, 10 most urgent.")
    sync: bool = False
    files: list[Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]] = Field(
        default_factory=list,
        max_length=MAX_FILES_CAP,
        description=(
            "Paths of UTF-8 text files on the API's machine, inside KOUBOU_WORKSPACE_ROOTS (relative paths: "
            "against the first root). The API reads them at submit time and ships their contents with the task; "
            "a general task gets them in its prompt, each delimited with its path. At most KOUBOU_MAX_FILES "
            "(20) files, KOUBOU_MAX_FILE_BYTES (1 MiB) each, KOUBOU_MAX_FILES_BYTES (4 MiB) in all."
        ),
    )
    options: TaskOptions = Field(default_factory=TaskOptions)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value


class TaskResult(BaseModel):
    """The seed's `result`, plus what produced it."""

    model_config = ConfigDict(extra="allow")

    success: bool
    output: str | None = None
    error: str | None = None


class DelegateResponse(BaseModel):
    task_id: str
    status: Literal["delegated", "in_progress", "completed", "failed", "cancelled"]
    result: TaskResult | None = None


class CancelResponse(BaseModel):
    task_id: str
    status: Literal["cancelled", "cancelling", "completed", "failed"]


class TaskProgress(BaseModel):
    tokens: int = Field(description="Pieces of text the model has streamed so far (about one token each).")
    tokens_per_second: float | None = None
    queued_ms: float | None = Field(None, description="From acceptance to start.")
    running_ms: float | None = Field(None, description="From start to the end (or to now).")


class TaskStatusResponse(BaseModel):
    task_id: str
    status: TaskStatus
    type: TaskType | str
    priority: int
    result: TaskResult | None = None
    worker: str | None = None
    created_at: str
    updated_at: str
    started_at: str | None = None
    completed_at: str | None = None
    progress: TaskProgress | None = None


class ComponentHealth(BaseModel):
    name: str
    ok: bool
    detail: str | None = None


class BackendHealth(BaseModel):
    name: str
    kind: str
    url: str
    reachable: bool
    models: list[str]
    error: str | None = None
    slots: int | None = Field(None, description="Requests it serves at once (koubou never sends more).")
    in_use: int | None = Field(None, description="Slots leased right now, across every worker.")


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    components: dict[str, ComponentHealth]
    backends: list[BackendHealth]
    queues: dict[str, int]
    workers: list[str]


class TaskListQuery(BaseModel):
    """`GET /tasks` query string."""

    model_config = ConfigDict(extra="forbid")

    status: TaskStatus | None = None
    limit: int = Field(20, ge=1, le=200)


class TaskListResponse(BaseModel):
    tasks: list[TaskStatusResponse]


class WorkerInfo(BaseModel):
    worker_id: str
    #: The task types it serves (`general+code`, `code`, ...); `celery` when it never said.
    worker_type: str | None = None
    status: str
    model_name: str | None = None
    tasks_completed: int
    tasks_failed: int
    active_tasks: int
    last_heartbeat: str | None = None


class WorkerListResponse(BaseModel):
    workers: list[WorkerInfo]


class BackendListResponse(BaseModel):
    backends: list[BackendHealth]
    queues: dict[str, int] = Field(description="Tasks waiting in each priority queue.")


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None
