"""Claude Code's CLI (`claude`) for the MCP tests: npm's @anthropic-ai/claude-code, installed once.

`claude_code()` returns the argv that runs a working `claude`, installing the pinned version into
`.venv-tools/claude/` (ignored by git as `.venv-*/`, kept between runs) under a file lock, or raises
ToolUnavailable saying what was tried: a test turns that into a failure, never a skip.
`claude_env()` is an environment that keeps Claude Code's configuration in a given folder, never
in the user's own.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from tests.tools import TOOLS_DIR, ToolUnavailable, npm_install

PACKAGE = "@anthropic-ai/claude-code"
# The npm package ships the native binary in a per-platform optional dependency
# (@anthropic-ai/claude-code-linux-x64, ...), which its postinstall copies over bin/claude.exe.
VERSION = "2.1.328"
CLAUDE_DIR = TOOLS_DIR / "claude"
_COMPLETE_MARKER = ".koubou-tool-complete"

VERSION_TIMEOUT = 60

#: Variables of the calling shell that would make the CLI reach out, update itself, or use a real account.
_DROPPED_PREFIXES = ("CLAUDE", "ANTHROPIC_", "KOUBOU_", "MCP_")


def _version_of(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(
            [*argv, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT,
            stdin=subprocess.DEVNULL, env=claude_env(CLAUDE_DIR / "version-home"),
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _candidates() -> list[list[str]]:
    """Ways to run the installed CLI: the bin link, else the package's own node wrapper
    (for an npm that did not run the postinstall script)."""
    package = CLAUDE_DIR / "node_modules" / PACKAGE
    found = [[str(CLAUDE_DIR / "node_modules" / ".bin" / "claude")]]
    node = shutil.which("node")
    if node:
        found.append([node, str(package / "cli-wrapper.cjs")])
    return found


def _working() -> list[str] | None:
    for argv in _candidates():
        version = _version_of(argv)
        if version and version.startswith(VERSION):
            return argv
    return None


def claude_code() -> list[str]:
    """The argv of a working `claude` of the pinned version (installed once with npm)."""
    marker = CLAUDE_DIR / _COMPLETE_MARKER
    TOOLS_DIR.mkdir(exist_ok=True)
    # One installer at a time (parallel test runs); a half-made install has no marker and is redone.
    with open(TOOLS_DIR / "claude.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == VERSION:
            argv = _working()
            if argv:
                return argv
        install = npm_install(CLAUDE_DIR, f"{PACKAGE}@{VERSION}", _explain)
        argv = _working()
        if argv is None:
            tried = "; ".join(" ".join(a) + " --version" for a in _candidates())
            raise ToolUnavailable(_explain(install, f"installed, but none of these runs: {tried}"))
        marker.write_text(VERSION)
        return argv


def claude_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for `claude` whose HOME and config dir are `home`: the user's own config is
    never read or written. No updates, telemetry or other traffic that is not needed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_PREFIXES)}
    home.mkdir(parents=True, exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_CACHE_HOME=str(home / ".cache"),
        CLAUDE_CONFIG_DIR=str(home / ".claude"),
        DISABLE_AUTOUPDATER="1",
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        **extra,
    )
    return env


def _explain(argv: str, output: str) -> str:
    return (
        f"no working Claude Code CLI ({PACKAGE}@{VERSION}) for this test.\n"
        f"Tried: installing it with npm into {CLAUDE_DIR}.\n"
        f"Failed: {argv}\n{output.strip()}\n"
        "Fix: install Node.js and npm (Debian: `apt-get install npm`) and make the npm registry "
        "reachable, then rerun."
    )
