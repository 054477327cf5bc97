"""`koubou` command line: argument parsing, then one call into the module that does the work."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .config import ConfigError, Settings, get_settings
from .constants import QUEUES

PIDFILE = "run/koubou.pid"


def _settings() -> Settings:
    try:
        return get_settings()
    except ConfigError as error:
        sys.exit(f"koubou: {error}")


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- up / down -------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    settings = _settings()
    home = settings.ensure_home()
    pidfile = home / PIDFILE
    running = _running_pid(pidfile)
    if running:
        print(f"koubou is already running (pid {running}); `koubou down` stops it.", file=sys.stderr)
        return 1
    if args.detach:
        return _detach(settings, pidfile)
    from .services import StartupError, Supervisor, plan_services

    _logging()
    try:
        services, env = plan_services(settings)
    except StartupError as error:
        print(f"koubou: {error}", file=sys.stderr)
        return 1
    supervisor = Supervisor(services)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: supervisor.stop())
    pidfile.write_text(str(os.getpid()))
    try:
        supervisor.start_all()
        if not supervisor.stopping.is_set():
            _print_summary(settings, env)
            supervisor.watch()
    except StartupError as error:
        print(f"koubou: {error}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop_all()
        pidfile.unlink(missing_ok=True)
    return 0


def _print_summary(settings: Settings, env: dict[str, str]) -> None:
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::") else settings.api_host
    lines = [
        "koubou is up:",
        f"  API       http://{host}:{settings.api_port}  (POST /task/delegate, GET /task/<id>/status, GET /health)",
        f"  Flower    http://127.0.0.1:{settings.flower_port}",
        f"  broker    {settings.broker}" + ("  (embedded valkey, data in redis/)" if settings.uses_embedded_broker else ""),
        f"  database  {settings.database_url}",
        f"  Ollama    {settings.ollama_host}",
    ]
    if env.get("OPENAI_API_BASE"):
        demo = env.get("OPENAI_API_BASE") != settings.openai_api_base
        label = "  (DEMO: SmolLM2-135M on llama.cpp, a tiny model; set OLLAMA_HOST or OPENAI_API_BASE)" if demo else ""
        lines.append(f"  OpenAI    {env['OPENAI_API_BASE']}{label}")
    lines += [
        f"  model     {env.get('KOUBOU_DEFAULT_MODEL', settings.default_model)} (default)",
        f"  logs      {settings.home_dir / 'logs'}",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


def _running_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _detach(settings: Settings, pidfile: Path) -> int:
    log_path = settings.home_dir / "logs" / "system" / "koubou-up.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "koubou", "up"],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            print(f"koubou up failed; see {log_path}", file=sys.stderr)
            return 1
        if _running_pid(pidfile) == process.pid and "koubou is up" in log_path.read_text(errors="replace"):
            print(f"koubou is up in the background (pid {process.pid}); log: {log_path}; `koubou down` stops it.")
            return 0
        time.sleep(0.3)
    print(f"koubou did not come up within 180s; see {log_path}", file=sys.stderr)
    return 1


def cmd_down(_: argparse.Namespace) -> int:
    settings = _settings()
    pidfile = settings.home_dir / PIDFILE
    pid = _running_pid(pidfile)
    if pid is None:
        print("koubou is not running.")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            print(f"koubou stopped (pid {pid}).")
            return 0
        time.sleep(0.2)
    print(f"koubou (pid {pid}) did not stop within 60s.", file=sys.stderr)
    return 1


# -- single services -------------------------------------------------------------------------


def cmd_api(_: argparse.Namespace) -> int:
    settings = _settings()
    from gunicorn.app.wsgiapp import run

    # gthread: each waiting `sync` delegation holds a thread, not a process.
    sys.argv = [
        "gunicorn",
        "--bind", f"{settings.api_host}:{settings.api_port}",
        "--worker-class", "gthread",
        "--workers", "2",
        "--threads", str(settings.api_threads),
        "--timeout", "0",
        "--graceful-timeout", "5",
        "--access-logfile", "-",
        # No %(u)s: gunicorn would decode a Basic-auth user name, and a client could put a token there.
        "--access-logformat", '%(h)s %(l)s - %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"',
        "koubou.api.app:create_app()",
    ]  # fmt: skip
    run()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings()
    argv = ["celery", "-A", "koubou", "worker", "-Q", ",".join(QUEUES), "--loglevel=INFO", *args.celery_args]
    if settings.worker_id and not any(a.startswith(("-n", "--hostname")) for a in args.celery_args):
        # The seed's WORKER_ID names the node; Celery wants name@host.
        argv += ["-n", settings.worker_id if "@" in settings.worker_id else f"{settings.worker_id}@%h"]
    if not any(a.startswith("--autoscale") or a.startswith("-c") for a in args.celery_args):
        argv.append(f"--autoscale={settings.worker_autoscale}")
    return _celery(argv)


def cmd_flower(args: argparse.Namespace) -> int:
    settings = _settings()
    return _celery(["celery", "-A", "koubou", "flower", f"--port={settings.flower_port}", "--address=127.0.0.1", *args.celery_args])


def _celery(argv: list[str]) -> int:
    from celery.bin.celery import main as celery_main

    sys.argv = argv
    return int(celery_main() or 0)


def cmd_mirror(_: argparse.Namespace) -> int:
    settings = _settings()
    _logging()
    import redis

    from .celery import app
    from .db.session import make_engine, make_session_factory
    from .mirror import Mirror

    settings.ensure_home()
    mirror = Mirror(
        app,
        make_session_factory(make_engine(settings.database_url)),
        redis.Redis.from_url(settings.broker, socket_timeout=5, socket_connect_timeout=5),
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: mirror.stop())
    mirror.run()
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from .demo import DemoUnavailable, serve

    try:
        serve(args.host, args.port)
    except DemoUnavailable as error:
        print(f"koubou: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    settings = _settings()
    from .agents import AgentExists, add_agent, list_agents, revoke_agent
    from .db.session import make_engine, make_session_factory

    settings.ensure_home()
    sessions = make_session_factory(make_engine(settings.database_url))
    if args.action == "add":
        try:
            token = add_agent(sessions, args.name)
        except AgentExists as error:
            print(f"koubou: {error}", file=sys.stderr)
            return 1
        print(f"agent {args.name!r} added. Its token (shown only this once):")
        print(token)
        return 0
    if args.action == "revoke":
        if not revoke_agent(sessions, args.name):
            print(f"koubou: no active agent named {args.name!r}", file=sys.stderr)
            return 1
        print(f"agent {args.name!r} revoked.")
        return 0
    for agent in list_agents(sessions):
        seen = agent.last_seen.isoformat(timespec="seconds") if agent.last_seen else "never"
        print(f"{agent.name}\t{agent.status}\tcreated {agent.created_at.isoformat(timespec='seconds')}\tlast seen {seen}")
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    """Serve koubou's tools over MCP: stdio by default, streamable HTTP with --http."""
    settings = _settings()
    from .mcp import serve

    serve(http=args.http, port=args.port or settings.mcp_port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koubou", description="Delegate LLM work to local models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start the whole system in the foreground (Ctrl-C stops it)")
    up.add_argument("--detach", action="store_true", help="run in the background; `koubou down` stops it")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop a system started with `koubou up --detach`").set_defaults(func=cmd_down)
    sub.add_parser("api", help="serve the HTTP API (gunicorn)").set_defaults(func=cmd_api)
    sub.add_parser("mirror", help="mirror Celery events into the database").set_defaults(func=cmd_mirror)
    worker = sub.add_parser(
        "worker", help="run a Celery worker on koubou's queues (extra args go to celery worker)", add_help=True
    )
    worker.set_defaults(func=cmd_worker, passthrough=True)
    flower = sub.add_parser("flower", help="run Flower on KOUBOU_FLOWER_PORT (extra args go to celery flower)")
    flower.set_defaults(func=cmd_flower, passthrough=True)
    agent = sub.add_parser("agent", help="manage API agents and their bearer tokens")
    actions = agent.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("add", help="create an agent; prints its token once").add_argument("name")
    actions.add_parser("list", help="list agents")
    actions.add_parser("revoke", help="revoke an agent's token").add_argument("name")
    agent.set_defaults(func=cmd_agent)
    demo = sub.add_parser("demo-model", help="serve the embedded demo model (llama.cpp + SmolLM2-135M)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8767)
    demo.set_defaults(func=cmd_demo_model)
    mcp = sub.add_parser("mcp", help="serve the MCP server for Claude Code (stdio; --http for streamable HTTP)")
    mcp.add_argument("--http", action="store_true", help="serve streamable HTTP at http://127.0.0.1:PORT/mcp instead of stdio")
    mcp.add_argument("--port", type=int, default=None, help="port for --http (default KOUBOU_MCP_PORT, 8766)")
    mcp.set_defaults(func=cmd_mcp)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # worker and flower hand unknown options (e.g. --autoscale=4,1) on to Celery.
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.celery_args = extra
    return int(args.func(args) or 0)
