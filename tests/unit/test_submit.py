"""What the API records around handing a task to the broker: the message first, then the row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from koubou.api.context import ApiContext, APIError
from koubou.api.operations import submit
from koubou.api.schemas import DelegateRequest
from koubou.config import load_settings
from koubou.db.models import AgentCommunicationRow, TaskRow
from koubou.db.session import make_engine, make_session_factory, utcnow
from koubou.workspace import Workspace


class Broker:
    """Stands in for Celery's send_task: records what was sent, or fails like a broker that is down."""

    def __init__(self, fail: bool = False, on_send: Any = None) -> None:
        self.fail, self.on_send, self.sent = fail, on_send, []  # type: list[str]

    def send_task(self, name: str, **options: Any) -> None:
        if self.fail:
            raise ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        self.sent.append(options["task_id"])
        if self.on_send:
            self.on_send(options["task_id"])


def context(tmp_path: Path, broker: Broker) -> ApiContext:
    settings = load_settings({"KOUBOU_HOME": str(tmp_path / "home")})
    sessions = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'k.db'}"))
    return ApiContext(settings=settings, celery=broker, sessions=sessions, router=None, redis=None,  # type: ignore[arg-type]
                      workspace=Workspace.from_settings(settings), results=None)  # type: ignore[arg-type]  # fmt: skip


def run_submit(ctx: ApiContext, task_id: str = "task_1", **fields: Any) -> str:
    with Flask("t").test_request_context():
        body = DelegateRequest.model_validate_json(json.dumps({"prompt": "hello", "priority": 8, **fields}))
        return submit(ctx, body, task_id)


def rows(ctx: ApiContext) -> list[TaskRow]:
    with ctx.sessions() as session:
        return list(session.scalars(select(TaskRow)).all())


def test_the_row_is_written_once_the_message_is_queued(tmp_path: Path) -> None:
    seen: list[int] = []
    broker = Broker()
    ctx = context(tmp_path, broker)
    broker.on_send = lambda _id: seen.append(len(rows(ctx)))
    assert run_submit(ctx) == "task_1"
    assert broker.sent == ["task_1"] and seen == [0]  # no row yet when the message went out
    (row,) = rows(ctx)
    assert (row.status, row.priority, row.content["prompt"]) == ("pending", 8, "hello")


def test_a_broker_that_is_down_gets_a_503_and_leaves_no_row(tmp_path: Path) -> None:
    ctx = context(tmp_path, Broker(fail=True))
    with pytest.raises(APIError) as refused:
        run_submit(ctx)
    assert refused.value.status == 503 and "not queued" in refused.value.detail
    assert rows(ctx) == []


def test_a_task_the_mirror_adopted_first_keeps_its_status_and_gets_its_content(tmp_path: Path) -> None:
    broker = Broker()
    ctx = context(tmp_path, broker)

    def adopted_by_the_mirror(task_id: str) -> None:  # its events were applied before the API's INSERT
        with ctx.sessions.begin() as session:
            session.add(TaskRow(task_id=task_id, task_type="general", status="completed", priority=5,
                                content={"name": "koubou.delegate", "args": "(...)"}, created_at=utcnow(), updated_at=utcnow()))  # fmt: skip

    broker.on_send = adopted_by_the_mirror
    run_submit(ctx, type="code")
    (row,) = rows(ctx)
    assert (row.status, row.task_type, row.priority, row.content["prompt"]) == ("completed", "code", 8, "hello")
    with ctx.sessions() as session:
        assert session.scalars(select(AgentCommunicationRow.task_id)).all() == ["task_1"]


def test_a_database_that_is_down_still_answers_with_the_queued_task(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker()
    ctx = context(tmp_path, broker)
    ctx.sessions.kw["bind"].dispose()
    (tmp_path / "k.db").unlink()
    (tmp_path / "k.db").mkdir()  # the database cannot be opened now
    assert run_submit(ctx) == "task_1" and broker.sent == ["task_1"]  # queued: it runs; the mirror adopts its row
    assert "its row could not be written" in caplog.text
