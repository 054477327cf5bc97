"""Property/fuzz test of the HTTP API against a real `koubou up` (the session's `system`).

The rule: no 5xx, ever, and the system is healthy afterwards. Three sources of requests:

1. schemathesis (4.x Python API), from the live `/openapi.json`: its coverage phase (boundary
   and wrong-type values, unexpected properties, unspecified methods, malformed Content-Types,
   bad auth) and then Hypothesis fuzzing of every operation, positive and negative, with
   `max_examples` bounded per operation. The document declares a bearer scheme, for which
   schemathesis makes up tokens (all 401): the main run uses the document without its
   `security` (auth is off on loopback while no agent exists, as in this session's system), so
   cases reach validation and the task logic; a smaller run uses the document as served, which
   exercises the auth path. Checks: `not_a_server_error`, and every 4xx body is JSON
   `{"error", "detail"}`. Then every accepted task is read back through `/task/<id>/status`.
2. A hand-made list of hostile raw requests (raw sockets, so nothing is normalised on the way):
   wrong types, huge and deeply nested JSON, invalid UTF-8, NUL bytes, path traversal in the
   task id, header abuse, broken chunked framing, Idempotency-Key abuse, odd methods, bytes that
   are not HTTP. Each lists the answers it may get; 4xx from Flask must be JSON `{"error",
   "detail"}`. Those marked `gunicorn=True` are refused by gunicorn before Flask runs (request
   line or headers too large, malformed headers or framing): its 4xx are HTML. One 5xx is
   allowed by name: gunicorn's 501 for an unknown Transfer-Encoding (RFC 9112 6.1); it is
   counted and printed apart.
3. A few scripted sequences that need state: one Idempotency-Key sent twice, cancelling a real
   task twice by DELETE and by POST .../cancel.

Afterwards: every task created is final within `DRAIN_TIMEOUT` (so none is stuck, and the next
tests get an idle worker pool), `GET /health` is 200 with status ok, the API log holds no
traceback, no gunicorn worker was re-booted and `koubou up` restarted nothing.

Bounding `sync` waits: a generated `sync: true` delegation may wait up to its `options.timeout`.
Before sending, every case whose body has `sync: true` gets `options.timeout` capped at
`SYNC_TIMEOUT_CAP` seconds (an absent `options` becomes `{"timeout": SYNC_TIMEOUT_CAP}`; a
non-object `options` or a non-numeric timeout is left alone: that request is invalid anyway and
refused at once). The fake LLM answers in milliseconds, so most waits end well before the cap.

`.venv/bin/pytest tests/integration/test_fuzz.py -q -s` prints the figures (cases, 5xx, answers).
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from koubou.constants import FINAL_STATUSES
from tests.harness import System, http

#: Seconds a generated `sync: true` delegation may wait (see the module docstring).
SYNC_TIMEOUT_CAP = 1.0
#: Hypothesis examples per operation and generation mode (coverage-phase cases come on top).
MAX_EXAMPLES = {
    "POST /task/delegate": 300,
    "GET /task/{task_id}/status": 100,
    "GET /task/status/{task_id}": 100,
    "DELETE /task/{task_id}": 60,
    "POST /task/{task_id}/cancel": 60,
    "GET /health": 5,  # no parameters: every case is the same request
}
MAX_EXAMPLES_DEFAULT = 60  # an operation added later
#: Hypothesis examples per operation against the document as served (made-up bearer tokens).
MAX_EXAMPLES_WITH_AUTH = 20
#: Seconds any single fuzz request may take before it counts as a hang.
REQUEST_TIMEOUT = 15.0
#: Accepted tasks read back after fuzzing (each is one cheap GET).
MAX_READBACKS = 1000
#: Fewer generated delegations accepted than this means the fuzzing bounced off something.
MIN_ACCEPTED = 50
#: Seconds the tasks created by fuzzing get to become final at the end.
DRAIN_TIMEOUT = 30.0

ERROR_KEYS = {"error", "detail"}
ACCESS_LINE = re.compile(r'" \d{3} (\d+|-) "')
GUNICORN_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:]+ [+-]\d{4}\] \[\d+\] \[[A-Z]+\]")


@dataclass
class Tally:
    """What the fuzzing saw; failures are collected, not raised, so every case still runs."""

    name: str
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    allowed_5xx: list[str] = field(default_factory=list)  # 5xx an entry of the hostile list explains
    failures: list[str] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    phases: dict[str, int] = field(default_factory=dict)  # cases per phase, in order
    sync_waits: list[float] = field(default_factory=list)  # seconds each `sync: true` case took

    def record(self, status: int | None) -> None:
        self.cases += 1
        self.statuses[status if status is not None else 0] += 1

    @property
    def five_xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def summary(self) -> str:
        codes = ", ".join(f"{status or 'no answer'}: {n}" for status, n in sorted(self.statuses.items()))
        allowed = f", {len(self.allowed_5xx)} of them allowed by name" if self.allowed_5xx else ""
        phases = " [" + ", ".join(f"{name} {n}" for name, n in self.phases.items()) + "]" if self.phases else ""
        return f"{self.name}: {self.cases} cases{phases}, {self.five_xx} 5xx{allowed}; answers {codes}"


def error_shape_problem(status: int, content_type: str, body: bytes) -> str | None:
    """Why a 4xx body is not JSON `{"error": str, "detail": ...}`, or None when it is."""
    if "json" not in content_type:
        return f"{status} with Content-Type {content_type!r}, not JSON: {body[:200]!r}"
    try:
        payload = json.loads(body)
    except ValueError:
        return f"{status} body is not JSON: {body[:200]!r}"
    if not isinstance(payload, dict) or set(payload) != ERROR_KEYS or not isinstance(payload["error"], str):
        return f"{status} body is not {{'error', 'detail'}}: {body[:300]!r}"
    return None


def api_log_offset(system: System) -> int:
    try:
        return (system.home / "logs" / "system" / "api.log").stat().st_size
    except OSError:
        return 0


def api_log_since(system: System, offset: int) -> str:
    try:
        with open(system.home / "logs" / "system" / "api.log", "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def tracebacks(log_text: str) -> list[str]:
    """The API log's error blocks: koubou's 'unhandled error' and any traceback, gunicorn's ERROR lines."""
    blocks: list[list[str]] = []
    inside = False
    for line in log_text.splitlines():
        if ACCESS_LINE.search(line) or GUNICORN_LINE.match(line):
            inside = False
            if "[ERROR]" in line or "[CRITICAL]" in line:
                blocks.append([line])
                inside = True
            continue
        if "unhandled error" in line or line.startswith("Traceback"):
            if not (inside and line.startswith("Traceback")):
                blocks.append([])
            inside = True
        if inside:
            blocks[-1].append(line)
    return ["\n".join(block) for block in blocks]


def short_traceback(block: str) -> str:
    """A traceback cut to its first lines, koubou's own frames and its last frame and exception."""
    lines = block.splitlines()
    if len(lines) <= 20:
        return block
    keep = set(range(2)) | set(range(len(lines) - 5, len(lines)))
    for index, line in enumerate(lines):
        if "/koubou/" in line and "site-packages" not in line:
            keep |= {index, index + 1}
    shown, last = [], -1
    for index in sorted(i for i in keep if i < len(lines)):
        if index != last + 1:
            shown.append("  ...")
        shown.append(lines[index])
        last = index
    return "\n".join(shown)


def worker_boots(system: System) -> int:
    return api_log_since(system, 0).count("Booting worker")


# -- 1. schemathesis --------------------------------------------------------------------------


def cap_sync_wait(case: schemathesis.Case) -> bool:
    """Bound how long a generated `sync: true` delegation can keep its request open; True if sync."""
    body = case.body
    if not isinstance(body, dict) or body.get("sync") is not True:
        return False
    options = body.get("options", None)
    if "options" not in body:
        body["options"] = {"timeout": SYNC_TIMEOUT_CAP}
    elif isinstance(options, dict):
        timeout = options.get("timeout", 120.0)
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and not timeout <= SYNC_TIMEOUT_CAP:
            options["timeout"] = SYNC_TIMEOUT_CAP
    return True


def four_xx_is_error_json(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Custom schemathesis check: a 4xx answer is JSON `{"error", "detail"}` (HEAD has no body)."""
    if 400 <= response.status_code < 500 and case.method.upper() != "HEAD":
        content_type = response.headers.get("content-type", [""])[0]
        problem = error_shape_problem(response.status_code, content_type, response.content)
        assert problem is None, problem


class Fuzzer:
    def __init__(self, system: System, tally: Tally) -> None:
        self.system, self.tally = system, tally
        self.session = requests.Session()

    def run(self, case: schemathesis.Case) -> None:
        is_sync = cap_sync_wait(case)
        started = time.monotonic()
        try:
            response = case.call(base_url=self.system.api, session=self.session, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as error:
            self.tally.record(None)
            self.tally.failures.append(f"no answer ({type(error).__name__}: {error}) to:\n{self._curl(case)}")
            return
        self.tally.record(response.status_code)
        if is_sync:
            self.tally.sync_waits.append(time.monotonic() - started)
        if response.status_code >= 500:
            self.tally.server_errors.append(
                f"{response.status_code} {response.text[:300]!r} for:\n{self._curl(case)}"
            )
        try:
            case.validate_response(
                response,
                checks=[not_a_server_error, four_xx_is_error_json],
                transport_kwargs={"base_url": self.system.api},
            )
        except Exception as failure:  # schemathesis' FailureGroup: keep it, carry on
            if response.status_code < 500:  # 5xx are already recorded above, with the input
                self.tally.failures.append(str(failure)[:1500])
        is_delegate = case.method.upper() == "POST" and case.operation.path == "/task/delegate"
        if is_delegate and response.status_code in (200, 202):
            try:
                self.tally.task_ids.append(response.json()["task_id"])
            except (ValueError, KeyError, TypeError):
                self.tally.failures.append(f"2xx without a task_id: {response.text[:300]!r}")

    def _curl(self, case: schemathesis.Case) -> str:
        try:
            return case.as_curl_command(base_url=self.system.api)
        except Exception:  # curl rendering of odd bodies can fail; the repr still says what was sent
            return f"{case.method} {case.formatted_path} body={case.body!r:.500}"


def without_security(document: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI document with no security requirement, so schemathesis sends no Authorization."""
    document = copy.deepcopy(document)
    document.pop("security", None)
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict):
                operation.pop("security", None)
    return document


def run_phases(
    schema: Any, fuzzer: Fuzzer, tally: Tally, label: str, max_examples: dict[str, int], default: int
) -> None:
    """schemathesis' coverage phase, then bounded Hypothesis fuzzing, of every operation."""
    both = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    operations = [result.ok() for result in schema.get_all_operations()]
    before = tally.cases
    for operation in operations:  # deterministic boundary, wrong-type, wrong-method, bad-auth cases
        config = schema.config.generation_for(operation=operation, phase="coverage")
        for case in schema.iter_coverage_cases(operation, generation_modes=both, generation_config=config):
            fuzzer.run(case)
    tally.phases[f"coverage{label}"] = tally.cases - before
    before = tally.cases
    for operation in operations:
        # Negative data only where there is something to negate: a plain-string path
        # parameter has no invalid value (Hypothesis would report Unsatisfiable).
        modes = both if len(operation.body) else [GenerationMode.POSITIVE]
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=max_examples.get(operation.label, default),
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],  # failures are collected, nothing to shrink
                suppress_health_check=list(HealthCheck),
            )
            def fuzz(case: schemathesis.Case) -> None:
                fuzzer.run(case)

            fuzz()
    tally.phases[f"fuzzing{label}"] = tally.cases - before


def run_schemathesis(system: System, tally: Tally) -> None:
    fuzzer = Fuzzer(system, tally)
    served = schemathesis.openapi.from_url(f"{system.api}/openapi.json", timeout=REQUEST_TIMEOUT)
    labels = {result.ok().label for result in served.get_all_operations()}
    assert labels >= {"POST /task/delegate", "GET /task/{task_id}/status", "GET /health"}, labels

    # Auth is off on loopback while no agent exists, as in this session's system. The document
    # declares a bearer scheme, for which schemathesis makes up tokens (401 for all of them):
    # the main run uses the document without it, so cases reach validation and the task logic.
    document = requests.get(f"{system.api}/openapi.json", timeout=REQUEST_TIMEOUT).json()
    open_schema = schemathesis.openapi.from_dict(without_security(document))
    run_phases(open_schema, fuzzer, tally, "", MAX_EXAMPLES, MAX_EXAMPLES_DEFAULT)
    # Then the document as served: made-up and missing tokens exercise the auth path.
    run_phases(served, fuzzer, tally, " (as served, bearer)", {}, MAX_EXAMPLES_WITH_AUTH)

    # Every accepted task can be read back (weird prompts included).
    before = tally.cases
    for task_id in tally.task_ids[:MAX_READBACKS]:
        status, body = http("GET", f"{system.api}/task/{quote(task_id, safe='')}/status", timeout=REQUEST_TIMEOUT)
        tally.record(status)
        if status >= 500:
            tally.server_errors.append(f"{status} {body!r:.300} for GET /task/{task_id}/status (read-back)")
        elif status != 200:
            tally.failures.append(f"read-back of accepted {task_id}: {status} {body!r:.300}")
    tally.phases["read-backs"] = tally.cases - before


# -- 2. hostile raw requests ------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None  # None: the server closed without answering
    headers: dict[str, str]
    body: bytes
    error: str | None = None


def raw_exchange(port: int, request: bytes, *, half_close: bool = False, timeout: float = REQUEST_TIMEOUT) -> Answer:
    """Send `request` as is on a fresh connection; read the answer until the server closes.

    Sending runs in a thread while this one reads: a server that answers 413 before reading a
    10 MB body, then closes, must not leave us blocked in sendall or lose its answer.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    send_error: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(request)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError as error:
            send_error.append(error)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    chunks: list[bytes] = []
    error = None
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            if _complete(b"".join(chunks)):
                break
    except OSError as exc:  # a reset after the answer was sent is fine; we keep what arrived
        error = f"{type(exc).__name__}: {exc}"
    finally:
        sender.join(timeout=timeout)
        sock.close()
    data = b"".join(chunks)
    if not data.startswith(b"HTTP/"):
        return Answer(None, {}, data, error or (f"send: {send_error[0]}" if send_error else None))
    head, _, body = data.partition(b"\r\n\r\n")
    while re.match(rb"HTTP/\S+ 1\d\d", head) and body.startswith(b"HTTP/"):  # interim answers (100 Continue)
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(lines[0].split()[1]), headers, body, error)


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    while sep and re.match(rb"HTTP/\S+ 1\d\d", head):
        head, sep, body = body.partition(b"\r\n\r\n")
    if not sep:
        return False
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return bool(match) and len(body) >= int(match.group(1))


def req(method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
        *, content_type: str | None = "application/json", chunked: bool = False) -> bytes:  # fmt: skip
    """Bytes of one HTTP/1.1 request with `Connection: close`; `path` is sent exactly as given."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", "User-Agent: koubou-fuzz"]
    if content_type is not None and body is not None:
        lines.append(f"Content-Type: {content_type}")
    if body is not None and not chunked:
        lines.append(f"Content-Length: {len(body)}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    if chunked:
        payload = body or b""
        parts = [payload[i : i + 65536] for i in range(0, len(payload), 65536)]
        return head + b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    return head + (body or b"")


def delegate(body: Any | bytes, **kwargs: Any) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return req("POST", "/task/delegate", raw, **kwargs)


@dataclass
class Hostile:
    name: str
    request: bytes
    expect: frozenset[int | None]  # answers allowed; None = the server closed without an answer
    json_error: bool = True  # a 4xx must be JSON {"error", "detail"} (False: gunicorn answers, not Flask)
    half_close: bool = False
    check: Callable[[Answer], str | None] | None = None
    allowed_5xx: str | None = None  # why this 5xx is not koubou's to avoid (counted and reported apart)


def H(name: str, request: bytes, *codes: int | None, gunicorn: bool = False, **more: Any) -> Hostile:
    """A hostile case allowed to get `codes` (None: no answer); `gunicorn`: refused before Flask, not JSON."""
    return Hostile(name, request, frozenset(codes), json_error=not gunicorn, **more)


MB = 1024 * 1024
NEST = 100_000
LONG_ID = "a" * 10_000
TASK = "task_20260101_000000_abcdefABCDEF"  # well-formed, unknown
CHUNKED = req("POST", "/task/delegate", None, {"Transfer-Encoding": "chunked", "Content-Type": "application/json"})
RAW_START = b"POST /task/delegate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"


def post(**headers: str) -> bytes:
    """A valid delegation with extra headers."""
    return delegate({"prompt": "x"}, headers=headers)


def health(**headers: str) -> bytes:
    return req("GET", "/health", headers=headers)


WRONG_BODIES: list[tuple[str, Any]] = [
    ("prompt int", {"prompt": 123}),
    ("prompt null", {"prompt": None}),
    ("prompt list", {"prompt": ["a"]}),
    ("prompt object", {"prompt": {"a": 1}}),
    ("prompt blank", {"prompt": " \t\n "}),
    ("prompt empty", {"prompt": ""}),
    ("no prompt", {"priority": 5}),
    ("priority string", {"prompt": "x", "priority": "5"}),
    ("priority float", {"prompt": "x", "priority": 5.5}),
    ("priority bool", {"prompt": "x", "priority": True}),
    ("priority huge int", {"prompt": "x", "priority": 10**400}),
    ("priority negative", {"prompt": "x", "priority": -(2**63)}),
    ("sync string", {"prompt": "x", "sync": "true"}),
    ("sync int", {"prompt": "x", "sync": 1}),
    ("files string", {"prompt": "x", "files": "/etc/passwd"}),
    ("files traversal", {"prompt": "x", "files": ["../../../../etc/passwd"]}),
    ("options list", {"prompt": "x", "options": []}),
    ("options string", {"prompt": "x", "options": "x"}),
    ("timeout string", {"prompt": "x", "options": {"timeout": "1"}}),
    ("timeout zero", {"prompt": "x", "options": {"timeout": 0}}),
    ("timeout negative", {"prompt": "x", "options": {"timeout": -1e308}}),
    ("timeout bool", {"prompt": "x", "options": {"timeout": True}}),
    ("model int", {"prompt": "x", "options": {"model": 5}}),
    ("model empty", {"prompt": "x", "options": {"model": ""}}),
    ("model too long", {"prompt": "x", "options": {"model": "m" * 201}}),
    ("temperature string", {"prompt": "x", "options": {"temperature": "hot"}}),
    ("num_ctx float", {"prompt": "x", "options": {"num_ctx": 1.5}}),
    ("num_ctx 2**64", {"prompt": "x", "options": {"num_ctx": 2**64}}),
    ("max_tokens negative", {"prompt": "x", "options": {"max_tokens": -1}}),
    ("type unknown", {"prompt": "x", "type": "shell"}),
    ("type null", {"prompt": "x", "type": None}),
    ("unknown field", {"prompt": "x", "__proto__": {"admin": True}}),
    ("unknown option", {"prompt": "x", "options": {"stream": True}}),
    ("body array", [{"prompt": "x"}]),
    ("body string", "prompt"),
    ("body number", 1),
    ("body null", None),
    ("body true", True),
]


def hostile_cases() -> list[Hostile]:
    big = b'{"prompt":"' + b"a" * (10 * MB) + b'"}'
    return [
        *(H(f"wrong type: {label}", delegate(body), 400) for label, body in WRONG_BODIES),
        H("empty body", delegate(b""), 400),
        H("whitespace body", delegate(b" \r\n\t "), 400),
        H("number overflow to inf (priority 1e400)", delegate(b'{"prompt":"x","priority":1e400}'), 400),
        H("timeout underflow to 0 (1e-400)", delegate(b'{"prompt":"x","options":{"timeout":1e-400}}'), 400),
        H("timeout NaN", delegate(b'{"prompt":"x","options":{"timeout":NaN}}'), 400),
        H("timeout -Infinity", delegate(b'{"prompt":"x","options":{"timeout":-Infinity}}'), 400),
        H("timeout Infinity, async", delegate(b'{"prompt":"x","options":{"timeout":Infinity}}'), 202, 400),
        H("5000-digit number", delegate(b'{"prompt":"x","options":{"num_ctx":' + b"9" * 5000 + b"}}"), 400),
        H("duplicate keys", delegate(b'{"prompt":"x","prompt":""}'), 202, 400),
        # huge and deeply nested
        H("10 MB body (Content-Length)", delegate(big), 413),
        # Over 8 MiB without a Content-Length, werkzeug's readall() stops at the limit without
        # raising: the body is cut at 8 MiB and refused as invalid JSON (400), not 413.
        H("10 MB body (chunked)", delegate(big, chunked=True), 400, 413),
        H("prompt over 1M chars (2 MB body)", delegate({"prompt": "a" * 2_000_001}), 413),
        H("6 MB: 700k-item files list", delegate({"prompt": "x", "files": ["aaaaa"] * 700_000}), 400),
        H("100k nested lists", delegate(b"[" * NEST + b"]" * NEST), 400),
        H("100k nested objects", delegate(b'{"a":' * NEST + b"1" + b"}" * NEST), 400),
        H("100k nested lists in files", delegate(b'{"prompt":"x","files":' + b"[" * NEST + b"]" * NEST + b"}"), 400),
        H("100k nested objects in options",
          delegate(b'{"prompt":"x","options":' + b'{"model":' * NEST + b'"m"' + b"}" * NEST + b"}"), 400),  # fmt: skip
        H("100k unclosed lists", delegate(b"[" * NEST), 400),
        # encodings, NUL
        H("invalid UTF-8 in prompt", delegate(b'{"prompt":"\xff\xfe\xfd"}'), 400),
        H("overlong UTF-8 slash", delegate(b'{"prompt":"\xc0\xaf"}'), 400),
        H("invalid UTF-8 as key", delegate(b'{"\xff":"x","prompt":"x"}'), 400),
        H("lone surrogate escape", delegate(b'{"prompt":"a\\ud800b"}'), 400),
        H("UTF-16 body", delegate('{"prompt":"x"}'.encode("utf-16")), 400),
        H("UTF-8 BOM", delegate(b'\xef\xbb\xbf{"prompt":"x"}'), 202, 400),
        H("raw NUL bytes body", delegate(b"\x00" * 1000), 400),
        H("raw NUL inside JSON string", delegate(b'{"prompt":"a\x00b"}'), 400),
        H("prompt \\u0000", delegate({"prompt": "\u0000"}), 202),
        H("prompt with \\u0000 inside", delegate({"prompt": "say \u0000 hi \u0000"}), 202),
        H("model \\u0000", delegate({"prompt": "x", "options": {"model": "\u0000../../etc"}}), 202),
        H("prompt of control chars and RTL marks", delegate({"prompt": "\u202e\u0007\u001b[2J\ufeff"}), 202),
        H("prompt of astral chars", delegate({"prompt": "\U0001f600" * 1000}), 202),
        # Content-Type (koubou reads the body as JSON whatever the type says)
        H("text/plain JSON", delegate({"prompt": "x"}, content_type="text/plain"), 202, 400, 415),
        H("no Content-Type", delegate({"prompt": "x"}, content_type=None), 202, 400, 415),
        H("form-urlencoded", delegate(b"prompt=x", content_type="application/x-www-form-urlencoded"), 400, 415),
        H("multipart", delegate(b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n',
                                content_type="multipart/form-data; boundary=b"), 400, 415),  # fmt: skip
        H("multipart without boundary", delegate(b"--b\r\n\r\nx", content_type="multipart/form-data"), 400, 415),
        H("latin-1 charset", delegate(b'{"prompt":"caf\xe9"}', content_type="application/json; charset=latin-1"),
          202, 400, 415),  # fmt: skip
        H("XML body with an external entity",
          delegate(b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><p>&e;</p>",
                   content_type="application/xml"), 400, 415),  # fmt: skip
        H("gzip claimed, not gzip", post(**{"Content-Encoding": "gzip"}), 202, 400, 415),
        # framing
        H("chunked, valid JSON", delegate({"prompt": "chunked hello"}, chunked=True), 202),
        H("chunked, extension", CHUNKED + b'e;ext=1\r\n{"prompt":"x"}\r\n0\r\n\r\n', 202),
        # Broken chunked framing is only found while the view reads the body: Flask answers it.
        H("chunked, bad chunk size", CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n", 400),
        H("chunked, negative chunk size", CHUNKED + b"-1\r\n{}\r\n0\r\n\r\n", 400),
        H("chunked, no CRLF after chunk", CHUNKED + b'e\r\n{"prompt":"x"}XX0\r\n\r\n', 400),
        H("chunked, bad trailer", CHUNKED + b'e\r\n{"prompt":"x"}\r\n0\r\nX Bad\r\n\r\n', 400),
        H("chunked, no last chunk", CHUNKED + b'e\r\n{"prompt":"x"}\r\n', 400, half_close=True),
        H("chunked, chunk longer than data", CHUNKED + b'ff\r\n{"prompt":"x"}', 400, half_close=True),
        H("chunked, 2**80 chunk size", CHUNKED + b"ffffffffffffffffffff\r\n{}", 400, 413, half_close=True),
        H("Transfer-Encoding: gzip, chunked",
          RAW_START + b'Transfer-Encoding: gzip, chunked\r\n\r\ne\r\n{"prompt":"x"}\r\n0\r\n\r\n',
          202, 400, gunicorn=True),  # fmt: skip
        H("Transfer-Encoding: identity", post(**{"Transfer-Encoding": "identity"}), 400, gunicorn=True),
        # RFC 9112 6.1: an unknown transfer coding SHOULD get 501; gunicorn does so before Flask runs.
        H("Transfer-Encoding: junk", post(**{"Transfer-Encoding": "junk"}), 400, 501, gunicorn=True,
          allowed_5xx="gunicorn's RFC 9112 answer to an unknown transfer coding"),  # fmt: skip
        H("Content-Length and chunked",
          RAW_START + b'Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\ne\r\n{"prompt":"x"}\r\n0\r\n\r\n',
          400, gunicorn=True),  # fmt: skip
        H("Content-Length -1", RAW_START + b"Content-Length: -1\r\n\r\n", 400, gunicorn=True),
        H("Content-Length abc", RAW_START + b"Content-Length: abc\r\n\r\n", 400, gunicorn=True),
        H("Content-Length 2**70", RAW_START + b"Content-Length: %d\r\n\r\n" % 2**70, 400, 413),
        H("body shorter than Content-Length", RAW_START + b'Content-Length: 100\r\n\r\n{"prompt":',
          400, None, half_close=True),  # fmt: skip
        H("Expect: 100-continue", post(Expect="100-continue"), 202),
        # task ids: traversal, encoding, length
        H("traversal /task/../../etc/passwd/status", req("GET", "/task/../../etc/passwd/status"), 404),
        H("traversal %2e%2e%2f", req("GET", "/task/%2e%2e%2f%2e%2e%2fetc%2fpasswd/status"), 404),
        H("traversal ..%2f", req("GET", "/task/..%2f..%2f..%2fetc%2fpasswd/status"), 404),
        H("traversal %252e double-encoded", req("GET", "/task/%252e%252e%252fetc%252fpasswd/status"), 404),
        H("traversal backslash", req("GET", "/task/..%5c..%5cwindows%5cwin.ini/status"), 404),
        H("traversal alias", req("GET", "/task/status/../../../etc/passwd"), 404),
        H("traversal alias encoded", req("GET", "/task/status/%2e%2e%2f%2e%2e%2fetc%2fpasswd"), 404),
        H("absolute-form URL", req("GET", "http://evil.example/task/x/status"), 404, 400),
        H("task id %00", req("GET", "/task/%00/status"), 404),
        H("task id NUL in middle", req("GET", f"/task/{TASK}%00x/status"), 404),
        H("task id %ff%fe", req("GET", "/task/%ff%fe/status"), 404),
        H("task id raw bytes \\xff", b"GET /task/\xff\xfe/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
          400, 404, gunicorn=True),  # fmt: skip
        H("task id SQL injection", req("GET", "/task/" + quote("' OR '1'='1' --") + "/status"), 404),
        H("task id LIKE wildcards", req("GET", "/task/task_%25_%25/status"), 404),
        H("task id unicode", req("GET", "/task/" + quote("task_\u202e\U0001f600") + "/status"), 404),
        H("task id 4000 chars (reaches Flask)", req("GET", f"/task/{'a' * 4000}/status"), 404),
        H("task id 10k chars", req("GET", f"/task/{LONG_ID}/status"), 414, 400, gunicorn=True),
        H("task id 10k chars, alias", req("GET", f"/task/status/{LONG_ID}"), 414, 400, gunicorn=True),
        H("double slashes", req("GET", f"//task//{TASK}//status"), 404, 308),
        H("trailing slash", req("GET", f"/task/{TASK}/status/"), 404, 308),
        H("query junk", req("GET", f"/task/{TASK}/status?%ff=%00&a=" + "b" * 3000), 404),
        H("fragment in request line", req("GET", f"/task/{TASK}/status#x"), 404, 400),
        # headers
        H("100 KB header value", health(**{"X-Big": "v" * 100_000}), 400, 431, gunicorn=True),
        H("8 KB header value", health(**{"X-Big": "v" * 8_100}), 200, 400, 431, gunicorn=True),
        H("300 headers", health(**{f"X-H{i}": "v" for i in range(300)}), 400, 431, gunicorn=True),
        H("90 headers", health(**{f"X-H{i}": "v" for i in range(90)}), 200),
        H("header name with space", health(**{"X Bad": "v"}), 400, gunicorn=True),
        H("header value with NUL", health(**{"X-Nul": "a\x00b"}), 400, gunicorn=True),
        H("header value latin-1 bytes", health(**{"X-Latin": "caf\xe9\xff"}), 200, 400, gunicorn=True),
        H("header without colon", health(NoColonHere="").replace(b"NoColonHere: ", b"NoColonHere"), 400, gunicorn=True),
        H("obs-fold continuation", health(**{"X-A": "a\r\n b"}), 200, 400, gunicorn=True),
        H("huge X-Forwarded-Host", health(**{"X-Forwarded-Host": "h" * 4000}), 200),
        H("X-Forwarded-For spoof", health(**{"X-Forwarded-For": "1.2.3.4, ::1, " + "9" * 1000}), 200),
        H("Authorization with control chars", post(Authorization="Bearer \x01\x02junk"), 400, gunicorn=True),
        H("Authorization long bearer", post(Authorization="Bearer " + "t" * 4000), 202, 401),
        H("Authorization basic", post(Authorization="Basic YWRtaW46YWRtaW4="), 202, 401),
        H("Authorization SQL-ish", post(Authorization="Bearer ' OR 1=1 --"), 202, 401),
        H("Accept XML only", req("GET", f"/task/{TASK}/status", headers={"Accept": "application/xml"}), 404, 406),
        H("Range header", req("GET", "/openapi.json", headers={"Range": "bytes=-1,0-0,99999999999999999999-"}),
          200, 206, 416),  # fmt: skip
        # Idempotency-Key
        H("Idempotency-Key empty", post(**{"Idempotency-Key": ""}), 400),
        H("Idempotency-Key 256 chars", post(**{"Idempotency-Key": "k" * 256}), 400),
        H("Idempotency-Key 8000 chars", post(**{"Idempotency-Key": "k" * 8000}), 400),
        H("Idempotency-Key latin-1 bytes", post(**{"Idempotency-Key": "caf\xe9\xff"}), 202),
        H("Idempotency-Key with NUL", post(**{"Idempotency-Key": "a\x00b"}), 400, gunicorn=True),
        H("Idempotency-Key on an invalid body", delegate({"prompt": 1}, headers={"Idempotency-Key": "fuzz-bad"}), 400),
        H("Idempotency-Key twice in one request",
          post(**{"Idempotency-Key": "a"}).replace(b"\r\n\r\n", b"\r\nIdempotency-Key: b\r\n\r\n", 1),
          202, 400),  # fmt: skip
        # cancel paths
        H("DELETE traversal", req("DELETE", "/task/../../etc/passwd"), 404, 405),
        H("DELETE encoded traversal", req("DELETE", "/task/%2e%2e%2f%2e%2e%2fetc%2fpasswd"), 404),
        H("DELETE task id %00", req("DELETE", "/task/%00"), 404),
        H("DELETE task id 4000 chars", req("DELETE", f"/task/{'a' * 4000}"), 404),
        H("DELETE task id 10k chars", req("DELETE", f"/task/{LONG_ID}"), 414, 400, gunicorn=True),
        H("cancel unknown id", req("POST", f"/task/{TASK}/cancel", b""), 404),
        H("cancel with 10 MB body", req("POST", f"/task/{TASK}/cancel", b"x" * (10 * MB)), 404, 413),
        H("cancel with JSON junk", req("POST", f"/task/{TASK}/cancel", b"[" * NEST), 404, 400),
        H("GET cancel", req("GET", f"/task/{TASK}/cancel"), 405),
        H("PUT task", req("PUT", f"/task/{TASK}", b"{}"), 405),
        # methods
        H("HEAD /health", req("HEAD", "/health"), 200, check=lambda a: "HEAD has a body" if a.body else None),
        H("HEAD status", req("HEAD", f"/task/{TASK}/status"), 404, gunicorn=True),  # no body to be JSON
        H("OPTIONS /task/delegate", req("OPTIONS", "/task/delegate"), 200, 204),
        H("OPTIONS *", req("OPTIONS", "*"), 200, 204, 400, 404),
        H("PUT /task/delegate", delegate({"prompt": "x"}).replace(b"POST", b"PUT", 1), 405),
        H("DELETE status", req("DELETE", f"/task/{TASK}/status"), 404, 405),
        H("PATCH status", req("PATCH", f"/task/{TASK}/status", b"{}"), 405),
        H("GET /task/delegate", req("GET", "/task/delegate"), 405),
        H("POST /health", req("POST", "/health", b"{}"), 405),
        H("TRACE /health", req("TRACE", "/health"), 405),
        H("CONNECT", req("CONNECT", "127.0.0.1:22"), 400, 404, 405, gunicorn=True),
        H("made-up method", req("BREW", "/health"), 405),
        H("method with NUL", b"G\x00T /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400, gunicorn=True),
        H("lowercase method", req("get", "/health"), 400, 405, gunicorn=True),
        # not HTTP at all (half-closed, so the server sees the end at once)
        H("HTTP/0.9 request line", b"GET /health\r\n\r\n", 400, None, gunicorn=True, half_close=True),
        H("HTTP/9.9", b"GET /health HTTP/9.9\r\nHost: x\r\nConnection: close\r\n\r\n", 400, 505, None,
          gunicorn=True, half_close=True),  # fmt: skip
        H("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, None, gunicorn=True, half_close=True),
        H("TLS ClientHello", bytes.fromhex("16030100a5010000a10303") + b"\x00" * 160, 400, None,
          gunicorn=True, half_close=True),  # fmt: skip
        H("binary garbage", bytes(range(256)) * 16, 400, None, gunicorn=True, half_close=True),
        H("empty connection", b"", None, gunicorn=True, half_close=True),
    ]


def run_hostile(system: System, tally: Tally) -> None:
    port = urlsplit(system.api).port
    assert port is not None
    for case in hostile_cases():
        started = time.monotonic()
        try:
            answer = raw_exchange(port, case.request, half_close=case.half_close)
        except OSError as error:
            answer = Answer(None, {}, b"", f"{type(error).__name__}: {error}")
        elapsed = time.monotonic() - started
        tally.record(answer.status)
        note = f", {answer.error}" if answer.error else ""
        shown = f"{case.name!r}: {answer.status} {answer.body[:300]!r} ({elapsed:.1f}s{note})"
        if answer.status is not None and answer.status >= 500:
            if case.allowed_5xx and answer.status in case.expect:
                tally.allowed_5xx.append(f"{case.name!r}: {answer.status}, {case.allowed_5xx}")
            else:
                tally.server_errors.append(f"hostile {shown}\n  request: {case.request[:300]!r}")
            continue
        if answer.status not in case.expect:
            expected = sorted(case.expect, key=lambda s: s or 0)
            tally.failures.append(f"hostile {shown}; expected one of {expected}")
            continue
        if case.json_error and answer.status is not None and 400 <= answer.status < 500:
            problem = error_shape_problem(answer.status, answer.headers.get("content-type", ""), answer.body)
            if problem:
                tally.failures.append(f"hostile {case.name!r}: {problem}")
        if case.check is not None and (problem := case.check(answer)):
            tally.failures.append(f"hostile {case.name!r}: {problem}")
        if answer.status in (200, 202) and case.request.startswith(b"POST /task/delegate "):
            try:
                task_id = json.loads(answer.body)["task_id"]
            except (ValueError, KeyError, TypeError):
                tally.failures.append(f"hostile {case.name!r}: {answer.status}, no task_id: {answer.body[:300]!r}")
                continue
            tally.task_ids.append(task_id)
            status, body = http("GET", f"{system.api}/task/{task_id}/status", timeout=REQUEST_TIMEOUT)
            tally.record(status)
            shown = f"read-back of {task_id} after hostile {case.name!r}: {status} {body!r:.300}"
            if status >= 500:
                tally.server_errors.append(shown)
            elif status != 200:
                tally.failures.append(shown)


def call(
    system: System, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    return http(method, f"{system.api}{path}", body, timeout=REQUEST_TIMEOUT, headers=headers)

def run_sequences(system: System, tally: Tally) -> None:
    """Short scripted exchanges that need state: Idempotency-Key reuse, cancelling real tasks."""

    def step(name: str, method: str, path: str, expect: set[int], body: Any = None, **headers: str) -> Any:
        status, payload = call(system, method, path, body, headers)
        tally.record(status)
        shown = f"sequence {name!r}: {method} {path[:80]} -> {status} {payload!r:.300}"
        if status >= 500:
            tally.server_errors.append(shown)
        elif status not in expect:
            tally.failures.append(f"{shown}; expected one of {sorted(expect)}")
        elif status >= 400 and (not isinstance(payload, dict) or set(payload) != ERROR_KEYS):
            tally.failures.append(f"{shown}: not {{'error', 'detail'}}")
        if isinstance(payload, dict) and method == "POST" and path == "/task/delegate" and "task_id" in payload:
            tally.task_ids.append(payload["task_id"])
        return payload if isinstance(payload, dict) else {}

    key = {"Idempotency-Key": f"fuzz-{time.monotonic_ns()}"}
    first = step("idempotent 1", "POST", "/task/delegate", {202}, {"prompt": "once"}, **key)
    again = step("idempotent 2, other body", "POST", "/task/delegate", {202}, {"prompt": "twice", "priority": 9}, **key)
    if first.get("task_id") != again.get("task_id"):
        tally.failures.append(f"one Idempotency-Key gave two tasks: {first} / {again}")

    for verb, suffix in (("DELETE", ""), ("POST", "/cancel")):
        created = step(f"delegate to cancel ({verb})", "POST", "/task/delegate", {202}, {"prompt": "cancel me"})
        task_id = created.get("task_id")
        if not task_id:
            continue
        step("cancel", verb, f"/task/{task_id}{suffix}", {200, 202, 409})
        step("cancel again", verb, f"/task/{task_id}{suffix}", {200, 202, 409})
        step("status after cancel", "GET", f"/task/{task_id}/status", {200})
        sync = {"prompt": "x", "sync": True, "options": {"timeout": SYNC_TIMEOUT_CAP}}
        step("sync, with the task id as Idempotency-Key", "POST", "/task/delegate", {200, 202}, sync,
             **{"Idempotency-Key": task_id})  # fmt: skip


# -- the test ---------------------------------------------------------------------------------


def unfinished(system: System, task_ids: list[str], timeout: float) -> list[str]:
    """The tasks among `task_ids` still not final (in task_master) after waiting up to `timeout`."""
    final = tuple(status.value for status in FINAL_STATUSES)
    pending = sorted(set(task_ids))
    deadline = time.monotonic() + timeout
    while pending:
        marks = ",".join("?" * len(final))
        done: set[str] = set()
        for start in range(0, len(pending), 500):  # SQLite's bound-parameter limit
            batch = pending[start : start + 500]
            ids = ",".join("?" * len(batch))
            query = f"SELECT task_id FROM task_master WHERE task_id IN ({ids}) AND status IN ({marks})"
            rows = system.sql(query, *batch, *final)
            done |= {row["task_id"] for row in rows}
        pending = [task_id for task_id in pending if task_id not in done]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    return pending


def test_fuzz_api_no_server_errors_and_stays_healthy(system: System) -> None:
    started = time.monotonic()
    log_offset = api_log_offset(system)
    boots_before = worker_boots(system)
    restarts_before = system.output().count("restarting")

    fuzz = Tally("schemathesis")
    run_schemathesis(system, fuzz)
    hostile = Tally("hand-made hostile requests and sequences")
    run_hostile(system, hostile)
    run_sequences(system, hostile)

    # Every task the fuzzing created ends (the fake LLM answers at once): none is left stuck, and
    # the next tests find an idle worker pool.
    stuck = unfinished(system, fuzz.task_ids + hostile.task_ids, timeout=DRAIN_TIMEOUT)
    health_status, health = http("GET", f"{system.api}/health", timeout=30)
    log_text = api_log_since(system, log_offset)
    errors_in_log = tracebacks(log_text)
    elapsed = time.monotonic() - started

    total_cases = fuzz.cases + hostile.cases
    server_errors = [entry for tally in (fuzz, hostile) for entry in tally.server_errors]
    allowed = [entry for tally in (fuzz, hostile) for entry in tally.allowed_5xx]
    report = "\n".join(
        [
            f"fuzz: {total_cases} cases, {len(server_errors)} 5xx"
            + (f" (+{len(allowed)} allowed: {'; '.join(allowed)})" if allowed else "")
            + f", {elapsed:.1f}s",
            f"  {fuzz.summary()}",
            f"  {hostile.summary()}",
            f"  tasks accepted: {len(fuzz.task_ids)} + {len(hostile.task_ids)} (hand-made), {len(stuck)} not final"
            f" {DRAIN_TIMEOUT:.0f}s later; generated sync cases: {len(fuzz.sync_waits)}, "
            f"longest {max(fuzz.sync_waits, default=0):.2f}s (timeout capped at {SYNC_TIMEOUT_CAP}s)",
            f"  /health after: {health_status} {health.get('status') if isinstance(health, dict) else health!r}",
        ]
    )
    print("\n" + report)
    problems = [f"5xx: {entry}" for entry in server_errors]
    problems += [failure for tally in (fuzz, hostile) for failure in tally.failures]
    if stuck:
        problems.append(f"{len(stuck)} accepted tasks not final {DRAIN_TIMEOUT:.0f}s after fuzzing, e.g. {stuck[:5]}")
    if len(fuzz.task_ids) < MIN_ACCEPTED:
        problems.append(
            f"only {len(fuzz.task_ids)} generated delegations were accepted (< {MIN_ACCEPTED}): "
            f"the fuzzing did not reach the task logic (auth turned on? answers: {dict(fuzz.statuses)})"
        )
    for block in errors_in_log:
        problems.append("API log error:\n" + short_traceback(block))
    if worker_boots(system) != boots_before:
        problems.append(f"a gunicorn worker was re-booted during fuzzing:\n{log_text[-3000:]}")
    if system.output().count("restarting") != restarts_before:
        problems.append(f"`koubou up` restarted a service:\n{system.output()[-3000:]}")
    if health_status != 200 or not isinstance(health, dict) or health.get("status") != "ok":
        problems.append(f"/health after fuzzing: {health_status} {health!r:.1000}")
    if problems:
        pytest.fail(report + "\n\n" + "\n\n".join(problems), pytrace=False)
