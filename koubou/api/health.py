"""/health and /backends: broker, database, workers, mirror, LLM backends, queues."""

from __future__ import annotations

import logging
from datetime import timedelta

import redis
from sqlalchemy import select, text

from ..broker import queue_depths as broker_queue_depths
from ..config import redacted
from ..constants import MIRROR_ALIVE_KEY, WorkerStatus
from ..db.models import WorkerRow
from ..db.session import utcnow
from ..slots import SlotLeases
from .context import ApiContext
from .schemas import (
    BackendHealth,
    ComponentHealth,
    HealthResponse,
)

log = logging.getLogger(__name__)

#: Seconds a backend's reachability may be cached for /health.
HEALTH_MAX_AGE = 2.0
WORKER_PING_TIMEOUT = 1.0
#: A heartbeat younger than this (Celery sends one every 2 s) counts as a live worker.
WORKER_HEARTBEAT_FRESH = 10.0


def health_report(ctx: ApiContext) -> HealthResponse:
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
    backends = backend_reports(ctx)
    required = ("broker", "database", "workers")
    ok = all(components[name].ok for name in required)
    return HealthResponse(
        status="ok" if ok else "degraded", components=components, backends=backends,
        queues=queue_depths(ctx), workers=workers,
    )  # fmt: skip


def backend_reports(ctx: ApiContext) -> list[BackendHealth]:
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


def queue_depths(ctx: ApiContext) -> dict[str, int]:
    """Messages waiting in each queue (every priority class of every task type)."""
    try:
        return broker_queue_depths(ctx.redis)
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
