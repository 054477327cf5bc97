"""Code tasks: the Codex CLI (`codex exec --json`) in a fresh workspace, against the routed backend.

Each run gets a directory of its own under `$KOUBOU_HOME/run/codex/` holding the workspace (the
shipped files, a git repository), Codex's home (`CODEX_HOME`: `$KOUBOU_HOME/config/codex.toml` as its
config.toml, koubou's instructions) and a HOME and TMPDIR, so the user's ~/.codex is never read or
written. The directory is removed when the run ends. What koubou relies on was measured with
Codex 0.169.0 (see the README's "Code tasks (Codex)").
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import selectors
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from ..config import Settings
from ..jobs import DelegationJob
from ..process_tree import ProcessTree
from ..git_workspace import BadPath, GitWorkspace, GitWorkspaceError
from .base import (
    Backend,
    BackendError,
    BackendRejected,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
    ChatResult,
    PromptTooLong,
    DeltaCallback,
    error_for_status,
)

log = logging.getLogger(__name__)

CODEX_PACKAGE = "@openai/codex"
#: The version koubou is built and tested against.
CODEX_VERSION = "0.169.0"
INSTALL_COMMAND = f"npm install -g {CODEX_PACKAGE}@{CODEX_VERSION}"
#: koubou's `[model_providers.*]` entry for OpenAI-compatible servers, and the variable that
#: carries the server's API key to Codex (its `env_key`), never on the command line.
PROVIDER_ID = "koubou"
API_KEY_VARIABLE = "KOUBOU_CODEX_API_KEY"
#: What an Ollama variant made for code tasks is called: `<model>-koubou-ctx<num_ctx>`.
CONTEXT_VARIANT = "{model}-koubou-ctx{num_ctx}"
#: Seconds between two looks at the cancel flag and at the process tree while Codex runs.
TICK = 0.25
VERSION_TIMEOUT = 30.0
#: Seconds to read what Codex wrote before it exited, once it has exited.
EXIT_GRACE = 2.0
STDERR_KEPT = 16_000
#: Characters of a command's output shown in the task's live stream.
STREAMED_OUTPUT = 2_000
#: Variables of the worker's environment Codex gets; nothing else (no broker URL, no secrets).
PASSED_VARIABLES = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR", "CODEX_CA_CERTIFICATE")

#: Written to `$KOUBOU_HOME/config/codex.toml` when it does not exist; the operator may edit it.
DEFAULT_SETTINGS = """\
# Codex's settings for koubou's code tasks (`codex exec`, checked with --strict-config).
# Each task runs Codex with a home of its own (CODEX_HOME) whose config.toml is this file, so the
# user's ~/.codex is never read or written. Reference: https://developers.openai.com/codex/config-reference
#
# koubou always sets, whatever this file says: the model and its provider (the backend the task was
# routed to), the sandbox (--sandbox workspace-write; danger-full-access only with
# CODEX_UNSAFE_ALLOW_NO_SANDBOX=1), approval_policy = "never", features.plugins = false and
# analytics.enabled = false (then Codex opens no connection but the backend's), no update check,
# and no endless reconnecting (koubou retries).
#
# koubou gives Codex a short, task-focused prompt instead of its ~4.7k-token built-in one, which is
# more than a small model's context often holds. To use your own, name it here:
# model_instructions_file = "/absolute/path/to/instructions.md"

# Blocks of the prompt a task in a throw-away workspace does not need.
include_environment_context = false
include_permissions_instructions = false
include_apps_instructions = false
include_collaboration_mode_instructions = false
web_search = "disabled"

[features]
goals = false
apps = false
image_generation = false
shell_snapshot = false
memories = false

[agents]
enabled = false

[skills]
include_instructions = false
bundled.enabled = false

[feedback]
enabled = false

[history]
persistence = "none"

[sandbox_workspace_write]
# Commands write the workspace and their own TMPDIR only (not /tmp), with no network.
exclude_slash_tmp = true
exclude_tmpdir_env_var = false
network_access = false

[shell_environment_policy]
inherit = "core"
"""

#: koubou's prompt for Codex (`model_instructions_file`), with the shipped files listed.
INSTRUCTIONS = """\
You are a coding agent. The current directory is a git repository holding the files of one task.
Do what the user asks. Run shell commands with the exec_command tool (for example `cat FILE`, `ls`).
Change files with apply_patch, run through exec_command:
apply_patch <<'PATCH'
*** Begin Patch
*** Update File: path/to/file
@@
-old line
+new line
*** End Patch
PATCH
`*** Add File: PATH` followed by lines that each start with `+` creates a file; `*** Delete File: PATH`
removes one. Stay inside the current directory; there is no network. When you are done, reply with a
short summary of what you changed, or with the answer when the task asks a question.
"""

#: Overrides koubou always passes (`-c key=value`, the value in TOML).
ENFORCED = (
    ("features.plugins", "false"),
    ("analytics.enabled", "false"),
    ("check_for_update_on_startup", "false"),
    ("features.unbounded_connection_retries", "false"),
    ("approval_policy", '"never"'),
)


class CodexUnavailable(BackendError):
    """The Codex CLI (or git, which code tasks need) is missing or does not start on this worker."""


class CodexSettingsError(BackendError):
    """`codex.toml` is not valid TOML or has a key this Codex does not know."""


class CodexTurnFailed(BackendError):
    """Codex ran but its turn failed for a reason retrying will not fix."""


@dataclass(frozen=True)
class CodexSetup:
    """What a worker needs to run Codex, from its settings."""

    binary: str | None
    settings_file: Path
    run_dir: Path
    allow_no_sandbox: bool
    num_ctx: int
    #: Directories Codex must not read (the worker's $KOUBOU_HOME): covered in a mount namespace.
    hide: tuple[Path, ...] = ()
    binary_variable: str = "KOUBOU_CODEX_BIN"
    unsafe_variable: str = "CODEX_UNSAFE_ALLOW_NO_SANDBOX"

    @classmethod
    def from_settings(cls, settings: Settings) -> CodexSetup:
        return cls(
            binary=settings.codex_bin,
            settings_file=settings.codex_settings_file,
            run_dir=settings.codex_run_dir,
            allow_no_sandbox=settings.codex_unsafe_no_sandbox,
            num_ctx=settings.codex_num_ctx,
            hide=(settings.home_dir,),
            binary_variable=str(Settings.model_fields["codex_bin"].validation_alias),
            unsafe_variable=str(Settings.model_fields["codex_unsafe_no_sandbox"].validation_alias),
        )


@dataclass
class _Run:
    """One Codex run's directories."""

    root: Path

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def codex_home(self) -> Path:
        return self.root / "codex-home"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"


class CodexRunner:
    """Runs code tasks with the Codex CLI; one per worker process."""

    def __init__(self, setup: CodexSetup) -> None:
        self.setup = setup
        self._checked: set[str] = set()  # binaries whose --version answered
        self._sandboxed: set[str] = set()  # binaries whose sandbox was seen to work here
        self._variants: set[tuple[str, str]] = set()  # (Ollama URL, variant) made by this process

    def run(
        self,
        backend: Backend,
        model: str,
        job: DelegationJob,
        timeout: float,
        on_delta: DeltaCallback | None = None,
        tick: Callable[[], None] = lambda: None,
    ) -> ChatResult:
        """Run Codex on `job` against `backend`; `tick` is called often (it may raise to cancel)."""
        started = time.monotonic()
        deadline = started + timeout
        binary = self._binary()
        self.setup.run_dir.mkdir(parents=True, exist_ok=True)
        run = _Run(self.setup.run_dir / f"{job.task_id}-{secrets.token_hex(4)}")
        run.root.mkdir()
        try:
            for path in (run.home, run.codex_home, run.tmp):
                path.mkdir()
            self._check_version(binary, run, deadline)
            if not self.setup.allow_no_sandbox:
                self._check_sandbox(binary, run, deadline)
            try:
                workspace = GitWorkspace.create(run.workspace, run.home, job.files)
            except BadPath as error:
                raise BackendRejected(str(error)) from error
            except GitWorkspaceError as error:
                raise CodexUnavailable(str(error)) from error
            served, context = self._model_for(backend, model, job, deadline)
            argv, env = self._command(binary, backend, served, context, job, run)
            transcript = self._execute(argv, env, run, job.prompt, deadline, on_delta, tick)
            where = _where(backend)
            if not transcript.succeeded:
                raise self._failure(transcript, where, served, timeout)
            try:
                changes = workspace.changes()
            except GitWorkspaceError as error:
                raise CodexUnavailable(str(error)) from error
            if changes.omitted:
                log.info("changed files left out of the result (binary or too large): %s", ", ".join(changes.omitted))
            extra: dict[str, object] = {"diff": changes.diff, "changed_files": changes.files}
            return ChatResult(
                output=transcript.final_message,
                model=model,
                prompt_tokens=transcript.input_tokens,
                completion_tokens=transcript.output_tokens,
                duration_ms=(time.monotonic() - started) * 1000,
                extra=extra,
            )
        finally:
            shutil.rmtree(run.root, ignore_errors=True)

    # -- set-up ------------------------------------------------------------------------------

    def _binary(self) -> str:
        configured = self.setup.binary
        found = shutil.which(configured) if configured else shutil.which("codex")
        if found:
            return found
        host = socket.gethostname()
        if configured:
            raise CodexUnavailable(
                f"{self.setup.binary_variable}={configured!r} is not an executable on worker host {host}: "
                f"point it at the Codex CLI, or install it with `{INSTALL_COMMAND}`"
            )
        raise CodexUnavailable(
            f"the Codex CLI (`codex`) is not installed on worker host {host}, and code tasks need it: "
            f"install it with `{INSTALL_COMMAND}` (it must be on the worker's PATH), "
            f"or set {self.setup.binary_variable} to its path"
        )

    def _check_version(self, binary: str, run: _Run, deadline: float) -> None:
        if binary in self._checked:
            return
        try:
            done = subprocess.run(
                [binary, "--version"], capture_output=True, timeout=_bounded(VERSION_TIMEOUT, deadline),
                stdin=subprocess.DEVNULL, env=self._environment(run), cwd=run.root,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as error:
            raise CodexUnavailable(f"the Codex CLI at {binary} does not start: {error}") from error
        output = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0:
            detail = _stderr_summary(done.stderr.decode(errors="replace"))
            raise CodexUnavailable(f"the Codex CLI at {binary} does not start ({detail}); reinstall it: `{INSTALL_COMMAND}`")
        if CODEX_VERSION not in output:
            log.warning("%s is %r; koubou is tested with Codex %s", binary, output, CODEX_VERSION)
        self._checked.add(binary)

    def _check_sandbox(self, binary: str, run: _Run, deadline: float) -> None:
        """Codex's Linux sandbox (bubblewrap, user namespaces) must work here, or every command the
        model runs would fail inside the task while the task itself "completes"."""
        if binary in self._sandboxed:
            return
        argv = self._jailed([binary, "sandbox", "--", "true"], run)
        try:
            done = subprocess.run(
                argv, capture_output=True, timeout=_bounded(VERSION_TIMEOUT, deadline), stdin=subprocess.DEVNULL,
                env=self._environment(run), cwd=run.tmp,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as error:
            raise CodexUnavailable(f"cannot check Codex's sandbox on worker host {socket.gethostname()}: {error}") from error
        if done.returncode != 0:
            detail = _stderr_summary(done.stderr.decode(errors="replace")) or f"exit status {done.returncode}"
            raise CodexUnavailable(
                f"Codex's sandbox does not work on worker host {socket.gethostname()} ({detail}): it needs "
                "user namespaces (bubblewrap); run the worker where they are allowed, or, only if the worker is "
                f"isolated already (a VM or container of its own), set {self.setup.unsafe_variable}=1"
            )
        self._sandboxed.add(binary)

    def _settings_text(self) -> str:
        """The operator's codex.toml (written with koubou's defaults when missing), checked as TOML."""
        path = self.setup.settings_file
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(path, "x", encoding="utf-8") as handle:
                    handle.write(DEFAULT_SETTINGS)
            except FileExistsError:
                pass  # another worker process wrote it first
        text = path.read_text(encoding="utf-8")
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise CodexSettingsError(f"{path} is not valid TOML: {error}") from None
        return text

    def _model_for(self, backend: Backend, model: str, job: DelegationJob, deadline: float) -> tuple[str, int | None]:
        """The model name Codex should use, and its context when koubou knows it."""
        num_ctx = job.num_ctx or self.setup.num_ctx
        if backend.kind != "ollama":
            return model, job.num_ctx
        if not num_ctx:
            return model, None
        return self._ollama_variant(backend, model, num_ctx, deadline), num_ctx

    def _ollama_variant(self, backend: Backend, model: str, num_ctx: int, deadline: float) -> str:
        """An Ollama model with `num_ctx` as its default (same weights: no download, no disk).

        Codex reaches Ollama through its OpenAI API, which cannot set num_ctx per request, and
        Ollama otherwise cuts a prompt longer than its default context without a word.
        """
        variant = CONTEXT_VARIANT.format(model=model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest", num_ctx=num_ctx)
        url = _http_url(backend.url)
        if (url, variant) in self._variants:
            return variant
        body = {"model": variant, "from": model, "parameters": {"num_ctx": num_ctx}, "stream": False}
        timeout = max(1.0, min(60.0, deadline - time.monotonic()))
        where = _where(backend)
        try:
            response = httpx.post(f"{url}/api/create", json=body, timeout=timeout)
        except httpx.TimeoutException as error:
            raise BackendTimeout(f"{where} timed out making {variant}") from error
        except httpx.TransportError as error:
            raise BackendUnavailable(f"cannot reach {where}: {error}") from error
        if response.status_code != 200:
            detail = _error_detail(response.text)
            raise error_for_status(response.status_code, where, f"making {variant} from {model}: {detail}", model)
        self._variants.add((url, variant))
        log.info("made %s (num_ctx %d) on %s for code tasks", variant, num_ctx, where)
        return variant

    def _command(
        self, binary: str, backend: Backend, model: str, context: int | None, job: DelegationJob, run: _Run
    ) -> tuple[list[str], dict[str, str]]:
        settings = self._settings_text()
        (run.codex_home / "config.toml").write_text(settings, encoding="utf-8")
        overrides = list(ENFORCED)
        if "model_instructions_file" not in tomllib.loads(settings):
            instructions = run.codex_home / "koubou-instructions.md"
            instructions.write_text(_instructions(job), encoding="utf-8")
            overrides.append(("model_instructions_file", _toml_string(str(instructions))))
        if context:
            overrides.append(("model_context_window", str(context)))
        env = self._environment(run)
        if backend.kind == "ollama":
            provider = ["--oss", "--local-provider", "ollama"]
            # Codex's own variable, set from the routed backend: an inherited value is never used.
            env["CODEX_OSS_BASE_URL"] = f"{_http_url(backend.url)}/v1"
        else:
            entry = (
                f'{{name = "koubou", base_url = {_toml_string(backend.url)}, wire_api = "responses", '
                f'env_key = "{API_KEY_VARIABLE}", request_max_retries = 0, stream_max_retries = 0}}'
            )
            overrides += [(f"model_providers.{PROVIDER_ID}", entry), ("model_provider", f'"{PROVIDER_ID}"')]
            provider = []
            env[API_KEY_VARIABLE] = getattr(backend, "api_key", None) or "not-needed"
        sandbox = "danger-full-access" if self.setup.allow_no_sandbox else "workspace-write"
        argv = [
            binary, "exec", "--json", "--strict-config", "--ephemeral", "--color", "never",
            "--sandbox", sandbox, "--cd", str(run.workspace), "-m", model, *provider,
        ]  # fmt: skip
        for key, value in overrides:
            argv += ["-c", f"{key}={value}"]
        argv.append("-")  # the prompt comes on stdin, never through a shell
        return argv, env

    def _jailed(self, argv: list[str], run: _Run) -> list[str]:
        """`argv` started in a private mount namespace where the hidden directories are empty and only
        this run's own directory is back in place (see koubou.codex_jail): the sandbox confines Codex's
        writes, this its reads of koubou's secrets and of other tasks' workspaces."""
        if not self.setup.hide:
            return argv
        # Root may make a mount namespace directly; anyone else in a user namespace of their own.
        unshare = ["unshare", "--mount", "--propagation", "private"]
        if os.geteuid() != 0:
            unshare += ["--user", "--map-current-user"]
        hidden = [arg for path in self.setup.hide for arg in ("--hide", str(path))]
        return [*unshare, sys.executable, "-m", "koubou.codex_jail", *hidden, "--keep", str(run.root), "--", *argv]

    def _environment(self, run: _Run) -> dict[str, str]:
        env = {name: os.environ[name] for name in PASSED_VARIABLES if name in os.environ}
        env.setdefault("PATH", os.defpath)
        env.setdefault("LANG", "C.UTF-8")
        env.update(
            HOME=str(run.home),
            CODEX_HOME=str(run.codex_home),
            TMPDIR=str(run.tmp),
            XDG_CONFIG_HOME=str(run.home / ".config"),
            XDG_CACHE_HOME=str(run.home / ".cache"),
            XDG_DATA_HOME=str(run.home / ".local" / "share"),
            XDG_STATE_HOME=str(run.home / ".local" / "state"),
            NO_COLOR="1",
        )
        return env

    # -- running -----------------------------------------------------------------------------

    def _execute(
        self,
        argv: list[str],
        env: dict[str, str],
        run: _Run,
        prompt: str,
        deadline: float,
        on_delta: DeltaCallback | None,
        tick: Callable[[], None],
    ) -> _Transcript:
        prompt_file = run.root / "prompt.txt"
        prompt_file.write_text(prompt, encoding="utf-8")
        transcript = _Transcript(run.workspace, on_delta)
        with open(prompt_file, "rb") as stdin:
            try:
                process = subprocess.Popen(
                    self._jailed(argv, run), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                    cwd=run.workspace, start_new_session=True,
                )  # fmt: skip
            except OSError as error:
                raise CodexUnavailable(f"cannot start the Codex CLI ({argv[0]}): {error}") from error
        tree = ProcessTree(process)
        try:
            log.info("codex started, pid %d, in %s", process.pid, run.workspace)
            self._pump(process, tree, transcript, deadline, tick)
        finally:
            # Timeout, cancel (SIGUSR1 raises in here) or done: nothing of this run may outlive it.
            tree.kill()
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        transcript.returncode = process.returncode
        return transcript

    def _pump(
        self,
        process: subprocess.Popen[bytes],
        tree: ProcessTree,
        transcript: _Transcript,
        deadline: float,
        tick: Callable[[], None],
    ) -> None:
        assert process.stdout is not None and process.stderr is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ, "stdout")
        selector.register(process.stderr, selectors.EVENT_READ, "stderr")
        pending = b""
        exited_at: float | None = None
        try:
            while selector.get_map():
                now = time.monotonic()
                if now >= deadline:
                    transcript.timed_out = True
                    return
                if exited_at is None and process.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > EXIT_GRACE:
                    break  # something Codex started still holds its output open: enough
                remaining = deadline - now
                for key, _ in selector.select(timeout=min(TICK, remaining)):
                    stream: IO[bytes] = key.fileobj  # type: ignore[assignment]
                    data = os.read(stream.fileno(), 65536)
                    if not data:
                        selector.unregister(stream)
                    elif key.data == "stderr":
                        transcript.stderr = (transcript.stderr + data.decode(errors="replace"))[-STDERR_KEPT:]
                    else:
                        *lines, pending = (pending + data).split(b"\n")
                        for line in lines:
                            transcript.feed(line)
                tree.watch()
                tick()
            if pending:
                transcript.feed(pending)
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            transcript.timed_out = True
        finally:
            selector.close()

    # -- failures ----------------------------------------------------------------------------

    def _failure(self, transcript: _Transcript, where: str, model: str, timeout: float) -> BackendError:
        if transcript.timed_out:
            return BackendTimeout(f"codex on {where} timed out after {round(timeout, 1):g}s (killed with every process it started)")
        message = transcript.failure or _stderr_summary(transcript.stderr)
        if not message:
            message = f"codex exited with status {transcript.returncode} without finishing its turn"
        return classify(message, where, model, self.setup.settings_file)


class _Transcript:
    """What `codex exec --json` reported: messages, usage, the failure; live progress to on_delta."""

    def __init__(self, workspace: Path, on_delta: DeltaCallback | None) -> None:
        self.workspace = workspace
        self.on_delta = on_delta
        self.messages: list[str] = []
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.completed = False
        self.failure: str | None = None
        self.last_error: str | None = None
        self.stderr = ""
        self.timed_out = False
        self.returncode: int | None = None

    @property
    def succeeded(self) -> bool:
        return self.completed and self.failure is None and not self.timed_out and self.returncode == 0

    @property
    def final_message(self) -> str:
        return self.messages[-1] if self.messages else ""

    def feed(self, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            if line.strip():
                log.debug("codex printed a line that is not JSON: %r", line[:200])
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind == "turn.completed":
            self.completed = True
            usage = event.get("usage") or {}
            self.input_tokens = (self.input_tokens or 0) + int(usage.get("input_tokens") or 0)
            self.output_tokens = (self.output_tokens or 0) + int(usage.get("output_tokens") or 0)
        elif kind == "turn.failed":
            self.failure = str((event.get("error") or {}).get("message") or self.last_error or "turn failed")
        elif kind == "error":
            # Also "Reconnecting... n/5" while Codex retries: only the last one matters.
            self.last_error = str(event.get("message") or "")
            log.info("codex: %s", self.last_error)
        elif kind in ("item.started", "item.completed"):
            self._item(kind, event.get("item") or {})

    def _item(self, kind: str, item: dict[str, Any]) -> None:
        item_type = item.get("type")
        if kind == "item.completed" and item_type == "agent_message":
            self.messages.append(str(item.get("text") or ""))
        elif item_type == "error":  # a warning, e.g. "Model metadata for `x` not found"
            log.info("codex warning: %s", item.get("message"))
        text = self._progress(kind, item)
        if text and self.on_delta is not None:
            self.on_delta(text)

    def _progress(self, kind: str, item: dict[str, Any]) -> str | None:
        """What the task's live stream shows of an item: messages, commands and their output, edits."""
        item_type = item.get("type")
        if item_type == "command_execution":
            if kind == "item.started":
                return f"$ {item.get('command')}\n"
            output = str(item.get("aggregated_output") or "")[-STREAMED_OUTPUT:]
            newline = "\n" if output and not output.endswith("\n") else ""
            return f"{output}{newline}[exit {item.get('exit_code')}]\n"
        if kind != "item.completed":
            return None
        if item_type == "agent_message":
            return f"{item.get('text') or ''}\n"
        if item_type == "file_change":
            changes = item.get("changes") or []
            return "".join(f"{c.get('kind')} {self._relative(str(c.get('path')))}\n" for c in changes)
        return None

    def _relative(self, path: str) -> str:
        try:
            return Path(path).relative_to(self.workspace).as_posix()
        except ValueError:
            return path


# -- errors: Codex's words → koubou's BackendError family --------------------------------------

_STATUS = re.compile(r"(?:unexpected status|last status:)\s*(\d{3})")
_VLLM_CONTEXT = re.compile(r"maximum context length is (\d+) tokens.*?(?:requested|contains|has) (\d+)", re.S)


def classify(message: str, where: str, model: str, settings_file: Path) -> BackendError:
    """The BackendError a Codex failure message means (the edge where Codex's errors are translated)."""
    if "Error loading config.toml" in message or "configuration field" in message:
        detail = re.sub(r"\S*/config\.toml", str(settings_file), message.replace("Error loading config.toml:", "")).strip()
        return CodexSettingsError(f"Codex refused its settings: {detail}")
    context = _context_error(message, where)
    if context is not None:
        return context
    if "No running Ollama server detected" in message or "Connection failed" in message or "error sending request" in message:
        return BackendUnavailable(f"cannot reach {where}: codex: {message}")
    if "too old" in message:
        return BackendRejected(f"{where}: codex: {message}")
    if match := _STATUS.search(message):
        return error_for_status(int(match[1]), where, f"codex: {message}", model)
    body = _json_in(message)
    if isinstance(body, dict) and isinstance(body.get("error"), (dict, str)):
        # Codex 0.169 shows an HTTP 400's body as it is, without the status.
        error = body["error"]
        code = error.get("code") if isinstance(error, dict) else None
        detail = error.get("message", error) if isinstance(error, dict) else error
        return error_for_status(code if isinstance(code, int) and code >= 400 else 400, where, str(detail), model)
    if "experiencing high demand" in message:  # Codex's words for an HTTP 500
        return BackendServerError(f"{where} failed (HTTP 5xx) while Codex was working: codex: {message}")
    if "stream disconnected" in message or "idle timeout" in message:
        return BackendServerError(f"{where} broke off its answer: codex: {message}")
    return CodexTurnFailed(f"codex failed on {where}: {message}")


def _context_error(message: str, where: str) -> PromptTooLong | None:
    body = _json_in(message)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and (error.get("type") == "exceed_context_size_error" or "n_ctx" in error):
        prompt, limit = error.get("n_prompt_tokens"), error.get("n_ctx")
        return PromptTooLong(_context_text(where, prompt, limit))
    if match := _VLLM_CONTEXT.search(message):
        return PromptTooLong(_context_text(where, int(match[2]), int(match[1])))
    if "exceeds the available context size" in message or "context length exceeded" in message.lower():
        return PromptTooLong(_context_text(where, None, None) + f" ({message})")
    return None


def _context_text(where: str, prompt: object, limit: object) -> str:
    needs = f"{prompt} tokens" if prompt is not None else "more tokens"
    holds = f"{limit} tokens" if limit is not None else "less"
    return (
        f"the code task's prompt ({needs}: Codex's instructions and tools, the task and its work so far) "
        f"does not fit the model's context ({holds} per request) on {where}; give the server a larger "
        f"context (llama.cpp: --ctx-size / --parallel; Ollama: options.num_ctx or KOUBOU_CODEX_NUM_CTX) "
        f"or a smaller task"
    )


def _json_in(message: str) -> object:
    start = message.find("{")
    if start < 0:
        return None
    try:
        return json.JSONDecoder().raw_decode(message[start:])[0]
    except ValueError:
        return None


def _stderr_summary(stderr: str) -> str:
    """Codex's error on stderr without its backtrace and harmless warnings."""
    text = stderr.split("Stack backtrace:", 1)[0]
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("WARNING: proceeding")]
    return "\n".join(lines)[-2000:].strip()


def _error_detail(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    return str(body.get("error", body)) if isinstance(body, dict) else text.strip()[:300]


def _instructions(job: DelegationJob) -> str:
    if not job.files:
        return INSTRUCTIONS
    shown = [f"- {f.path}" for f in job.files[:200]]
    more = [f"- ... and {len(job.files) - 200} more"] if len(job.files) > 200 else []
    return INSTRUCTIONS + "\nThe files shipped with the task:\n" + "\n".join(shown + more) + "\n"


def _bounded(seconds: float, deadline: float) -> float:
    """`seconds`, or less when the task's deadline is nearer (at least a tenth of a second)."""
    return max(0.1, min(seconds, deadline - time.monotonic()))


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def _http_url(url: str) -> str:
    # OLLAMA_HOST may be a bare host:port, as Ollama itself allows.
    return (url if "://" in url else f"http://{url}").rstrip("/")


def _where(backend: Backend) -> str:
    kind = "ollama" if backend.kind == "ollama" else "openai-compatible server"
    return f"{kind} at {backend.url}"
