"""Live output as the worker writes it: the stream's entries, the progress hash, their lifetimes."""

import fakeredis

from koubou.streaming import KEY_TTL, TokenPublisher, progress_key, read_progress, stream_key


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_flushes_append_the_pieces_and_keep_the_progress() -> None:
    client, clock = fakeredis.FakeRedis(), Clock()
    publisher = TokenPublisher(client, "t", clock=clock)
    publisher("Hel")
    publisher("lo")
    clock.now = 100.5  # past the flush interval: this piece flushes the three
    publisher(", ")
    publisher("world")
    clock.now = 102.0
    publisher.flush()
    entries = [(fields[b"text"].decode(), int(fields[b"n"])) for _, fields in client.xrange(stream_key("t"))]
    assert entries == [("Hello, ", 3), ("world", 1)]
    progress = {k.decode(): v.decode() for k, v in client.hgetall(progress_key("t")).items()}
    assert progress["tokens"] == "4" and float(progress["first_at"]) == 100.5 and float(progress["last_at"]) == 102.0
    assert read_progress(client, "t").tokens == 4
    for key in (stream_key("t"), progress_key("t")):
        assert KEY_TTL - 5 < client.ttl(key) <= KEY_TTL


def test_a_flush_rides_on_another_pipeline_as_one_command() -> None:
    client = fakeredis.FakeRedis()
    publisher = TokenPublisher(client, "t", clock=lambda: 0.0)
    publisher("answer")
    pipe = client.pipeline()
    pipe.set("other", 1)
    publisher.flush_into(pipe)
    assert [command[0][0] for command in pipe.command_stack] == ["SET", "EVAL"]
    assert client.xlen(stream_key("t")) == 0  # nothing sent before the pipeline is
    pipe.execute()
    assert client.xlen(stream_key("t")) == 1 and client.get("other") == b"1"
    publisher.flush_into(pipe)  # nothing buffered: adds nothing
    assert not pipe.command_stack
