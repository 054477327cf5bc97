"""Files named in a delegation, end to end: read by the API, shipped in the task, used by the model.

Its own system, started the way a user does it: `koubou up` run in a project directory (the default
workspace root) whose `.koubou` home lies inside it, against its own fake Ollama (a token per word;
like Ollama before its `truncate` field, it cuts a prompt over num_ctx to num_ctx and answers anyway).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from koubou.jobs import ShippedFile
from koubou.prompts import context_window, estimate_tokens, user_message
from tests.fakes.llm_server import FakeLLMServer, fake_answer, fake_prompt_tokens
from tests.harness import REPO, System, clean_env, http, make_system

MODEL = "fake-model:1b"
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(models=(MODEL,)) as server:
        yield server


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("files")
    (base / "project/src").mkdir(parents=True)
    (base / "project/src/app.py").write_text("def main():\n    return 'hello'\n")
    (base / "project/NOTES.md").write_text("# Notes\nThe app says hello.\n")
    (base / "secret.txt").write_text("not in the workspace\n")
    return base / "project"


@pytest.fixture(scope="module")
def system(project: Path, fake: FakeLLMServer) -> Iterator[System]:
    (project / ".koubou").mkdir()
    running = make_system(
        project / ".koubou", OLLAMA_HOST=fake.url, KOUBOU_DEFAULT_MODEL=MODEL, KOUBOU_WORKER_AUTOSCALE="1,1",
        PYTHONPATH=str(REPO),
    )  # fmt: skip
    running.cwd = project  # no KOUBOU_WORKSPACE_ROOTS: the root is where `koubou up` starts
    running.start()
    try:
        yield running
    finally:
        survivors = running.stop()
        assert not survivors, f"koubou up left processes behind: {survivors}"


def sent_for(fake: FakeLLMServer, needle: str) -> list[dict[str, Any]]:
    """Bodies of the chat calls whose user message contains `needle`."""
    return [body for _, _, body in fake.chat_requests() if body and needle in body["messages"][-1]["content"]]


def test_files_are_shipped_with_their_paths_and_the_model_gets_them(system: System, fake: FakeLLMServer, project: Path) -> None:
    prompt = "Does NOTES.md describe src/app.py? [shipped]"
    code, body = system.delegate(
        prompt=prompt, sync=True, files=["src/app.py", str(project / "NOTES.md"), "./src/app.py"], options={"timeout": 60}
    )
    assert code == 200 and body["status"] == "completed", body
    files = (
        ShippedFile(path="src/app.py", content=(project / "src/app.py").read_text()),
        ShippedFile(path="NOTES.md", content=(project / "NOTES.md").read_text()),
    )
    message = user_message(prompt, files)
    [sent] = sent_for(fake, "[shipped]")
    assert sent["messages"] == [{"role": "user", "content": message}]
    assert '<file path="src/app.py">\ndef main():' in message and message.endswith(prompt)
    assert sent["options"] == {"num_ctx": 8192} and sent["truncate"] is False
    assert body["result"]["output"] == fake_answer(MODEL, sent["messages"])
    # The task's row names each file with its size and digest; the text itself is not kept there.
    row = wait_row(system, body["task_id"])
    content = json.loads(row["content"])
    assert [f["path"] for f in content["files"]] == ["src/app.py", "NOTES.md"]
    assert "return 'hello'" not in row["content"]


def test_refused_paths_are_4xx_naming_the_path(system: System, project: Path) -> None:
    (project / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (project / "huge.log").write_text("x" * (1024 * 1024 + 1))
    os.mkfifo(project / "pipe")
    cases = [
        ("../secret.txt", 400, "file outside the workspace"),
        (str(project.parent / "secret.txt"), 400, "file outside the workspace"),
        ("/etc/passwd", 400, "file outside the workspace"),
        (".koubou/config/flower-auth", 400, "file outside the workspace"),  # a real credential koubou up made
        (".koubou/db/koubou.db", 400, "file outside the workspace"),
        ("src", 400, "not a regular file"),
        ("pipe", 400, "not a regular file"),
        ("image.png", 400, "not a text file"),
        ("src/missing.py", 404, "file not found"),
        ("huge.log", 413, "files too large"),
    ]
    for name, status, error in cases:
        started = time.monotonic()
        code, body = system.delegate(prompt="refuse me", files=[name])
        assert (code, body["error"], body["detail"]["path"]) == (status, error, name), body
        assert time.monotonic() - started < 10  # a FIFO must not hang the API
    code, body = system.delegate(prompt="too many", files=[f"f{i}.txt" for i in range(21)])
    assert code == 413 and body["error"] == "too many files" and "at most 20" in body["detail"]["reason"]
    code, tasks = http("GET", f"{system.api}/tasks?limit=200")
    assert code == 200 and not [t for t in tasks["tasks"] if t["status"] == "pending"]
    assert http("GET", f"{system.api}/health")[0] == 200


def test_a_big_file_gets_a_window_large_enough_and_succeeds(system: System, fake: FakeLLMServer, project: Path) -> None:
    text = "\n".join(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(12)) for i in range(1200))  # ~80 KB
    (project / "big.txt").write_text(text)
    prompt = "Summarise big.txt. [big]"
    code, body = system.delegate(prompt=prompt, sync=True, files=["big.txt"], options={"timeout": 120})
    assert code == 200 and body["status"] == "completed", body
    message = user_message(prompt, (ShippedFile(path="big.txt", content=text),))
    expected = context_window(estimate_tokens(message), None, 8192, 131072)
    [sent] = sent_for(fake, "[big]")
    assert sent["options"]["num_ctx"] == expected == 32768
    words = fake_prompt_tokens(sent["messages"])
    assert words > 8192  # the default window would have cut it
    assert body["result"]["prompt_tokens"] == words < expected


@pytest.mark.parametrize("explicit_num_ctx", [None, 1024], ids=["dense-text", "small-num_ctx"])
def test_a_truncated_task_fails_as_prompt_truncated(system: System, project: Path, explicit_num_ctx: int | None) -> None:
    # Dense text: one-letter words take more tokens than koubou's estimate allows for, so the
    # window it picks is too small; or the caller's own num_ctx is. Either way the server cuts the
    # prompt and answers, and the task must fail, not pass.
    (project / "dense.txt").write_text("a " * 20_000)
    options: dict[str, Any] = {"timeout": 60}
    if explicit_num_ctx is not None:
        options["num_ctx"] = explicit_num_ctx
    code, body = system.delegate(prompt="Count the letters.", sync=True, files=["dense.txt"], options=options)
    assert code == 200 and body["status"] == "failed", body
    result = body["result"]
    assert result["success"] is False and result["error_type"] == "PromptTruncated"
    num_ctx = explicit_num_ctx or 16384
    assert f"all of num_ctx {num_ctx}" in result["error"] and "fewer or smaller files" in result["error"]
    assert [a["error_type"] for a in result["attempts"]] == ["PromptTruncated"]
    assert system.wait_final(body["task_id"])["status"] == "failed"


def test_the_cli_sends_paths_relative_to_its_own_directory(system: System, fake: FakeLLMServer, project: Path) -> None:
    prompt = "Explain app.py [cli]"
    done = subprocess.run(
        [sys.executable, "-m", "koubou", "delegate", prompt, "--file", "app.py", "--wait"],
        env=clean_env(KOUBOU_API_URL=system.api, PYTHONPATH=str(REPO)), capture_output=True, text=True,
        timeout=120, cwd=project / "src",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    message = user_message(prompt, (ShippedFile(path="src/app.py", content=(project / "src/app.py").read_text()),))
    assert done.stdout == fake_answer(MODEL, [{"role": "user", "content": message}])


def wait_row(system: System, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = system.sql("SELECT * FROM task_master WHERE task_id = ? AND status = 'completed'", task_id)
        if rows:
            return dict(rows[0])
        time.sleep(0.1)
    raise AssertionError(f"{task_id} has no completed row after 30s")
