"""koubou's kombu transport on a real Valkey: messages flow as with kombu's own, with one client per channel."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from koubou.services import broker_binary, redis_answers
from koubou.transport import Transport
from tests.harness import REPO, free_port


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        [broker_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path), "--save", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not redis_answers(url):
            assert time.monotonic() < deadline, "the broker did not start"
            time.sleep(0.05)
        yield url
    finally:
        server.kill()
        server.wait()


def test_messages_go_through_and_the_channel_builds_one_client(
    broker_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[object] = []
    real_init = redis.Redis.__init__

    def counting_init(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
        built.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting_init)
    queue = Queue("t.q", Exchange("t", type="direct"), routing_key="t.q")
    with Connection(broker_url, transport=Transport) as connection:
        producer = connection.Producer()
        for i in range(20):
            producer.publish({"n": i}, exchange=queue.exchange, routing_key="t.q", declare=[queue], serializer="json")
        received: list[int] = []
        with connection.Consumer(queue, callbacks=[lambda body, message: (received.append(body["n"]), message.ack())]):
            deadline = time.monotonic() + 10
            while len(received) < 20 and time.monotonic() < deadline:
                connection.drain_events(timeout=1)
    assert received == list(range(20))
    # kombu's own channel builds one per publish, per delivery and per ack (60+ here); the reading
    # connection's own clients (BRPOP, Pub/Sub) are a few more.
    assert len(built) <= 4, len(built)
    assert redis.Redis.from_url(broker_url).llen("t.q") == 0  # acknowledged: nothing left behind


@pytest.mark.parametrize(
    ("url", "transport"),
    [("redis://127.0.0.1:1/0", "Transport"), ("rediss://127.0.0.1:1/0?ssl_cert_reqs=required", "None")],
)
def test_celery_uses_it_for_redis_urls_only(url: str, transport: str, tmp_path: Path) -> None:
    # rediss:// stays kombu's: kombu turns TLS on from that scheme's name.
    script = "import celeryconfig; print(getattr(celeryconfig, 'broker_transport', None))"
    env = {"KOUBOU_BROKER_URL": url, "KOUBOU_HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("koubou.transport:Transport" if transport == "Transport" else "None")


def test_a_channel_whose_pool_was_replaced_gets_a_client_on_the_new_pool(broker_url: str) -> None:
    # kombu drops a channel's pools when it reconnects (Channel._disconnect_pools); the kept client
    # must not go on borrowing from the old one.
    with Connection(broker_url, transport=Transport) as connection:
        channel = connection.default_channel
        first = channel._create_client()
        assert channel._create_client() is first and first.connection_pool is channel.pool
        channel._disconnect_pools()
        second = channel._create_client()
        assert second is not first and second.connection_pool is channel.pool
        assert second.ping()
