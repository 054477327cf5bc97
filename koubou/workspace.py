"""The files a task names: found inside the workspace roots, read safely by the API, shipped with the task.

The API reads them at submit time and puts their text in the task message, so a worker on another
machine has them without sharing a disk. What may be read is decided here, once:

- a path resolves (symlinks followed) to somewhere inside one of the roots (`KOUBOU_WORKSPACE_ROOTS`,
  default the directory `koubou up` was started in); a relative path resolves against the first root;
- never inside `$KOUBOU_HOME`, even when the home lies under a root: its database and credentials
  (API token hashes, broker and Flower passwords, backend API keys) are never shipped;
- only a regular file (no directory, device, FIFO or socket), UTF-8 text without NUL bytes
  (NUL cannot be stored in a PostgreSQL JSON column, and a model cannot use binary anyway);
- at most `max_files` distinct paths, `max_file_bytes` each and `max_total_bytes` in all.

Each refusal is a `FileRefused` subclass naming the path and the reason; the API maps the type to an
HTTP status (see `koubou/api/app.py`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .config import Settings
from .jobs import ShippedFile

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused after fstat anyway).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symlink"),
)


class FileRefused(Exception):
    """A file the task names cannot be shipped; `path` is as the caller wrote it (None: the whole list)."""

    def __init__(self, path: str | None, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path is not None else reason)
        self.path, self.reason = path, reason


class OutsideWorkspace(FileRefused):
    """The path resolves outside every workspace root, or inside `$KOUBOU_HOME`."""


class NotRegularFile(FileRefused):
    """The path is a directory, device, FIFO or socket."""


class NotText(FileRefused):
    """The file is not UTF-8 text (binary, or another encoding)."""


class FileMissing(FileRefused):
    """Nothing exists at the path (inside the roots)."""


class FileUnreadable(FileRefused):
    """The API's user may not read the file."""


class FileTooLarge(FileRefused):
    """One file is over the per-file limit, or the files together are over the total."""


class TooManyFiles(FileRefused):
    """The task names more distinct paths than allowed."""


@dataclass(frozen=True)
class FileLimits:
    max_files: int = 20
    max_file_bytes: int = 1024 * 1024
    max_total_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class Workspace:
    """The roots files may come from, the one directory they never come from, and the limits."""

    roots: tuple[Path, ...]
    home: Path
    limits: FileLimits = FileLimits()

    @classmethod
    def from_settings(cls, settings: Settings) -> Workspace:
        limits = FileLimits(settings.max_files, settings.max_file_bytes, settings.max_files_bytes)
        return cls(settings.workspace_roots, settings.home_dir, limits)

    def __post_init__(self) -> None:
        # Compare real paths only: a root or home given through a symlink must still match.
        object.__setattr__(self, "roots", tuple(Path(os.path.realpath(root)) for root in self.roots))
        object.__setattr__(self, "home", Path(os.path.realpath(self.home)))

    def read(self, paths: Sequence[str]) -> tuple[ShippedFile, ...]:
        """The named files, read now, in the order named; the same file named twice is shipped once."""
        names = list(dict.fromkeys(paths))
        if len(names) > self.limits.max_files:
            raise TooManyFiles(None, f"{len(names)} files named, at most {self.limits.max_files} (KOUBOU_MAX_FILES)")
        shipped: dict[Path, ShippedFile] = {}
        by_name: dict[str, str] = {}
        total = 0
        for name in names:
            real, root = self.resolve(name)
            if real in shipped:
                continue
            relative = real.relative_to(root).as_posix()
            if relative in by_name:  # the same relative path under two roots: which one would a worker write?
                raise FileRefused(name, f"has the same path, {relative!r}, as {by_name[relative]!r} under another root")
            data = self._read(name, real, root)
            total += len(data)
            if total > self.limits.max_total_bytes:
                raise FileTooLarge(
                    name, f"the files come to more than {self.limits.max_total_bytes} bytes in all (KOUBOU_MAX_FILES_BYTES)"
                )
            shipped[real] = ShippedFile(path=relative, content=_text(name, data))
            by_name[relative] = name
        return tuple(shipped.values())

    def resolve(self, name: str) -> tuple[Path, Path]:
        """The real path `name` names and the root it lies in; refuses anything outside the roots."""
        if not name or "\0" in name:
            raise FileRefused(name, "not a valid path")
        if not self.roots:
            raise OutsideWorkspace(name, "no workspace root is configured (KOUBOU_WORKSPACE_ROOTS)")
        path = Path(name)
        if not path.is_absolute():
            path = self.roots[0] / path
        # Not strict: a missing path inside the roots is "not found" (404), but one outside them is
        # refused (400) whether it exists or not, so the API tells nothing about the rest of the disk.
        try:
            real = Path(os.path.realpath(path))
        except (OSError, ValueError) as error:
            raise FileRefused(name, f"cannot be resolved ({_why(error)})") from None
        if real.is_relative_to(self.home):
            raise OutsideWorkspace(name, "is inside KOUBOU_HOME: koubou's database and credentials are never shipped")
        root = next((r for r in self.roots if real.is_relative_to(r)), None)
        if root is None:
            roots = os.pathsep.join(str(r) for r in self.roots)
            raise OutsideWorkspace(name, f"resolves to {real}, outside the workspace roots ({roots}; KOUBOU_WORKSPACE_ROOTS)")
        return real, root

    def _read(self, name: str, real: Path, root: Path) -> bytes:
        limit = self.limits.max_file_bytes
        try:
            info = os.lstat(real)
        except OSError as error:
            if error.errno == errno.ENOTDIR:  # a file where the path wants a directory
                raise FileMissing(name, "no such file") from None
            raise _refusal(name, error) from None
        _require_regular(name, info.st_mode)  # before opening: opening a device can have effects
        if info.st_size > limit:
            raise FileTooLarge(name, f"is {info.st_size} bytes, over the limit of {limit} (KOUBOU_MAX_FILE_BYTES)")
        try:
            fd = _open_beneath(root, PurePosixPath(real.relative_to(root).as_posix()))
        except OSError as error:
            raise _refusal(name, error) from None
        with os.fdopen(fd, "rb") as handle:
            _require_regular(name, os.fstat(fd).st_mode)  # what was opened, not what was looked at
            data = handle.read(limit + 1)  # the file may have grown since lstat
        if len(data) > limit:
            raise FileTooLarge(name, f"is over the limit of {limit} bytes (KOUBOU_MAX_FILE_BYTES)")
        return data


def _open_beneath(root: Path, relative: PurePosixPath) -> int:
    """Open root/relative one component at a time, following no symlink.

    `relative` comes from a path resolved a moment ago, so it holds no symlink; one found now means
    the tree changed in between (a swapped directory), and following it could leave the root.
    """
    if not relative.parts:
        raise IsADirectoryError(errno.EISDIR, "is the workspace root")
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        for part in relative.parts[:-1]:
            inner = os.open(part, _DIR_FLAGS, dir_fd=directory)
            os.close(directory)
            directory = inner
        return os.open(relative.parts[-1], _FILE_FLAGS, dir_fd=directory)
    finally:
        os.close(directory)


def _require_regular(name: str, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((label for test, label in _KINDS if test(mode)), "not a regular file")
    raise NotRegularFile(name, f"is {kind}, not a regular file")


def _text(name: str, data: bytes) -> str:
    if b"\0" in data:
        raise NotText(name, "is binary (it holds NUL bytes): only UTF-8 text files can be shipped")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise NotText(name, f"is not UTF-8 text (byte {error.start}): only UTF-8 text files can be shipped") from None


def _refusal(name: str, error: OSError) -> FileRefused:
    if error.errno == errno.ENOENT:
        return FileMissing(name, "no such file")
    if error.errno in (errno.EACCES, errno.EPERM):
        return FileUnreadable(name, "permission denied")
    if error.errno in (errno.ELOOP, errno.ENOTDIR):
        return OutsideWorkspace(name, "changed while it was being read (a symlink appeared on its path)")
    if error.errno in (errno.ENXIO, errno.EISDIR):  # ENXIO: a socket cannot be opened
        return NotRegularFile(name, f"is not a regular file ({_why(error)})")
    return FileRefused(name, f"cannot be read ({_why(error)})")


def _why(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
