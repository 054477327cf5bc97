"""API agents and their bearer tokens (`koubou agent add|list|revoke`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.orm import Session, sessionmaker


@dataclass(frozen=True)
class AgentInfo:
    name: str
    status: str
    created_at: datetime
    last_seen: datetime | None


class AgentExists(Exception):
    """An active agent already has that name."""


def add_agent(sessions: sessionmaker[Session], name: str) -> str:
    """Create an agent and return its new token (shown once; only its hash is stored)."""
    raise NotImplementedError


def list_agents(sessions: sessionmaker[Session]) -> list[AgentInfo]:
    raise NotImplementedError


def revoke_agent(sessions: sessionmaker[Session], name: str) -> bool:
    """Revoke the agent's token; False when no active agent has that name."""
    raise NotImplementedError
