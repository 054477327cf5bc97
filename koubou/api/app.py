"""Flask app factory: routes, one error handler, generated OpenAPI."""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from flask import Flask, Response, jsonify, request
from gunicorn.http.errors import ParseException
from pydantic import BaseModel, ValidationError
from spectree import Response as SpecResponse
from spectree import SpecTree
from sqlalchemy import select
from werkzeug.exceptions import HTTPException

from .. import __version__
from ..celery import app as celery_app
from ..config import Settings, get_settings
from ..db.models import TaskRow, WorkerRow
from ..db.session import make_engine, make_session_factory
from ..prompts import ExceedsMaxContext
from ..results import ResultWaiter
from ..routing import build_router
from ..streaming import event_stream
from ..workspace import (
    FileMissing,
    FileRefused,
    FileTooLarge,
    FileUnreadable,
    NotRegularFile,
    NotText,
    OutsideWorkspace,
    TooManyFiles,
    Workspace,
)
from . import auth
from .context import ApiContext, APIError
from .health import backend_reports, health_report, queue_depths
from .operations import (
    cancel_task,
    effective_status,
    get_status,
    iso,
    recent_tasks,
    submit_once,
    wait_for_final,
)
from .schemas import (
    MAX_PROMPT_CHARS,
    BackendListResponse,
    CancelResponse,
    DelegateRequest,
    DelegateResponse,
    ErrorResponse,
    HealthResponse,
    TaskListQuery,
    TaskListResponse,
    TaskStatusResponse,
    WorkerInfo,
    WorkerListResponse,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
#: How each refused file is answered: (HTTP status, error); the detail names the path and the reason.
FILE_ERRORS: dict[type[FileRefused], tuple[int, str]] = {
    OutsideWorkspace: (400, "file outside the workspace"),
    NotRegularFile: (400, "not a regular file"),
    NotText: (400, "not a text file"),
    FileMissing: (404, "file not found"),
    FileUnreadable: (403, "file not readable"),
    FileTooLarge: (413, "files too large"),
    TooManyFiles: (413, "too many files"),
}


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
        workspace=Workspace.from_settings(settings),
        results=ResultWaiter(celery_app.backend.client, celery_app.backend.task_keyprefix),
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


def _register_routes(app: Flask, spec: SpecTree, ctx: ApiContext) -> None:
    error_responses = {"HTTP_400": ErrorResponse, "HTTP_404": ErrorResponse, "HTTP_503": ErrorResponse}

    @app.post("/task/delegate")
    @spec.validate(
        json=DelegateRequest,
        resp=SpecResponse(
            HTTP_200=DelegateResponse, HTTP_202=DelegateResponse, HTTP_403=ErrorResponse, HTTP_413=ErrorResponse, **error_responses
        ),
        skip_validation=True,
    )
    def delegate() -> tuple[Response, int]:
        """Delegate a prompt to a local model; with `sync`, wait up to `options.timeout`."""
        body: DelegateRequest = _parse(DelegateRequest)
        task_id = submit_once(ctx, body, request.headers.get("Idempotency-Key"))
        if not body.sync:
            return jsonify(DelegateResponse(task_id=task_id, status="delegated").model_dump()), 202
        view = wait_for_final(ctx, task_id, min(body.options.timeout, float(ctx.settings.max_task_time)))
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
        status = cancel_task(ctx, task_id)
        code = 200 if status.is_final else 202
        shown = status.value if status.is_final else "cancelling"
        return jsonify(CancelResponse(task_id=task_id, status=shown).model_dump()), code

    app.add_url_rule("/task/<task_id>", "cancel", cancel, methods=["DELETE"])
    app.add_url_rule("/task/<task_id>/cancel", "cancel_post", cancel, methods=["POST"])

    @spec.validate(resp=SpecResponse(HTTP_200=TaskStatusResponse, HTTP_404=ErrorResponse), skip_validation=True)
    def task_status(task_id: str) -> Response:
        """A task's state, result and timestamps."""
        return jsonify(get_status(ctx, task_id).model_dump(mode="json"))

    # No @spec.validate here: spectree reads the whole response to check it, which would hold
    # every event back until the task ends. The route is documented in the README instead.
    def task_stream(task_id: str) -> Response:
        """Server-sent events: `status` on each change, `delta` (the model's text as it streams), `done`.

        Resume with `Last-Event-ID`; a finished task's stream is `status`, `done`.
        """
        get_status(ctx, task_id)  # 404 for an unknown task, before the stream starts

        def current() -> tuple[str, dict[str, Any] | None]:
            with ctx.sessions() as session:
                row = session.get(TaskRow, task_id)
            assert row is not None
            status, view = effective_status(ctx, row)
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
        """Recent tasks, newest first; `status` filters (by the status GET /task/<id>/status gives),
        `limit` bounds (1-200, default 20)."""
        try:
            query = TaskListQuery.model_validate(request.args.to_dict())
        except ValidationError as error:
            raise APIError(400, "invalid request", _field_errors(error)) from None
        tasks = recent_tasks(ctx, query.status, query.limit)
        return jsonify(TaskListResponse(tasks=tasks).model_dump(mode="json"))

    @app.get("/workers")
    @spec.validate(resp=SpecResponse(HTTP_200=WorkerListResponse), skip_validation=True)
    def list_workers() -> Response:
        """Every worker the mirror has seen, with its state and counters."""
        with ctx.sessions() as session:
            rows = session.scalars(select(WorkerRow).order_by(WorkerRow.worker_id)).all()
        workers = [
            WorkerInfo(
                worker_id=row.worker_id, worker_type=row.worker_type, status=row.status, model_name=row.model_name,
                tasks_completed=row.tasks_completed, tasks_failed=row.tasks_failed,
                active_tasks=row.active_tasks, last_heartbeat=iso(row.last_heartbeat),
            )  # fmt: skip
            for row in rows
        ]
        return jsonify(WorkerListResponse(workers=workers).model_dump(mode="json"))

    @app.get("/backends")
    @spec.validate(resp=SpecResponse(HTTP_200=BackendListResponse), skip_validation=True)
    def list_backends() -> Response:
        """Each LLM backend: reachable or not, and its models."""
        answer = BackendListResponse(backends=backend_reports(ctx), queues=queue_depths(ctx))
        return jsonify(answer.model_dump(mode="json"))

    @app.get("/health")
    @spec.validate(resp=SpecResponse(HTTP_200=HealthResponse, HTTP_503=HealthResponse), skip_validation=True)
    def health() -> tuple[Response, int]:
        """Broker, database and workers (required); mirror and LLM backends (reported)."""
        report = health_report(ctx)
        code = 200 if report.status == "ok" else 503
        if not auth.full_health_allowed():
            return jsonify({"status": report.status}), code  # liveness only for the unauthenticated
        return jsonify(report.model_dump()), code


def _register_errors(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(error: APIError) -> tuple[Response, int]:
        return jsonify(ErrorResponse(error=error.error, detail=error.detail).model_dump()), error.status

    @app.errorhandler(FileRefused)
    def _file_refused(error: FileRefused) -> tuple[Response, int]:
        status, message = FILE_ERRORS.get(type(error), (400, "file refused"))
        detail = {"path": error.path, "reason": error.reason} if error.path is not None else {"reason": error.reason}
        return jsonify(ErrorResponse(error=message, detail=detail).model_dump()), status

    @app.errorhandler(ExceedsMaxContext)
    def _too_large_for_context(error: ExceedsMaxContext) -> tuple[Response, int]:
        detail = {"estimated_tokens": error.estimated, "max_num_ctx": error.maximum, "reason": str(error)}
        return jsonify(ErrorResponse(error="prompt too large for the context window", detail=detail).model_dump()), 413

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> tuple[Response, int]:
        status = error.code or 500
        return jsonify(ErrorResponse(error=error.name.lower(), detail=error.description).model_dump()), status

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return jsonify(ErrorResponse(error="internal error", detail=type(error).__name__).model_dump()), 500
