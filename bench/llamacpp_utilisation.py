"""Backend utilisation against the real llama.cpp server (the demo model), with the fake as the baseline.

bench/scheduling.py measures utilisation against the fake server. This runs the same measurement
against llama.cpp's own server (`koubou demo-model`: SmolLM2-135M, `n_parallel` = its 2 slots) with
koubou's slots set to that n_parallel, then against the fake (OpenAI API, 2 slots, its latency set to
the real server's mean service time) in the same run, so the two figures are comparable.

Busy time is measured at the server's door: a thin recording HTTP proxy in front of each server
notes every chat request from its arrival to its response's last byte, how many were in flight at
once, and each status (503 = busy). llama.cpp's /slots endpoint would show the engine's own view,
but only by polling (a sampling error of the polling interval, and more load on two busy cores);
the proxy sees every request exactly and works the same for both servers.

utilisation = busy time / (slots x span), span = first request's arrival to last response's end
(also shown: the worker-side form bench/scheduling.py prints, call durations over the span of the
task rows). Starts its own processes on free ports and stops them by PID.
Run: .venv/bin/python bench/llamacpp_utilisation.py [--tasks 30] [--workers 4] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from koubou.demo import DEMO_MODEL_NAME, DEMO_SLOTS  # noqa: E402
from bench.common import mirrored  # noqa: E402
from tests.fakes.llm_server import FakeLLMServer  # noqa: E402
from tests.harness import REPO, System, clean_env, free_port, http, make_system  # noqa: E402

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "te", "upgrade"}


@dataclass
class Record:
    """What the proxy saw of chat requests: (arrival, end, status) each, and the peak in flight."""

    calls: list[tuple[float, float, int]] = field(default_factory=list)
    in_flight: int = 0
    peak: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self) -> float:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        return time.monotonic()

    def end(self, began: float, status: int) -> None:
        with self.lock:
            self.in_flight -= 1
            self.calls.append((began, time.monotonic(), status))


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up are expected
            super().handle_error(request, client_address)


class RecordingProxy:
    """An HTTP proxy to one upstream server that records every chat request's time at the server."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.record = Record()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and each body piece are separate writes: without this, Nagle and the client's
            # delayed ACK add ~40 ms to some answers and the proxy would measure itself.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.forward(self)

            def do_POST(self) -> None:
                proxy.forward(self)

        self.server = _QuietServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="recording-proxy", daemon=True)

    def __enter__(self) -> RecordingProxy:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        is_chat = handler.command == "POST" and path in CHAT_PATHS
        began = self.record.begin() if is_chat else 0.0
        status = 502
        try:
            body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
            upstream = HTTPConnection(*self.upstream, timeout=600)
            try:
                headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
                upstream.request(handler.command, handler.path, body if body else None, headers)
                response = upstream.getresponse()
                status = response.status
                handler.send_response(status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        handler.send_header(key, value)
                handler.send_header("Transfer-Encoding", "chunked")
                handler.end_headers()
                while piece := response.read1(65536):  # relay a streamed answer as it comes
                    handler.wfile.write(b"%X\r\n%s\r\n" % (len(piece), piece))
                handler.wfile.write(b"0\r\n\r\n")
                handler.wfile.flush()
            finally:
                upstream.close()
        finally:
            if is_chat:
                self.record.end(began, status)


@dataclass
class Figures:
    utilisation: float  # at the server: busy / (slots x span), both from the proxy
    worker_utilisation: float  # bench/scheduling.py's form: call durations / (slots x task-row span)
    peak: int
    busy503: int
    calls: int
    mean_service: float
    span: float


def demo_server(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """`koubou demo-model` on `port`, ready (model loaded) or raising."""
    with open(log_path, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "koubou", "demo-model", "--port", str(port)], cwd=REPO,
                                   env=clean_env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"demo model exited with {process.returncode}: {log_path.read_text(errors='replace')[-2000:]}")
        try:
            if http("GET", f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200:
                return process
        except OSError:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"demo model not ready after 240s: {log_path.read_text(errors='replace')[-2000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's group (by its PID), SIGKILL what is left after a grace."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run(upstream: str, model: str, home: Path, tasks: int, workers: int, max_tokens: int) -> Figures:
    """Start koubou on `upstream` (through a recording proxy, `DEMO_SLOTS` slots), run `tasks` delegations."""
    with RecordingProxy(upstream) as proxy:
        (home / "config").mkdir(parents=True)
        line = f"  - {{name: server, kind: openai, url: '{proxy.url}/v1', slots: {DEMO_SLOTS}}}\n"
        (home / "config" / "backends.yaml").write_text("backends:\n" + line)
        system = make_system(home, KOUBOU_DEFAULT_MODEL=model, KOUBOU_WORKER_AUTOSCALE=f"{workers},{workers}")
        system.start(timeout=180)
        try:
            ids = submit(system, tasks, max_tokens)
            finals = [system.wait_final(task_id, timeout=600) for task_id in ids]
            rows = mirrored(system, ids)
        finally:
            system.stop()
    failed = [f for f in finals if f["status"] != "completed"]
    assert not failed, f"{len(failed)} tasks did not complete, e.g. {failed[0]}"
    calls = proxy.record.calls
    served = [(a, b) for a, b, status in calls if status == 200]
    span = max(b for _, b in served) - min(a for a, _ in served)
    busy = sum(b - a for a, b in served)
    attempts = [a for f in finals for a in f["result"]["attempts"] if a["ok"]]
    row_span = (max(datetime.fromisoformat(rows[t]["completed_at"]) for t in ids)
                - min(datetime.fromisoformat(rows[t]["started_at"]) for t in ids)).total_seconds()  # fmt: skip
    return Figures(
        utilisation=busy / (DEMO_SLOTS * span),
        worker_utilisation=sum(a["duration_ms"] for a in attempts) / 1000 / (DEMO_SLOTS * row_span),
        peak=proxy.record.peak,
        busy503=sum(status == 503 for _, _, status in calls),
        calls=len(calls),
        mean_service=statistics.mean(b - a for a, b in served),
        span=span,
    )


def submit(system: System, count: int, max_tokens: int) -> list[str]:
    def one(i: int) -> str:
        options = {"timeout": 300, "max_tokens": max_tokens, "temperature": 0}
        code, body = system.delegate(prompt=f"Name a colour. ({i})", options=options)
        assert code == 202, body
        return str(body["task_id"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(count)))


def line(name: str, f: Figures) -> str:
    return (f"  {name:<30}{f.utilisation:>8.3f}{f.worker_utilisation:>9.3f}{f.peak:>6}/{DEMO_SLOTS}{f.busy503:>6}"
            f"{f.calls:>7}{f.mean_service * 1000:>10.0f}{f.span:>8.1f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--workers", type=int, default=4, help="worker processes (more than the slots)")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        port = free_port()
        server = demo_server(port, Path(root) / "demo-model.log")
        try:
            real = run(f"http://127.0.0.1:{port}", DEMO_MODEL_NAME, Path(root) / "real", args.tasks, args.workers,
                       args.max_tokens)  # fmt: skip
        finally:
            stop(server)
        # The baseline: the fake with the real server's service time and slots, measured the same way.
        with FakeLLMServer(models=("fake-model:1b",), slots=DEMO_SLOTS, latency=real.mean_service) as fake:
            baseline = run(fake.url, "fake-model:1b", Path(root) / "fake", args.tasks, args.workers, args.max_tokens)
    print(f"utilisation, {args.tasks} tasks, {args.workers} worker processes, koubou slots = n_parallel = {DEMO_SLOTS}, "
          f"max_tokens {args.max_tokens}")  # fmt: skip
    print(f"  {'':<30}{'server':>8}{'worker':>9}{'peak':>8}{'503s':>6}{'calls':>7}{'mean ms':>10}{'span s':>8}")
    print(line("llama.cpp (SmolLM2-135M)", real))
    print(line("fake, same latency and slots", baseline))
    print(f"  llama.cpp / fake utilisation: {real.utilisation / baseline.utilisation:.2f} (server), "
          f"{real.worker_utilisation / baseline.worker_utilisation:.2f} (worker)")  # fmt: skip


if __name__ == "__main__":
    main()
