"""Bearer-token authentication of API requests (tokens belong to `agents` rows)."""

from __future__ import annotations

from flask import Flask
from sqlalchemy.orm import Session, sessionmaker

from ..config import Settings


def install(app: Flask, sessions: sessionmaker[Session], settings: Settings) -> None:
    """Require a bearer token where auth applies; set `flask.g.agent_id` for authenticated requests."""


def full_health_allowed() -> bool:
    """Whether this request may see /health's details (components, backends, workers)."""
    return True
