"""The baseline for bench/overhead.py: a bare Celery app whose task makes koubou's backend call and nothing else.

It shares koubou's broker (its own queue, exchanges and result keys) and makes the same HTTP call to
the same server with the same client (`ollama`, streamed chat), so the difference in a benchmark is
koubou's own machinery: the API, the pending row, events and the mirror, slot leases, cancel
checks, live output and the result's shape. Delivery settings that change how Celery hands out
messages (late acks, prefetch 1, JSON) are koubou's, so they do not count as a difference.

The worker: BARE_BROKER_URL=... BARE_OLLAMA_HOST=... celery -A bench.bare_celery worker -Q bare.bench
"""

from __future__ import annotations

import os
from functools import cache

import ollama
from celery import Celery

QUEUE = "bare.bench"
TASK = "bare.chat"


def make_app(broker_url: str) -> Celery:
    """A Celery app on `broker_url` (also the result backend), with koubou's delivery settings."""
    app = Celery("bare", broker=broker_url, backend=broker_url)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
    )
    return app


@cache
def _client(host: str) -> ollama.Client:
    # One client per worker process, as a plain Celery task would keep it.
    return ollama.Client(host=host, timeout=30)


def chat(host: str, model: str, prompt: str) -> str:
    """The backend call: a streamed Ollama chat, its pieces joined."""
    stream = _client(host).chat(model, [{"role": "user", "content": prompt}], stream=True)
    return "".join(chunk.message.content or "" for chunk in stream)


app = make_app(os.environ.get("BARE_BROKER_URL", "redis://127.0.0.1:1/0"))


@app.task(name=TASK)
def bare_chat(prompt: str) -> str:
    return chat(os.environ["BARE_OLLAMA_HOST"], os.environ["BARE_MODEL"], prompt)
