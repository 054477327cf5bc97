"""The Celery task that runs one delegation on a worker."""

from __future__ import annotations

import logging
import time
from functools import lru_cache

from celery.exceptions import SoftTimeLimitExceeded

from .backends.base import Backend, BackendError, BackendTimeout, BackendUnavailable, ChatMessage, ChatRequest
from .celery import app
from .config import get_settings
from .constants import DELEGATE_TASK
from .jobs import DelegationFailed, DelegationJob, Outcome
from .routing import Router, build_backends

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def get_router() -> Router:
    """One router per worker process, so model lists are cached across tasks."""
    return Router(build_backends(get_settings()))


def run_delegation(job: DelegationJob, router: Router, worker: str | None) -> Outcome:
    """Route the job to a backend and call it; raise DelegationFailed on any backend error."""
    started = time.monotonic()
    backend: Backend | None = None
    try:
        backend, model = router.pick(job.model)
        request = ChatRequest(
            model=model,
            messages=(ChatMessage("user", job.prompt),),
            temperature=job.temperature,
            num_ctx=job.num_ctx,
            max_tokens=job.max_tokens,
            timeout=job.timeout,
        )
        answer = backend.chat(request)
    except (BackendError, SoftTimeLimitExceeded) as error:
        if isinstance(error, BackendUnavailable) and backend is not None:
            router.forget(backend)
        if isinstance(error, SoftTimeLimitExceeded):
            error = BackendTimeout(f"timed out: the task passed its time limit of {job.timeout:g}s")
        failed = Outcome(
            success=False,
            error=str(error),
            error_type=type(error).__name__,
            model=job.model,
            backend=backend.name if backend else None,
            worker=worker,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        raise DelegationFailed(str(error), failed.model_dump()) from None
    return Outcome(
        success=True,
        output=answer.output,
        model=answer.model,
        backend=backend.name,
        worker=worker,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        duration_ms=round((time.monotonic() - started) * 1000, 1),
    )


@app.task(name=DELEGATE_TASK, bind=True)
def delegate(self, job: dict) -> dict:  # type: ignore[no-untyped-def]
    """Run one delegation; the returned dict is the task's `result`."""
    parsed = DelegationJob.model_validate(job)
    log.info("delegation %s: model=%s type=%s", parsed.task_id, parsed.model, parsed.type)
    outcome = run_delegation(parsed, get_router(), self.request.hostname)
    return outcome.model_dump()
