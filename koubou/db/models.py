"""SQLAlchemy models for the seed's tables, with the documented columns first."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class TaskRow(Base):
    """`task_master`: one row per delegation."""

    __tablename__ = "task_master"

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task_type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=5)
    content: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The seed's "割り当てワーカー" (assigned worker): the Celery node name that ran it.
    assigned_worker_type: Mapped[str | None] = mapped_column(String(255), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    # Beyond the seed:
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # The agent (API token owner) that delegated it, when auth is on.
    agent_id: Mapped[str | None] = mapped_column(String(255), nullable=True, index=True)
    # Sender timestamp of the last event applied, so late events never move a row back.
    last_event_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class WorkerRow(Base):
    """`workers`: one row per Celery worker node."""

    __tablename__ = "workers"

    worker_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    worker_type: Mapped[str] = mapped_column(String(32), default="celery")
    model_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    status: Mapped[str] = mapped_column(String(16))
    tasks_completed: Mapped[int] = mapped_column(Integer, default=0)
    tasks_failed: Mapped[int] = mapped_column(Integer, default=0)
    last_heartbeat: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # Beyond the seed:
    hostname: Mapped[str | None] = mapped_column(String(255), nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    active_tasks: Mapped[int] = mapped_column(Integer, default=0)
    first_seen: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # When this incarnation of the node came online: tasks it started before then were lost.
    online_since: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class AgentRow(Base):
    """`agents`: registered agents (Claude Code sessions, MCP clients)."""

    __tablename__ = "agents"

    agent_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    agent_type: Mapped[str] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    capabilities: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # Beyond the seed: the API bearer token, as the sha256 hex of the token (never the token).
    token_hash: Mapped[str | None] = mapped_column(String(128), nullable=True, unique=True, index=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    __table_args__ = (
        # One active agent per name (a revoked agent's name may be reused). Partial indexes
        # exist on SQLite and PostgreSQL only; elsewhere `koubou agent add` checks it alone.
        Index(
            "ix_agents_active_name",
            "name",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ).ddl_if(dialect=("sqlite", "postgresql")),
    )


class SystemLogRow(Base):
    """`system_logs`: notable events (mirror reconciliations, supervisor restarts, ...)."""

    __tablename__ = "system_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    timestamp: Mapped[datetime] = mapped_column(DateTime, index=True)
    level: Mapped[str] = mapped_column(String(16))
    component: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    task_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class AgentCommunicationRow(Base):
    """`agent_communications`: messages between agents about a task."""

    __tablename__ = "agent_communications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    sender: Mapped[str] = mapped_column(String(255))
    receiver: Mapped[str] = mapped_column(String(255))
    message_type: Mapped[str] = mapped_column(String(32))
    content: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
