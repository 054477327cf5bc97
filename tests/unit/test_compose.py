"""docker-compose.yml (and deploy/systemd/) against docker-compose itself and against koubou's CLI."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `tests.tools` whether pytest ran from the repo root or not
    sys.path.insert(0, str(REPO))

from koubou.config import Settings, load_settings  # noqa: E402
from tests.tools import ToolUnavailable, docker_compose  # noqa: E402

COMPOSE_FILE = REPO / "docker-compose.yml"
SYSTEMD_DIR = REPO / "deploy" / "systemd"
KOUBOU_SERVICES = {"api", "worker", "mirror", "flower"}
BROKER_URL = "redis://redis:6379/0"
OLLAMA_DEFAULT = "${OLLAMA_HOST:-http://host.docker.internal:11434}"
DB_MOUNT = "/data/db"
CLI_TIMEOUT = 60


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _services() -> dict:
    return _compose()["services"]


def _env(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def _container_port(spec: str | int) -> int:
    # "[ip:][host:]container[/proto]"; the host part may be a ${VAR:-default}.
    return int(str(spec).rsplit(":", 1)[-1].split("/")[0])


def _mounts(service: dict) -> dict[str, str]:
    """target -> source, for short-syntax volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def _systemd_commands() -> list[tuple[str, list[str]]]:
    found = []
    for unit in sorted(SYSTEMD_DIR.glob("*.service")):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                argv = shlex.split(line.removeprefix("ExecStart=").lstrip("-@:+!"))
                found.append((unit.name, [Path(argv[0]).name, *argv[1:]]))
    return found


def _entry_point_commands() -> list[tuple[str, list[str]]]:
    commands = [
        (f"compose:{name}", _argv(service["command"]))
        for name, service in sorted(_services().items())
        if name in KOUBOU_SERVICES and "command" in service
    ]
    return commands + [(f"systemd:{unit}", argv) for unit, argv in _systemd_commands()]


# -- running koubou's and Celery's entry points ------------------------------------------------------

def _koubou_target() -> tuple[str, str]:
    module, func = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["koubou"].split(":")
    return module, func


def _koubou_argv(args: list[str]) -> list[str]:
    """The installed `koubou` script beside this Python, else the same entry point from pyproject."""
    script = Path(sys.executable).parent / "koubou"
    if script.is_file():
        return [str(script), *args]
    module, func = _koubou_target()
    code = f"import sys; sys.argv[0] = 'koubou'; from {module} import {func}; sys.exit({func}())"
    return [sys.executable, "-c", code, *args]


# `--help` alone cannot show that a subcommand accepts the rest of the line: argparse answers
# `--help` before it complains about arguments it does not know. So the exact command also runs,
# and is stopped (by an audit hook) at its first act: connecting, binding, forking or starting a
# program. By then every parser on the way (koubou's, Celery's, Flower's, gunicorn's) has
# accepted the line; a rejected line exits with a usage error before any of that.
ACCEPTED = "koubou-test: command accepted, stopped at"
_UNTIL_FIRST_ACT = """
import os, sys
ACTS = {{"socket.connect", "socket.bind", "os.fork", "os.exec", "os.posix_spawn", "os.spawn",
        "subprocess.Popen", "sqlite3.connect"}}
def stop_at_first_act(event, args):
    if event in ACTS:
        print({mark!r}, event, flush=True)
        os._exit(0)
sys.addaudithook(stop_at_first_act)
sys.argv[0] = {name!r}
from {module} import {func}
sys.exit({func}())
"""


def _until_first_act_argv(argv: list[str]) -> list[str]:
    """`koubou ...` or `celery ...` through its console-script entry point, stopped at its first act."""
    name, *args = argv
    module, func = _koubou_target() if name == "koubou" else ("celery.__main__", "main")
    code = _UNTIL_FIRST_ACT.format(mark=ACCEPTED, name=name, module=module, func=func)
    return [sys.executable, "-c", code, *args]


def _cli_env(tmp_path: Path) -> dict[str, str]:
    # No developer settings leak in, nothing lands in the repo's .koubou, no real broker is touched.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KOUBOU_", "OLLAMA_", "OPENAI_"))}
    env["KOUBOU_HOME"] = str(tmp_path)
    env["KOUBOU_BROKER_URL"] = "redis://127.0.0.1:1/0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _run(argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # Its own session, so a command that runs on after all is killed with its children.
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                          env=_cli_env(tmp_path), stdin=subprocess.DEVNULL, start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"{argv[3:]} still running after {CLI_TIMEOUT}s:\n{out[-1000:]}{err[-1000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _explain(done: subprocess.CompletedProcess[str]) -> str:
    return f"exited {done.returncode}:\n{done.stdout[-1500:]}{done.stderr[-1500:]}"


# (a) docker-compose itself reads the file --------------------------------------------------------

def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    try:
        program, missing = docker_compose(), ""
    except ToolUnavailable as error:
        program, missing = None, str(error)
    if program is None:  # failed outside the except block, so the reason is shown once
        pytest.fail(missing, pytrace=False)
    # Interpolate with the file's own defaults, not whatever the developer's shell has.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KOUBOU_", "OLLAMA_", "OPENAI_", "COMPOSE_", "DOCKER_"))}
    done = subprocess.run(
        [str(program), "--project-directory", str(REPO), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"{program} config {_explain(done)}"
    resolved = yaml.safe_load(done.stdout)
    assert set(resolved["services"]) == KOUBOU_SERVICES | {"redis"}
    assert resolved["services"]["worker"]["environment"]["OLLAMA_HOST"] == "http://host.docker.internal:11434"


# (b) every command is a real entry point ----------------------------------------------------------

def test_every_koubou_service_has_an_entry_point_command() -> None:
    where = {w for w, _ in _entry_point_commands()}
    assert {f"compose:{name}" for name in KOUBOU_SERVICES} | {
        "systemd:koubou.service", "systemd:koubou-worker.service"} == where


@pytest.mark.parametrize(("where", "argv"), [pytest.param(w, a, id=w) for w, a in _entry_point_commands()])
def test_command_is_a_real_entry_point(where: str, argv: list[str], tmp_path: Path) -> None:
    program, *args = argv
    if program == "koubou":
        done = _run(_koubou_argv([args[0], "--help"]), tmp_path)
        assert done.returncode == 0, f"{where}: `koubou {args[0]} --help` {_explain(done)}"
    elif program == "celery":
        assert args[:2] == ["-A", "koubou"], f"{where}: celery must be started with -A koubou: {argv}"
        done = _run([sys.executable, "-m", "celery", *args, "--help"], tmp_path)
        assert done.returncode == 0, f"{where}: `{shlex.join(argv)} --help` {_explain(done)}"
    else:
        pytest.fail(f"{where}: {argv} is neither `koubou ...` nor `celery -A koubou ...`")
    done = _run(_until_first_act_argv(argv), tmp_path)
    assert done.returncode == 0 and ACCEPTED in done.stdout, f"{where}: `{shlex.join(argv)}` {_explain(done)}"


def test_the_entry_point_checks_can_fail(tmp_path: Path) -> None:
    # Without these, a CLI (or a check) that accepts anything would make the checks above meaningless.
    assert _run(_koubou_argv(["no-such-subcommand", "--help"]), tmp_path).returncode != 0
    for argv in (["koubou", "api", "--no-such-option"], ["koubou", "worker", "--no-such-option"],
                 ["celery", "-A", "koubou", "worker", "--no-such-option"]):
        done = _run(_until_first_act_argv(argv), tmp_path)
        assert done.returncode != 0 and ACCEPTED not in done.stdout, f"{argv} was accepted: {_explain(done)}"


# (c) the services' wiring ---------------------------------------------------------------------------

def test_redis_keeps_an_append_only_file_on_a_named_volume() -> None:
    compose = _compose()
    redis = compose["services"]["redis"]
    command = " ".join(_argv(redis["command"]))
    assert re.search(r"--appendonly[ =]yes\b", command), command
    sources = set(_mounts(redis).values())
    assert sources and sources <= set(compose["volumes"]), "redis data must live on a named volume"
    assert "ping" in redis["healthcheck"]["test"]


def test_worker_never_gets_the_database() -> None:
    services = _services()
    worker = services["worker"]
    assert not any("DATABASE" in key for key in _env(worker)), _env(worker)
    assert "env_file" not in worker
    db_volumes = {_mounts(services[name]).get(DB_MOUNT) for name in ("api", "mirror")}
    assert not db_volumes & set(_mounts(worker).values())


def test_api_and_mirror_share_the_sqlite_volume_where_koubou_puts_the_database() -> None:
    services = _services()
    api, mirror = _mounts(services["api"]), _mounts(services["mirror"])
    assert api.get(DB_MOUNT) and api.get(DB_MOUNT) == mirror.get(DB_MOUNT)
    # The image's KOUBOU_HOME, and the default SQLite path koubou derives from it.
    home = re.search(r"KOUBOU_HOME=(\S+)", (REPO / "Dockerfile").read_text())[1]
    database = load_settings({"KOUBOU_HOME": home}).database_url
    assert database.startswith("sqlite:///") and str(Path(database.removeprefix("sqlite:///")).parent) == DB_MOUNT


def test_ports_are_koubous_defaults() -> None:
    services = _services()
    api_port = Settings.model_fields["api_port"].default
    flower_port = Settings.model_fields["flower_port"].default
    assert [_container_port(p) for p in services["api"]["ports"]] == [api_port]
    assert [_container_port(p) for p in services["flower"]["ports"]] == [flower_port]
    assert _env(services["api"])["KOUBOU_API_HOST"] == "0.0.0.0"
    for name in ("api", "flower"):
        assert not {"KOUBOU_API_PORT", "KOUBOU_FLOWER_PORT"} & set(_env(services[name]))
    assert f":{api_port}/" in " ".join(services["api"]["healthcheck"]["test"])
    assert f":{flower_port}/" in " ".join(services["flower"]["healthcheck"]["test"])


def test_koubou_services_reach_redis_and_the_hosts_ollama() -> None:
    services = _services()
    for name in KOUBOU_SERVICES:
        service = services[name]
        env = _env(service)
        assert env["KOUBOU_BROKER_URL"] == BROKER_URL, name
        assert env["OLLAMA_HOST"] == OLLAMA_DEFAULT, name
        assert "host.docker.internal:host-gateway" in service["extra_hosts"], name
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert service.get("restart"), name
    assert services["redis"].get("restart")
