"""Start a whole koubou system the way a user does (`koubou up`), on free ports, and talk to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from koubou.process_tree import descendants

REPO = Path(__file__).resolve().parent.parent

#: Variables of the user's shell that would change what the system under test does.
FOREIGN_ENV_PREFIXES = ("KOUBOU_", "OLLAMA_", "OPENAI_", "CELERY_", "WORKER_ID")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV_PREFIXES)}
    env.update(overrides)
    return env


def http(
    method: str,
    url: str,
    body: Any = None,
    raw: bytes | None = None,
    timeout: float = 200,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP call; returns (status, parsed JSON or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    sent = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class System:
    """A running `koubou up` and how to reach it."""

    home: Path
    env: dict[str, str]
    api_port: int
    flower_port: int
    redis_port: int
    process: subprocess.Popen[bytes] | None = None
    #: Where `koubou up` runs (the default workspace root); the repository unless a test says otherwise.
    cwd: Path = REPO
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.home / "koubou-up.out"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def db_path(self) -> Path:
        return self.home / "db" / "koubou.db"

    def start(self, wait_for_workers: bool = True, timeout: float = 120) -> System:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "koubou", "up"], cwd=self.cwd, env=self.env,
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"koubou up exited with {self.process.returncode}:\n{self.output()}")
            if "koubou is up" in self.output():
                if not wait_for_workers:
                    return self
                status, body = http("GET", f"{self.api}/health", timeout=10)
                if status == 200:
                    return self
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"koubou up not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def child(self, word: str) -> int | None:
        """PID of the live child of `koubou up` running `koubou <word>` (or the broker), if there is one now."""
        assert self.process is not None
        for pid in descendants(self.process.pid):
            line = cmdline(pid)
            is_it = f"-m koubou {word}" in line or (word == "broker" and line.split(" ")[0].endswith("-server"))
            if is_it and _parent(pid) == self.process.pid and alive(pid):
                return pid
        return None

    def stop(self, timeout: float = 60) -> set[int]:
        """SIGTERM `koubou up`; returns the PIDs below it that outlived it (should be none)."""
        if self.process is None or self.process.poll() is not None:
            return set()
        tree = descendants(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(pid) for pid in tree):
            time.sleep(0.1)
        survivors = {pid for pid in tree if alive(pid)}
        for pid in survivors:  # never leave anything behind, even when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return survivors

    # -- talking to it ---------------------------------------------------------------------

    def delegate(self, **body: Any) -> tuple[int, Any]:
        return http("POST", f"{self.api}/task/delegate", body)

    def status(self, task_id: str) -> tuple[int, Any]:
        return http("GET", f"{self.api}/task/{task_id}/status")

    def wait_final(self, task_id: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code, body = self.status(task_id)
            assert code == 200, body
            if body["status"] in ("completed", "failed", "cancelled"):
                return body
            time.sleep(0.1)
        raise AssertionError(f"{task_id} not final after {timeout}s: {body}")

    def sql(self, query: str, *params: Any) -> list[sqlite3.Row]:
        """Read the mirror's database with plain sqlite3, as an operator would."""
        connection = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10)
        connection.row_factory = sqlite3.Row
        try:
            return connection.execute(query, params).fetchall()
        finally:
            connection.close()


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def make_system(home: Path, **env: str) -> System:
    """A System on free ports with `home` as KOUBOU_HOME; `env` adds settings."""
    api_port, flower_port, redis_port, demo_port = free_port(), free_port(), free_port(), free_port()
    ports = {
        "KOUBOU_API_PORT": str(api_port),
        "KOUBOU_FLOWER_PORT": str(flower_port),
        "KOUBOU_REDIS_PORT": str(redis_port),
        "KOUBOU_DEMO_PORT": str(demo_port),
    }
    full_env = clean_env(KOUBOU_HOME=str(home), **{**ports, **env})
    return System(home=home, env=full_env, api_port=api_port, flower_port=flower_port, redis_port=redis_port)


def start_worker(system: System, home: Path, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """A plain `celery -A koubou worker` as an extra machine runs it: the broker URL, its own
    KOUBOU_HOME (no database) and what `env` adds; named `name@host`, logging to `<home>.log`."""
    full_env = clean_env(KOUBOU_BROKER_URL=f"redis://127.0.0.1:{system.redis_port}/0", KOUBOU_HOME=str(home), **env)
    argv = [sys.executable, "-m", "celery", "-A", "koubou", "worker", "-n", f"{name}@%h", *args]
    with open(home.with_name(home.name + ".log"), "wb") as log:
        return subprocess.Popen(argv, cwd=home.parent, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    """Warm shutdown of a worker started by start_worker (its process group, by PID), then a kill if it hangs."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
