"""The Celery app; `celery -A koubou worker` finds it here."""

from typing import Any

from celery import Celery
from celery.signals import celeryd_init

from .config import get_settings
from .constants import queues_for_types

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
