"""kombu's Redis transport, with one client object per channel instead of one per command.

kombu's Redis channel builds a new `redis.Redis` around its connection pool for every publish, every
delivered message's bookkeeping and every ack (`Channel.conn_or_acquire`). With redis-py 8 building
one costs ~0.1 ms of CPU (it fills a table of ~170 response callbacks), about three times per task:
more than the commands themselves. A `redis.Redis` on a pool is safe to share (each command borrows a
connection from the pool), so each channel keeps one, built again only if the channel's pool changes.

Celery uses it through `broker_transport` (celeryconfig), for redis:// brokers.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    """A Redis channel that reuses its synchronous client."""

    _shared_client: Any = None

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            # The asynchronous pool's clients back BRPOP and Pub/Sub, which kombu keeps itself.
            return super()._create_client(asynchronous=True)
        pool = self.pool
        client = self._shared_client
        if client is None or client.connection_pool is not pool:
            client = self._shared_client = super()._create_client(asynchronous=False)
        return client

    def close(self) -> None:
        super().close()
        self._shared_client = None


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with koubou's `Channel`."""

    Channel = Channel
