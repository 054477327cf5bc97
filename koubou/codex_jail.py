"""Start Codex with koubou's home hidden from it: `python -m koubou.codex_jail --hide DIR --keep RUN -- ARGV`.

Codex's `workspace-write` sandbox confines writes, not reads, so the model's commands could read
the worker's `$KOUBOU_HOME` (broker password, backend keys, Flower's login, the database) and other
tasks' workspaces. Run inside a private mount namespace (`unshare --mount`, made by the Codex
runner), this puts an empty tmpfs over each hidden directory, mounts the task's own run directory
back at its place, and then becomes Codex (exec: same PID, so the runner's process tree still
holds it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence


def _mount(*args: str, keep_fd: int | None = None) -> None:
    done = subprocess.run(
        ["mount", *args], capture_output=True, text=True, timeout=10,
        pass_fds=(keep_fd,) if keep_fd is not None else (),
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"koubou codex jail: mount {' '.join(args)} failed: {done.stderr.strip()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m koubou.codex_jail")
    parser.add_argument("--hide", action="append", default=[], help="a directory to cover with an empty tmpfs")
    parser.add_argument("--keep", required=True, help="the run directory to mount back (inside a hidden one)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    command = options.command[1:] if options.command[:1] == ["--"] else options.command
    if not command:
        parser.error("no command given")
    cwd = os.getcwd()  # after the mounts it has no path any more: re-entered by name below
    # Held open before the tmpfs covers it: afterwards its path leads into the empty tmpfs.
    keep_fd = os.open(options.keep, os.O_PATH | os.O_DIRECTORY)
    for hidden in options.hide:
        _mount("-t", "tmpfs", "-o", "mode=0700,size=64k", "koubou-hidden", hidden)
    os.makedirs(options.keep, exist_ok=True)
    # --no-canonicalize: the kernel must follow the descriptor, not mount(8) its (now covered) path name.
    _mount("--no-canonicalize", "--bind", f"/proc/self/fd/{keep_fd}", options.keep, keep_fd=keep_fd)
    os.close(keep_fd)
    os.chdir(cwd)  # now the directory mounted back, where it was under a hidden one
    os.execvp(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
