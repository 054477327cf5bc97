"""`koubou` command line: argument parsing, then one call into the module that does the work."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .config import ConfigError, Settings, get_settings, redacted

if TYPE_CHECKING:
    from .client import KoubouClient

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
    except (StartupError, ConfigError) as error:
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
        f"  Flower    http://127.0.0.1:{settings.flower_port}  (login: "
        + ("KOUBOU_FLOWER_AUTH" if settings.flower_auth_setting else str(settings.flower_auth_file)) + ")",
        f"  broker    {redacted(settings.broker)}" + _broker_note(settings),
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


def _broker_note(settings: Settings) -> str:
    if not settings.uses_embedded_broker:
        return ""
    if settings.redis_bind_is_loopback:
        return "  (embedded valkey, data in redis/)"
    where = "KOUBOU_REDIS_PASSWORD" if settings.redis_password_setting else str(settings.redis_password_file)
    return f"  (embedded valkey on {settings.redis_bind}; other machines use redis://:PASSWORD@<this host>:{settings.redis_port}/0, password in {where})"


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
        # The API's modules are imported once, in the arbiter, and shared with the workers it forks.
        "--config", "python:koubou.api.gunicorn_hooks",
        "--workers", "2",
        "--threads", str(settings.api_threads),
        "--timeout", "0",
        "--graceful-timeout", "5",
        # gunicorn 25+ would open a control socket in ~/.gunicorn/, one path for every gunicorn of the
        # user: a second koubou would take over the first one's. koubou supervises the API by PID.
        "--no-control-socket",
        # gunicorn touches a heartbeat file per request; in memory that costs nothing.
        *(["--worker-tmp-dir", "/dev/shm"] if os.access("/dev/shm", os.W_OK) else []),
        "--access-logfile", "-",
        # Apache's combined line without the user, written for a fraction of gunicorn's own cost.
        "--logger-class", "koubou.api.access_log.AccessLogger",
        "koubou.api.app:create_app()",
    ]  # fmt: skip
    run()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings()
    # Without -Q the worker reads the queues of KOUBOU_WORKER_TYPES (koubou.celery); a -Q given here wins.
    argv = ["celery", "-A", "koubou", "worker", "--loglevel=INFO", *args.celery_args]
    if settings.worker_id and not any(a.startswith(("-n", "--hostname")) for a in args.celery_args):
        # The seed's WORKER_ID names the node; Celery wants name@host.
        argv += ["-n", settings.worker_id if "@" in settings.worker_id else f"{settings.worker_id}@%h"]
    if not any(a.startswith("--autoscale") or a.startswith("-c") for a in args.celery_args):
        argv.append(f"--autoscale={settings.worker_autoscale}")
    return _celery(argv)


#: Flower's tasks page shows no arguments by default; koubou's (type, model, abbreviated prompt) say what a task is.
FLOWER_TASK_COLUMNS = "name,uuid,state,args,received,runtime,worker"


def cmd_flower(args: argparse.Namespace) -> int:
    settings = _settings()
    # Through Flower's own environment variable, so the password shows in no process list or log.
    os.environ["FLOWER_BASIC_AUTH"] = settings.flower_auth()
    # Flower takes the last of a repeated option: the caller's own options win over these.
    return _celery(["celery", "-A", "koubou", "flower", f"--port={settings.flower_port}", "--address=127.0.0.1",
                    f"--tasks_columns={FLOWER_TASK_COLUMNS}", *args.celery_args])  # fmt: skip


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
        ageing=settings.priority_ageing,
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


# -- client commands (talk to a running API through koubou.client) ---------------------------

EXIT_OK, EXIT_FAILED, EXIT_OTHER, EXIT_UNREACHABLE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
#: Extra seconds `delegate --wait` allows past the task's own timeout (queueing) before giving up.
QUEUE_ALLOWANCE = 120.0
#: Times a broken or ended-early stream is resumed before falling back to polling.
STREAM_RESUMES = 3
FINAL = ("completed", "failed", "cancelled")


class _BadInput(Exception):
    """Input the CLI refuses before asking the API."""


def _client_command(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a client command: one clear stderr line and an exit code for every error, no traceback."""

    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from . import cli_output as out
        from .client import KoubouAPIError, KoubouError, KoubouUnavailable

        try:
            return func(args)
        except (_BadInput, ConfigError) as error:
            out.say(str(error))
            return EXIT_BAD_INPUT
        except KoubouUnavailable as error:
            out.say(f"{error} (is `koubou up` running? KOUBOU_API_URL names the API)")
            return EXIT_UNREACHABLE
        except KoubouAPIError as error:
            out.say(out.api_error_line(error, getattr(args, "task_id", None)))
            if error.status == 409:
                return EXIT_OTHER
            return EXIT_BAD_INPUT if 400 <= error.status < 500 else EXIT_OTHER
        except KoubouError as error:
            out.say(str(error))
            return EXIT_OTHER
        except KeyboardInterrupt:
            out.say("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # `koubou ... | head`: the reader left; say nothing more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141

    return run


def _client(args: argparse.Namespace) -> KoubouClient:
    from .client import KoubouClient

    return KoubouClient(url=args.url, token=args.token)


def _prompt(value: str) -> str:
    prompt = sys.stdin.read() if value == "-" else value
    if not prompt.strip():
        raise _BadInput("the prompt is empty" + (" (nothing on stdin)" if value == "-" else ""))
    return prompt


def _files(paths: list[str] | None) -> list[str] | None:
    """Paths as the API needs them: relative ones made absolute against this shell's directory.

    `--file src/a.py` means the file here, as with any command; sent as is, the API would take it
    against its first workspace root. Nothing else is checked here: the API reads the files and
    is the one judge of what may be read (and it may run on another machine).
    """
    if not paths:
        return None
    return [os.path.abspath(path) for path in paths]


@_client_command
def cmd_delegate(args: argparse.Namespace) -> int:
    from . import cli_output as out

    prompt, files = _prompt(args.prompt), _files(args.file)
    with _client(args) as client:
        answer = client.delegate(
            prompt, type=args.type, priority=args.priority, model=args.model, timeout=args.timeout,
            temperature=args.temperature, num_ctx=args.num_ctx, max_tokens=args.max_tokens, files=files,
        )  # fmt: skip
        task_id = answer["task_id"]
        if not args.wait:
            out.print_json(answer) if args.json else print(task_id, flush=True)
            return EXIT_OK
        max_wait = args.max_wait if args.max_wait is not None else (args.timeout or 120.0) + QUEUE_ALLOWANCE
        out.say(f"task {task_id} delegated")
        try:
            followed = _follow(client, task_id, max_wait, show_text=not args.json)
        except KeyboardInterrupt:
            out.say(f"interrupted; task {task_id} keeps running (`koubou wait {task_id}`, `koubou cancel {task_id}`)")
            return EXIT_INTERRUPTED
        return _final(followed, task_id, args.json, streamed=True)


@dataclass
class _Followed:
    final: dict[str, Any]
    shown: str = ""
    timed_out: bool = False


def _follow(client: KoubouClient, task_id: str, max_wait: float, show_text: bool) -> _Followed:
    """Stream the task's answer to stdout until it is final (or `max_wait` passes).

    A stream that breaks or ends before `done` is resumed after the last delta; the status is
    polled instead when the API has no stream endpoint (a 404 other than "task not found") or
    the stream keeps breaking.
    """
    from . import cli_output as out
    from .client import KoubouAPIError, KoubouUnavailable

    deadline = time.monotonic() + max_wait
    progress = out.Progress(task_id, quiet_while_streaming=show_text and sys.stdout.isatty(), fetch=lambda: client.status(task_id))
    shown: list[str] = []
    last_id: str | None = None
    resumes = 0
    while resumes <= STREAM_RESUMES:
        # Reads wait at most until the deadline: a queued task's stream is quiet but for pings.
        read_timeout = min(client.timeout, max(1.0, deadline - time.monotonic()))
        try:
            for event in client.stream(task_id, last_event_id=last_id, keepalives=True, read_timeout=read_timeout):
                if event.kind == "status":
                    progress.changed(event.data.get("status"))
                elif event.kind == "delta":
                    text = str(event.data.get("text", ""))
                    last_id = event.id or last_id
                    if show_text and text:
                        out.write_answer(text)
                        shown.append(text)
                    progress.delta()
                elif event.kind == "done":
                    progress.finished(event.data)
                    return _Followed(event.data, "".join(shown))
                else:
                    progress.tick()
                if time.monotonic() >= deadline:
                    return _Followed(client.status(task_id), "".join(shown), timed_out=True)
        except KoubouAPIError as error:
            if error.status == 404 and error.error != "task not found":
                break  # an API without the stream endpoint: poll instead
            raise
        except KoubouUnavailable:
            if time.monotonic() >= deadline:
                return _Followed(client.status(task_id), "".join(shown), timed_out=True)
        resumes += 1  # the stream broke or ended before `done`: resume after the last delta
        time.sleep(min(0.5 * resumes, max(0.0, deadline - time.monotonic())))
    final = client.wait(task_id, max_wait=max(0.0, deadline - time.monotonic()), on_progress=progress.polled)
    if final.get("status") in FINAL:
        progress.finished(final)
    return _Followed(final, "".join(shown), timed_out=final.get("status") not in FINAL)


def _final(followed: _Followed, task_id: str, as_json: bool, streamed: bool) -> int:
    """Print what is left of the answer (or the JSON) and map the task's end to an exit code."""
    from . import cli_output as out

    final, status = followed.final, followed.final.get("status")
    if as_json:
        out.print_json(final)
    if followed.timed_out or status not in FINAL:
        out.say(f"task {task_id} is still {status}; `koubou wait {task_id}` waits for it, `koubou cancel {task_id}` stops it")
        return EXIT_OTHER
    if status == "completed":
        if not as_json:
            answer = str((final.get("result") or {}).get("output") or "")
            if answer.startswith(followed.shown):
                out.write_answer(answer[len(followed.shown) :])
            elif streamed:
                out.say(f"the streamed text differs from the final answer (a retried call?); `koubou status {task_id}` shows it")
            out.end_answer(followed.shown or answer)
        return EXIT_OK
    if status == "failed":
        out.say(f"task {task_id} failed: {out.result_error(final)}")
        return EXIT_FAILED
    out.say(f"task {task_id} was cancelled")
    return EXIT_OTHER


@_client_command
def cmd_wait(args: argparse.Namespace) -> int:
    from . import cli_output as out

    with _client(args) as client:
        progress = out.Progress(args.task_id)
        try:
            final = client.wait(args.task_id, max_wait=args.max_wait, on_progress=progress.polled)
        except KeyboardInterrupt:
            out.say(f"interrupted; task {args.task_id} keeps running (`koubou wait {args.task_id}` again)")
            return EXIT_INTERRUPTED
    if final.get("status") in FINAL:
        progress.finished(final)
    followed = _Followed(final, timed_out=final.get("status") not in FINAL)
    return _final(followed, args.task_id, args.json, streamed=False)


@_client_command
def cmd_status(args: argparse.Namespace) -> int:
    from . import cli_output as out

    with _client(args) as client:
        status = client.status(args.task_id)
    out.print_json(status) if args.json else print(out.task_details(status), flush=True)
    return EXIT_OK


@_client_command
def cmd_cancel(args: argparse.Namespace) -> int:
    from . import cli_output as out

    with _client(args) as client:
        answer = client.cancel(args.task_id)
    if args.json:
        out.print_json(answer)
    else:
        print(f"task {answer.get('task_id', args.task_id)} {answer.get('status')}", flush=True)
    return EXIT_OK


@_client_command
def cmd_tasks(args: argparse.Namespace) -> int:
    from . import cli_output as out

    with _client(args) as client:
        tasks = client.tasks(status=args.status, limit=args.limit)
    out.print_json(tasks) if args.json else print(out.tasks_table(tasks), flush=True)
    return EXIT_OK


@_client_command
def cmd_workers(args: argparse.Namespace) -> int:
    from . import cli_output as out

    with _client(args) as client:
        workers = client.workers()
    out.print_json(workers) if args.json else print(out.workers_table(workers), flush=True)
    return EXIT_OK


@_client_command
def cmd_backends(args: argparse.Namespace) -> int:
    from . import cli_output as out

    with _client(args) as client:
        backends = client.backends()
    out.print_json(backends) if args.json else print(out.backends_table(backends), flush=True)
    return EXIT_OK


def _add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the API (default: KOUBOU_API_URL, else KOUBOU_API_HOST/PORT)")
    common.add_argument("--token", help="bearer token (default: KOUBOU_API_TOKEN)")
    common.add_argument("--json", action="store_true", help="print the API's JSON on stdout")

    delegate = sub.add_parser("delegate", parents=[common], help="delegate a prompt; prints the task id, or with --wait the answer")
    delegate.add_argument("prompt", help="the prompt; - reads it from stdin")
    delegate.add_argument("--type", choices=("general", "code"), default="general")
    delegate.add_argument("--file", action="append", metavar="F", help="a text file for the task, read by the API (repeatable; inside its KOUBOU_WORKSPACE_ROOTS)")
    delegate.add_argument("--priority", type=int, default=5, metavar="N", help="1-10, 10 most urgent (default 5)")
    delegate.add_argument("--model", metavar="M", help="model (default: the system's KOUBOU_DEFAULT_MODEL)")
    delegate.add_argument("--timeout", type=float, metavar="S", help="seconds the task may take (default 120)")
    delegate.add_argument("--temperature", type=float)
    delegate.add_argument("--num-ctx", type=int, metavar="N", help="context window")
    delegate.add_argument("--max-tokens", type=int, metavar="N", help="longest answer, in tokens")
    delegate.add_argument("--wait", action="store_true", help="stream the answer to stdout as it is generated; progress on stderr")
    delegate.add_argument("--max-wait", type=float, metavar="S", help="with --wait: stop waiting after S seconds (default: timeout + 120)")
    delegate.set_defaults(func=cmd_delegate)

    status = sub.add_parser("status", parents=[common], help="show a task")
    status.add_argument("task_id", metavar="ID")
    status.set_defaults(func=cmd_status)
    wait = sub.add_parser("wait", parents=[common], help="wait for a task, then print its answer (Ctrl-C leaves it running)")
    wait.add_argument("task_id", metavar="ID")
    wait.add_argument("--max-wait", type=float, metavar="S", help="stop waiting after S seconds (default: until the task is final)")
    wait.set_defaults(func=cmd_wait)
    cancel = sub.add_parser("cancel", parents=[common], help="cancel a queued or running task")
    cancel.add_argument("task_id", metavar="ID")
    cancel.set_defaults(func=cmd_cancel)
    tasks = sub.add_parser("tasks", parents=[common], help="list recent tasks, newest first")
    tasks.add_argument("--status", choices=("pending", "in_progress", *FINAL))
    tasks.add_argument("--limit", type=int, default=20, metavar="N", help="1-200 (default 20)")
    tasks.set_defaults(func=cmd_tasks)
    sub.add_parser("workers", parents=[common], help="list workers").set_defaults(func=cmd_workers)
    sub.add_parser("backends", parents=[common], help="list LLM backends and their models").set_defaults(func=cmd_backends)
    for name in ("delegate", "status", "wait", "cancel", "tasks", "workers", "backends"):
        _bad_input_on_usage_error(sub.choices[name])


def _bad_input_on_usage_error(parser: argparse.ArgumentParser) -> None:
    """Usage errors of the client commands exit 4 (bad input), like the input the API refuses."""

    def error(message: str) -> NoReturn:
        parser.print_usage(sys.stderr)
        parser.exit(EXIT_BAD_INPUT, f"{parser.prog}: error: {message}\n")

    parser.error = error  # type: ignore[method-assign]
    parser.set_defaults(usage_parser=parser)


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
    _add_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # worker and flower hand unknown options (e.g. --autoscale=4,1) on to Celery.
    if extra and not getattr(args, "passthrough", False):
        (getattr(args, "usage_parser", None) or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    args.celery_args = extra
    return int(args.func(args) or 0)
