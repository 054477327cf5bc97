"""The Celery app; `celery -A koubou worker` finds it here."""

import gc
import logging
from typing import Any

import redis
from celery import Celery
from celery.signals import after_setup_logger, celeryd_init, worker_before_create_process, worker_ready

from .config import get_settings
from .constants import WORKER_TYPES_KEY, queues_for_types, types_of_queues, worker_type_label

log = logging.getLogger(__name__)

app = Celery("koubou")
app.config_from_object("celeryconfig")
# Registers the delegation task with the app without importing it here (no import cycle).
app.conf.imports = ("koubou.tasks",)


@celeryd_init.connect
def consume_served_types(sender: str, instance: Any, options: dict[str, Any], **_: Any) -> None:
    """A worker started without -Q reads the queues of the task types it serves (KOUBOU_WORKER_TYPES).

    Every process declares every queue (celeryconfig's task_queues), so the API routes a code task
    the same way whatever its own environment says; only what a worker consumes depends on the
    setting. Celery sends this signal before it applies -Q (which then wins) and -X (which then
    leaves out some of these).
    """
    if not options.get("queues"):
        instance.app.amqp.queues.select(queues_for_types(get_settings().worker_types))


@worker_ready.connect
def announce_served_types(sender: Any, **_: Any) -> None:
    """Tell the mirror which task types this worker serves (`workers.worker_type`): from the queues it
    really consumes, so -Q and -X count too. Workers on other machines have no database, only Redis."""
    consumed = sender.app.amqp.queues.consume_from
    label = worker_type_label(types_of_queues(consumed))
    try:
        sender.app.backend.client.hset(WORKER_TYPES_KEY, sender.hostname, label)
    except redis.RedisError:
        log.warning("could not record that %s serves %s tasks", sender.hostname, label, exc_info=True)


@after_setup_logger.connect
def quiet_http_client(loglevel: int | str | None = None, **_: Any) -> None:
    """No line per backend call from the HTTP clients (INFO "HTTP Request: POST ..." from httpx, and from
    httpx2 under the openai SDK): the task's own lines say what ran and how it ended, and at
    --loglevel=INFO every call wrote one more line, at a CPU cost. At DEBUG they stay."""
    level = logging.getLevelName(loglevel.upper()) if isinstance(loglevel, str) else loglevel
    if isinstance(level, int) and level <= logging.DEBUG:
        return
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)


@worker_before_create_process.connect
def keep_pages_shared_with_the_pool(**_: Any) -> None:
    """Freeze the worker's objects before it forks a pool process: the garbage collector then skips them
    in both processes, so the pages holding them stay shared (copy-on-write) instead of being copied
    into every pool process the first time it collects (see the gc.freeze docs)."""
    gc.freeze()
