"""Bearer-token auth against a real `koubou up`: tokens from the CLI, tasks owned, no token in any log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.fakes.llm_server import FakeLLMServer
from tests.harness import REPO, System, make_system


def call(method: str, url: str, token: str | None = None, body: Any = None) -> tuple[int, Any, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, payload, got = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as error:
        status, payload, got = error.code, error.read(), dict(error.headers)
    return status, json.loads(payload), got


def add_agent(system: System, name: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "koubou", "agent", "add", name], cwd=REPO, env=system.env,
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.splitlines()[-1]


def revoke_agent(system: System, name: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "koubou", "agent", "revoke", name], cwd=REPO, env=system.env,
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip


def test_tokens_on_a_running_system(tmp_path: Path, ollama_fake: FakeLLMServer) -> None:
    system = make_system(tmp_path / "home", OLLAMA_HOST=ollama_fake.url, KOUBOU_DEFAULT_MODEL="fake-model:1b")
    system.home.mkdir()
    token = add_agent(system, "claude")
    system.start()
    tokens = [token]
    try:
        delegate = f"{system.api}/task/delegate"
        code, body, headers = call("POST", delegate, body={"prompt": "hi", "sync": True})
        assert code == 401 and body["error"] == "unauthorized", body
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert call("POST", delegate, token="kb_wrong", body={"prompt": "hi"})[0] == 401

        code, body, _ = call("POST", delegate, token=token, body={"prompt": "auth round trip", "sync": True})
        assert code == 200 and body["status"] == "completed", body
        task_id = body["task_id"]
        code, status, _ = call("GET", f"{system.api}/task/{task_id}/status", token=token)
        assert code == 200 and status["status"] == "completed"
        assert call("GET", f"{system.api}/task/{task_id}/status")[0] == 401
        (agent,) = system.sql("SELECT agent_id FROM agents WHERE name = 'claude'")
        (row,) = system.sql("SELECT agent_id FROM task_master WHERE task_id = ?", task_id)
        assert row["agent_id"] == agent["agent_id"]

        assert call("GET", f"{system.api}/health")[1] == {"status": "ok"}
        assert "components" in call("GET", f"{system.api}/health", token=token)[1]

        # Each gunicorn process sees a new agent within its cache time, and a revocation at once.
        second = add_agent(system, "codex")
        tokens.append(second)
        deadline = time.monotonic() + 5
        while call("GET", f"{system.api}/task/{task_id}/status", token=second)[0] != 200:
            assert time.monotonic() < deadline, "a new agent's token was not accepted"
            time.sleep(0.2)
        revoke_agent(system, "claude")
        for _ in range(10):  # several requests, so both gunicorn processes answer some
            code, body, _ = call("GET", f"{system.api}/task/{task_id}/status", token=token)
            assert code == 401 and "revoked" in body["detail"]
        seen = system.sql("SELECT last_seen FROM agents WHERE name = 'claude'")[0]["last_seen"]
        assert seen is not None
    finally:
        survivors = system.stop()
    assert not survivors
    leaks = [
        str(path)
        for path in system.home.rglob("*")
        if path.is_file() and any(t.encode() in path.read_bytes() for t in tokens)
    ]
    assert not leaks, f"a token was written to {leaks}"
    assert (system.home / "logs" / "system" / "api.log").stat().st_size > 0
