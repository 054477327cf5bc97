"""Starting and stopping the whole system: configuration errors, ports, detach/down, no orphans."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from tests.harness import REPO, alive, cmdline, descendants, free_port, http, make_system


def run_koubou(env: dict[str, str], *args: str, timeout: float = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "koubou", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def health_code(api: str) -> int | None:
    """/health's status, or None while nothing listens (a restarting API)."""
    try:
        return http("GET", f"{api}/health", timeout=10)[0]
    except OSError:
        return None


def test_a_bad_setting_fails_at_start_naming_the_variable(tmp_path: Path) -> None:
    system = make_system(tmp_path, KOUBOU_API_PORT="eighty")
    done = run_koubou(system.env, "up", timeout=60)
    assert done.returncode != 0
    assert "KOUBOU_API_PORT" in done.stderr + done.stdout


def test_a_busy_broker_port_is_never_taken_over(tmp_path: Path) -> None:
    system = make_system(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", system.redis_port))
        squatter.listen()
        done = run_koubou(system.env, "up", timeout=60)
    assert done.returncode == 1
    assert "KOUBOU_REDIS_PORT" in done.stderr and str(system.redis_port) in done.stderr


def test_unreachable_configured_backend_fails_tasks_and_shutdown_leaves_nothing(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    system = make_system(tmp_path, OLLAMA_HOST=dead, KOUBOU_DEFAULT_MODEL="gpt-oss:20b").start()
    try:
        # A configured backend replaces the demo model, even when it is down.
        assert "demo-model" not in system.output()
        code, body = system.delegate(prompt="hello", sync=True, options={"timeout": 20})
        assert code == 200 and body["status"] == "failed"
        assert "no LLM backend is reachable" in body["result"]["error"] and dead in body["result"]["error"]
        code, health = http("GET", f"{system.api}/health")
        assert code == 200 and health["backends"][0]["reachable"] is False
    finally:
        survivors = system.stop()
    assert not survivors, f"processes outlived koubou up: {survivors}"
    assert system.process is not None and system.process.returncode == 0


def test_detach_then_down(tmp_path: Path) -> None:
    system = make_system(tmp_path, OLLAMA_HOST=f"http://127.0.0.1:{free_port()}")
    pidfile = tmp_path / "run" / "koubou.pid"
    tree: set[int] = set()
    try:
        started = run_koubou(system.env, "up", "--detach")
        if pidfile.exists():
            pid = int(pidfile.read_text())
            tree = descendants(pid) | {pid}
        assert started.returncode == 0, started.stdout + started.stderr
        assert http("GET", f"{system.api}/health")[0] in (200, 503)
        assert len(tree) >= 6  # supervisor, broker, mirror, worker, api, flower (+ their children)
        assert run_koubou(system.env, "up").returncode == 1  # a second `up` refuses
        stopped = run_koubou(system.env, "down", timeout=90)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.1)
        assert not [p for p in tree if alive(p)]
        assert not pidfile.exists()
    finally:
        run_koubou(system.env, "down", timeout=90)
        for leftover in (p for p in tree if alive(p)):
            subprocess.run(["kill", "-9", str(leftover)], check=False)


@pytest.mark.parametrize("service", ["worker", "api"])
def test_a_child_that_dies_is_restarted(tmp_path: Path, service: str) -> None:
    system = make_system(tmp_path, OLLAMA_HOST=f"http://127.0.0.1:{free_port()}").start()
    try:
        first = system.child(service)
        assert first is not None
        subprocess.run(["kill", "-9", str(first)], check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and system.child(service) in (None, first):
            time.sleep(0.2)
        assert system.child(service) not in (None, first)
        assert f"restarting {service}" in system.output()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and health_code(system.api) != 200:
            time.sleep(0.5)
        assert health_code(system.api) == 200
    finally:
        assert not system.stop()


def test_a_broker_open_beyond_loopback_requires_its_password(tmp_path: Path) -> None:
    system = make_system(tmp_path, OLLAMA_HOST=f"http://127.0.0.1:{free_port()}", KOUBOU_REDIS_BIND="0.0.0.0").start()
    try:
        password_file = tmp_path / "config" / "redis-password"
        assert oct(password_file.stat().st_mode & 0o777) == "0o600"
        password = password_file.read_text().strip()
        assert len(password) >= 24
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=system.redis_port, socket_timeout=5).ping()
        assert redis.Redis(port=system.redis_port, password=password, socket_timeout=5).ping()
        # The system itself uses it: a task goes through (and fails only for want of an LLM).
        code, body = system.delegate(prompt="through a guarded broker", sync=True, options={"timeout": 20})
        assert code == 200 and body["status"] == "failed" and "reach" in body["result"]["error"]
        assert str(password_file) in system.output()
        for text in [system.output(), *(log.read_text(errors="replace") for log in (tmp_path / "logs").rglob("*.log"))]:
            assert password not in text
        assert all(password not in cmdline(pid) for pid in descendants(system.process.pid))  # type: ignore[union-attr]
    finally:
        assert not system.stop()
