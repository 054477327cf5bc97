"""The Celery task that runs one delegation on a worker (Celery glue around koubou.delegation)."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded

from .backends.codex import CodexRunner, CodexSetup
from .celery import app
from .config import get_settings
from .constants import DELEGATE_TASK, cancel_key
from .delegation import Delegation, RetryPolicy
from .jobs import DelegationJob
from .results import ride_with_result, send_riders_now
from .routing import Router, build_router
from .slots import SlotLeases
from .streaming import TokenPublisher

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def get_router() -> Router:
    """One router per worker process, so model lists are cached across tasks."""
    return build_router(get_settings())


@lru_cache(maxsize=1)
def get_codex_runner() -> CodexRunner:
    """One Codex runner per worker process (it remembers what it checked and made)."""
    return CodexRunner(CodexSetup.from_settings(get_settings()))


@lru_cache(maxsize=1)
def get_leases() -> SlotLeases:
    """One lease keeper per worker process (it registers its script once, not per task)."""
    return SlotLeases(app.backend.client)


def retry_policy() -> RetryPolicy:
    settings = get_settings()
    return RetryPolicy(settings.retry_max, settings.retry_window, settings.retry_base_delay)


def cancel_requested(task_id: str) -> bool:
    try:
        return bool(app.backend.client.exists(cancel_key(task_id)))
    except Exception:  # the result backend being briefly away must not fail the task
        log.warning("cannot read the cancel flag of %s", task_id, exc_info=True)
        return False


# A cancel interrupts a blocking backend call with SIGUSR1 (Celery's revoke(terminate=True)).
# Billiard's own handler would raise wherever the signal lands, e.g. while the result is being
# stored, which breaks that store; ours raises only inside a backend call, and the cancel flag
# covers every other place.
_in_backend_call = False


@contextmanager
def _interruptible() -> Iterator[None]:
    global _in_backend_call
    _in_backend_call = True
    try:
        yield
    finally:
        _in_backend_call = False


def _on_interrupt(_signum: int, _frame: object) -> None:
    if _in_backend_call:
        raise SoftTimeLimitExceeded()


# The worker log's success line shows the start of the outcome, not up to 1 KB of the model's answer.
@app.task(name=DELEGATE_TASK, bind=True, resultrepr_maxsize=160)
def delegate(self, job: dict) -> dict:  # type: ignore[no-untyped-def]
    """Run one delegation; the returned dict is the task's `result` (failures raise DelegationFailed)."""
    # Installed here, not at process start: billiard sets its own handler after its initializers.
    if signal.getsignal(signal.SIGUSR1) is not _on_interrupt:
        signal.signal(signal.SIGUSR1, _on_interrupt)
    parsed = DelegationJob.model_validate(job)
    publish = TokenPublisher(app.backend.client, parsed.task_id)
    delegation = Delegation(
        parsed,
        get_router(),
        retry_policy(),
        self.request.hostname,
        is_cancelled=lambda: cancel_requested(parsed.task_id),
        on_text=publish,
        leases=get_leases(),
        interruptible=_interruptible,
        codex=get_codex_runner(),
        cancel_flag=cancel_key(parsed.task_id),
        on_release=publish.flush_into,
        release_with_result=lambda rider: ride_with_result(app.backend, parsed.task_id, rider),
    )
    try:
        return delegation.run().model_dump()
    finally:
        # The last live output goes in the round trip that stores the result, so `done` never
        # overtakes the last delta.
        ride_with_result(app.backend, parsed.task_id, publish.flush_into)


@signals.task_postrun.connect
def _send_leftover_riders(task_id: str | None = None, **_: object) -> None:
    """What the result store did not carry (it failed) still goes out: the slot is given back."""
    if task_id:
        send_riders_now(app.backend, task_id)
