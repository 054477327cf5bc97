"""The client commands of `koubou` (delegate, wait, status, cancel, tasks, workers, backends) as a user runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakes.llm_server import FakeLLMServer, fake_answer
from tests.harness import REPO, System, clean_env, free_port
from tests.integration.conftest import SLOW_MODEL

TASK_ID = re.compile(r"^task_\d{8}_\d{6}_[A-Za-z0-9]{12}$")


def answer(model: str, prompt: str) -> str:
    return fake_answer(model, [{"role": "user", "content": prompt}])


def cli_env(api: str) -> dict[str, str]:
    return clean_env(KOUBOU_API_URL=api, PYTHONPATH=str(REPO))


def koubou(system: System | str, *args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    api = system if isinstance(system, str) else system.api
    return subprocess.run(
        [sys.executable, "-m", "koubou", *args], env=cli_env(api), input=stdin, capture_output=True, text=True,
        timeout=60, cwd=cwd or REPO / "tests",
    )  # fmt: skip


def test_delegate_wait_prints_exactly_the_answer(system: System) -> None:
    prompt = "Say hello in one sentence."
    done = koubou(system, "delegate", prompt, "--wait")
    assert done.returncode == 0, done.stderr
    assert done.stdout == answer("fake-model:1b", prompt)
    task_id = re.search(r"task (task_\S+) delegated", done.stderr)
    assert task_id, done.stderr
    # It followed the live stream, not a status poll.
    log = (system.home / "logs" / "system" / "api.log").read_text(errors="replace")
    assert f"GET /task/{task_id[1]}/stream" in log


def test_prompt_from_stdin_and_json(system: System) -> None:
    prompt = "from\nstandard input"
    done = koubou(system, "delegate", "-", "--wait", "--json", "--priority", "9", stdin=prompt)
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout)
    assert final["status"] == "completed" and final["result"]["output"] == answer("fake-model:1b", prompt)


def test_the_answer_streams_while_it_is_generated(system: System, openai_fake: FakeLLMServer) -> None:
    prompt = "one two three four five six seven eight nine ten"
    openai_fake.set_latency(2.0)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "koubou", "delegate", prompt, "--model", SLOW_MODEL, "--wait"],
            env=cli_env(system.api), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO / "tests",
        )  # fmt: skip
        assert process.stdout is not None
        first = os.read(process.stdout.fileno(), 1 << 16)
        first_at = time.monotonic()
        rest, err = process.communicate(timeout=60)
        ended_at = time.monotonic()
    finally:
        openai_fake.set_latency(0)
    assert process.returncode == 0, err
    assert (first + rest).decode() == answer(SLOW_MODEL, prompt)
    assert first and ended_at - first_at > 0.5, "the first words came only at the end"


def test_a_missing_model_exits_1_with_the_error(system: System) -> None:
    done = koubou(system, "delegate", "hello", "--model", "absent:1b", "--wait")
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    assert "failed" in done.stderr and "absent:1b" in done.stderr


def test_delegate_then_wait_status_tasks_and_cancel(system: System) -> None:
    prompt = "queued for later"
    delegated = koubou(system, "delegate", prompt)
    assert delegated.returncode == 0, delegated.stderr
    task_id = delegated.stdout.strip()
    assert TASK_ID.match(task_id), delegated.stdout

    waited = koubou(system, "wait", task_id, "--max-wait", "30")
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout == answer("fake-model:1b", prompt)

    status = koubou(system, "status", task_id, "--json")
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert body["status"] == "completed" and body["progress"]["tokens"] >= 1
    shown = koubou(system, "status", task_id)
    assert shown.returncode == 0 and "completed" in shown.stdout and body["result"]["output"] in shown.stdout

    tasks = koubou(system, "tasks", "--status", "completed", "--limit", "50", "--json")
    assert tasks.returncode == 0, tasks.stderr
    assert task_id in [t["task_id"] for t in json.loads(tasks.stdout)]
    assert task_id in koubou(system, "tasks", "--limit", "50").stdout

    cancelled = koubou(system, "cancel", task_id)
    assert cancelled.returncode != 0
    assert cancelled.stderr.strip().splitlines() == [f"koubou: task {task_id} is already completed: nothing to cancel"]


def test_workers_and_backends(system: System) -> None:
    workers = koubou(system, "workers", "--json")
    assert workers.returncode == 0, workers.stderr
    assert any(w["status"] != "offline" for w in json.loads(workers.stdout))
    backends = koubou(system, "backends", "--json")
    assert backends.returncode == 0, backends.stderr
    models = {m for b in json.loads(backends.stdout) for m in b["models"]}
    assert {"fake-model:1b", SLOW_MODEL} <= models
    table = koubou(system, "backends")
    assert table.returncode == 0 and "fake-model:1b" in table.stdout


def test_ctrl_c_leaves_the_task_running_and_cancel_stops_it(system: System, openai_fake: FakeLLMServer) -> None:
    openai_fake.set_latency(20)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "koubou", "delegate", "a long one", "--model", SLOW_MODEL, "--wait"],
            env=cli_env(system.api), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO / "tests",
        )  # fmt: skip
        assert process.stderr is not None
        line = process.stderr.readline()
        task_id = re.search(r"task (task_\S+) delegated", line)
        assert task_id, line
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
        assert process.returncode == 130, err
        assert f"koubou wait {task_id[1]}" in err and "Traceback" not in err
        assert system.status(task_id[1])[1]["status"] in ("pending", "in_progress")
        cancelled = koubou(system, "cancel", task_id[1])
        assert cancelled.returncode == 0, cancelled.stderr
        assert cancelled.stdout.strip() in (f"task {task_id[1]} cancelled", f"task {task_id[1]} cancelling")
    finally:
        openai_fake.set_latency(0)
    assert system.wait_final(task_id[1], timeout=30)["status"] == "cancelled"


def test_a_file_outside_the_workspace_is_refused_with_the_apis_error(system: System, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"  # the system's workspace root is the repository, where it was started
    notes.write_text("some notes")
    done = koubou(system, "delegate", "summarise", "--file", str(notes))
    assert done.returncode == 4 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert "file outside the workspace" in done.stderr and f"path={notes}" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("status", "task_20200101_000000_nothere00000"),
        ("delegate", "   "),
        ("delegate", "hi", "--priority", "11"),
        ("delegate", "hi", "--file", "/no/such/file"),
        ("tasks", "--limit", "many"),
    ],
)
def test_bad_input_exits_4(system: System, args: tuple[str, ...]) -> None:
    done = koubou(system, *args)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_an_unreachable_api_exits_3_with_one_line() -> None:
    for args in (("workers",), ("delegate", "hi", "--wait"), ("wait", "task_20200101_000000_nothere00000")):
        done = koubou(f"http://127.0.0.1:{free_port()}", *args)
        assert done.returncode == 3, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot reach" in lines[0], done.stderr
