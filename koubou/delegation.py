"""Running one delegation: route, call, retry transient errors, fall back, honour cancel."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded

from .backends.base import (
    Backend,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    ChatRequest,
    ChatResult,
)
from .backends.codex import CodexRunner
from .constants import TaskType
from .jobs import DelegationFailed, DelegationJob, Outcome
from .prompts import estimate_tokens, user_message
from .results import CANCELLED
from .routing import Router
from .slots import CancelFlagSet, SlotLeases

#: Seconds between two looks at the cancel flag while tokens stream in.
CANCEL_CHECK_INTERVAL = 0.25
#: Below this many seconds left, waiting for a slot is given up.
SLOT_WAIT_MIN = 0.01
#: Tries to give a slot lease back (about 8 s in all) before leaving it to expire.
RELEASE_ATTEMPTS = 12


class Cancelled(Exception):
    """The delegation was cancelled by its client."""


@dataclass(frozen=True)
class RetryPolicy:
    """Transient errors are retried with jittered exponential backoff, within bounds."""

    max_retries: int = 3  # per backend, after the first call
    window: float = 60.0  # seconds of retrying in all
    base_delay: float = 1.0
    max_delay: float = 15.0

    def delay(self, retry: int) -> float:
        """Full jitter: uniform in [0.5, 1] x base x 2^retry, capped."""
        return min(self.max_delay, self.base_delay * 2**retry) * random.uniform(0.5, 1.0)


@dataclass
class Attempt:
    backend: str | None
    ok: bool
    error_type: str | None = None
    error: str | None = None
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds"))
    duration_ms: float = 0.0


class Delegation:
    """One delegation's run: its attempts, its deadline and its cancel flag."""

    def __init__(
        self,
        job: DelegationJob,
        router: Router,
        policy: RetryPolicy,
        worker: str | None = None,
        is_cancelled: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], None] = time.sleep,
        on_text: Callable[[str], None] | None = None,
        leases: SlotLeases | None = None,
        interruptible: Callable[[], AbstractContextManager[None]] = nullcontext,
        codex: CodexRunner | None = None,
        cancel_flag: str | None = None,
        on_release: Callable[[Any], object] | None = None,
        release_with_result: Callable[[Callable[[Any], object]], None] | None = None,
    ) -> None:
        self.job = job
        self.router = router
        self.policy = policy
        self.worker = worker
        self.is_cancelled = is_cancelled
        self.sleep = sleep
        self.on_text = on_text
        self.leases = leases
        self.interruptible = interruptible
        #: Runs code tasks (the Codex CLI); required for a job of type code.
        self.codex = codex
        #: The cancel flag's key: the slot lease script looks at it in the lease's own round trip.
        self.cancel_flag = cancel_flag
        #: Adds commands to the pipeline that gives a lease back (the live output's last flush).
        self.on_release = on_release
        #: Takes commands for a pipeline to send with the task's result (koubou.results.ride_with_result):
        #: the successful call's lease goes back in that round trip instead of one of its own.
        self.release_with_result = release_with_result
        self.attempts: list[Attempt] = []
        self.started = time.monotonic()
        self.deadline = self.started + job.timeout
        #: When the cancel flag was last read; streamed pieces look again every CANCEL_CHECK_INTERVAL.
        self._last_cancel_check = 0.0

    def run(self) -> Outcome:
        """The outcome of a successful call; raises DelegationFailed otherwise."""
        try:
            if not self._lease_checks_cancel:
                self._check_cancel(force=True)
            return self._run()
        except Cancelled:
            raise self._failure(CANCELLED, "cancelled by the client") from None
        except SoftTimeLimitExceeded:
            # SIGUSR1 from a cancel, or Celery's soft time limit: the flag tells which.
            if self.is_cancelled():
                raise self._failure(CANCELLED, "cancelled by the client") from None
            raise self._failure("BackendTimeout", f"timed out: the task passed its limit of {self.job.timeout:g}s") from None

    @property
    def _lease_checks_cancel(self) -> bool:
        return self.leases is not None and self.cancel_flag is not None

    def _run(self) -> Outcome:
        retries: dict[str, int] = {}
        routing_retries = 0
        exhausted: set[str] = set()
        while True:
            try:
                candidates = [(b, m) for b, m in self.router.candidates(self.job.model) if b.name not in exhausted]
            except BackendError as error:  # no backend serves it, or none is reachable
                self._record(None, error, 0.0)
                if not error.transient or not self._wait_before_retry(routing_retries):
                    raise self._failure_from(error) from None
                routing_retries += 1
                continue
            if not candidates:  # every backend serving the model used up its retries
                raise self._last_failure() from None
            try:
                backend, model, lease = self._reserve(candidates)
            except BackendTimeout as error:
                self._record(None, error, 0.0)
                raise self._failure_from(error) from None
            began = time.monotonic()
            try:
                with self.interruptible():
                    answer = self._call(backend, model)
            except BackendError as error:
                failure: BackendError | None = error
            except BaseException:  # a cancel or the time limit: give the slot back, then let it unwind
                self._release(backend, lease)
                raise
            else:
                failure = None
            if failure is None:
                self.attempts.append(Attempt(backend.name, True, duration_ms=_ms_since(began)))
                self._release(backend, lease, with_result=True)
                return self._success(backend, answer)
            self._release(backend, lease)  # before any backoff: others may use the slot meanwhile
            self._record(backend, failure, began)
            if isinstance(failure, BackendUnavailable):
                self.router.forget(backend)
            if not failure.transient:
                raise self._failure_from(failure) from None
            done = retries.get(backend.name, 0)
            if done >= self.policy.max_retries:
                exhausted.add(backend.name)  # fall back to the next backend serving the model
                continue
            if not self._wait_before_retry(done):
                raise self._failure_from(failure) from None
            retries[backend.name] = done + 1

    def _reserve(self, candidates: list[tuple[Backend, str]]) -> tuple[Backend, str, str | None]:
        """Wait for a free slot on one of the candidates, least busy first; the lease id with it."""
        if self.leases is None:
            return (*candidates[0], None)
        while True:
            try:
                # Least busy first; one candidate needs no count (a Redis round trip per task saved).
                ordered = candidates if len(candidates) == 1 else sorted(candidates, key=lambda c: self.leases.in_use(c[0].name))  # type: ignore[union-attr]
                for backend, model in ordered:
                    slots = self.router.slots_of(backend)
                    if slots is None:
                        self._check_cancel(force=True)
                        return backend, model, None
                    hold_for = max(1.0, self.deadline - time.monotonic())
                    lease = self.leases.acquire(
                        backend.name, slots, hold_for, holder=self.job.task_id, cancel_flag=self.cancel_flag
                    )
                    if lease is not None:
                        if self.cancel_flag is not None:
                            self._last_cancel_check = time.monotonic()  # the lease script just looked
                        return backend, model, lease
            except CancelFlagSet:
                raise Cancelled() from None
            except redis.RedisError:
                self._check_cancel(force=True)
                return (*candidates[0], None)  # no lease book to keep: better late than lost
            remaining = self.deadline - time.monotonic()
            if remaining <= SLOT_WAIT_MIN:
                names = ", ".join(backend.name for backend, _ in candidates)
                raise BackendTimeout(f"timed out waiting for a free slot on {names}")
            if not self._lease_checks_cancel:  # else the lease script has just read the flag
                self._check_cancel(force=True)
            # Woken the moment a lease on one of them is given back; the bound covers leases that
            # expire instead (a dead worker's) and keeps looking at the cancel flag.
            try:
                self.leases.wait_for_release([b.name for b, _ in candidates], min(remaining, CANCEL_CHECK_INTERVAL))
            except redis.RedisError:
                self.sleep(0.05)

    def _release(self, backend: Backend, lease: str | None, with_result: bool = False) -> None:
        """Give the lease back now, or (`with_result`, when the task can) in the same round trip that
        stores the task's result."""
        if lease is None or self.leases is None:
            return
        if with_result and self.release_with_result is not None:
            leases, name = self.leases, backend.name
            self.release_with_result(lambda pipe: leases.queue_release(pipe, name, lease))
            return
        # A broker restart takes a second or two; a lease not given back would hold the slot
        # until it expires (the task's deadline plus a margin), so try for a few seconds.
        # A cancel's SIGUSR1 (SoftTimeLimitExceeded) may land right here too: try again, or the
        # slot would stay taken.
        for attempt in range(RELEASE_ATTEMPTS):
            try:
                # The live output's last flush rides along once (one round trip); it is best effort.
                self.leases.release(backend.name, lease, also=self.on_release if attempt == 0 else None)
                return
            except (redis.RedisError, SoftTimeLimitExceeded):
                try:
                    self.sleep(min(0.1 * 2**attempt, 1.0))
                except SoftTimeLimitExceeded:
                    continue

    def _call(self, backend: Backend, model: str) -> ChatResult:
        """One call to the backend for this job (code tasks are routed here too)."""
        if self.job.type == TaskType.CODE:
            return self._run_codex(backend, model)
        return backend.chat(self._request(model), on_delta=self._on_delta)

    def _run_codex(self, backend: Backend, model: str) -> ChatResult:
        """A code task: the Codex CLI works on the job's files against this backend (holding its slot)."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise BackendTimeout(f"timed out: no time left of the task's {self.job.timeout:g}s")
        if self.codex is None:
            raise BackendError("this worker has no Codex runner for code tasks")
        return self.codex.run(
            backend, model, self.job, remaining, on_delta=self._on_delta, tick=lambda: self._check_cancel()
        )

    def _request(self, model: str) -> ChatRequest:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise BackendTimeout(f"timed out: no time left of the task's {self.job.timeout:g}s")
        # The shipped files go in the same message as the prompt (see prompts.user_message).
        message = user_message(self.job.prompt, self.job.files)
        return ChatRequest(
            model=model,
            messages=(ChatMessage("user", message),),
            temperature=self.job.temperature,
            num_ctx=self.job.num_ctx,
            max_tokens=self.job.max_tokens,
            timeout=remaining,
            prompt_tokens_estimate=estimate_tokens(message),
        )

    def _on_delta(self, text: str) -> None:
        if self.on_text is not None:
            self.on_text(text)
        self._check_cancel()

    def _check_cancel(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_cancel_check >= CANCEL_CHECK_INTERVAL:
            self._last_cancel_check = now
            if self.is_cancelled():
                raise Cancelled()

    def _wait_before_retry(self, retry: int) -> bool:
        """Sleep the backoff if the retry window and the deadline allow it; False when they do not."""
        delay = self.policy.delay(retry)
        now = time.monotonic()
        if now + delay > min(self.started + self.policy.window, self.deadline) or retry >= self.policy.max_retries:
            return False
        end = now + delay
        while time.monotonic() < end:  # in small steps, so a cancel is seen while waiting
            self._check_cancel(force=True)
            self.sleep(min(CANCEL_CHECK_INTERVAL, max(0.0, end - time.monotonic())))
        return True

    def _record(self, backend: Backend | None, error: BackendError, began: float) -> None:
        self.attempts.append(
            Attempt(backend.name if backend else None, False, type(error).__name__, str(error), duration_ms=_ms_since(began) if began else 0.0)
        )

    def _last_failure(self) -> DelegationFailed:
        last = next((a for a in reversed(self.attempts) if not a.ok), None)
        if last is None:
            return self._failure("BackendError", "no backend could take the task")
        return self._failure(last.error_type or "BackendError", last.error or "failed")

    def _attempts_json(self) -> list[dict[str, Any]]:
        return [vars(attempt) for attempt in self.attempts]

    def _success(self, backend: Backend, answer: ChatResult) -> Outcome:
        return Outcome(
            success=True,
            output=answer.output,
            model=answer.model,
            backend=backend.name,
            worker=self.worker,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            duration_ms=_ms_since(self.started),
            diff=_text_or_none(answer.extra.get("diff")),
            changed_files=_files_or_none(answer.extra.get("changed_files")),
            attempts=self._attempts_json(),
        )

    def _failure_from(self, error: BackendError) -> DelegationFailed:
        return self._failure(type(error).__name__, str(error))

    def _failure(self, error_type: str, message: str) -> DelegationFailed:
        failed_backends = [a.backend for a in self.attempts if a.backend]
        outcome = Outcome(
            success=False,
            error=message,
            error_type=error_type,
            model=self.job.model,
            backend=failed_backends[-1] if failed_backends else None,
            worker=self.worker,
            duration_ms=_ms_since(self.started),
            attempts=self._attempts_json(),
        )
        return DelegationFailed(message, outcome.model_dump())


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _files_or_none(value: object) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    return {str(path): str(content) for path, content in value.items()}


def _ms_since(began: float) -> float:
    return round((time.monotonic() - began) * 1000, 1)
