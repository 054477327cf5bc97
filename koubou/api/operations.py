"""What the task endpoints do: submit (once), cancel, wait, describe a task."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from flask import g
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ..constants import (
    DELEGATE_TASK,
    TaskStatus,
    TaskType,
    cancel_key,
    idempotency_key,
    queue_for_priority,
)
from ..db.models import AgentCommunicationRow, TaskRow
from ..db.session import utcnow
from ..git_workspace import BadPath, checked_path
from ..jobs import DelegationJob, ShippedFile, new_task_id
from ..prompts import context_window, estimate_tokens, user_message
from ..results import BackendView, CANCELLED, read_view, read_views, wait_until_final
from ..streaming import read_progress
from ..workspace import FileRefused
from .context import ApiContext, APIError
from .schemas import (
    DelegateRequest,
    TaskProgress,
    TaskResult,
    TaskStatusResponse,
)

log = logging.getLogger(__name__)

#: Extra seconds Celery's hard limit allows past the task's own timeout.
TIME_LIMIT_GRACE = 30
#: Seconds DELETE /task/<id> waits for a running task to stop before answering 202.
CANCEL_WAIT = 3.0
IDEMPOTENCY_TTL = 24 * 3600


def submit_once(ctx: ApiContext, body: DelegateRequest, client_key: str | None) -> str:
    """Submit, unless the client's Idempotency-Key already names a task: then return that one."""
    if client_key is None:
        return submit(ctx, body, new_task_id())
    if not 0 < len(client_key) <= 255:
        raise APIError(400, "invalid request", "Idempotency-Key must be 1 to 255 characters")
    digest = hashlib.sha256(f"{g.get('agent_id') or ''}\0{client_key}".encode()).hexdigest()
    key = idempotency_key(digest)
    task_id = new_task_id()
    # SET NX makes the claim atomic: two racing requests with one key get one task.
    if ctx.redis.set(key, task_id, nx=True, ex=IDEMPOTENCY_TTL):
        try:
            return submit(ctx, body, task_id)
        except Exception:
            ctx.redis.delete(key)
            raise
    existing = ctx.redis.get(key)
    return existing.decode() if existing else submit(ctx, body, task_id)


def submit(ctx: ApiContext, body: DelegateRequest, task_id: str) -> str:
    settings = ctx.settings
    timeout = min(body.options.timeout, float(settings.max_task_time))
    # Read now, on the API's machine, so the task carries them to whichever worker runs it.
    files = ctx.workspace.read(body.files) if body.files else ()
    if body.type == TaskType.CODE:
        _check_workspace_paths(files)
    job = DelegationJob(
        task_id=task_id,
        type=body.type,
        prompt=body.prompt,
        model=body.options.model or settings.default_model,
        priority=body.priority,
        timeout=timeout,
        temperature=body.options.temperature,
        num_ctx=_num_ctx(ctx, body, files),
        max_tokens=body.options.max_tokens,
        files=files,
    )
    try:
        ctx.celery.send_task(
            DELEGATE_TASK,
            args=[job.model_dump(mode="json")],
            # What Flower shows: readable, with the prompt abbreviated.
            argsrepr=f"{body.type.value} model={job.model} prompt={_abbreviate(body.prompt)!r}"
            + (f" files={len(files)}" if files else ""),
            kwargsrepr="{}",
            task_id=task_id,
            queue=queue_for_priority(body.priority, body.type),
            soft_time_limit=timeout + 5,
            time_limit=timeout + TIME_LIMIT_GRACE,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as error:  # kombu/redis raise several unrelated types for "broker down"
        log.exception("could not send %s to the broker", task_id)
        raise APIError(503, "broker unavailable", f"the task was not queued: {error}") from None
    # The row follows the message: the message, which the broker keeps durably, is what makes the
    # task real, and a `sync` delegation writes its row while a worker already runs the task.
    _record_submitted(ctx, job, body)
    return task_id


_INSERT_TASK = insert(TaskRow.__table__)
_INSERT_ASKED = insert(AgentCommunicationRow.__table__)


def _record_submitted(ctx: ApiContext, job: DelegationJob, body: DelegateRequest) -> None:
    """Write the task's `pending` row and who asked for it (plain INSERTs: this is every delegation's path).

    The mirror may have met the task's events first and adopted it with what they carry; the row
    then gets the content it lacks. With the database down the task still runs (it is queued):
    the mirror adopts it once the database is back, so the client still gets its task id.
    """
    now = utcnow()
    row = {
        "task_id": job.task_id,
        "task_type": body.type.value,
        "status": TaskStatus.PENDING.value,
        "priority": body.priority,
        "content": _row_content(job),
        "agent_id": g.get("agent_id"),
        "created_at": now,
        "updated_at": now,
    }
    asked = _communication(job.task_id, "delegate", {"type": body.type.value, "model": job.model})
    # On the engine, not an ORM session: the session's bookkeeping cost more than the two INSERTs.
    engine = ctx.sessions.kw["bind"]
    try:
        try:
            with engine.begin() as connection:
                connection.execute(_INSERT_TASK, row)
                connection.execute(_INSERT_ASKED, asked)
        except IntegrityError:  # adopted by the mirror already: keep its status, add the content
            kept = {key: row[key] for key in ("task_type", "priority", "content", "agent_id", "created_at")}
            with engine.begin() as connection:
                connection.execute(update(TaskRow).where(TaskRow.task_id == job.task_id).values(**kept))
                connection.execute(_INSERT_ASKED, asked)
    except SQLAlchemyError:
        log.exception("task %s is queued, but its row could not be written now; the mirror will adopt it", job.task_id)


def _check_workspace_paths(files: tuple[ShippedFile, ...]) -> None:
    """Refuse now (400) what a code task's git workspace could not hold, rather than fail in the worker:
    paths inside `.git/` or `.codex/`, and a file that another shipped path needs as a directory."""
    shipped = {f.path for f in files}
    for item in files:
        try:
            checked_path(item.path)
        except BadPath as error:
            raise FileRefused(item.path, str(error)) from None
        for parent in PurePosixPath(item.path).parents:
            if str(parent) in shipped:
                raise FileRefused(item.path, f"{parent} is shipped as a file too, so it cannot also be its directory")


def _num_ctx(ctx: ApiContext, body: DelegateRequest, files: tuple[ShippedFile, ...]) -> int | None:
    """The task's own options.num_ctx, else a window that fits the prompt as it will be sent.

    Ollama cuts a prompt longer than num_ctx (default 4096) without an error, so koubou always
    sends one; a prompt too large for KOUBOU_MAX_NUM_CTX is refused here (413), before it queues.
    A code task's prompt is Codex's, not this message, so its window is the Codex runner's choice
    (KOUBOU_CODEX_NUM_CTX) unless the task names one.
    """
    if body.options.num_ctx is not None or body.type == TaskType.CODE:
        return body.options.num_ctx
    tokens = estimate_tokens(user_message(body.prompt, files))
    return context_window(tokens, body.options.max_tokens, ctx.settings.num_ctx, ctx.settings.max_num_ctx)


def _row_content(job: DelegationJob) -> dict[str, Any]:
    """The job as task_master.content keeps it: each file's path, size and SHA-256, not its text.

    The row is history, kept for good; file contents can be megabytes (and private), and the
    message the worker runs from carries them already.
    """
    content = job.model_dump(mode="json", exclude={"files"})
    content["files"] = [
        {"path": f.path, "bytes": len(f.content.encode()), "sha256": hashlib.sha256(f.content.encode()).hexdigest()}
        for f in job.files
    ]
    return content


def _communication(task_id: str, kind: str, details: dict[str, Any]) -> dict[str, Any]:
    """Who asked koubou what, and when; the prompt itself stays in task_master.content (stored once)."""
    return {
        "task_id": task_id,
        "sender": g.get("agent_id") or "anonymous",
        "receiver": "koubou",
        "message_type": kind,
        "content": {**details, "prompt_ref": f"task_master.content#{task_id}"},
        "created_at": utcnow(),
    }


def _abbreviate(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def backend_view(ctx: ApiContext, task_id: str) -> BackendView | None:
    return read_view(ctx.celery, task_id)


def effective_status(
    ctx: ApiContext, row: TaskRow, views: Mapping[str, BackendView] | None = None
) -> tuple[TaskStatus, BackendView | None]:
    """The row's status, or the result backend's when the mirror has not caught up (`views`: the
    backend's states already read for a page of rows)."""
    status = TaskStatus(row.status)
    if status.is_final:
        return status, None
    view = views.get(row.task_id) if views is not None else backend_view(ctx, row.task_id)
    if view is not None and (view.status.is_final or status == TaskStatus.PENDING):
        return view.status, view
    return status, None


def cancel_task(ctx: ApiContext, task_id: str) -> TaskStatus:
    with ctx.sessions() as session:
        row = session.get(TaskRow, task_id)
    if row is None:
        raise APIError(404, "task not found", f"no task with id {task_id!r}")
    status, _ = effective_status(ctx, row)
    if status.is_final:
        raise APIError(409, "task already final", {"task_id": task_id, "status": status.value})
    # The flag stops the task wherever it is (queued, retrying, streaming); the revoke drops a
    # queued message and SIGUSR1 interrupts a blocking backend call, which then reads the flag.
    ctx.celery.backend.client.set(cancel_key(task_id), "1", ex=ctx.settings.max_task_time * 2 + 60)
    with ctx.sessions.begin() as session:
        session.execute(_INSERT_ASKED, _communication(task_id, "cancel", {"status_then": status.value}))
    ctx.celery.control.revoke(task_id, terminate=True, signal="SIGUSR1")
    if status == TaskStatus.PENDING:
        with ctx.sessions.begin() as session:
            session.execute(
                update(TaskRow)
                .where(TaskRow.task_id == task_id, TaskRow.status == TaskStatus.PENDING.value)
                .values(
                    status=TaskStatus.CANCELLED.value,
                    result={"success": False, "output": None, "error": "cancelled by the client", "error_type": CANCELLED},
                    completed_at=utcnow(),
                    updated_at=utcnow(),
                )
            )
        return TaskStatus.CANCELLED
    view = wait_for_final(ctx, task_id, CANCEL_WAIT)
    return view.status if view is not None and view.status.is_final else status


def wait_for_final(ctx: ApiContext, task_id: str, timeout: float) -> BackendView | None:
    """Wait until the task is final or `timeout` passes; woken when its result is stored."""
    return wait_until_final(ctx.celery, ctx.results, task_id, timeout)


def get_status(ctx: ApiContext, task_id: str) -> TaskStatusResponse:
    with ctx.sessions() as session:
        row = session.get(TaskRow, task_id)
    if row is None:
        raise APIError(404, "task not found", f"no task with id {task_id!r}")
    return describe(ctx, row)


def describe(ctx: ApiContext, row: TaskRow, views: Mapping[str, BackendView] | None = None) -> TaskStatusResponse:
    status, view = effective_status(ctx, row, views)
    result, worker = row.result, row.assigned_worker_type
    if view is not None:  # the mirror lags behind; the result backend is where it catches up from
        result, worker = view.result or result, view.worker or worker
    completed_at = row.completed_at or (view.completed_at if view else None)
    return TaskStatusResponse(
        progress=progress_of(ctx, row, completed_at),
        task_id=row.task_id,
        status=status,
        type=row.task_type,
        priority=row.priority,
        result=TaskResult.model_validate(result) if result else None,
        worker=worker,
        created_at=iso(row.created_at) or "",
        updated_at=iso(row.updated_at) or "",
        started_at=iso(row.started_at),
        completed_at=iso(completed_at),
    )


#: Rows not final yet that a listing of finished tasks looks up in the result backend (oldest first:
#: under a backlog, the oldest waiting tasks are the ones that ran).
LAGGING_ROWS_LOOKED_AT = 1000


def recent_tasks(ctx: ApiContext, wanted: TaskStatus | None, limit: int) -> list[TaskStatusResponse]:
    """The newest tasks, by the status GET /task/<id>/status gives (`wanted` filters).

    The mirror writes a row a moment after the result backend has the outcome; a task that status
    calls completed must be in the list of completed ones already, and not in the list of pending ones.
    """
    statement = select(TaskRow).order_by(TaskRow.created_at.desc()).limit(limit)
    if wanted is not None:
        statement = statement.where(TaskRow.status == wanted.value)
    lagging: list[TaskRow] = []
    with ctx.sessions() as session:
        rows = list(session.scalars(statement).all())
        if wanted is not None and wanted.is_final:
            lagging = list(
                session.scalars(
                    select(TaskRow)
                    .where(TaskRow.status.in_((TaskStatus.PENDING.value, TaskStatus.IN_PROGRESS.value)))
                    .order_by(TaskRow.created_at)
                    .limit(LAGGING_ROWS_LOOKED_AT)
                ).all()
            )
    # The backend's states of every row not final yet, in one MGET rather than a GET per row.
    views = read_views(ctx.celery, [row.task_id for row in rows + lagging if not TaskStatus(row.status).is_final])
    rows += [row for row in lagging if (view := views.get(row.task_id)) and view.status == wanted]
    described = [describe(ctx, row, views) for row in rows]
    if wanted is not None:
        described = [task for task in described if task.status == wanted]
    described.sort(key=lambda task: task.created_at, reverse=True)
    return described[:limit]


def progress_of(ctx: ApiContext, row: TaskRow, completed_at: datetime | None) -> TaskProgress:
    streamed = read_progress(ctx.celery.backend.client, row.task_id)
    started = row.started_at
    end = completed_at or utcnow()
    return TaskProgress(
        tokens=streamed.tokens,
        tokens_per_second=streamed.tokens_per_second,
        queued_ms=_ms_between(row.created_at, started or end),
        running_ms=_ms_between(started, end) if started else None,
    )


def _ms_between(start: datetime, end: datetime) -> float:
    return round(max(0.0, (end - start).total_seconds()) * 1000, 1)


def iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value else None
