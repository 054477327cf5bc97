"""A code task's workspace: the shipped files in a fresh git repository, and what changed in it."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .jobs import ShippedFile

#: Top-level names a shipped file may not use: git's own data, and Codex's per-project settings
#: (an operator's choice, never a request's).
RESERVED_DIRS = frozenset({".git", ".codex"})
#: Bounds on what a task hands back: each changed file's content, and all of them together.
MAX_FILE_BYTES = 1 << 20
MAX_TOTAL_BYTES = 8 << 20
GIT_TIMEOUT = 60.0
_IDENTITY = {"GIT_AUTHOR_NAME": "koubou", "GIT_AUTHOR_EMAIL": "koubou@localhost"}


class GitWorkspaceError(Exception):
    """The workspace could not be made or read (git missing or failing)."""


class BadPath(GitWorkspaceError):
    """A shipped file's path is not a plain relative path inside the workspace."""


@dataclass(frozen=True)
class Changes:
    """What a task changed: the unified diff, and the new content of each added or modified file."""

    diff: str
    files: dict[str, str]
    #: Changed paths whose content is not in `files` (binary, too large, or past the total bound).
    omitted: tuple[str, ...] = ()


def _bounded(diff: str) -> str:
    """The diff, cut at MAX_TOTAL_BYTES with a note: a model that writes a huge file must not turn
    the task's result (stored, published to every API process) into tens of megabytes."""
    data = diff.encode()
    if len(data) <= MAX_TOTAL_BYTES:
        return diff
    kept = data[:MAX_TOTAL_BYTES].decode(errors="ignore")
    return kept + f"\n[koubou: the diff was cut at {MAX_TOTAL_BYTES} of its {len(data)} bytes]\n"


def checked_path(path: str) -> PurePosixPath:
    """A shipped file's path, refused unless it is relative, `/`-separated and stays inside."""
    pure = PurePosixPath(path)
    if not path or "\\" in path or "\0" in path or pure.is_absolute():
        raise BadPath(f"file path {path!r} must be relative and use '/' separators")
    if any(part in ("..", "") for part in path.split("/")) or str(pure) != path.rstrip("/"):
        raise BadPath(f"file path {path!r} must be a plain relative path without '..' or empty parts")
    if not pure.parts:
        raise BadPath(f"file path {path!r} names no file")
    if pure.parts[0] in RESERVED_DIRS:
        raise BadPath(f"file path {path!r} is inside {pure.parts[0]}/, which koubou keeps for itself")
    return pure


class GitWorkspace:
    """A directory holding the shipped files, committed once so that every change can be diffed."""

    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        #: git's HOME: the task's own, so the user's ~/.gitconfig is never read.
        self.home = home

    @classmethod
    def create(cls, root: Path, home: Path, files: tuple[ShippedFile, ...]) -> GitWorkspace:
        """Write `files` under `root` (made here) and commit them as the base of the diff."""
        root.mkdir(parents=True)
        home.mkdir(parents=True, exist_ok=True)
        for shipped in files:
            target = root.joinpath(*checked_path(shipped.path).parts)
            if target.exists():
                raise BadPath(f"file path {shipped.path!r} is shipped twice, or under another shipped file")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(shipped.content, encoding="utf-8")
            except (FileExistsError, NotADirectoryError):
                raise BadPath(f"file path {shipped.path!r} is under another shipped file") from None
        workspace = cls(root, home)
        workspace._git("init", "--quiet", "--initial-branch=main")
        workspace._git("add", "--all", "--force")
        workspace._git("commit", "--quiet", "--allow-empty", "--no-verify", "-m", "files shipped with the task")
        return workspace

    def changes(self) -> Changes:
        """Everything that differs from the shipped files: added, modified and deleted, ignored or not."""
        self._git("add", "--all", "--force")
        diff = _bounded(self._git("diff", "--cached", "--no-color", "--no-ext-diff", "--no-renames", "HEAD"))
        listing = self._git("diff", "--cached", "--name-status", "--no-renames", "-z", "HEAD")
        fields = listing.split("\0")
        files: dict[str, str] = {}
        omitted: list[str] = []
        total = 0
        for status, path in zip(fields[0::2], fields[1::2]):
            if status == "D":
                continue  # the diff shows the deletion; there is no content to return
            content = self._text_of(path)
            if content is None or total + len(content.encode()) > MAX_TOTAL_BYTES:
                omitted.append(path)
                continue
            files[path] = content
            total += len(content.encode())
        return Changes(diff, files, tuple(omitted))

    def _text_of(self, path: str) -> str | None:
        target = self.root / path
        if target.is_symlink() or not target.is_file() or target.stat().st_size > MAX_FILE_BYTES:
            return None
        try:
            return target.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            return None

    def _git(self, *args: str) -> str:
        git = shutil.which("git")
        if git is None:
            raise GitWorkspaceError("git is not installed on this worker: code tasks need it (Debian: apt-get install git)")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "LC_ALL": "C",
            **_IDENTITY,
            "GIT_COMMITTER_NAME": _IDENTITY["GIT_AUTHOR_NAME"],
            "GIT_COMMITTER_EMAIL": _IDENTITY["GIT_AUTHOR_EMAIL"],
        }
        # core.quotepath=off: non-ASCII paths as they are; no hooks, no signing, no CRLF rewriting.
        argv = [git, "-c", "core.quotepath=off", "-c", "core.autocrlf=false", "-c", "commit.gpgsign=false",
                "-c", "core.hooksPath=/dev/null", *args]  # fmt: skip
        try:
            done = subprocess.run(
                argv, cwd=self.root, env=env, capture_output=True, timeout=GIT_TIMEOUT, stdin=subprocess.DEVNULL
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise GitWorkspaceError(f"git {args[0]} failed in {self.root}: {error}") from error
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip()[-500:]
            raise GitWorkspaceError(f"git {args[0]} failed in {self.root}: {detail}")
        return done.stdout.decode("utf-8", errors="replace")
