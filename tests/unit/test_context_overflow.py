"""A prompt that does not fit the context window never passes as a success.

Through the real clients against the fake server, which behaves as the servers do: Ollama (before
its `truncate` field) cuts the prompt to num_ctx tokens, reports prompt_eval_count = num_ctx and
answers; newer Ollama honours `truncate: false` with HTTP 400; llama.cpp's server answers HTTP 400
`exceed_context_size_error`. The fake counts a token per word.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from koubou.backends.base import ChatMessage, ChatRequest, PromptTooLong, PromptTruncated
from koubou.backends.ollama import OllamaBackend
from koubou.backends.openai import OpenAIBackend
from koubou.delegation import Delegation, RetryPolicy
from koubou.jobs import DelegationFailed, DelegationJob, ShippedFile
from koubou.prompts import user_message
from koubou.routing import Router
from tests.fakes.llm_server import OLLAMA_DEFAULT_NUM_CTX, FakeLLMServer, fake_answer

MODEL = "fake-model:1b"
FAST = RetryPolicy(max_retries=2, window=10.0, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(models=(MODEL,)) as fake:
        yield fake


def words(count: int) -> str:
    return " ".join(f"w{i}" for i in range(count))


def ask(text: str, num_ctx: int | None, estimate: int | None = None) -> ChatRequest:
    return ChatRequest(model=MODEL, messages=(ChatMessage("user", text),), num_ctx=num_ctx, prompt_tokens_estimate=estimate)


def last_body(server: FakeLLMServer) -> dict:
    return server.chat_requests()[-1][2]


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_ollama_cutting_the_prompt_to_num_ctx_raises_prompt_truncated(server: FakeLLMServer, streamed: bool) -> None:
    backend = OllamaBackend(server.url)
    with pytest.raises(PromptTruncated) as caught:
        backend.chat(ask(words(600), num_ctx=512, estimate=700), on_delta=(lambda _: None) if streamed else None)
    message = str(caught.value)
    assert "reported 512 prompt tokens, all of num_ctx 512" in message and "about 700 tokens" in message
    assert "fewer or smaller files" in message and "num_ctx" in message
    assert caught.value.transient is False
    assert last_body(server)["truncate"] is False and last_body(server)["options"] == {"num_ctx": 512}


def test_ollamas_default_window_applies_when_no_num_ctx_is_sent(server: FakeLLMServer) -> None:
    # Without a num_ctx koubou cannot tell a cut prompt from a whole one: the API always sends one.
    answer = OllamaBackend(server.url).chat(ask(words(OLLAMA_DEFAULT_NUM_CTX + 10), num_ctx=None))
    assert answer.prompt_tokens == OLLAMA_DEFAULT_NUM_CTX


def test_a_prompt_that_fits_passes_with_its_real_count(server: FakeLLMServer) -> None:
    answer = OllamaBackend(server.url).chat(ask(words(511), num_ctx=512), on_delta=lambda _: None)
    assert answer.prompt_tokens == 511 and answer.output == fake_answer(MODEL, [{"role": "user", "content": words(511)}])


def test_ollama_honouring_truncate_false_refuses_with_the_sizes(server: FakeLLMServer) -> None:
    server.honours_truncate = True
    for on_delta in (None, lambda _: None):
        with pytest.raises(PromptTooLong) as caught:
            OllamaBackend(server.url).chat(ask(words(600), num_ctx=512), on_delta=on_delta)
        assert "600 prompt tokens, context window 512" in str(caught.value)
        assert caught.value.transient is False


def test_llama_cpp_refusing_the_prompt_becomes_prompt_too_long_with_the_sizes(server: FakeLLMServer) -> None:
    server.openai_n_ctx = 256
    backend = OpenAIBackend(f"{server.url}/v1")
    for on_delta in (None, lambda _: None):
        with pytest.raises(PromptTooLong) as caught:
            backend.chat(ask(words(300), num_ctx=None), on_delta=on_delta)
        assert "300 prompt tokens, context window 256" in str(caught.value)
    assert backend.chat(ask(words(200), num_ctx=None)).prompt_tokens == 200


def job(**fields: object) -> DelegationJob:
    return DelegationJob(task_id="t", model=MODEL, timeout=10.0, **fields)  # type: ignore[arg-type]


def test_a_delegation_sends_its_files_and_the_prompt_in_one_user_message(server: FakeLLMServer) -> None:
    files = (ShippedFile(path="src/a.py", content="print('a')\n"), ShippedFile(path="b.md", content="bee"))
    outcome = Delegation(job(prompt="Explain src/a.py", files=files, num_ctx=8192), Router([OllamaBackend(server.url)]), FAST).run()
    body = last_body(server)
    assert body["messages"] == [{"role": "user", "content": user_message("Explain src/a.py", files)}]
    assert '<file path="src/a.py">\nprint(\'a\')\n</file>' in body["messages"][0]["content"]
    assert body["options"] == {"num_ctx": 8192}
    assert outcome.success and outcome.output == fake_answer(MODEL, body["messages"])


def test_a_truncated_delegation_fails_at_once_as_prompt_truncated(server: FakeLLMServer) -> None:
    files = (ShippedFile(path="big.txt", content=words(3000)),)
    run = Delegation(job(prompt="Summarise big.txt", files=files, num_ctx=1024), Router([OllamaBackend(server.url)]), FAST)
    with pytest.raises(DelegationFailed) as caught:
        run.run()
    outcome = caught.value.outcome
    assert outcome["success"] is False and outcome["error_type"] == "PromptTruncated"
    assert "all of num_ctx 1024" in outcome["error"]
    assert [a["error_type"] for a in outcome["attempts"]] == ["PromptTruncated"]
    assert len(server.chat_requests()) == 1  # not retried: the same prompt would be cut again
