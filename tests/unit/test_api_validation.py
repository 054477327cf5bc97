"""Bad input of every kind gets a 4xx JSON error; nothing reaches the broker."""

import json
from typing import Any

import pytest
from flask.testing import FlaskClient

from koubou.api.app import MAX_BODY_BYTES, create_app
from koubou.api.schemas import MAX_PROMPT_CHARS
from koubou.config import load_settings
from tests.harness import free_port


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> FlaskClient:
    home = tmp_path_factory.mktemp("home")
    # A port nothing listens on: a request that got past validation would fail loudly.
    settings = load_settings({"KOUBOU_HOME": str(home), "KOUBOU_REDIS_PORT": str(free_port())})
    return create_app(settings).test_client()


def post(client: FlaskClient, body: Any = None, raw: bytes | None = None, content_type: str = "application/json"):
    data = raw if raw is not None else json.dumps(body).encode()
    return client.post("/task/delegate", data=data, content_type=content_type)


def assert_error(response: Any, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error", "detail"}
    text = json.dumps(body)
    for word in words:
        assert word in text
    return body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   \n"}, "prompt"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "hi", "type": "poetry"}, "type"),
        ({"prompt": "hi", "priority": 0}, "priority"),
        ({"prompt": "hi", "priority": 11}, "priority"),
        ({"prompt": "hi", "priority": "5"}, "priority"),
        ({"prompt": "hi", "priority": 5.5}, "priority"),
        ({"prompt": "hi", "sync": "yes"}, "sync"),
        ({"prompt": "hi", "files": "a.py"}, "files"),
        ({"prompt": "hi", "files": [""]}, "files.0"),
        ({"prompt": "hi", "files": ["a.py", 7]}, "files.1"),
        ({"prompt": "hi", "files": ["a" * 4097]}, "files.0"),
        ({"prompt": "hi", "files": ["a.py"] * 1001}, "files"),
        ({"prompt": "hi", "options": {"timeout": -1}}, "options.timeout"),
        ({"prompt": "hi", "options": {"timeout": "soon"}}, "options.timeout"),
        ({"prompt": "hi", "options": {"model": ""}}, "options.model"),
        ({"prompt": "hi", "options": {"temperature": 9}}, "options.temperature"),
        ({"prompt": "hi", "options": {"colour": "red"}}, "options.colour"),
        ({"prompt": "hi", "options": []}, "options"),
        ({"prompt": "hi", "promt": "typo"}, "promt"),
    ],
)
def test_invalid_fields_are_named(client: FlaskClient, body: dict[str, Any], field: str) -> None:
    error = assert_error(post(client, body), 400, "invalid request")
    assert field in [item["field"] for item in error["detail"]]


@pytest.mark.parametrize("raw", [b"not json", b"{\"prompt\": ", b"[1, 2]", b"\"just a string\"", b"", b"null"])
def test_bodies_that_are_not_a_json_object(client: FlaskClient, raw: bytes) -> None:
    assert_error(post(client, raw=raw), 400)


def test_oversized_body_is_413_json(client: FlaskClient) -> None:
    raw = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 10)}).encode()
    assert_error(post(client, raw=raw), 413)


def test_unknown_task_is_404_json_on_both_paths(client: FlaskClient) -> None:
    for path in ("/task/task_20250101_000000_nope/status", "/task/status/task_20250101_000000_nope"):
        assert_error(client.get(path), 404, "task not found")


def test_unknown_route_and_wrong_method_are_json(client: FlaskClient) -> None:
    assert_error(client.get("/nope"), 404)
    assert_error(client.get("/task/delegate"), 405)


def test_openapi_is_generated_from_the_request_model(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    operation = spec["paths"]["/task/delegate"]["post"]
    schema_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = spec["components"]["schemas"][schema_ref.rsplit("/", 1)[1]]
    assert {"type", "prompt", "priority", "sync", "files", "options"} <= set(schema["properties"])
    assert schema["properties"]["priority"]["maximum"] == 10
    assert "/task/{task_id}/status" in spec["paths"] and "/health" in spec["paths"]


def test_a_prompt_over_the_limit_is_413(client: FlaskClient) -> None:
    assert_error(post(client, {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}), 413, "prompt too long")


@pytest.mark.parametrize("query", ["limit=0", "limit=201", "limit=many", "status=bogus", "colour=red"])
def test_bad_task_list_queries_are_400(client: FlaskClient, query: str) -> None:
    assert_error(client.get(f"/tasks?{query}"), 400, "invalid request")
