"""Round-trip time of a `sync` delegation through koubou vs a direct call to the same server.

Also: while 100 clients wait on `sync` delegations, how fast do status and health answer?
Starts its own system (`koubou up` on free ports) against the fake Ollama server. Prints figures.
Run: .venv/bin/python bench/sync_roundtrip.py [--n 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from koubou.backends.base import ChatMessage, ChatRequest  # noqa: E402
from koubou.backends.ollama import OllamaBackend  # noqa: E402
from tests.fakes.llm_server import FakeLLMServer  # noqa: E402
from tests.harness import http, make_system  # noqa: E402


def timed(call) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def summary(name: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[max(0, int(len(ordered) * 0.95) - 1)]
    return f"{name:<44} n={len(samples):<4} p50={statistics.median(samples):8.1f} ms  p95={p95:8.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--waiters", type=int, default=100)
    args = parser.parse_args()
    with FakeLLMServer(models=("fake-model:1b",)) as fake, tempfile.TemporaryDirectory() as home:
        system = make_system(Path(home), OLLAMA_HOST=fake.url, KOUBOU_DEFAULT_MODEL="fake-model:1b").start()
        try:
            backend = OllamaBackend(fake.url)
            request = ChatRequest(model="fake-model:1b", messages=(ChatMessage("user", "bench"),))
            for _ in range(5):  # warm both paths
                backend.chat(request)
                system.delegate(prompt="warm", sync=True)
            direct = [timed(lambda: backend.chat(request)) for _ in range(args.n)]
            routed = [timed(lambda: system.delegate(prompt="bench", sync=True)) for _ in range(args.n)]
            print(summary("direct call to the server (ollama client)", direct))
            print(summary("sync delegation through koubou", routed))
            print(f"koubou overhead per sync task: {statistics.median(routed) - statistics.median(direct):.1f} ms "
                  f"(ratio {statistics.median(routed) / statistics.median(direct):.1f}x)")

            # Hold `waiters` sync delegations open against a slow server, then time status and health.
            fake.set_latency(8)
            codes: list[int] = []

            def wait_one() -> None:
                codes.append(system.delegate(prompt="held", sync=True, options={"timeout": 4})[0])

            threads = [threading.Thread(target=wait_one) for _ in range(args.waiters)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            task_id = system.delegate(prompt="probe")[1]["task_id"]
            status = [timed(lambda: system.status(task_id)) for _ in range(20)]
            health = [timed(lambda: http("GET", f"{system.api}/health")) for _ in range(5)]
            print(summary(f"status while {args.waiters} sync clients wait", status))
            print(summary(f"health while {args.waiters} sync clients wait", health))
            for thread in threads:
                thread.join()
            print(f"the {args.waiters} waiting clients got: " + ", ".join(f"{c}x{codes.count(c)}" for c in sorted(set(codes))))
            fake.set_latency(0)
        finally:
            system.stop()


if __name__ == "__main__":
    main()
