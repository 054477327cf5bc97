"""API agents and their bearer tokens (`koubou agent add|list|revoke`).

A token is shown once, when it is made; the database keeps only its sha256. A fast hash is
enough here (no bcrypt/scrypt): the token is 32 random bytes, so there is nothing to guess
from a leaked hash, and a fast hash lets every request check its token with one indexed SELECT.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .db.models import AgentRow
from .db.session import utcnow

#: Marks a koubou token (easy to spot in a config file, and by secret scanners).
TOKEN_PREFIX = "kb_"
TOKEN_BYTES = 32
AGENT_TYPE = "api"
ACTIVE = "active"
REVOKED = "revoked"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}")


@dataclass(frozen=True)
class AgentInfo:
    name: str
    status: str
    created_at: datetime
    last_seen: datetime | None


@dataclass(frozen=True)
class TokenOwner:
    """The agent a presented token belongs to (revoked agents included)."""

    agent_id: str
    name: str
    active: bool
    last_seen: datetime | None


class AgentExists(Exception):
    """An active agent already has that name."""


class BadAgentName(AgentExists):
    """The name is not usable (a subclass so the CLI reports it the same way)."""


def hash_token(token: str) -> str:
    """The stored form of a token: sha256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def add_agent(sessions: sessionmaker[Session], name: str) -> str:
    """Create an agent and return its new token (shown once; only its hash is stored)."""
    if not NAME_PATTERN.fullmatch(name):
        raise BadAgentName(
            f"invalid agent name {name!r}: use 1-128 letters, digits and . _ @ : - (starting with a letter or digit)"
        )
    token = new_token()
    try:
        with sessions.begin() as session:
            if session.scalar(select(AgentRow.agent_id).where(AgentRow.name == name, AgentRow.status == ACTIVE)):
                raise AgentExists(f"an active agent is already named {name!r} (`koubou agent revoke {name}` first)")
            session.add(
                AgentRow(
                    # A fresh id per agent, so a name reused after a revocation is a different agent
                    # in task_master.agent_id.
                    agent_id=uuid.uuid4().hex,
                    agent_type=AGENT_TYPE,
                    name=name,
                    status=ACTIVE,
                    token_hash=hash_token(token),
                    created_at=utcnow(),
                )
            )
    except IntegrityError:  # a concurrent `agent add` of the same name won the partial unique index
        raise AgentExists(f"an active agent is already named {name!r}") from None
    return token


def list_agents(sessions: sessionmaker[Session]) -> list[AgentInfo]:
    """Every agent that has a token (active and revoked), oldest first."""
    with sessions() as session:
        rows = session.scalars(
            select(AgentRow).where(AgentRow.token_hash.is_not(None)).order_by(AgentRow.created_at, AgentRow.name)
        ).all()
    return [
        AgentInfo(name=row.name or row.agent_id, status=row.status, created_at=row.created_at, last_seen=row.last_seen)
        for row in rows
    ]


def revoke_agent(sessions: sessionmaker[Session], name: str) -> bool:
    """Revoke the agent's token; False when no active agent has that name."""
    now = utcnow()
    with sessions.begin() as session:
        result = session.execute(
            update(AgentRow)
            .where(AgentRow.name == name, AgentRow.status == ACTIVE, AgentRow.token_hash.is_not(None))
            .values(status=REVOKED, revoked_at=now)
        )
        return bool(result.rowcount)


def any_active(sessions: sessionmaker[Session]) -> bool:
    """Whether at least one agent holds a usable token (this turns auth on for a loopback API)."""
    with sessions() as session:
        found = session.scalar(
            select(AgentRow.agent_id).where(AgentRow.status == ACTIVE, AgentRow.token_hash.is_not(None)).limit(1)
        )
    return found is not None


def find_token_owner(sessions: sessionmaker[Session], token: str) -> TokenOwner | None:
    """The agent whose token this is, or None. One indexed SELECT, so revocation acts at once."""
    digest = hash_token(token)
    with sessions() as session:
        row = session.execute(
            select(AgentRow.agent_id, AgentRow.name, AgentRow.status, AgentRow.token_hash, AgentRow.last_seen).where(
                AgentRow.token_hash == digest
            )
        ).first()
    # The lookup is by hash, so its timing tells nothing about the token itself; the
    # constant-time comparison keeps the final check free of early exits all the same.
    if row is None or not hmac.compare_digest(row.token_hash.encode(), digest.encode()):
        return None
    return TokenOwner(
        agent_id=row.agent_id, name=row.name or row.agent_id, active=row.status == ACTIVE, last_seen=row.last_seen
    )


def touch(sessions: sessionmaker[Session], agent_id: str, when: datetime) -> None:
    """Record that the agent was seen at `when`."""
    with sessions.begin() as session:
        session.execute(update(AgentRow).where(AgentRow.agent_id == agent_id).values(last_seen=when))
