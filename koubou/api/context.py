"""What every request handler shares: the API's context object and its error type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery
from redis import Redis
from sqlalchemy.orm import Session, sessionmaker

from ..config import Settings
from ..results import ResultWaiter
from ..routing import Router
from ..workspace import Workspace


class APIError(Exception):
    """An error answered as `{"error", "detail"}` with an HTTP status."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail = status, error, detail


@dataclass
class ApiContext:
    """The process-wide parts every handler uses."""

    settings: Settings
    celery: Celery
    sessions: sessionmaker[Session]
    router: Router
    redis: Redis  # the broker's Redis
    workspace: Workspace  # where task files may be read from, and the limits
    results: ResultWaiter  # wakes `sync` waits when a result is stored
