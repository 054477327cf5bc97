"""Programs the tests need that requirements-test.txt cannot bring: found on PATH, or installed once.

Each helper returns a path to a working program or raises ToolUnavailable saying what was tried;
a test turns that into a failure, never a skip.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Private venvs for tools, ignored by git (`.venv-*/`) and kept between runs.
TOOLS_DIR = REPO / ".venv-tools"
COMPOSE_VENV = TOOLS_DIR / "compose"

# docker-compose 1.29.2 is the one Debian ships (apt package `docker-compose`), the oldest reader
# the compose file must satisfy. Its own pins need help on Python 3.11 today:
# - PyYAML<6 resolves to 5.4.1, whose sdist no longer builds (setuptools + Cython 3:
#   "'build_ext' object has no attribute 'cython_sources'"); 5.3.1 builds from plain setup.py.
#   (5.4.1 with a `cython<3` PIP_CONSTRAINT also builds, but only while pip applies
#   PIP_CONSTRAINT to build environments.)
# - docker>=7 dropped kwargs_from_env(ssl_version=), which compose calls for every command that
#   talks to an engine; docker 6.1.3 in turn needs requests<2.32 (its http+docker:// scheme).
COMPOSE_REQUIREMENTS = ("docker-compose==1.29.2", "PyYAML==5.3.1", "docker==6.1.3", "requests==2.31.0")
_COMPLETE_MARKER = ".koubou-tool-complete"

VERSION_TIMEOUT = 60
INSTALL_TIMEOUT = 240


class ToolUnavailable(RuntimeError):
    """A program a test needs could not be found or installed; the message says what was tried."""


def _runs(argv: list[str]) -> bool:
    try:
        done = subprocess.run(argv, capture_output=True, timeout=VERSION_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def docker_compose() -> Path:
    """A working `docker-compose`: the one on PATH, else 1.29.2 in a private venv (installed once)."""
    on_path = shutil.which("docker-compose")
    if on_path and _runs([on_path, "version"]):
        return Path(on_path)
    return _install_compose(tried=f"docker-compose on PATH: {on_path or 'none'}")


def _install_compose(tried: str) -> Path:
    program = COMPOSE_VENV / "bin" / "docker-compose"
    marker = COMPOSE_VENV / _COMPLETE_MARKER
    wanted = "\n".join(COMPOSE_REQUIREMENTS)
    TOOLS_DIR.mkdir(exist_ok=True)
    # One installer at a time (parallel test runs); a half-made venv has no marker and is redone.
    with open(TOOLS_DIR / "compose.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == wanted and _runs([str(program), "version"]):
            return program
        shutil.rmtree(COMPOSE_VENV, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(COMPOSE_VENV)],
            [str(COMPOSE_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet",
             "--disable-pip-version-check", *COMPOSE_REQUIREMENTS],
        ]
        env = {**os.environ, "PIP_NO_INPUT": "1"}
        for argv in steps:
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT,
                                      stdin=subprocess.DEVNULL, env=env)
            except (OSError, subprocess.TimeoutExpired) as error:
                raise ToolUnavailable(_explain(tried, argv, str(error))) from None
            if done.returncode != 0:
                raise ToolUnavailable(_explain(tried, argv, (done.stdout + done.stderr)[-3000:]))
        if not _runs([str(program), "version"]):
            raise ToolUnavailable(_explain(tried, [str(program), "version"], "installed, but does not run"))
        marker.write_text(wanted)
        return program


def _explain(tried: str, argv: list[str], output: str) -> str:
    return (
        "no working docker-compose for this test.\n"
        f"Tried: {tried}; then installing {' '.join(COMPOSE_REQUIREMENTS)} into {COMPOSE_VENV}.\n"
        f"Failed: {' '.join(argv)}\n{output.strip()}\n"
        "Fix: put a docker-compose on PATH (Debian: `apt-get install docker-compose`), "
        "or make PyPI reachable and rerun."
    )


#: Seconds an npm install of one pinned CLI may take.
NPM_INSTALL_TIMEOUT = 420


def npm_install(prefix: Path, spec: str, explain: Callable[[str, str], str]) -> str:
    """Install the npm package `spec` (name@version) afresh into `prefix`; return the command line run.

    Raises ToolUnavailable, worded by `explain(command, output)`, when npm fails. The packages
    koubou's tests use ship their native binary in a per-platform optional dependency.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise ToolUnavailable(explain("npm install", "npm is not on PATH"))
    shutil.rmtree(prefix, ignore_errors=True)
    prefix.mkdir(parents=True)
    install = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error", "--include=optional", spec]
    command = " ".join(install)
    try:
        done = subprocess.run(
            install, capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "npm_config_update_notifier": "false"},
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ToolUnavailable(explain(command, str(error))) from None
    if done.returncode != 0:
        raise ToolUnavailable(explain(command, (done.stdout + done.stderr)[-3000:]))
    return command
