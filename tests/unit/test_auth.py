"""Bearer-token auth of the API, and `koubou agent add|list|revoke`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from koubou.agents import AgentExists, add_agent, hash_token, list_agents, revoke_agent
from koubou.api import auth
from koubou.api.app import create_app
from koubou.config import load_settings
from koubou.db.models import AgentRow, TaskRow
from koubou.db.session import make_engine, make_session_factory
from tests.harness import REPO, clean_env, free_port

UNKNOWN_TASK = "/task/task_20250101_000000_nope/status"


@pytest.fixture(autouse=True)
def no_agent_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every request rereads "is there an active agent?", so tests need not wait out the cache.
    monkeypatch.setattr(auth, "ACTIVE_CACHE_SECONDS", 0.0)


def make(home: Path, **env: str) -> tuple[Flask, Any]:
    settings = load_settings({"KOUBOU_HOME": str(home), "KOUBOU_REDIS_PORT": str(free_port()), **env})
    app = create_app(settings)
    return app, make_session_factory(make_engine(settings.database_url))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_unauthorized(response: Any, *words: str) -> None:
    assert response.status_code == 401, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error", "detail"} and body["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for word in words:
        assert word in body["detail"]


def test_loopback_without_agents_is_open(tmp_path: Path) -> None:
    app, _ = make(tmp_path)
    client = app.test_client()
    assert client.get(UNKNOWN_TASK).status_code == 404
    # Bodies of every kind still get their own errors, not 401.
    assert client.post("/task/delegate", json={}).status_code == 400


def test_one_agent_turns_auth_on(tmp_path: Path) -> None:
    app, sessions = make(tmp_path)
    client = app.test_client()
    token = add_agent(sessions, "claude")
    assert len(token) >= 32

    assert_unauthorized(client.get(UNKNOWN_TASK), "Bearer")
    assert_unauthorized(client.get(UNKNOWN_TASK, headers=bearer(token + "x")), "unknown token")
    assert_unauthorized(client.get(UNKNOWN_TASK, headers={"Authorization": token}))  # no scheme
    assert_unauthorized(client.get(UNKNOWN_TASK, headers={"Authorization": f"Basic {token}"}))
    assert_unauthorized(client.post("/task/delegate", json={"prompt": "hi"}))
    assert_unauthorized(client.get("/no/such/path"))

    response = client.get(UNKNOWN_TASK, headers=bearer(token))
    assert response.status_code == 404 and response.get_json()["error"] == "task not found"
    assert client.get(UNKNOWN_TASK, headers={"Authorization": f"bearer   {token} "}).status_code == 404
    # Past auth, validation answers as before.
    assert client.post("/task/delegate", json={}, headers=bearer(token)).status_code == 400


def test_revoked_token_fails_at_once(tmp_path: Path) -> None:
    app, sessions = make(tmp_path)
    client = app.test_client()
    token = add_agent(sessions, "claude")
    other = add_agent(sessions, "codex")
    assert client.get(UNKNOWN_TASK, headers=bearer(token)).status_code == 404
    assert revoke_agent(sessions, "claude")
    assert_unauthorized(client.get(UNKNOWN_TASK, headers=bearer(token)), "revoked")
    assert client.get(UNKNOWN_TASK, headers=bearer(other)).status_code == 404
    # Revoking the last agent turns loopback auth off, but the revoked token itself still fails.
    assert revoke_agent(sessions, "codex")
    assert client.get(UNKNOWN_TASK).status_code == 404
    assert_unauthorized(client.get(UNKNOWN_TASK, headers=bearer(other)), "revoked")


def test_revocation_is_immediate_even_with_the_agent_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "ACTIVE_CACHE_SECONDS", 60.0)
    app, sessions = make(tmp_path)
    client = app.test_client()
    token = add_agent(sessions, "claude")
    add_agent(sessions, "codex")
    assert client.get(UNKNOWN_TASK, headers=bearer(token)).status_code == 404
    revoke_agent(sessions, "claude")
    assert_unauthorized(client.get(UNKNOWN_TASK, headers=bearer(token)), "revoked")


def test_new_agent_turns_auth_on_within_the_cache_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "ACTIVE_CACHE_SECONDS", 0.5)
    app, sessions = make(tmp_path)
    client = app.test_client()
    assert client.get(UNKNOWN_TASK).status_code == 404
    add_agent(sessions, "claude")
    time.sleep(0.6)
    assert_unauthorized(client.get(UNKNOWN_TASK))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::", "example.org"])
def test_non_loopback_bind_requires_a_token_even_without_agents(tmp_path: Path, host: str) -> None:
    app, sessions = make(tmp_path, KOUBOU_API_HOST=host)
    client = app.test_client()
    assert_unauthorized(client.get(UNKNOWN_TASK))
    token = add_agent(sessions, "claude")
    assert client.get(UNKNOWN_TASK, headers=bearer(token)).status_code == 404


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
        ("LOCALHOST", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("::", False),
        ("10.0.0.1", False), ("myhost", False), ("", False),
    ],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert auth.is_loopback(host) is loopback


def test_health_without_token_is_status_only(tmp_path: Path) -> None:
    app, sessions = make(tmp_path, KOUBOU_API_HOST="0.0.0.0")
    client = app.test_client()
    token = add_agent(sessions, "claude")
    for headers in ({}, bearer("wrong"), {"Authorization": "Basic x"}):
        response = client.get("/health", headers=headers)
        assert response.status_code == 503  # no broker here
        assert response.get_json() == {"status": "degraded"}
    full = client.get("/health", headers=bearer(token)).get_json()
    assert {"status", "components", "backends", "workers"} <= set(full)


def test_health_is_full_when_auth_is_off(tmp_path: Path) -> None:
    app, _ = make(tmp_path)
    body = app.test_client().get("/health").get_json()
    assert "components" in body


def test_openapi_stays_public(tmp_path: Path) -> None:
    app, sessions = make(tmp_path, KOUBOU_API_HOST="0.0.0.0")
    add_agent(sessions, "claude")
    client = app.test_client()
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/apidoc/openapi.json").status_code == 200


def test_task_records_its_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from koubou.celery import app as celery_app

    sent: list[str] = []
    monkeypatch.setattr(celery_app, "send_task", lambda name, **kw: sent.append(kw["task_id"]))
    app, sessions = make(tmp_path)
    token = add_agent(sessions, "claude")
    with sessions() as session:
        agent_id = session.scalar(select(AgentRow.agent_id).where(AgentRow.name == "claude"))
    response = app.test_client().post("/task/delegate", json={"prompt": "hi"}, headers=bearer(token))
    assert response.status_code == 202, response.get_data(as_text=True)
    with sessions() as session:
        assert session.execute(select(TaskRow.task_id, TaskRow.agent_id)).all() == [(sent[0], agent_id)]


def test_last_seen_written_once_a_minute(tmp_path: Path) -> None:
    app, sessions = make(tmp_path)
    token = add_agent(sessions, "claude")
    assert list_agents(sessions)[0].last_seen is None
    client = app.test_client()
    client.get(UNKNOWN_TASK, headers=bearer(token))
    first = list_agents(sessions)[0].last_seen
    assert first is not None
    time.sleep(0.01)
    client.get(UNKNOWN_TASK, headers=bearer(token))
    assert list_agents(sessions)[0].last_seen == first


def test_agents_api(tmp_path: Path) -> None:
    _, sessions = make(tmp_path)
    token = add_agent(sessions, "claude")
    assert token.startswith("kb_") and len(token) >= 32
    with pytest.raises(AgentExists):
        add_agent(sessions, "claude")
    with pytest.raises(AgentExists):
        add_agent(sessions, "bad name\n")
    with sessions() as session:
        row = session.scalars(select(AgentRow)).one()
    assert row.token_hash == hash_token(token) and token not in json.dumps(
        {c.name: str(getattr(row, c.name)) for c in AgentRow.__table__.columns}
    )
    assert not revoke_agent(sessions, "nobody")
    assert revoke_agent(sessions, "claude")
    assert not revoke_agent(sessions, "claude")
    again = add_agent(sessions, "claude")  # a revoked name may be reused
    assert again != token
    assert [(a.name, a.status) for a in list_agents(sessions)] == [("claude", "revoked"), ("claude", "active")]


def test_openapi_security_kwargs_work_with_spectree() -> None:
    from spectree import SpecTree

    spec = SpecTree("flask", title="t", version="1", path="apidoc", **auth.OPENAPI_SECURITY)
    app = Flask("t")
    spec.register(app)
    with app.app_context():
        document = spec.spec
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["security"] == [{"bearer": []}]


# -- the CLI -------------------------------------------------------------------------------------


def koubou(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "koubou", *args], cwd=REPO, env=clean_env(KOUBOU_HOME=str(home)),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_cli_add_list_revoke(tmp_path: Path) -> None:
    added = koubou(tmp_path, "agent", "add", "claude")
    assert added.returncode == 0, added.stderr
    token = added.stdout.rstrip("\n").splitlines()[-1]
    assert token == token.strip() and len(token) >= 32 and " " not in token

    db = tmp_path / "db" / "koubou.db"
    stored = b"".join(p.read_bytes() for p in db.parent.iterdir() if p.name.startswith("koubou.db"))
    assert token.encode() not in stored
    assert hash_token(token).encode() in stored

    listed = koubou(tmp_path, "agent", "list")
    assert listed.returncode == 0 and "claude\tactive" in listed.stdout
    assert token not in listed.stdout

    duplicate = koubou(tmp_path, "agent", "add", "claude")
    assert duplicate.returncode == 1 and "claude" in duplicate.stderr
    assert token not in duplicate.stdout + duplicate.stderr

    revoked = koubou(tmp_path, "agent", "revoke", "claude")
    assert revoked.returncode == 0, revoked.stderr
    assert "claude\trevoked" in koubou(tmp_path, "agent", "list").stdout
    assert koubou(tmp_path, "agent", "revoke", "claude").returncode == 1

    # The CLI's agent works against the API.
    settings = load_settings({"KOUBOU_HOME": str(tmp_path), "KOUBOU_REDIS_PORT": str(free_port())})
    client = create_app(settings).test_client()
    fresh = koubou(tmp_path, "agent", "add", "claude").stdout.splitlines()[-1]
    assert client.get(UNKNOWN_TASK, headers=bearer(fresh)).status_code == 404
    assert_unauthorized(client.get(UNKNOWN_TASK, headers=bearer(token)), "revoked")


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER\tabc", "abc"), ("Bearer", None),
        ("Bearer ", None), ("Bearer a b", None), ("Basic abc", None), ("abc", None), ("", None), (None, None),
    ],
)  # fmt: skip
def test_bearer_token_parsing(header: str | None, token: str | None) -> None:
    assert auth.bearer_token(header) == token


def test_database_down_keeps_the_last_answer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from koubou import agents

    app, sessions = make(tmp_path)
    token = add_agent(sessions, "claude")
    client = app.test_client()
    assert_unauthorized(client.get(UNKNOWN_TASK))

    def down(*_: Any) -> Any:
        raise RuntimeError("database down")

    monkeypatch.setattr(agents, "any_active", down)
    monkeypatch.setattr(agents, "find_token_owner", down)
    assert_unauthorized(client.get(UNKNOWN_TASK))  # auth stays on
    response = client.get(UNKNOWN_TASK, headers=bearer(token))
    assert response.status_code == 503 and set(response.get_json()) == {"error", "detail"}
    assert client.get("/health", headers=bearer(token)).get_json() == {"status": "degraded"}


def test_database_down_from_the_start_requires_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from koubou import agents

    app, _ = make(tmp_path)
    monkeypatch.setattr(agents, "any_active", lambda *_: (_ for _ in ()).throw(RuntimeError("down")))
    assert_unauthorized(app.test_client().get(UNKNOWN_TASK))
