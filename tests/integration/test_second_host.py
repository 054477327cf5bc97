"""A worker on a second host joins the cluster with only the broker URL and its backend (issue 4).

The second host is a network namespace made by the test (tests/netns.py) and linked to this host by a
veth pair: it reaches this host only at this host's veth address, never at 127.0.0.1. The main host
runs `koubou up` with its embedded broker opened to that address (`KOUBOU_REDIS_BIND`, so it wants
its generated password), and an "Ollama" (the fake server) on the same address, as a LAN would have.
The second host runs plain `celery -A koubou worker --autoscale=4,1` with its own KOUBOU_HOME, no
database and only what an operator copies: the broker URL (with the password) and OLLAMA_HOST.
The main host's own worker is told to stop consuming, so every task here runs on the second host.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from koubou.constants import QUEUES
from tests.fakes.llm_server import FakeLLMServer, fake_answer
from tests.harness import System, http, make_system
from tests.integration.test_pipeline import wait_row, wait_until
from tests.netns import SecondHost, second_host, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")

MODEL = "fake-model:1b"
#: The mirror marks a worker offline after 10 s without a heartbeat, checking every 5 s.
OFFLINE_BOUND = 30.0


@dataclass
class ExtraWorker:
    """A `celery -A koubou worker` running inside the second host."""

    name: str
    home: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Signal its whole process group (its pool too) by PID; SIGKILL what is left after `timeout`."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)


def start_extra_worker(host: SecondHost, name: str, home: Path, broker_url: str, ollama_url: str) -> ExtraWorker:
    home.mkdir(parents=True)
    # Only what an operator copies to the new machine: no database URL, nothing of the main host's home.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
           "KOUBOU_HOME": str(home), "KOUBOU_BROKER_URL": broker_url, "OLLAMA_HOST": ollama_url}  # fmt: skip
    argv = host.argv(sys.executable, "-m", "celery", "-A", "koubou", "worker", "--autoscale=4,1", "-n", name)
    log_path = home.parent / f"{home.name}.log"
    with open(log_path, "wb") as log:
        # `ip netns exec` execs the command: the PID is the worker's, and its own session holds its pool.
        process = subprocess.Popen(argv, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    return ExtraWorker(name, home, process, log_path)


def broker_password(system: System) -> str:
    """The password `koubou up` generated for its broker (KOUBOU_REDIS_BIND beyond loopback)."""
    return (system.home / "config" / "redis-password").read_text().strip()


def worker_row(system: System, name: str) -> dict[str, Any] | None:
    rows = system.sql("SELECT * FROM workers WHERE worker_id = ?", name)
    return dict(rows[0]) if rows else None


def wait_row_status(system: System, name: str, status: str, timeout: float) -> dict[str, Any]:
    wait_until(lambda: (worker_row(system, name) or {}).get("status") == status, timeout)
    row = worker_row(system, name)
    assert row is not None
    return row


def flower_get(system: System, path: str) -> Any:
    user_password = (system.home / "config" / "flower-auth").read_text().strip()
    token = base64.b64encode(user_password.encode()).decode()
    request = urllib.request.Request(f"http://127.0.0.1:{system.flower_port}{path}",
                                     headers={"Authorization": f"Basic {token}"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def flower_workers(system: System) -> dict[str, Any]:
    """Flower's /api/workers after a fresh inspect; empty when that round failed (Flower answers 503)."""
    try:
        return dict(flower_get(system, "/api/workers?refresh=1"))
    except urllib.error.HTTPError as error:
        if error.code == 503:
            return {}
        raise


# -- fixtures: the two hosts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def link() -> Iterator[SecondHost]:
    with second_host() as host:
        yield host


@pytest.fixture(scope="module")
def llm(link: SecondHost) -> Iterator[FakeLLMServer]:
    # An LLM server on the LAN: listening on the main host's address on the link, not on loopback.
    with FakeLLMServer(models=(MODEL,), host=link.host_ip) as server:
        yield server


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory, link: SecondHost, llm: FakeLLMServer) -> Iterator[System]:
    system = make_system(
        tmp_path_factory.mktemp("main-host"),
        OLLAMA_HOST=llm.url,
        KOUBOU_DEFAULT_MODEL=MODEL,
        KOUBOU_WORKER_AUTOSCALE="1,1",
        KOUBOU_REDIS_BIND=f"127.0.0.1 {link.host_ip}",
    ).start()
    try:
        drain_local_worker(system)
        yield system
    finally:
        assert not system.stop(), "koubou up left processes behind"


def drain_local_worker(system: System) -> None:
    """Tell the main host's worker to stop taking tasks (Celery remote control), as an operator would."""
    (local,) = http("GET", f"{system.api}/health")[1]["workers"]
    for queue in QUEUES:
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "koubou", "control", "--timeout", "10", "-d", local,
             "cancel_consumer", queue],
            cwd=system.home, env=system.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0 and "no longer consuming" in done.stdout, done.stdout + done.stderr


@pytest.fixture(scope="module")
def broker_url(main: System, link: SecondHost) -> str:
    return f"redis://:{quote(broker_password(main), safe='')}@{link.host_ip}:{main.redis_port}/0"


@pytest.fixture(scope="module")
def extra(
    tmp_path_factory: pytest.TempPathFactory, link: SecondHost, main: System, broker_url: str, llm: FakeLLMServer
) -> Iterator[ExtraWorker]:
    worker = start_extra_worker(link, "extra@second-host", tmp_path_factory.mktemp("second-host") / "home",
                                broker_url, llm.url)  # fmt: skip
    try:
        wait_until(lambda: worker.process.poll() is not None or worker_row(main, worker.name) is not None, 90)
        assert worker.process.poll() is None, worker.log()
        yield worker
    finally:
        worker.stop()


# -- tests ------------------------------------------------------------------------------------

PROBE = """
import json, socket, sys
import redis
host, port, api_port, url = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def connects(address, port):
    try:
        socket.create_connection((address, port), timeout=3).close()
        return "connects"
    except OSError as error:
        return type(error).__name__
def ping(client):
    try:
        return repr(client.ping())
    except redis.RedisError as error:
        return type(error).__name__ + ": " + str(error)
print(json.dumps({
    "loopback broker": connects("127.0.0.1", port),
    "loopback api": connects("127.0.0.1", api_port),
    "api on the link": connects(host, api_port),
    "no password": ping(redis.Redis(host=host, port=port, socket_timeout=5)),
    "wrong password": ping(redis.Redis(host=host, port=port, password="not-the-password", socket_timeout=5)),
    "broker url": ping(redis.Redis.from_url(url, socket_timeout=5)),
}))
"""


def test_the_second_host_reaches_the_broker_only_on_the_link_and_only_with_the_password(
    link: SecondHost, main: System, broker_url: str
) -> None:
    done = link.run(sys.executable, "-c", PROBE, link.host_ip, str(main.redis_port), str(main.api_port), broker_url)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    # Isolation: the main host's loopback services do not exist from there (they do from here).
    assert seen["loopback broker"] == "ConnectionRefusedError" and seen["loopback api"] == "ConnectionRefusedError"
    assert http("GET", f"{main.api}/health")[0] == 200
    assert seen["api on the link"] == "ConnectionRefusedError"  # the API stays on loopback
    # The broker listens on the link, and only for those who have its password.
    assert seen["no password"].startswith("AuthenticationError"), seen
    assert seen["wrong password"].startswith("AuthenticationError"), seen
    assert seen["broker url"] == "True", seen


def test_a_task_runs_on_the_second_host_and_is_mirrored(main: System, extra: ExtraWorker, llm: FakeLLMServer) -> None:
    prompt = "summarise this on the second host"
    code, body = main.delegate(prompt=prompt, sync=True, options={"timeout": 60})
    assert code == 200 and body["status"] == "completed", body
    assert body["result"]["output"] == fake_answer(MODEL, [{"role": "user", "content": prompt}])
    assert body["result"]["worker"] == extra.name
    assert wait_row(main, body["task_id"])["assigned_worker_type"] == extra.name
    assert any(prompt in json.dumps(request) for request in llm.chat_requests())
    # A worker never touches the database: the second host has none, and no database setting.
    assert not (extra.home / "db" / "koubou.db").exists()
    assert broker_password(main) not in extra.log()


def test_the_workers_row_shows_the_second_host_busy_then_idle_with_its_counters(
    main: System, extra: ExtraWorker, llm: FakeLLMServer
) -> None:
    row = wait_row_status(main, extra.name, "idle", 30)
    assert (row["hostname"], row["worker_type"], row["pid"]) == ("second-host", "celery", extra.process.pid)
    heartbeat = datetime.fromisoformat(row["last_heartbeat"])
    assert datetime.now(UTC).replace(tzinfo=None) - heartbeat < timedelta(seconds=15)  # stored as naive UTC
    before = (row["tasks_completed"], row["tasks_failed"])
    llm.set_latency(10.0)
    try:
        task_id = main.delegate(prompt="a long answer", options={"timeout": 60})[1]["task_id"]
        wait_until(lambda: main.status(task_id)[1]["status"] == "in_progress", 20)
        busy = wait_row_status(main, extra.name, "busy", 8)
        assert busy["active_tasks"] == 1
        assert main.status(task_id)[1]["status"] == "in_progress"  # still running: busy while it runs
        assert main.wait_final(task_id, timeout=60)["status"] == "completed"
    finally:
        llm.set_latency(0)
    wait_row_status(main, extra.name, "idle", 10)
    failed = main.delegate(prompt="needs a model nobody has", sync=True, options={"model": "absent:70b", "timeout": 60})[1]
    assert failed["status"] == "failed" and failed["result"]["worker"] == extra.name, failed

    def counted() -> bool:
        row = worker_row(main, extra.name) or {}
        return (row.get("tasks_completed"), row.get("tasks_failed")) == (before[0] + 1, before[1] + 1)

    wait_until(counted, 15)
    listed = {w["worker_id"]: w for w in http("GET", f"{main.api}/workers")[1]["workers"]}
    assert listed[extra.name]["tasks_completed"] == before[0] + 1
    assert listed[extra.name]["tasks_failed"] == before[1] + 1


def test_health_and_flower_list_the_second_host(main: System, extra: ExtraWorker) -> None:
    code, health = http("GET", f"{main.api}/health")
    assert code == 200 and extra.name in health["workers"], health
    # Flower asks the workers over the broker (inspect, 1 s per round), and follows their events.
    wait_until(lambda: extra.name in flower_workers(main), 30)
    assert flower_workers(main)[extra.name]["stats"]["pid"] == extra.process.pid
    wait_until(lambda: flower_get(main, "/api/workers?status=1").get(extra.name) is True, 20)


def test_a_killed_second_host_goes_offline_within_bounded_time(
    tmp_path: Path, link: SecondHost, main: System, broker_url: str, llm: FakeLLMServer
) -> None:
    doomed = start_extra_worker(link, "doomed@second-host", tmp_path / "home", broker_url, llm.url)
    try:
        wait_row_status(main, doomed.name, "idle", 90)
        wait_until(lambda: doomed.name in http("GET", f"{main.api}/health")[1]["workers"], 20)
        doomed.stop(signal.SIGKILL)  # no worker-offline event: only the missing heartbeats tell
        killed = time.monotonic()
        row = wait_row_status(main, doomed.name, "offline", OFFLINE_BOUND)
        took = time.monotonic() - killed
    finally:
        doomed.stop(signal.SIGKILL)
    assert row["active_tasks"] == 0
    assert took <= OFFLINE_BOUND
    assert doomed.name not in http("GET", f"{main.api}/health")[1]["workers"]
    wait_until(lambda: flower_get(main, "/api/workers?status=1").get(doomed.name) is False, 20)
