"""Queue names per (priority class, task type), and which of them a worker consumes."""

from types import SimpleNamespace

import pytest
from celery import Celery

import koubou.celery
from koubou.config import load_settings
from koubou.constants import (
    PROMOTIONS,
    QUEUES,
    QUEUES_BY_TYPE,
    TaskType,
    queue_for_priority,
    queues_for_types,
    types_of_queues,
    worker_type_label,
)


def test_general_queues_keep_their_names_and_code_has_its_own() -> None:
    assert QUEUES_BY_TYPE[TaskType.GENERAL] == ("koubou.1-urgent", "koubou.2-normal", "koubou.3-low")
    assert QUEUES_BY_TYPE[TaskType.CODE] == ("koubou.1-urgent.code", "koubou.2-normal.code", "koubou.3-low.code")
    assert set(QUEUES) == set(QUEUES_BY_TYPE[TaskType.GENERAL] + QUEUES_BY_TYPE[TaskType.CODE])


@pytest.mark.parametrize(
    ("priority", "task_type", "queue"),
    [
        (10, "general", "koubou.1-urgent"),
        (8, TaskType.GENERAL, "koubou.1-urgent"),
        (7, "general", "koubou.2-normal"),
        (4, "code", "koubou.2-normal.code"),
        (3, TaskType.CODE, "koubou.3-low.code"),
        (1, "code", "koubou.3-low.code"),
        (9, "code", "koubou.1-urgent.code"),
    ],
)
def test_priority_and_type_pick_the_queue(priority: int, task_type: str, queue: str) -> None:
    assert queue_for_priority(priority, task_type) == queue


def test_an_unknown_type_has_no_queue() -> None:
    with pytest.raises(ValueError):
        queue_for_priority(5, "gpu")


def test_name_order_is_priority_class_first_across_types() -> None:
    # kombu's 'sorted' strategy reads queues in sorted name order: that order must be strict
    # priority for a worker serving both types.
    ranks = [next(i for i, c in enumerate(("1-urgent", "2-normal", "3-low")) if c in q) for q in sorted(QUEUES)]
    assert ranks == sorted(ranks)
    assert queues_for_types(["code", "general"]) == tuple(sorted(QUEUES))
    assert queues_for_types([TaskType.CODE]) == QUEUES_BY_TYPE[TaskType.CODE]


def test_ageing_moves_up_one_class_within_the_same_type() -> None:
    assert set(PROMOTIONS) == {
        ("koubou.2-normal", "koubou.1-urgent"),
        ("koubou.3-low", "koubou.2-normal"),
        ("koubou.2-normal.code", "koubou.1-urgent.code"),
        ("koubou.3-low.code", "koubou.2-normal.code"),
    }


def worker_queues(monkeypatch: pytest.MonkeyPatch, types: str | None, **options: object) -> list[str]:
    """The queues a worker consumes after koubou's celeryd_init hook, then Celery's own -Q/-X."""
    env = {"KOUBOU_WORKER_TYPES": types} if types else {}
    monkeypatch.setattr(koubou.celery, "get_settings", lambda: load_settings(env))
    app = Celery("test")
    app.config_from_object("celeryconfig")
    koubou.celery.consume_served_types("w@h", SimpleNamespace(app=app), options=options)
    selected = app.amqp.queues
    selected.select(options.get("queues"))
    selected.deselect(options.get("exclude_queues"))
    return sorted(selected.consume_from)


def test_a_worker_reads_the_queues_of_its_types_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert worker_queues(monkeypatch, None, queues=None) == sorted(QUEUES)
    assert worker_queues(monkeypatch, "code", queues=None) == list(QUEUES_BY_TYPE[TaskType.CODE])
    assert worker_queues(monkeypatch, "general", queues=[]) == list(QUEUES_BY_TYPE[TaskType.GENERAL])
    # -Q on the command line still decides; -X leaves out some of the type's queues.
    assert worker_queues(monkeypatch, "code", queues=["koubou.3-low"]) == ["koubou.3-low"]
    assert worker_queues(monkeypatch, "code", exclude_queues=["koubou.3-low.code"]) == [
        "koubou.1-urgent.code", "koubou.2-normal.code"]
    assert worker_queues(monkeypatch, None, exclude_queues=["koubou.3-low"]) == sorted(set(QUEUES) - {"koubou.3-low"})


def test_a_worker_type_names_the_task_types_of_the_queues_it_consumes() -> None:
    assert worker_type_label(types_of_queues(QUEUES)) == "general+code"
    assert worker_type_label(types_of_queues(queues_for_types(["code"]))) == "code"
    assert worker_type_label(types_of_queues(["koubou.1-urgent"])) == "general"  # -Q with one queue
    assert worker_type_label(types_of_queues(["someone.elses"])) == "none"
