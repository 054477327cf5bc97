"""Celery settings for koubou, derived from koubou's one settings object (koubou.config)."""

from urllib.parse import urlsplit

from kombu import Exchange, Queue

from koubou.config import get_settings
from koubou.constants import DEFAULT_QUEUE, DELEGATE_TASK, QUEUES

_settings = get_settings()

broker_url = _settings.broker
if urlsplit(broker_url).scheme == "redis":
    # kombu's Redis transport, one client per channel instead of one per command (koubou.transport);
    # rediss:// keeps kombu's own, which derives its TLS defaults from that scheme name.
    broker_transport = "koubou.transport:Transport"
# koubou.results.ResultBackend: Celery's Redis backend on the same URL, without a per-task subscription.
result_backend = f"koubou.results:ResultBackend+{_settings.result_backend}"
broker_connection_retry_on_startup = True

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# koubou's own queue, exchange and event/control names: another Celery app on a shared
# Redis neither takes koubou's tasks nor floods its mirror with foreign events.
task_default_queue = DEFAULT_QUEUE
task_default_exchange = "koubou"
task_default_routing_key = DEFAULT_QUEUE
task_queues = tuple(Queue(name, Exchange("koubou", type="direct"), routing_key=name) for name in QUEUES)
task_routes = {DELEGATE_TASK: {"queue": DEFAULT_QUEUE}}
event_exchange = "koubou.events"
control_exchange = "koubou.control"

# The mirror builds rows from these events; the result backend is the fallback it
# reconciles against when events are lost (they are best effort).
worker_send_task_events = True
# No task-sent event: the API writes the `pending` row itself, so the event told the mirror nothing,
# cost every delegation a second broker round trip on its path, and made the mirror and Flower
# each handle a quarter more events. Waiting tasks show as queue depths (/health, Flower's Broker page).
task_send_sent_event = False
# Not stored: a STARTED state (the task-started event already says it; storing it cost every task a
# durable write, fsynced, on its path) and the extended meta (it copied the whole job, prompt and
# files, into the result for a week); the outcome itself names the worker.
task_track_started = False
result_extended = False
result_expires = 7 * 24 * 3600
# A broker/result-backend restart while a task finishes must not turn its answer into a failure:
# retry storing the result (about a minute in all) instead of raising.
result_backend_always_retry = True
result_backend_max_retries = 30
result_backend_base_sleep_between_retries_ms = 200
result_backend_max_sleep_between_retries_ms = 3000

# A task is acknowledged only after it ran, so a worker that dies mid-task loses nothing;
# prefetch 1 keeps one slow task from holding others hostage on a busy worker.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
task_soft_time_limit = _settings.max_task_time
task_time_limit = _settings.max_task_time + 30
# Redis redelivers an unacknowledged message after this; it must exceed the longest task.
broker_transport_options = {
    "visibility_timeout": _settings.max_task_time * 2 + 60,
    # Read the queues in name order, which is priority order (see koubou.constants).
    "queue_order_strategy": "sorted",
}

# `--autoscale=MAX,MIN` grows the pool under backlog only up to the slots of the backends this worker
# can use, keeps the prefetch at the pool size, and stops only idle processes (see koubou.autoscale).
worker_autoscaler = "koubou.autoscale:SlotAwareAutoscaler"

# Task events leave in batches every 0.1 s (koubou.worker_events), not one message per event.
worker_consumer = "koubou.worker_events:BatchingConsumer"

worker_hijack_root_logger = False
worker_redirect_stdouts = False
