"""A code task's workspace: shipped files in, a git diff and the changed files out."""

from pathlib import Path

import pytest

from koubou.jobs import ShippedFile
from koubou.git_workspace import MAX_FILE_BYTES, BadPath, GitWorkspace, checked_path


@pytest.mark.parametrize(
    "path", ["", ".", "/etc/passwd", "../up.py", "a/../../b", "a//b", "./a", "a/", "a\\b", ".git/config", ".codex/config.toml", "x\0y"]
)
def test_paths_that_could_escape_or_take_koubous_places_are_refused(path: str) -> None:
    with pytest.raises(BadPath, match="file path"):
        checked_path(path)


@pytest.mark.parametrize("path", ["a.py", "src/pkg/mod.py", ".gitignore", "docs/.codex-notes.md", "ünï/çödé.txt"])
def test_plain_relative_paths_are_accepted(path: str) -> None:
    assert checked_path(path).as_posix() == path


def make(tmp_path: Path, *files: tuple[str, str]) -> GitWorkspace:
    shipped = tuple(ShippedFile(path=p, content=c) for p, c in files)
    return GitWorkspace.create(tmp_path / "ws", tmp_path / "home", shipped)


def test_untouched_files_give_an_empty_diff(tmp_path: Path) -> None:
    workspace = make(tmp_path, ("a.py", "x = 1\n"), ("pkg/b.py", "y = 2\n"))
    assert (tmp_path / "ws" / "pkg" / "b.py").read_text() == "y = 2\n"
    changes = workspace.changes()
    assert changes.diff == "" and changes.files == {} and changes.omitted == ()


def test_added_modified_deleted_and_ignored_files_all_show(tmp_path: Path) -> None:
    workspace = make(tmp_path, ("a.py", "x = 1\n"), ("gone.py", "z\n"), (".gitignore", "*.log\n"))
    root = tmp_path / "ws"
    (root / "a.py").write_text("x = 2\n")
    (root / "gone.py").unlink()
    (root / "new" / "c.py").parent.mkdir()
    (root / "new" / "c.py").write_text("c = 3\n")
    (root / "build.log").write_text("ignored by .gitignore, shown anyway\n")
    changes = workspace.changes()
    assert changes.files == {"a.py": "x = 2\n", "new/c.py": "c = 3\n", "build.log": "ignored by .gitignore, shown anyway\n"}
    assert "-x = 1\n+x = 2\n" in changes.diff and "deleted file mode" in changes.diff and "+++ b/new/c.py" in changes.diff


def test_binary_and_huge_files_are_in_the_diff_but_not_returned(tmp_path: Path) -> None:
    workspace = make(tmp_path)
    (tmp_path / "ws" / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "ws" / "huge.txt").write_text("a" * (MAX_FILE_BYTES + 1))
    changes = workspace.changes()
    assert changes.files == {} and set(changes.omitted) == {"blob.bin", "huge.txt"}
    assert "Binary files /dev/null and b/blob.bin differ" in changes.diff


def test_a_file_shipped_under_another_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadPath, match="under another shipped file"):
        make(tmp_path, ("a", "x"), ("a/b", "y"))


def test_the_users_git_configuration_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "user"
    home.mkdir()
    # A hook path that would fail every commit, and an identity that must not be used.
    (home / ".gitconfig").write_text("[core]\n\thooksPath = /nonexistent\n[user]\n\tname = Someone Else\n")
    monkeypatch.setenv("HOME", str(home))
    workspace = make(tmp_path, ("a.py", "x\n"))
    assert "Author: koubou <koubou@localhost>" in workspace._git("log", "--format=Author: %an <%ae>")


def test_a_huge_diff_is_cut_with_a_note(tmp_path: Path) -> None:
    from koubou.git_workspace import MAX_TOTAL_BYTES, _bounded

    small = "diff --git a/x b/x\n+1\n"
    assert _bounded(small) == small
    cut = _bounded("+" + "y" * (MAX_TOTAL_BYTES + 10))
    assert len(cut.encode()) < MAX_TOTAL_BYTES + 200 and "the diff was cut at" in cut
