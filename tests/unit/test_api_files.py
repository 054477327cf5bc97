"""`files` at the HTTP edge: each refusal a 4xx JSON error naming the path; the window sized at submit.

Every request here is refused before anything is queued (no broker runs in this test).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flask.testing import FlaskClient

from koubou.api.app import create_app
from koubou.api.operations import _num_ctx, _row_content
from koubou.api.schemas import DelegateRequest
from koubou.config import load_settings
from koubou.jobs import DelegationJob, ShippedFile
from koubou.prompts import estimate_tokens, user_message
from tests.harness import free_port


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("api-files")
    (base / "root/.koubou").mkdir(parents=True)
    (base / "root/small.txt").write_text("small\n")
    (base / "root/big.txt").write_text("word " * 300)  # 1500 bytes
    (base / "root/blob.bin").write_bytes(b"\x00\x01\x02")
    (base / "root/dir").mkdir()
    (base / "outside.txt").write_text("outside\n")
    (base / "root/escape").symlink_to(base / "outside.txt")
    return base / "root"


@pytest.fixture(scope="module")
def client(root: Path) -> FlaskClient:
    settings = load_settings(
        {"KOUBOU_HOME": str(root / ".koubou"), "KOUBOU_REDIS_PORT": str(free_port()), "KOUBOU_WORKSPACE_ROOTS": str(root),
         "KOUBOU_MAX_FILES": "2", "KOUBOU_MAX_FILE_BYTES": "1000", "KOUBOU_MAX_FILES_BYTES": "1200",
         "KOUBOU_NUM_CTX": "512", "KOUBOU_MAX_NUM_CTX": "512"}
    )  # fmt: skip
    return create_app(settings).test_client()


def delegate(client: FlaskClient, files: list[str], prompt: str = "Summarise.") -> tuple[int, dict[str, Any]]:
    response = client.post("/task/delegate", data=json.dumps({"prompt": prompt, "files": files}), content_type="application/json")
    assert response.is_json, response.get_data(as_text=True)
    return response.status_code, response.get_json()


@pytest.mark.parametrize(
    ("name", "status", "error", "reason"),
    [
        ("../outside.txt", 400, "file outside the workspace", "outside the workspace roots"),
        ("/etc/passwd", 400, "file outside the workspace", "outside the workspace roots"),
        ("escape", 400, "file outside the workspace", "outside the workspace roots"),
        (".koubou/config/.env", 400, "file outside the workspace", "KOUBOU_HOME"),
        ("dir", 400, "not a regular file", "a directory"),
        ("blob.bin", 400, "not a text file", "binary"),
        ("missing.txt", 404, "file not found", "no such file"),
        ("big.txt", 413, "files too large", "1500 bytes"),
    ],
)
def test_a_refused_file_is_a_4xx_naming_the_path(client: FlaskClient, name: str, status: int, error: str, reason: str) -> None:
    code, body = delegate(client, ["small.txt", name])
    assert code == status, body
    assert body["error"] == error
    assert body["detail"]["path"] == name and reason in body["detail"]["reason"]


def test_too_many_files_and_too_many_bytes_in_all_are_413(client: FlaskClient, root: Path) -> None:
    code, body = delegate(client, ["small.txt", "a.txt", "b.txt"])
    assert (code, body["error"]) == (413, "too many files") and "at most 2" in body["detail"]["reason"]
    (root / "nine-hundred.txt").write_text("x" * 900)
    (root / "four-hundred.txt").write_text("y" * 400)
    code, body = delegate(client, ["nine-hundred.txt", "four-hundred.txt"])
    assert (code, body["error"]) == (413, "files too large") and body["detail"]["path"] == "four-hundred.txt"


def test_a_prompt_too_large_for_the_maximum_window_is_413_with_the_sizes(client: FlaskClient, root: Path) -> None:
    (root / "wide.txt").write_text("z" * 990)  # about 330 tokens, plus the template's 256: over 512
    code, body = delegate(client, ["wide.txt"])
    assert code == 413 and body["error"] == "prompt too large for the context window"
    assert body["detail"]["max_num_ctx"] == 512 and body["detail"]["estimated_tokens"] > 330
    assert "KOUBOU_MAX_NUM_CTX" in body["detail"]["reason"]


def test_nothing_refused_was_recorded(client: FlaskClient) -> None:
    assert client.get("/tasks?limit=200").get_json()["tasks"] == []


def test_the_openapi_document_lists_the_file_errors(client: FlaskClient) -> None:
    operation = client.get("/openapi.json").get_json()["paths"]["/task/delegate"]["post"]
    assert {"400", "403", "404", "413"} <= set(operation["responses"])
    assert "KOUBOU_WORKSPACE_ROOTS" in json.dumps(client.get("/openapi.json").get_json()["components"])


def settings_ns(num_ctx: int = 8192, max_num_ctx: int = 131072) -> SimpleNamespace:
    return SimpleNamespace(settings=SimpleNamespace(num_ctx=num_ctx, max_num_ctx=max_num_ctx))


def test_the_window_is_the_default_or_sized_for_the_message_or_the_callers_own() -> None:
    small = DelegateRequest.model_validate({"prompt": "hi"})
    assert _num_ctx(settings_ns(), small, ()) == 8192  # type: ignore[arg-type]
    files = (ShippedFile(path="big.txt", content="abc " * 30_000),)  # 120,000 characters
    assert estimate_tokens(user_message("hi", files)) > 40_000
    assert _num_ctx(settings_ns(), small, files) == 65536  # type: ignore[arg-type]
    own = DelegateRequest.model_validate({"prompt": "hi", "options": {"num_ctx": 2048}})
    assert _num_ctx(settings_ns(), own, files) == 2048  # type: ignore[arg-type]  # the caller's choice stands


def test_the_row_keeps_each_files_path_size_and_digest_not_its_text() -> None:
    job = DelegationJob(task_id="t", prompt="p", model="m", files=(ShippedFile(path="a.txt", content="héllo"),))
    content = _row_content(job)
    assert content["files"] == [{"path": "a.txt", "bytes": 6, "sha256": hashlib.sha256("héllo".encode()).hexdigest()}]
    assert "héllo" not in json.dumps(content) and content["prompt"] == "p"


def test_a_code_task_cannot_ship_into_the_workspaces_git_or_codex_dirs(client: FlaskClient, root: Path) -> None:
    (root / ".codex").mkdir(exist_ok=True)
    (root / ".codex" / "notes.md").write_text("x\n")
    response = client.post("/task/delegate", data=json.dumps({"type": "code", "prompt": "Fix it.", "files": [".codex/notes.md"]}),
                           content_type="application/json")  # fmt: skip
    body = response.get_json()
    assert response.status_code == 400 and body["detail"]["path"] == ".codex/notes.md", body
    assert ".codex/" in body["detail"]["reason"]
