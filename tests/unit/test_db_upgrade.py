import sqlite3
from pathlib import Path

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
