"""Code tasks run the real Codex CLI (npm @openai/codex, pinned) against the fake LLM server.

The fake speaks the Responses API; a prompt ending in `RUN: <command>` makes its first answer a call
of Codex's exec_command tool with that command (apply_patch runs through it as a heredoc), and its
second, after the tool's output, a message. First koubou's Codex runner on its own (files, diff,
sandbox, errors, timeout, offline), then code tasks through the HTTP API of a real system (result,
stream, failure, timeout and cancel killing every process, ~/.codex untouched).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from koubou.backends.base import (
    Backend,
    BackendBusy,
    BackendRejected,
    BackendTimeout,
    BackendUnavailable,
    PromptTooLong,
    ModelNotFound,
)
from koubou.backends.codex import (
    CODEX_VERSION,
    CONTEXT_VARIANT,
    CodexRunner,
    CodexSettingsError,
    CodexSetup,
    CodexUnavailable,
)
from koubou.backends.ollama import OllamaBackend
from koubou.backends.openai import OpenAIBackend
from koubou.delegation import Delegation, RetryPolicy
from koubou.demo import DEMO_MODEL_NAME
from koubou.jobs import DelegationFailed, DelegationJob, ShippedFile
from koubou.process_tree import children_map, descendants, start_time
from koubou.routing import Router
from koubou.services import port_open
from tests.codex_cli import NpmMissing, codex_cli
from tests.fakes.llm_server import EXEC_TOOL, FakeLLMServer, _responses_text, fake_answer, fake_tool_answer
from tests.harness import REPO, System, alive, cmdline, http, make_system
from tests.integration.test_pipeline import read_sse
from tests.tools import ToolUnavailable

pytestmark = pytest.mark.timeout(300)

MODEL = "fake-coder:1b"
NUM_CTX = 4096
KINDS = ("ollama", "openai")
FAST = RetryPolicy(max_retries=1, window=10.0, base_delay=0.01, max_delay=0.05)
GREET = "def greet(name):\n    return 'hi ' + name\n"
FILES = (ShippedFile(path="greet.py", content=GREET), ShippedFile(path="pkg/util.py", content="X = 1\n"))


def patch_command(body: str) -> str:
    return f"apply_patch <<'EOF'\n*** Begin Patch\n{body}*** End Patch\nEOF"


EDIT = patch_command(
    "*** Update File: greet.py\n@@\n-    return 'hi ' + name\n+    return 'hello ' + name\n"
    "*** Add File: notes/todo.md\n+- say hello\n"
    "*** Delete File: pkg/util.py\n"
)


@pytest.fixture(scope="module")
def codex_bin() -> Path:
    try:
        return codex_cli()
    except NpmMissing as missing:
        pytest.skip(f"the Codex CLI cannot be installed here: {missing}")
    except ToolUnavailable as error:
        pytest.fail(str(error))


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(models=(MODEL,)) as server:
        yield server


def setup_in(home: Path, binary: Path | str | None, **changes: Any) -> CodexSetup:
    fields: dict[str, Any] = {
        "binary": str(binary) if binary else None,
        "settings_file": home / "config" / "codex.toml",
        "run_dir": home / "run" / "codex",
        "allow_no_sandbox": False,
        "num_ctx": NUM_CTX,
        **changes,
    }
    return CodexSetup(**fields)


def backend_for(kind: str, fake: FakeLLMServer) -> Backend:
    return OllamaBackend(fake.url) if kind == "ollama" else OpenAIBackend(f"{fake.url}/v1", api_key="sk-test")


def served_name(kind: str) -> str:
    """The model Codex is told to use: for Ollama, koubou's variant with the code-task context."""
    return CONTEXT_VARIANT.format(model=MODEL, num_ctx=NUM_CTX) if kind == "ollama" else MODEL


def code_job(prompt: str, files: tuple[ShippedFile, ...] = FILES, timeout: float = 120) -> DelegationJob:
    return DelegationJob(task_id=f"task_test_{time.monotonic_ns()}", type="code", prompt=prompt, model=MODEL,
                         timeout=timeout, files=files)  # fmt: skip


# -- the runner against the fake ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_files_are_edited_and_the_diff_comes_back(
    kind: str, fake: FakeLLMServer, codex_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # koubou points Codex at the routed backend itself: an inherited value is never used.
    monkeypatch.setenv("CODEX_OSS_BASE_URL", "http://127.0.0.1:9/v1")
    pieces: list[str] = []
    runner = CodexRunner(setup_in(tmp_path, codex_bin))
    result = runner.run(backend_for(kind, fake), MODEL, code_job(f"Say hello.\nRUN: {EDIT}"), 120, on_delta=pieces.append)

    assert result.extra["changed_files"] == {"greet.py": GREET.replace("'hi '", "'hello '"), "notes/todo.md": "- say hello\n"}
    diff = str(result.extra["diff"])
    assert "--- a/greet.py\n+++ b/greet.py" in diff and "-    return 'hi ' + name\n+    return 'hello ' + name" in diff
    assert "+++ b/notes/todo.md" in diff and "deleted file mode" in diff and "--- a/pkg/util.py" in diff
    # The tool output Codex returned to the model ends with apply_patch's list of changes.
    assert result.output == fake_tool_answer(served_name(kind), "D pkg/util.py")
    assert result.model == MODEL

    calls = fake.responses_requests()
    assert len(calls) == 2 and all(body["model"] == served_name(kind) for _, _, body in calls)
    # Usage is what the server reported, summed over the turn's calls.
    assert result.prompt_tokens == sum(len(_responses_text(body).split()) for _, _, body in calls)
    assert result.completion_tokens is not None and result.completion_tokens > 0
    first = calls[0][2]
    # koubou's short prompt, with the shipped files listed, instead of Codex's ~4.7k-token one.
    instructions = next(i for i in first["input"] if i.get("role") == "developer")["content"][0]["text"]
    assert instructions.startswith("You are a coding agent.") and "- greet.py\n- pkg/util.py" in instructions
    assert EXEC_TOOL in {tool.get("name") for tool in first["tools"]}
    assert len(json.dumps(first)) < 12_000, "Codex's request grew: a prompt block koubou turns off came back?"
    streamed = "".join(pieces)
    assert "update greet.py\nadd notes/todo.md\ndelete pkg/util.py\n" in streamed and result.output in streamed
    if kind == "ollama":
        made = fake.created_models[served_name(kind)]
        assert made["from"] == MODEL and made["parameters"] == {"num_ctx": NUM_CTX}
    assert not any((tmp_path / "run" / "codex").iterdir()), "the run's directory was not removed"


@pytest.mark.parametrize("kind", KINDS)
def test_a_question_gets_the_models_answer_and_an_empty_diff(
    kind: str, fake: FakeLLMServer, codex_bin: Path, tmp_path: Path
) -> None:
    prompt = "What does greet.py return?"
    result = CodexRunner(setup_in(tmp_path, codex_bin)).run(backend_for(kind, fake), MODEL, code_job(prompt), 120)
    assert result.output == fake_answer(served_name(kind), [{"role": "user", "content": prompt}])
    assert result.extra["diff"] == "" and result.extra["changed_files"] == {}
    assert result.prompt_tokens and result.completion_tokens == len(result.output.split())


def test_the_users_home_is_never_read_or_written(
    fake: FakeLLMServer, codex_bin: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "user-home"
    (home / ".codex").mkdir(parents=True)
    # A user config that would break the run if Codex read it (an unknown key, under --strict-config).
    (home / ".codex" / "config.toml").write_text("this_key_does_not_exist = true\n")
    before = sorted(p.relative_to(home) for p in home.rglob("*"))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CODEX_HOME", str(home / ".codex"))
    result = CodexRunner(setup_in(tmp_path / "koubou", codex_bin)).run(
        backend_for("openai", fake), MODEL, code_job(f"RUN: {EDIT}"), 120
    )
    assert result.extra["changed_files"]
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == before


def test_the_sandbox_keeps_commands_inside_the_workspace(fake: FakeLLMServer, codex_bin: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    command = f"touch {outside}/escaped; echo rc=$?; touch /tmp/koubou-escaped-{os.getpid()}; echo tmp=$?; touch inside; echo in=$?"
    backend = backend_for("openai", fake)
    result = CodexRunner(setup_in(tmp_path, codex_bin)).run(backend, MODEL, code_job(f"RUN: {command}"), 120)
    output = json.dumps(fake.responses_requests()[-1][2]["input"])
    assert "rc=1" in output and "tmp=1" in output and "in=0" in output, output
    assert not (outside / "escaped").exists() and not Path(f"/tmp/koubou-escaped-{os.getpid()}").exists()
    assert result.extra["changed_files"] == {"inside": ""}

    # Only the operator's switch lifts the sandbox.
    unsafe = CodexRunner(setup_in(tmp_path / "unsafe", codex_bin, allow_no_sandbox=True))
    unsafe.run(backend, MODEL, code_job(f"RUN: touch {outside}/escaped; echo rc=$?"), 120)
    assert (outside / "escaped").exists()


def test_a_prompt_past_the_context_fails_naming_the_sizes(fake: FakeLLMServer, codex_bin: Path, tmp_path: Path) -> None:
    fake.set_context_limit(100)
    with pytest.raises(PromptTooLong) as caught:
        CodexRunner(setup_in(tmp_path, codex_bin)).run(backend_for("openai", fake), MODEL, code_job("hello"), 120)
    words = len(_responses_text(fake.responses_requests()[0][2]).split())
    assert f"({words} tokens" in str(caught.value) and "(100 tokens per request)" in str(caught.value)
    assert not caught.value.transient


@pytest.mark.parametrize(
    ("status", "error"), [(503, BackendBusy), (404, ModelNotFound), (400, BackendRejected)], ids=["busy", "not-found", "rejected"]
)
def test_backend_errors_become_koubous_error_types(
    status: int, error: type[Exception], fake: FakeLLMServer, codex_bin: Path, tmp_path: Path
) -> None:
    fake.fail_next(status)
    with pytest.raises(error) as caught:
        CodexRunner(setup_in(tmp_path, codex_bin)).run(backend_for("openai", fake), MODEL, code_job("hello"), 120)
    assert f"HTTP {status}" in str(caught.value) and fake.url in str(caught.value)
    assert len(fake.responses_requests()) == 1, "Codex retried by itself: koubou decides retries"


@pytest.mark.parametrize("kind", KINDS)
def test_an_unreachable_backend_is_a_transient_error(kind: str, codex_bin: Path, tmp_path: Path) -> None:
    fake = FakeLLMServer(models=(MODEL,)).start()
    backend = backend_for(kind, fake)
    fake.stop()
    setup = setup_in(tmp_path, codex_bin, num_ctx=0)  # no variant to make: reach Codex itself
    began = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        CodexRunner(setup).run(backend, MODEL, code_job("hello"), 120)
    assert caught.value.transient and time.monotonic() - began < 60


def test_a_mistyped_setting_in_codex_toml_is_named(fake: FakeLLMServer, codex_bin: Path, tmp_path: Path) -> None:
    settings = tmp_path / "config" / "codex.toml"
    settings.parent.mkdir(parents=True)
    settings.write_text('web_serch = "disabled"\n')
    with pytest.raises(CodexSettingsError) as caught:
        CodexRunner(setup_in(tmp_path, codex_bin)).run(backend_for("openai", fake), MODEL, code_job("hello"), 120)
    assert str(settings) in str(caught.value) and "web_serch" in str(caught.value)
    assert not caught.value.transient and fake.responses_requests() == []


def test_koubous_default_codex_toml_is_written_once_and_accepted(fake: FakeLLMServer, codex_bin: Path, tmp_path: Path) -> None:
    runner = CodexRunner(setup_in(tmp_path, codex_bin))
    runner.run(backend_for("openai", fake), MODEL, code_job("hello"), 120)
    settings = tmp_path / "config" / "codex.toml"
    assert "[sandbox_workspace_write]" in settings.read_text()
    settings.write_text(settings.read_text() + "\n# the operator's own line\n")
    runner.run(backend_for("openai", fake), MODEL, code_job("hello"), 120)
    assert settings.read_text().endswith("# the operator's own line\n")


def test_bad_file_paths_are_refused(fake: FakeLLMServer, codex_bin: Path, tmp_path: Path) -> None:
    runner = CodexRunner(setup_in(tmp_path, codex_bin))
    for path in ("../escape.py", "/etc/passwd", ".git/config", ".codex/config.toml"):
        with pytest.raises(BackendRejected, match="file path"):
            runner.run(backend_for("openai", fake), MODEL, code_job("hello", files=(ShippedFile(path=path, content="x"),)), 60)
    assert fake.responses_requests() == []


def test_a_timeout_kills_codex_and_every_process_it_started(fake: FakeLLMServer, codex_bin: Path, tmp_path: Path) -> None:
    runner = CodexRunner(setup_in(tmp_path, codex_bin))
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            runner.run(backend_for("openai", fake), MODEL, code_job("RUN: sleep 600"), 8)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    # Only what this run starts: a session-wide system (and its pool's new processes) may also be
    # running below this process, so follow this process's new direct children only.
    already = descendants(os.getpid())

    def started_here() -> set[int]:
        roots = set(children_map().get(os.getpid(), ())) - already
        return roots.union(*(descendants(root) for root in roots))

    thread = threading.Thread(target=run)
    thread.start()
    seen = watch_processes(started_here, until="sleep 600", thread=thread)
    thread.join(timeout=60)
    assert isinstance(outcome.get("error"), BackendTimeout), outcome
    assert "killed" in str(outcome["error"])
    assert_all_gone(seen)


@pytest.mark.parametrize("binary", [None, "/nonexistent/codex"], ids=["not-on-path", "bad-setting"])
def test_without_codex_a_code_task_fails_saying_how_to_install_it(
    binary: str | None, fake: FakeLLMServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no codex there
    job = code_job("hello")
    runner = CodexRunner(setup_in(tmp_path, binary))
    with pytest.raises(DelegationFailed) as caught:
        Delegation(job, Router([backend_for("openai", fake)]), FAST, codex=runner).run()
    outcome = caught.value.outcome
    assert outcome["error_type"] == CodexUnavailable.__name__ and len(outcome["attempts"]) == 1
    assert f"npm install -g @openai/codex@{CODEX_VERSION}" in outcome["error"] and "KOUBOU_CODEX_BIN" in outcome["error"]
    if binary:
        assert binary in outcome["error"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_code_task_runs_with_nothing_but_loopback(kind: str, codex_bin: Path, tmp_path: Path) -> None:
    """Local means local: in a network namespace with only `lo`, Codex finishes its task and looks up no name."""
    probe = [
        "unshare", "-n", "--", sys.executable, "-m", "tests.integration.isolated_code_task", "--offline",
        "--codex", str(codex_bin), "--home", str(tmp_path), "--kind", kind, "--prompt", f"Say hello.\nRUN: {EDIT}",
        "--files", json.dumps({f.path: f.content for f in FILES}),
    ]  # fmt: skip
    done = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["interfaces"] == ["lo"]
    assert "error" not in report, report
    assert report["output"].startswith("fake:") and "+    return 'hello ' + name" in report["diff"]
    assert report["backend_calls"] == 2
    assert report["dns_queries"] == [], f"Codex tried to phone home: {report['dns_queries']}"


def test_where_codexs_sandbox_cannot_work_the_task_fails_saying_why(codex_bin: Path, tmp_path: Path) -> None:
    """Without user namespaces (as in a default Docker container) bubblewrap cannot start: every command
    would fail inside the task while it "completes". koubou checks once per worker process and says so."""
    script = (
        "echo 0 > /proc/sys/user/max_user_namespaces && exec \"$0\" -m tests.integration.isolated_code_task "
        '--codex "$1" --home "$2" --kind openai --prompt "RUN: echo hello"'
    )
    probe = ["unshare", "--user", "--map-root-user", "--", "sh", "-c", script, sys.executable, str(codex_bin), str(tmp_path)]
    done = subprocess.run(probe, cwd=REPO, capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report.get("error", "").startswith("CodexUnavailable: Codex's sandbox does not work"), report
    assert "Creating new namespace failed" in report["error"] and "CODEX_UNSAFE_ALLOW_NO_SANDBOX=1" in report["error"]
    assert report["backend_calls"] == 0


# -- helpers: processes, by PID -----------------------------------------------------------------


def watch_processes(
    find: Any, until: str, thread: threading.Thread | None = None, timeout: float = 120
) -> dict[int, int]:
    """Every process `find()` returns (PID -> start time) until one runs `until`; fails if none does."""
    seen: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in find():
            started = start_time(pid)
            if started is not None:
                seen.setdefault(pid, started)
        if any(until in cmdline(pid) for pid in seen if alive(pid)):
            return seen
        if thread is not None and not thread.is_alive():
            break
        time.sleep(0.05)
    raise AssertionError(f"no process ran {until!r}; saw {[cmdline(p) for p in seen]}")


def assert_all_gone(seen: dict[int, int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    left = seen
    while time.monotonic() < deadline:
        left = {pid: started for pid, started in seen.items() if alive(pid) and start_time(pid) == started}
        if not left:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of the task outlived it: {[(pid, cmdline(pid)) for pid in left]}")


# -- through the HTTP API of a real system ------------------------------------------------------


@pytest.fixture(scope="module")
def code_fake() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(models=(MODEL,)) as server:
        yield server


@pytest.fixture(scope="module")
def code_system(tmp_path_factory: pytest.TempPathFactory, code_fake: FakeLLMServer, codex_bin: Path) -> Iterator[System]:
    user_home = tmp_path_factory.mktemp("user-home")
    project = tmp_path_factory.mktemp("project")
    for shipped in FILES:
        (project / shipped.path).parent.mkdir(parents=True, exist_ok=True)
        (project / shipped.path).write_text(shipped.content)
    running = make_system(
        tmp_path_factory.mktemp("koubou-home"),
        HOME=str(user_home),  # the worker's user: its ~/.codex must stay untouched
        OLLAMA_HOST=code_fake.url,
        KOUBOU_DEFAULT_MODEL=MODEL,
        KOUBOU_CODEX_BIN=str(codex_bin),
        KOUBOU_CODEX_NUM_CTX=str(NUM_CTX),
        KOUBOU_WORKSPACE_ROOTS=str(project),
        KOUBOU_WORKER_AUTOSCALE="2,2",
        KOUBOU_OLLAMA_SLOTS="2",
    ).start(timeout=180)
    try:
        yield running
    finally:
        assert not running.stop(), "koubou up left processes behind"
    written = [p.relative_to(user_home).as_posix() for p in user_home.rglob("*")]
    written = [path for path in written if "codex" in path.lower()]
    assert not written, f"Codex wrote in the user's HOME: {written}"


def task_processes(system: System, task_id: str) -> set[int]:
    """PIDs below `koubou up` that belong to the task: its Codex (named by the task's directory) and all below it."""
    assert system.process is not None
    roots = {pid for pid in descendants(system.process.pid) if task_id in cmdline(pid)}
    return roots.union(*(descendants(root) for root in roots))


def test_a_code_task_through_the_api_returns_the_message_the_diff_and_usage(
    code_system: System, code_fake: FakeLLMServer
) -> None:
    prompt = "Write hello.txt.\nRUN: " + patch_command("*** Add File: hello.txt\n+hello\n")
    code_fake.set_latency(1.5)  # time enough to watch the task's live stream
    try:
        code, body = code_system.delegate(type="code", prompt=prompt, options={"timeout": 150})
        assert code == 202, body
        events = read_sse(f"{code_system.api}/task/{body['task_id']}/stream")
    finally:
        code_fake.set_latency(0)
    # The live stream showed the work as it happened: the edit, then the final message.
    streamed = "".join(e["data"]["text"] for e in events if e["event"] == "delta")
    expected = fake_tool_answer(served_name("ollama"), "A hello.txt")
    assert "add hello.txt\n" in streamed and streamed.index("add hello.txt") < streamed.index(expected)
    assert events[-1]["event"] == "done" and events[-1]["data"]["status"] == "completed", events[-1]
    result = code_system.wait_final(body["task_id"])["result"]
    assert result == events[-1]["data"]["result"]
    assert result["success"] is True and result["model"] == MODEL and result["backend"].startswith("ollama@")
    assert result["output"] == expected
    assert result["changed_files"] == {"hello.txt": "hello\n"}
    assert "new file mode" in result["diff"] and "+++ b/hello.txt\n@@ -0,0 +1 @@\n+hello\n" in result["diff"]
    assert result["prompt_tokens"] > 0 and result["completion_tokens"] > 0


def test_a_backend_refusal_fails_the_code_task_clearly(code_system: System, code_fake: FakeLLMServer) -> None:
    code_fake.fail_next(400)
    code, body = code_system.delegate(type="code", prompt="Say hello.", sync=True, options={"timeout": 150})
    assert code == 200 and body["status"] == "failed", body
    result = body["result"]
    assert result["success"] is False and result["error_type"] == "BackendRejected"
    assert "rejected the request (HTTP 400)" in result["error"] and "fake failure" in result["error"]
    assert len(result["attempts"]) == 1


def test_a_timed_out_code_task_leaves_no_process_behind(code_system: System) -> None:
    code, body = code_system.delegate(type="code", prompt="RUN: sleep 600", options={"timeout": 20})
    assert code == 202, body
    task_id = body["task_id"]
    seen = watch_processes(lambda: task_processes(code_system, task_id), until="sleep 600")
    final = code_system.wait_final(task_id, timeout=120)
    assert final["status"] == "failed" and "timed out" in final["result"]["error"], final
    assert_all_gone(seen)


def test_a_cancelled_code_task_leaves_no_process_behind(code_system: System) -> None:
    code, body = code_system.delegate(type="code", prompt="RUN: sleep 600", options={"timeout": 200})
    assert code == 202, body
    task_id = body["task_id"]
    seen = watch_processes(lambda: task_processes(code_system, task_id), until="sleep 600")
    code, answer = http("DELETE", f"{code_system.api}/task/{task_id}")
    assert code in (200, 202), answer
    final = code_system.wait_final(task_id, timeout=60)
    assert final["status"] == "cancelled", final
    assert_all_gone(seen)


# -- end to end against the real llama.cpp demo model ------------------------------------------


@pytest.fixture(scope="module")
def demo_code_system(tmp_path_factory: pytest.TempPathFactory, codex_bin: Path) -> Iterator[System]:
    if port_open("127.0.0.1", 11434):
        pytest.skip("an Ollama answers at 127.0.0.1:11434, so koubou rightly uses it instead of the demo model")
    system = make_system(tmp_path_factory.mktemp("demo-code-home"), KOUBOU_CODEX_BIN=str(codex_bin)).start(timeout=240)
    try:
        yield system
    finally:
        assert not system.stop()


@pytest.mark.timeout(900)
def test_a_code_task_completes_against_the_real_demo_model(demo_code_system: System) -> None:
    """SmolLM2-135M cannot be trusted to edit files: this checks the contract, not the content."""
    code, body = demo_code_system.delegate(
        type="code", prompt="What does 2 + 2 make? Answer with one short sentence.", sync=True, options={"timeout": 600}
    )
    assert code == 200 and body["status"] == "completed", body
    result = body["result"]
    assert result["success"] is True and result["model"] == DEMO_MODEL_NAME and result["backend"].startswith("openai@")
    assert isinstance(result["output"], str) and result["output"].strip()
    assert result["prompt_tokens"] > 0 and result["completion_tokens"] > 0
    assert isinstance(result["diff"], str) and isinstance(result["changed_files"], dict)
    assert [a["ok"] for a in result["attempts"]][-1] is True


@pytest.mark.timeout(600)
def test_a_code_task_past_the_demo_models_context_fails_naming_the_sizes(demo_code_system: System) -> None:
    code, body = demo_code_system.delegate(type="code", prompt="sky " * 12000, sync=True, options={"timeout": 300})
    assert code == 200 and body["status"] == "failed", body
    result = body["result"]
    assert result["error_type"] == "PromptTooLong" and len(result["attempts"]) == 1
    assert "(8192 tokens per request)" in result["error"] and "does not fit the model's context" in result["error"]


def test_files_named_over_http_reach_codex_and_come_back_as_a_diff(code_system: System) -> None:
    """The API reads the named files on its machine; the worker's Codex edits them; the diff returns."""
    code, body = code_system.delegate(
        type="code", prompt=f"Say hello.\nRUN: {EDIT}", files=["greet.py", "pkg/util.py"], sync=True,
        options={"timeout": 120},
    )  # fmt: skip
    assert code == 200, body
    result = body["result"]
    assert body["status"] == "completed" and result["success"] is True, body
    assert "-    return 'hi ' + name\n+    return 'hello ' + name" in result["diff"]
    assert "deleted file mode" in result["diff"] and "pkg/util.py" in result["diff"]
    assert result["changed_files"]["greet.py"] == GREET.replace("'hi '", "'hello '")
    assert result["changed_files"]["notes/todo.md"] == "- say hello\n"
    # A path outside the project is refused before anything is queued.
    code, body = code_system.delegate(type="code", prompt="x", files=["../outside.py"])
    assert code == 400 and body["detail"]["path"] == "../outside.py", body


def test_a_code_task_cannot_read_the_workers_koubou_home(code_system: System) -> None:
    """The sandbox confines writes; koubou hides its home (credentials, database) from Codex's reads."""
    secret = code_system.home / "config" / "flower-auth"  # written by `koubou up`: Flower's login
    assert secret.is_file() and secret.read_text().strip()
    home = code_system.home
    command = f"cat {secret} {code_system.db_path} 2>&1 | tail -c 300; echo seen: $(ls -A {home}) $(ls {home}/run/codex | wc -l)"
    code, body = code_system.delegate(type="code", prompt=f"Read it.\nRUN: {command}", sync=True, options={"timeout": 120})
    assert code == 200 and body["status"] == "completed", body
    output = body["result"]["output"]
    # The fake answers with the command's last output line: in Codex's view the home holds only the
    # way to this task's own run directory, and no other task's.
    assert output.endswith("ran it: seen: run 1"), output
    assert secret.read_text().strip() not in json.dumps(body)
