import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from koubou.db.models import Base
from koubou.db.session import make_engine


def test_a_database_from_an_older_koubou_gets_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as old:
        old.execute(
            "CREATE TABLE task_master (task_id TEXT PRIMARY KEY, task_type TEXT NOT NULL, status TEXT NOT NULL, "
            "priority INTEGER NOT NULL, content JSON NOT NULL, result JSON, assigned_worker_type TEXT, "
            "created_at TIMESTAMP NOT NULL, updated_at TIMESTAMP NOT NULL)"
        )
        old.execute("INSERT INTO task_master VALUES ('t', 'general', 'completed', 5, '{}', NULL, NULL, '2025-01-01', '2025-01-01')")
    make_engine(f"sqlite:///{path}")
    with sqlite3.connect(path) as upgraded:
        columns = {row[1] for row in upgraded.execute("PRAGMA table_info(task_master)")}
        kept = upgraded.execute("SELECT task_id, status FROM task_master").fetchall()
    assert {"agent_id", "started_at", "completed_at", "last_event_at"} <= columns
    assert kept == [("t", "completed")]


def test_a_process_that_loses_the_race_to_create_the_tables_starts_anyway(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The API's gunicorn workers and the mirror start together on a new database: one checks that a
    # table is missing, another creates it, and the first one's CREATE TABLE meets "already exists".
    url = f"sqlite:///{tmp_path / 'new.db'}"
    real_create_all = Base.metadata.create_all
    raced: list[bool] = []

    def create_all_after_a_rival(bind, **kwargs):  # type: ignore[no-untyped-def]
        if not raced:
            raced.append(True)
            real_create_all(create_engine(url))  # the rival process
            return real_create_all(bind, checkfirst=False)  # ours had checked before the rival's CREATE
        return real_create_all(bind, **kwargs)

    monkeypatch.setattr(Base.metadata, "create_all", create_all_after_a_rival)
    engine = make_engine(url)
    assert raced
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM task_master")).scalar() == 0


def test_a_schema_error_that_is_no_race_is_raised_at_once(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls: list[object] = []

    def failing_create_all(bind, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(bind)
        raise OperationalError("CREATE TABLE task_master ...", {}, sqlite3.OperationalError("disk I/O error"))

    monkeypatch.setattr(Base.metadata, "create_all", failing_create_all)
    with pytest.raises(OperationalError, match="disk I/O error"):
        make_engine(f"sqlite:///{tmp_path / 'k.db'}")
    assert len(calls) == 1
