"""What the broker still holds for a task: kombu's Redis transport, read and repaired directly.

kombu keeps a delivered-but-unacknowledged message in the `unacked` hash until the worker acks
it; when the worker dies it is only given back after the visibility timeout (twice the longest
task). The mirror's reaper uses these helpers to give back, at once, the messages of a worker it
knows is gone. They rely on kombu 5.7's Redis layout (pinned in requirements.txt).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import redis
from celery import Celery
from kombu.utils.encoding import bytes_to_str

from .constants import PROMOTIONS, QUEUES


def _unacked_task_id(raw: bytes | str) -> str | None:
    """The task id of an `unacked` hash entry: JSON [message, exchange, routing_key]."""
    try:
        message = json.loads(raw)[0]
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return _message_task_id(message)


def requeue_unacked(app: Celery, task_ids: Iterable[str]) -> set[str]:
    """Put the unacknowledged messages of these tasks back on their queue; return the ids requeued."""
    wanted = set(task_ids)
    requeued: set[str] = set()
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        for tag, raw in client.hscan_iter(channel.unacked_key):
            task_id = _unacked_task_id(raw)
            if task_id in wanted:
                channel.qos.restore_by_tag(tag, client=client)
                requeued.add(task_id)
    return requeued


def delivered_task_ids(app: Celery) -> dict[str, float]:
    """The tasks delivered to a worker and not yet acknowledged, with when they were delivered (the
    delivering worker's clock, as kombu's visibility timeout reads it)."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        when = {bytes_to_str(tag): at for tag, at in client.zrange(channel.unacked_index_key, 0, -1, withscores=True)}
        return {
            task_id: when.get(bytes_to_str(tag), 0.0)
            for tag, raw in client.hscan_iter(channel.unacked_key)
            if (task_id := _unacked_task_id(raw))
        }


def unacked_task_ids(app: Celery) -> set[str]:
    """Ids of the tasks delivered to a worker and not yet acknowledged."""
    return set(delivered_task_ids(app))


def held_task_ids(app: Celery) -> set[str]:
    """Ids of every task the broker holds: waiting in a queue or delivered and unacknowledged."""
    return queued_task_ids(app) | unacked_task_ids(app)


def queue_depths(client: redis.Redis, queues: Iterable[str] = QUEUES) -> dict[str, int]:
    """How many messages wait in each queue (one round trip). koubou sends no message priorities,
    so every message is in the queue's main list."""
    names = list(queues)
    with client.pipeline(transaction=False) as pipe:
        for queue in names:
            pipe.llen(queue)
        return {queue: int(depth) for queue, depth in zip(names, pipe.execute())}


def queued_task_ids(app: Celery, queues: Iterable[str] = QUEUES) -> set[str]:
    """Ids of the tasks waiting in the queues (every priority sub-list)."""
    found: set[str] = set()
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        client = channel.client
        for queue in queues:
            for step in channel.priority_steps:
                for raw in client.lrange(channel._q_for_pri(queue, step), 0, -1):
                    task_id = _queued_task_id(raw)
                    if task_id:
                        found.add(task_id)
    return found


# Move one message from a queue to the consuming end of the next more urgent queue, only if it is
# still there (a worker may have taken it meanwhile): atomic, so it is never lost or doubled.
_PROMOTE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


def promote(app: Celery, task_ids: Iterable[str]) -> set[str]:
    """Move these tasks' messages up one priority class (low → normal → urgent) of their own task
    type, to the front: an aged code task stays in the code queues, where only code workers look."""
    wanted = set(task_ids)
    moved: set[str] = set()
    if not wanted:
        return moved
    with app.connection_for_write() as connection:
        client = connection.default_channel.client
        script = client.register_script(_PROMOTE)
        for lower, higher in PROMOTIONS:
            for raw in client.lrange(lower, 0, -1):
                task_id = _queued_task_id(raw)
                if task_id in wanted and task_id not in moved and script(keys=[lower, higher], args=[raw]):
                    moved.add(task_id)
    return moved


def _queued_task_id(raw: bytes) -> str | None:
    """The task id of a queue list entry: the JSON message itself."""
    try:
        return _message_task_id(json.loads(raw))
    except ValueError:
        return None


def _message_task_id(message: object) -> str | None:
    try:
        return message["headers"]["id"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
