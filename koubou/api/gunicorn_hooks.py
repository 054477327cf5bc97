"""gunicorn hooks for the API (`--config python:koubou.api.gunicorn_hooks`): workers share the arbiter's pages.

gunicorn imports this module in its arbiter, before it forks the workers: importing the API's modules
here (Flask, Celery, SQLAlchemy, pydantic, ...: no connection is opened at import) lets every worker
share them with the arbiter, copy-on-write, instead of importing them again; freezing the arbiter's
objects before each fork keeps the garbage collector from touching, and so copying, those pages.
Each worker still builds its own app, connections and threads (`koubou.api.app:create_app()`).
"""

from __future__ import annotations

import gc
from typing import Any

from . import app as _api  # noqa: F401  (imported for the side effect above: shared modules)


def pre_fork(server: Any, worker: Any) -> None:
    gc.freeze()
