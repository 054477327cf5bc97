"""Which files a task may ship, and how they are read: every refused path refused, for its reason."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from koubou.config import load_settings
from koubou.jobs import ShippedFile
from koubou.services import plan_services
from koubou.workspace import (
    FileLimits,
    FileMissing,
    FileRefused,
    FileTooLarge,
    NotRegularFile,
    NotText,
    OutsideWorkspace,
    TooManyFiles,
    Workspace,
)
from tests.harness import free_port


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/root (the workspace, with the home inside it), tmp/other (a second root), tmp/outside."""
    for name in ("root/src", "root/.koubou/config", "root/.koubou/db", "other/docs", "outside"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "root/src/a.py").write_text("print('a')\n")
    (tmp_path / "root/README.md").write_text("# readme\n")
    (tmp_path / "root/.koubou/config/.env").write_text("KOUBOU_REDIS_PASSWORD=not-a-real-secret\n")
    (tmp_path / "root/.koubou/db/koubou.db").write_text("not really sqlite\n")
    (tmp_path / "other/docs/guide.md").write_text("guide\n")
    (tmp_path / "outside/secret.txt").write_text("top secret\n")
    return tmp_path


def workspace(tree: Path, **limits: int) -> Workspace:
    return Workspace((tree / "root", tree / "other"), tree / "root/.koubou", FileLimits(**limits))


def refused(ws: Workspace, *paths: str) -> FileRefused:
    with pytest.raises(FileRefused) as caught:
        ws.read(paths)
    return caught.value


# -- what is shipped


def test_relative_paths_resolve_against_the_first_root_and_ship_with_their_content(tree: Path) -> None:
    files = workspace(tree).read(["src/a.py", "README.md"])
    assert files == (ShippedFile(path="src/a.py", content="print('a')\n"), ShippedFile(path="README.md", content="# readme\n"))


def test_an_absolute_path_in_another_root_ships_relative_to_that_root(tree: Path) -> None:
    assert workspace(tree).read([str(tree / "other/docs/guide.md")]) == (ShippedFile(path="docs/guide.md", content="guide\n"),)


def test_a_symlink_inside_the_roots_is_followed_and_ships_under_its_targets_path(tree: Path) -> None:
    (tree / "root/link.py").symlink_to(tree / "root/src/a.py")
    (tree / "root/srclink").symlink_to(tree / "root/src", target_is_directory=True)
    files = workspace(tree).read(["link.py", "srclink/a.py"])
    assert files == (ShippedFile(path="src/a.py", content="print('a')\n"),)  # one file, named twice


def test_duplicates_collapse_but_each_distinct_name_counts_towards_the_limit(tree: Path) -> None:
    ws = workspace(tree, max_files=2)
    assert [f.path for f in ws.read(["src/a.py", "src/a.py", "./src/a.py"])] == ["src/a.py"]
    error = refused(ws, "src/a.py", "./src/a.py", "src//a.py")
    assert isinstance(error, TooManyFiles) and "3 files named, at most 2" in error.reason


def test_empty_and_non_ascii_text_files_are_fine(tree: Path) -> None:
    (tree / "root/empty.txt").write_bytes(b"")
    (tree / "root/jp.txt").write_text("工房\n", encoding="utf-8")
    assert [f.content for f in workspace(tree).read(["empty.txt", "jp.txt"])] == ["", "工房\n"]


def test_the_default_root_is_the_current_directory(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree / "root")
    settings = load_settings({"KOUBOU_HOME": str(tree / "root/.koubou")})
    ws = Workspace.from_settings(settings)
    assert ws.roots == ((tree / "root").resolve(),)
    assert ws.read(["README.md"])[0].content == "# readme\n"
    refused_home = refused(ws, ".koubou/config/.env")
    assert isinstance(refused_home, OutsideWorkspace)


def test_roots_and_limits_come_from_the_settings(tree: Path) -> None:
    roots = os.pathsep.join([str(tree / "other"), str(tree / "root")])
    settings = load_settings(
        {"KOUBOU_HOME": str(tree / "home"), "KOUBOU_WORKSPACE_ROOTS": roots, "KOUBOU_MAX_FILES": "3",
         "KOUBOU_MAX_FILE_BYTES": "100", "KOUBOU_MAX_FILES_BYTES": "150"}
    )  # fmt: skip
    ws = Workspace.from_settings(settings)
    assert ws.roots == ((tree / "other").resolve(), (tree / "root").resolve())
    assert ws.limits == FileLimits(3, 100, 150)
    assert ws.read(["docs/guide.md"])[0].path == "docs/guide.md"  # relative: against the first root


# -- what is refused, and why


@pytest.mark.parametrize("name", ["../outside/secret.txt", "src/../../outside/secret.txt", "../outside/nothing-here"])
def test_dot_dot_out_of_the_roots_is_refused_whether_or_not_the_target_exists(tree: Path, name: str) -> None:
    error = refused(workspace(tree), name)
    assert isinstance(error, OutsideWorkspace) and error.path == name
    assert "outside the workspace roots" in error.reason and str(tree / "root") in error.reason


@pytest.mark.parametrize("name", ["/etc/passwd", "/etc/no-such-file", "/"])
def test_absolute_paths_elsewhere_are_refused(tree: Path, name: str) -> None:
    error = refused(workspace(tree), name)
    assert isinstance(error, OutsideWorkspace) and error.path == name


def test_a_symlink_escaping_the_roots_is_refused(tree: Path) -> None:
    (tree / "root/escape.txt").symlink_to(tree / "outside/secret.txt")
    (tree / "root/escape-dir").symlink_to(tree / "outside", target_is_directory=True)
    (tree / "root/dangling").symlink_to(tree / "outside/not-there")
    for name in ("escape.txt", "escape-dir/secret.txt", "dangling"):
        error = refused(workspace(tree), name)
        assert isinstance(error, OutsideWorkspace) and error.path == name, name
        assert str(tree / "outside") in error.reason


def test_koubou_home_is_never_reachable_even_under_a_root(tree: Path) -> None:
    (tree / "root/db-link").symlink_to(tree / "root/.koubou/db/koubou.db")
    names = [".koubou/config/.env", ".koubou/db/koubou.db", str(tree / "root/.koubou/config/.env"), "db-link", ".koubou"]
    for name in names:
        error = refused(workspace(tree), name)
        assert isinstance(error, OutsideWorkspace) and "KOUBOU_HOME" in error.reason, name


def test_a_directory_is_refused(tree: Path) -> None:
    for name in ("src", str(tree / "root"), "."):
        error = refused(workspace(tree), name)
        assert isinstance(error, NotRegularFile) and "a directory" in error.reason, name


def test_a_fifo_is_refused_without_blocking(tree: Path) -> None:
    os.mkfifo(tree / "root/pipe")
    done: list[FileRefused] = []
    reader = threading.Thread(target=lambda: done.append(refused(workspace(tree), "pipe")), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # unblock the thread (a writer end releases a blocked open) before failing
        os.close(os.open(tree / "root/pipe", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert isinstance(done[0], NotRegularFile) and "a FIFO" in done[0].reason


def test_a_socket_is_refused(tree: Path) -> None:
    path = tree / "root/sock"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        error = refused(workspace(tree), "sock")
    assert isinstance(error, NotRegularFile) and "a socket" in error.reason


def test_devices_are_refused(tree: Path) -> None:
    assert isinstance(refused(workspace(tree), "/dev/null"), OutsideWorkspace)
    with_dev = Workspace((Path("/dev"),), tree / "home")
    error = refused(with_dev, "/dev/null")
    assert isinstance(error, NotRegularFile) and "a character device" in error.reason
    assert isinstance(refused(with_dev, "null"), NotRegularFile)  # relative to the first root, /dev


def test_missing_files_inside_the_roots_are_not_found(tree: Path) -> None:
    for name in ("src/nothing.py", "nowhere/at/all.txt", "src/a.py/under-a-file"):
        error = refused(workspace(tree), name)
        assert isinstance(error, FileMissing) and error.path == name and error.reason == "no such file", name


def test_one_file_over_the_size_limit_is_refused(tree: Path) -> None:
    (tree / "root/exact.txt").write_bytes(b"x" * 100)
    (tree / "root/big.txt").write_bytes(b"x" * 101)
    ws = workspace(tree, max_file_bytes=100)
    assert len(ws.read(["exact.txt"])[0].content) == 100
    error = refused(ws, "exact.txt", "big.txt")
    assert isinstance(error, FileTooLarge) and error.path == "big.txt" and "101 bytes" in error.reason


def test_files_over_the_total_are_refused_naming_the_one_that_crossed_it(tree: Path) -> None:
    for name in ("one", "two", "three"):
        (tree / f"root/{name}.txt").write_bytes(b"y" * 60)
    ws = workspace(tree, max_file_bytes=100, max_total_bytes=150)
    assert len(ws.read(["one.txt", "two.txt"])) == 2
    error = refused(ws, "one.txt", "two.txt", "three.txt")
    assert isinstance(error, FileTooLarge) and error.path == "three.txt" and "150 bytes in all" in error.reason


def test_too_many_files_are_refused_before_any_is_read(tree: Path) -> None:
    error = refused(workspace(tree, max_files=1), "src/a.py", "missing.txt")
    assert isinstance(error, TooManyFiles) and error.path is None and "KOUBOU_MAX_FILES" in error.reason
    assert isinstance(refused(workspace(tree, max_files=0), "src/a.py"), TooManyFiles)  # 0 turns files off


@pytest.mark.parametrize(
    ("data", "words"),
    [(b"\x7fELF\x02\x01\x01\x00\x00\x00", "binary"), (b"caf\xe9 latin-1\n", "not UTF-8"), (b"text\x00more", "binary")],
)
def test_binary_and_non_utf8_files_are_refused(tree: Path, data: bytes, words: str) -> None:
    (tree / "root/blob").write_bytes(data)
    error = refused(workspace(tree), "blob")
    assert isinstance(error, NotText) and error.path == "blob" and words in error.reason


def test_the_same_relative_path_under_two_roots_is_refused(tree: Path) -> None:
    (tree / "root/docs").mkdir()
    (tree / "root/docs/guide.md").write_text("another guide\n")
    error = refused(workspace(tree), "docs/guide.md", str(tree / "other/docs/guide.md"))
    assert error.path == str(tree / "other/docs/guide.md") and "'docs/guide.md'" in error.reason


@pytest.mark.parametrize("name", ["a\0b", "x" * 5000, "/" + "y" * 300 + "/z"])
def test_malformed_paths_are_refused_not_crashed_on(tree: Path, name: str) -> None:
    assert isinstance(refused(workspace(tree), name), FileRefused)


def test_a_directory_swapped_for_a_symlink_after_resolving_is_not_followed(tree: Path) -> None:
    ws = workspace(tree)
    real, root = ws.resolve("src/a.py")
    (tree / "root/src").rename(tree / "root/src-moved")
    (tree / "outside/a.py").write_text("not yours\n")
    (tree / "root/src").symlink_to(tree / "outside", target_is_directory=True)
    with pytest.raises(OutsideWorkspace) as caught:
        ws._read("src/a.py", real, root)
    assert "changed while it was being read" in caught.value.reason


def test_koubou_up_pins_the_roots_for_the_processes_it_starts(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree / "root")
    settings = load_settings(
        {"KOUBOU_HOME": str(tree / "home"), "KOUBOU_REDIS_PORT": str(free_port()), "OLLAMA_HOST": "http://127.0.0.1:9"}
    )
    services, env = plan_services(settings)
    assert env["KOUBOU_WORKSPACE_ROOTS"] == str((tree / "root").resolve())
    assert all(service.env["KOUBOU_WORKSPACE_ROOTS"] == env["KOUBOU_WORKSPACE_ROOTS"] for service in services)
    monkeypatch.chdir(tree / "outside")  # a child starting elsewhere still reads the same roots
    assert load_settings(env).workspace_roots == ((tree / "root").resolve(),)
