"""The quick start: no LLM server configured, so `koubou up` runs the real llama.cpp demo model."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from koubou.demo import DEMO_MODEL_NAME
from koubou.services import port_open
from tests.harness import System, make_system


@pytest.fixture(scope="module")
def demo_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    if port_open("127.0.0.1", 11434):
        pytest.skip("an Ollama answers at 127.0.0.1:11434, so koubou rightly uses it instead of the demo model")
    system = make_system(tmp_path_factory.mktemp("demo-home")).start(timeout=180)
    try:
        yield system
    finally:
        assert not system.stop()


def test_the_quick_start_answers_with_a_real_model(demo_system: System) -> None:
    assert "DEMO" in demo_system.output() and "demo-model" in demo_system.output()
    code, body = demo_system.delegate(prompt="Name one colour of the sky.", sync=True, options={"timeout": 120})
    assert code == 200, body
    assert body["status"] == "completed", body
    result = body["result"]
    assert result["success"] is True
    assert isinstance(result["output"], str) and result["output"].strip()
    assert result["model"] == DEMO_MODEL_NAME
    assert result["backend"].startswith("openai@")
    assert result["prompt_tokens"] > 0 and result["completion_tokens"] > 0
    row = demo_system.sql("SELECT status, result FROM task_master WHERE task_id = ?", body["task_id"])
    assert row and row[0]["status"] in ("completed", "in_progress", "pending")
    final = demo_system.wait_final(body["task_id"])
    assert final["result"]["output"] == result["output"]


def test_the_demo_model_gives_each_slot_8k_tokens_of_context(demo_system: System) -> None:
    # About 5k tokens of prompt: more than Codex's built-in prompt (~4.7k), which the code-tasks issue needs.
    code, body = demo_system.delegate(
        prompt="sky " * 5000 + "\nReply with one word.", sync=True, options={"timeout": 180, "max_tokens": 16}
    )
    assert code == 200 and body["status"] == "completed", body
    assert 4700 < body["result"]["prompt_tokens"] < 8192


def test_a_prompt_past_the_context_fails_saying_so(demo_system: System) -> None:
    code, body = demo_system.delegate(prompt="sky " * 12000, sync=True, options={"timeout": 180})
    assert code == 200 and body["status"] == "failed", body
    assert "context" in body["result"]["error"] and "8192" in body["result"]["error"]


def test_demo_home_layout(demo_system: System) -> None:
    home: Path = demo_system.home
    for sub in ("config", "db", "logs/agents", "logs/workers", "logs/system"):
        assert (home / sub).is_dir()
    assert (home / "redis" / "appendonlydir").exists()
