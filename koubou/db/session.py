"""Engine and session factory; SQLite gets WAL and a busy timeout so readers never block the writer."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from .models import Base

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    """Naive UTC, the form every timestamp column stores."""
    return datetime.now(UTC).replace(tzinfo=None)


def make_engine(url: str) -> Engine:
    """Create the engine (and SQLite's directory), and the tables if missing."""
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    _create_schema(engine)
    return engine


#: Tries at creating the schema: processes that start together on a new database race to create it.
SCHEMA_TRIES = 3


def _create_schema(engine: Engine) -> None:
    """Create missing tables and columns. The API's gunicorn workers and the mirror may start on a new
    database at once: a process that loses the race to create a table (it checked, then another made
    it) sees "already exists", and looks again."""
    for attempt in range(1, SCHEMA_TRIES + 1):
        try:
            Base.metadata.create_all(engine)
            _add_missing_columns(engine)
            return
        except (OperationalError, ProgrammingError, IntegrityError) as error:
            if attempt == SCHEMA_TRIES or not _lost_a_race(error):
                raise
            log.info("another process created part of the schema at the same time; looking again (%s)", error.orig)
            time.sleep(0.1 * attempt)


def _lost_a_race(error: Exception) -> bool:
    """True for "already exists" (SQLite, PostgreSQL), "duplicate column" (SQLite) and "duplicate key"
    (PostgreSQL's catalog, when two CREATE TABLEs of one name meet): another process made it first."""
    text = str(getattr(error, "orig", error)).lower()
    return "already exists" in text or "duplicate" in text


def _add_missing_columns(engine: Engine) -> None:
    """Bring a database made by an older koubou up to date: add the nullable columns it lacks.

    create_all() only creates missing tables; every column added since the first release is
    nullable, so ALTER TABLE ADD COLUMN is all an upgrade needs.
    """
    existing = inspect(engine)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            present = {column["name"] for column in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                if not column.nullable:
                    raise RuntimeError(f"database table {table.name} lacks the required column {column.name}")
                kind = column.type.compile(dialect=engine.dialect)
                connection.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
