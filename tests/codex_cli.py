"""The Codex CLI for the code-task tests: npm's @openai/codex, pinned, installed once.

`codex_cli()` returns the path of a working `codex` of the pinned version, installing it into
`.venv-tools/codex/` (ignored by git as `.venv-*/`, kept between runs) under a file lock. Where npm
is absent it raises NpmMissing (tests skip, printing why); any other failure raises ToolUnavailable.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from koubou.backends.codex import CODEX_PACKAGE, CODEX_VERSION
from tests.tools import TOOLS_DIR, ToolUnavailable, npm_install

CODEX_DIR = TOOLS_DIR / "codex"
_COMPLETE_MARKER = ".koubou-tool-complete"
VERSION_TIMEOUT = 60


class NpmMissing(ToolUnavailable):
    """npm is not installed, so the Codex CLI cannot be installed here."""


def _version(program: Path) -> str | None:
    # A throw-away HOME: nothing of the user's (~/.codex) is read or written.
    with tempfile.TemporaryDirectory(prefix="codex-version-") as home:
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": home, "CODEX_HOME": home}
        try:
            done = subprocess.run(
                [str(program), "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT,
                stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
    return done.stdout.strip() if done.returncode == 0 else None


def codex_cli() -> Path:
    """The path of a working `codex` of the pinned version (installed once with npm)."""
    program = CODEX_DIR / "node_modules" / ".bin" / "codex"
    marker = CODEX_DIR / _COMPLETE_MARKER
    TOOLS_DIR.mkdir(exist_ok=True)
    # One installer at a time (parallel test runs); a half-made install has no marker and is redone.
    with open(TOOLS_DIR / "codex.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == CODEX_VERSION and CODEX_VERSION in (_version(program) or ""):
            return program
        if shutil.which("npm") is None:
            raise NpmMissing(f"npm is not on PATH, so {CODEX_PACKAGE}@{CODEX_VERSION} cannot be installed")
        install = npm_install(CODEX_DIR, f"{CODEX_PACKAGE}@{CODEX_VERSION}", _explain)
        version = _version(program)
        if version is None or CODEX_VERSION not in version:
            raise ToolUnavailable(_explain(install, f"installed, but `{program} --version` says {version!r}"))
        marker.write_text(CODEX_VERSION)
        return program


def _explain(argv: str, output: str) -> str:
    return (
        f"no working Codex CLI ({CODEX_PACKAGE}@{CODEX_VERSION}) for this test.\n"
        f"Tried: installing it with npm into {CODEX_DIR}.\nFailed: {argv}\n{output.strip()}\n"
        "Fix: make the npm registry reachable, then rerun."
    )
