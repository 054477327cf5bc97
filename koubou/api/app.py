"""Flask app factory: routes, one error handler, generated OpenAPI."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from celery import Celery
from flask import Flask, Response, g, jsonify, request
from gunicorn.http.errors import ParseException
from pydantic import BaseModel, ValidationError
from spectree import Response as SpecResponse
from spectree import SpecTree
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException

from .. import __version__
from ..celery import app as celery_app
from ..config import Settings, get_settings, redacted
from ..constants import DELEGATE_TASK, QUEUES, MIRROR_ALIVE_KEY, TaskStatus, WorkerStatus, cancel_key, idempotency_key, queue_for_priority
from ..db.models import AgentCommunicationRow, TaskRow, WorkerRow
from ..db.session import make_engine, make_session_factory, utcnow
from ..jobs import DelegationJob, new_task_id
from ..results import CANCELLED, BackendView, view_from_meta
from ..routing import Router, build_router
from ..slots import SlotLeases
from ..streaming import event_stream, read_progress
from . import auth
from .schemas import (
    BackendHealth,
    BackendListResponse,
    CancelResponse,
    ComponentHealth,
    DelegateRequest,
    DelegateResponse,
    ErrorResponse,
    HealthResponse,
    TaskResult,
    MAX_PROMPT_CHARS,
    TaskListQuery,
    TaskListResponse,
    TaskProgress,
    TaskStatusResponse,
    WorkerInfo,
    WorkerListResponse,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
#: Extra seconds Celery's hard limit allows past the task's own timeout.
TIME_LIMIT_GRACE = 30
#: Seconds a backend's reachability may be cached for /health.
HEALTH_MAX_AGE = 2.0
WORKER_PING_TIMEOUT = 1.0
#: Seconds DELETE /task/<id> waits for a running task to stop before answering 202.
CANCEL_WAIT = 3.0
IDEMPOTENCY_TTL = 24 * 3600
#: A heartbeat younger than this (Celery sends one every 2 s) counts as a live worker.
WORKER_HEARTBEAT_FRESH = 10.0


class APIError(Exception):
    """An error answered as `{"error", "detail"}` with an HTTP status."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


@dataclass
class ApiContext:
    settings: Settings
    celery: Celery
    sessions: sessionmaker[Session]
    router: Router
    redis: redis.Redis


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API; one instance per gunicorn worker process."""
    settings = settings or get_settings()
    settings.ensure_home()
    ctx = ApiContext(
        settings=settings,
        celery=celery_app,
        sessions=make_session_factory(make_engine(settings.database_url)),
        router=build_router(settings),
        redis=redis.Redis.from_url(settings.broker, socket_timeout=2, socket_connect_timeout=2),
    )
    app = Flask("koubou")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    spec = SpecTree("flask", title="koubou", version=__version__, path="apidoc", annotations=True, **auth.OPENAPI_SECURITY)
    auth.install(app, ctx.sessions, settings)
    _register_routes(app, spec, ctx)
    _register_errors(app)
    spec.register(app)
    app.add_url_rule("/openapi.json", "openapi", lambda: jsonify(spec.spec))
    return app


def _parse(model: type[BaseModel]) -> Any:
    try:
        raw = request.get_data(cache=False)
    except ParseException as error:  # gunicorn raises these mid-read for a malformed chunked body
        raise APIError(400, "invalid request body", f"{type(error).__name__}: {error}") from None
    if not raw.strip():
        raise APIError(400, "invalid request", "the body must be a JSON object")
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        if any(item["type"] == "json_invalid" for item in error.errors()):
            raise APIError(400, "invalid JSON", error.errors()[0]["msg"]) from None
        if any(item["type"] == "string_too_long" and item["loc"] == ("prompt",) for item in error.errors()):
            raise APIError(413, "prompt too long", f"at most {MAX_PROMPT_CHARS} characters") from None
        raise APIError(400, "invalid request", _field_errors(error)) from None


def _field_errors(error: ValidationError) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(p) for p in item["loc"]) or "(body)", "message": item["msg"]}
        for item in error.errors(include_url=False)
    ]


def _iso(value: Any) -> str | None:
    return value.isoformat(timespec="seconds") if value else None


def _register_routes(app: Flask, spec: SpecTree, ctx: ApiContext) -> None:
    error_responses = {"HTTP_400": ErrorResponse, "HTTP_404": ErrorResponse, "HTTP_503": ErrorResponse}

    @app.post("/task/delegate")
    @spec.validate(
        json=DelegateRequest,
        resp=SpecResponse(HTTP_200=DelegateResponse, HTTP_202=DelegateResponse, **error_responses),
        skip_validation=True,
    )
    def delegate() -> tuple[Response, int]:
        """Delegate a prompt to a local model; with `sync`, wait up to `options.timeout`."""
        body: DelegateRequest = _parse(DelegateRequest)
        task_id = _submit_once(ctx, body, request.headers.get("Idempotency-Key"))
        if not body.sync:
            return jsonify(DelegateResponse(task_id=task_id, status="delegated").model_dump()), 202
        view = _wait(ctx, task_id, min(body.options.timeout, float(ctx.settings.max_task_time)))
        if view is None or not view.status.is_final:
            return jsonify(DelegateResponse(task_id=task_id, status="in_progress").model_dump()), 202
        answer = DelegateResponse(task_id=task_id, status=view.status.value, result=view.result)
        return jsonify(answer.model_dump()), 200

    @spec.validate(
        resp=SpecResponse(HTTP_200=CancelResponse, HTTP_202=CancelResponse, HTTP_404=ErrorResponse, HTTP_409=ErrorResponse),
        skip_validation=True,
    )
    def cancel(task_id: str) -> tuple[Response, int]:
        """Cancel a queued or running task; 409 when it is already final."""
        status = _cancel(ctx, task_id)
        code = 200 if status.is_final else 202
        shown = status.value if status.is_final else "cancelling"
        return jsonify(CancelResponse(task_id=task_id, status=shown).model_dump()), code

    app.add_url_rule("/task/<task_id>", "cancel", cancel, methods=["DELETE"])
    app.add_url_rule("/task/<task_id>/cancel", "cancel_post", cancel, methods=["POST"])

    @spec.validate(resp=SpecResponse(HTTP_200=TaskStatusResponse, HTTP_404=ErrorResponse), skip_validation=True)
    def task_status(task_id: str) -> Response:
        """A task's state, result and timestamps."""
        return jsonify(_status(ctx, task_id).model_dump(mode="json"))

    # No @spec.validate here: spectree reads the whole response to check it, which would hold
    # every event back until the task ends. The route is documented in the README instead.
    def task_stream(task_id: str) -> Response:
        """Server-sent events: `status` on each change, `delta` (the model's text as it streams), `done`.

        Resume with `Last-Event-ID`; a finished task's stream is `status`, `done`.
        """
        _status(ctx, task_id)  # 404 for an unknown task, before the stream starts

        def current() -> tuple[str, dict[str, Any] | None]:
            with ctx.sessions() as session:
                row = session.get(TaskRow, task_id)
            assert row is not None
            status, view = _effective_status(ctx, row)
            if not status.is_final:
                return status.value, None
            result = view.result if view is not None and view.result else row.result
            return status.value, {"task_id": task_id, "status": status.value, "result": result}

        deadline = time.monotonic() + ctx.settings.max_task_time * 2 + 60
        events = event_stream(
            ctx.celery.backend.client, task_id, current, request.headers.get("Last-Event-ID"), deadline
        )
        return Response(events, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    app.add_url_rule("/task/<task_id>/stream", "task_stream", task_stream)
    app.add_url_rule("/task/<task_id>/status", "task_status", task_status)
    app.add_url_rule("/task/status/<task_id>", "task_status_alias", task_status)  # the original code's form

    @app.get("/tasks")
    @spec.validate(query=TaskListQuery, resp=SpecResponse(HTTP_200=TaskListResponse, HTTP_400=ErrorResponse), skip_validation=True)
    def list_tasks() -> Response:
        """Recent tasks, newest first; `status` filters, `limit` bounds (1-200, default 20)."""
        try:
            query = TaskListQuery.model_validate(request.args.to_dict())
        except ValidationError as error:
            raise APIError(400, "invalid request", _field_errors(error)) from None
        statement = select(TaskRow).order_by(TaskRow.created_at.desc()).limit(query.limit)
        if query.status is not None:
            statement = statement.where(TaskRow.status == query.status.value)
        with ctx.sessions() as session:
            rows = session.scalars(statement).all()
        return jsonify(TaskListResponse(tasks=[_describe(ctx, row) for row in rows]).model_dump(mode="json"))

    @app.get("/workers")
    @spec.validate(resp=SpecResponse(HTTP_200=WorkerListResponse), skip_validation=True)
    def list_workers() -> Response:
        """Every worker the mirror has seen, with its state and counters."""
        with ctx.sessions() as session:
            rows = session.scalars(select(WorkerRow).order_by(WorkerRow.worker_id)).all()
        workers = [
            WorkerInfo(
                worker_id=row.worker_id, status=row.status, model_name=row.model_name,
                tasks_completed=row.tasks_completed, tasks_failed=row.tasks_failed,
                active_tasks=row.active_tasks, last_heartbeat=_iso(row.last_heartbeat),
            )  # fmt: skip
            for row in rows
        ]
        return jsonify(WorkerListResponse(workers=workers).model_dump(mode="json"))

    @app.get("/backends")
    @spec.validate(resp=SpecResponse(HTTP_200=BackendListResponse), skip_validation=True)
    def list_backends() -> Response:
        """Each LLM backend: reachable or not, and its models."""
        answer = BackendListResponse(backends=_backends(ctx), queues=_queue_depths(ctx))
        return jsonify(answer.model_dump(mode="json"))

    @app.get("/health")
    @spec.validate(resp=SpecResponse(HTTP_200=HealthResponse, HTTP_503=HealthResponse), skip_validation=True)
    def health() -> tuple[Response, int]:
        """Broker, database and workers (required); mirror and LLM backends (reported)."""
        report = _health(ctx)
        code = 200 if report.status == "ok" else 503
        if not auth.full_health_allowed():
            return jsonify({"status": report.status}), code  # liveness only for the unauthenticated
        return jsonify(report.model_dump()), code


def _submit_once(ctx: ApiContext, body: DelegateRequest, client_key: str | None) -> str:
    """Submit, unless the client's Idempotency-Key already names a task: then return that one."""
    if client_key is None:
        return _submit(ctx, body, new_task_id())
    if not 0 < len(client_key) <= 255:
        raise APIError(400, "invalid request", "Idempotency-Key must be 1 to 255 characters")
    digest = hashlib.sha256(f"{g.get('agent_id') or ''}\0{client_key}".encode()).hexdigest()
    key = idempotency_key(digest)
    task_id = new_task_id()
    # SET NX makes the claim atomic: two racing requests with one key get one task.
    if ctx.redis.set(key, task_id, nx=True, ex=IDEMPOTENCY_TTL):
        try:
            return _submit(ctx, body, task_id)
        except Exception:
            ctx.redis.delete(key)
            raise
    existing = ctx.redis.get(key)
    return existing.decode() if existing else _submit(ctx, body, task_id)


def _submit(ctx: ApiContext, body: DelegateRequest, task_id: str) -> str:
    settings = ctx.settings
    timeout = min(body.options.timeout, float(settings.max_task_time))
    job = DelegationJob(
        task_id=task_id,
        type=body.type,
        prompt=body.prompt,
        model=body.options.model or settings.default_model,
        priority=body.priority,
        timeout=timeout,
        temperature=body.options.temperature,
        num_ctx=body.options.num_ctx,
        max_tokens=body.options.max_tokens,
    )
    now = utcnow()
    # The row exists before the message does, so the mirror never sees an unknown task.
    with ctx.sessions.begin() as session:
        session.add(
            TaskRow(
                task_id=task_id,
                task_type=body.type.value,
                status=TaskStatus.PENDING.value,
                priority=body.priority,
                content=job.model_dump(mode="json"),
                agent_id=g.get("agent_id"),
                created_at=now,
                updated_at=now,
            )
        )
        session.add(_communication(task_id, "delegate", {"type": body.type.value, "model": job.model}))
    try:
        ctx.celery.send_task(
            DELEGATE_TASK,
            args=[job.model_dump(mode="json")],
            # What Flower shows: readable, with the prompt abbreviated.
            argsrepr=f"{body.type.value} model={job.model} prompt={_abbreviate(body.prompt)!r}",
            kwargsrepr="{}",
            task_id=task_id,
            queue=queue_for_priority(body.priority),
            soft_time_limit=timeout + 5,
            time_limit=timeout + TIME_LIMIT_GRACE,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except Exception as error:  # kombu/redis raise several unrelated types for "broker down"
        log.exception("could not send %s to the broker", task_id)
        with ctx.sessions.begin() as session:
            row = session.get(TaskRow, task_id)
            if row is not None:
                row.status = TaskStatus.FAILED.value
                row.result = {"success": False, "output": None, "error": f"broker unavailable: {error}"}
                row.updated_at = utcnow()
        raise APIError(503, "broker unavailable", f"the task was not queued: {error}") from None
    return task_id


def _communication(task_id: str, kind: str, details: dict[str, Any]) -> AgentCommunicationRow:
    """Who asked koubou what, and when; the prompt itself stays in task_master.content (stored once)."""
    return AgentCommunicationRow(
        task_id=task_id,
        sender=g.get("agent_id") or "anonymous",
        receiver="koubou",
        message_type=kind,
        content={**details, "prompt_ref": f"task_master.content#{task_id}"},
        created_at=utcnow(),
    )


def _abbreviate(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _backend_view(ctx: ApiContext, task_id: str) -> BackendView | None:
    try:
        return view_from_meta(ctx.celery.backend.get_task_meta(task_id))
    except Exception:  # the result backend being down must not break status reads
        log.warning("result backend unavailable while reading %s", task_id, exc_info=True)
        return None


def _effective_status(ctx: ApiContext, row: TaskRow) -> tuple[TaskStatus, BackendView | None]:
    """The row's status, or the result backend's when the mirror has not caught up."""
    status = TaskStatus(row.status)
    if status.is_final:
        return status, None
    view = _backend_view(ctx, row.task_id)
    if view is not None and (view.status.is_final or status == TaskStatus.PENDING):
        return view.status, view
    return status, None


def _cancel(ctx: ApiContext, task_id: str) -> TaskStatus:
    with ctx.sessions() as session:
        row = session.get(TaskRow, task_id)
    if row is None:
        raise APIError(404, "task not found", f"no task with id {task_id!r}")
    status, _ = _effective_status(ctx, row)
    if status.is_final:
        raise APIError(409, "task already final", {"task_id": task_id, "status": status.value})
    # The flag stops the task wherever it is (queued, retrying, streaming); the revoke drops a
    # queued message and SIGUSR1 interrupts a blocking backend call, which then reads the flag.
    ctx.celery.backend.client.set(cancel_key(task_id), "1", ex=ctx.settings.max_task_time * 2 + 60)
    with ctx.sessions.begin() as session:
        session.add(_communication(task_id, "cancel", {"status_then": status.value}))
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
    view = _wait(ctx, task_id, CANCEL_WAIT)
    return view.status if view is not None and view.status.is_final else status


def _wait(ctx: ApiContext, task_id: str, timeout: float) -> BackendView | None:
    """Poll the result backend until the task is final or `timeout` passes."""
    deadline = time.monotonic() + timeout
    # Start fast (most answers from a local model take well under a second to route) and back off.
    delay = 0.005
    view = None
    while True:
        view = _backend_view(ctx, task_id)
        if view is not None and view.status.is_final:
            return view
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return view
        time.sleep(min(delay, remaining))
        delay = min(delay * 1.3, 0.1)


def _status(ctx: ApiContext, task_id: str) -> TaskStatusResponse:
    with ctx.sessions() as session:
        row = session.get(TaskRow, task_id)
    if row is None:
        raise APIError(404, "task not found", f"no task with id {task_id!r}")
    return _describe(ctx, row)


def _describe(ctx: ApiContext, row: TaskRow) -> TaskStatusResponse:
    status, view = _effective_status(ctx, row)
    result, worker = row.result, row.assigned_worker_type
    if view is not None:  # the mirror lags behind; the result backend is where it catches up from
        result, worker = view.result or result, view.worker or worker
    completed_at = row.completed_at or (view.completed_at if view else None)
    return TaskStatusResponse(
        progress=_progress(ctx, row, completed_at),
        task_id=row.task_id,
        status=status,
        type=row.task_type,
        priority=row.priority,
        result=TaskResult.model_validate(result) if result else None,
        worker=worker,
        created_at=_iso(row.created_at) or "",
        updated_at=_iso(row.updated_at) or "",
        started_at=_iso(row.started_at),
        completed_at=_iso(completed_at),
    )


def _progress(ctx: ApiContext, row: TaskRow, completed_at: datetime | None) -> TaskProgress:
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


def _health(ctx: ApiContext) -> HealthResponse:
    components: dict[str, ComponentHealth] = {}
    try:
        ctx.redis.ping()
        components["broker"] = ComponentHealth(name="broker", ok=True, detail=redacted(ctx.settings.broker))
        mirror_alive = bool(ctx.redis.exists(MIRROR_ALIVE_KEY))
    except redis.RedisError as error:
        components["broker"] = ComponentHealth(name="broker", ok=False, detail=str(error))
        mirror_alive = False
    try:
        with ctx.sessions() as session:
            session.execute(text("SELECT 1"))
        components["database"] = ComponentHealth(name="database", ok=True)
    except Exception as error:  # any driver error means the database is down for us
        components["database"] = ComponentHealth(name="database", ok=False, detail=str(error))
    workers: list[str] = []
    if components["broker"].ok:
        heartbeating = _heartbeating_workers(ctx)
        workers = sorted(heartbeating | _answering_workers(ctx, expected=len(heartbeating)))
    components["workers"] = ComponentHealth(
        name="workers", ok=bool(workers), detail=f"{len(workers)} answering" if workers else "no worker answered"
    )
    components["mirror"] = ComponentHealth(
        name="mirror", ok=mirror_alive, detail=None if mirror_alive else "not running: rows lag; status reads the result backend"
    )
    backends = _backends(ctx)
    required = ("broker", "database", "workers")
    ok = all(components[name].ok for name in required)
    return HealthResponse(
        status="ok" if ok else "degraded", components=components, backends=backends,
        queues=_queue_depths(ctx), workers=workers,
    )  # fmt: skip


def _backends(ctx: ApiContext) -> list[BackendHealth]:
    leases = SlotLeases(ctx.celery.backend.client)
    answer = []
    for backend, state in zip(ctx.router.backends, ctx.router.states(timeout=1.0, max_age=HEALTH_MAX_AGE)):
        try:
            in_use: int | None = leases.in_use(backend.name)
        except redis.RedisError:
            in_use = None
        answer.append(
            BackendHealth(
                name=state.name, kind=state.kind, url=state.url, reachable=state.reachable, models=list(state.models),
                error=state.error, slots=ctx.router.slots_of(backend), in_use=in_use,
            )  # fmt: skip
        )
    return answer


def _queue_depths(ctx: ApiContext) -> dict[str, int]:
    try:
        return {queue: int(ctx.redis.llen(queue)) for queue in QUEUES}
    except redis.RedisError:
        return {}


def _answering_workers(ctx: ApiContext, expected: int) -> set[str]:
    """Workers that answer a ping now; stops waiting once the `expected` number replied."""
    try:
        replies = ctx.celery.control.ping(timeout=WORKER_PING_TIMEOUT, limit=expected or None) or []
        return {name for reply in replies for name in reply}
    except Exception as error:  # a broker hiccup during the broadcast
        log.warning("worker ping failed: %s", error)
        return set()


def _heartbeating_workers(ctx: ApiContext) -> set[str]:
    """Workers whose heartbeats the mirror saw lately: a busy or just-started worker can miss a ping."""
    cutoff = utcnow() - timedelta(seconds=WORKER_HEARTBEAT_FRESH)
    try:
        with ctx.sessions() as session:
            rows = session.execute(
                select(WorkerRow.worker_id)
                .where(WorkerRow.status != WorkerStatus.OFFLINE.value)
                .where(WorkerRow.last_heartbeat >= cutoff)
            )
            return {worker_id for (worker_id,) in rows}
    except Exception:  # the database component reports this failure
        return set()


def _register_errors(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(error: APIError) -> tuple[Response, int]:
        return jsonify(ErrorResponse(error=error.error, detail=error.detail).model_dump()), error.status

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> tuple[Response, int]:
        status = error.code or 500
        return jsonify(ErrorResponse(error=error.name.lower(), detail=error.description).model_dump()), status

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return jsonify(ErrorResponse(error="internal error", detail=type(error).__name__).model_dump()), 500
