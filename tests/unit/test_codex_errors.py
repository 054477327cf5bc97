"""Codex 0.169's failure messages (as measured) become koubou's BackendError types, with honest transient flags."""

from pathlib import Path

import pytest

from koubou.backends.base import (
    BackendBusy,
    BackendError,
    BackendRejected,
    BackendServerError,
    BackendUnavailable,
    PromptTooLong,
    ModelNotFound,
)
from koubou.backends.codex import CodexSettingsError, CodexTurnFailed, classify

WHERE = "ollama at http://127.0.0.1:11434"
SETTINGS = Path("/srv/koubou/config/codex.toml")

MEASURED = [
    # (what Codex printed, the type, transient)
    ("No running Ollama server detected. Start it with: `ollama serve`", BackendUnavailable, True),
    ("Connection failed: error sending request", BackendUnavailable, True),
    ("OSS setup failed: Ollama 0.12.0 is too old. Codex requires Ollama 0.13.4 or newer.", BackendRejected, False),
    ("unexpected status 503 Service Unavailable: Loading model, url: http://h/v1/responses", BackendBusy, True),
    ("exceeded retry limit, last status: 429 Too Many Requests", BackendBusy, True),
    ("unexpected status 404 Not Found: boom, url: http://h/v1/responses", ModelNotFound, False),
    ("unexpected status 401 Unauthorized: bad key, url: http://h/v1/responses", BackendRejected, False),
    ("We’re currently experiencing high demand, which may cause temporary errors.", BackendServerError, True),
    ("stream disconnected before completion: model crashed", BackendServerError, True),
    ('{"error": {"message": "bad tool schema", "type": "invalid_request_error", "param": null, "code": null}}', BackendRejected, False),
    ("the model produced something Codex could not use", CodexTurnFailed, False),
]


@pytest.mark.parametrize(("message", "kind", "transient"), MEASURED)
def test_measured_messages(message: str, kind: type[BackendError], transient: bool) -> None:
    error = classify(message, WHERE, "m", SETTINGS)
    assert type(error) is kind and error.transient is transient
    assert WHERE in str(error) or kind is CodexSettingsError


def test_llama_cpp_context_refusal_names_both_sizes() -> None:
    body = ('{"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it", '
            '"type": "exceed_context_size_error", "n_prompt_tokens": 9000, "n_ctx": 8192}}')  # fmt: skip
    error = classify(body, WHERE, "m", SETTINGS)
    assert isinstance(error, PromptTooLong) and not error.transient
    assert "(9000 tokens" in str(error) and "(8192 tokens per request)" in str(error)


def test_vllm_context_refusal_names_both_sizes() -> None:
    message = ("unexpected status 400 Bad Request: This model's maximum context length is 4096 tokens. However, you "
               "requested 5000 tokens in the messages, url: http://h/v1/responses")  # fmt: skip
    error = classify(message, WHERE, "m", SETTINGS)
    assert isinstance(error, PromptTooLong) and "(5000 tokens" in str(error) and "(4096 tokens" in str(error)


def test_a_settings_error_names_koubous_file_not_the_runs_copy() -> None:
    message = ("Error loading config.toml:\n/srv/koubou/run/codex/task_x/codex-home/config.toml:1:1: "
               "unknown configuration field `web_serch`")  # fmt: skip
    error = classify(message, WHERE, "m", SETTINGS)
    assert isinstance(error, CodexSettingsError) and not error.transient
    assert str(SETTINGS) in str(error) and "codex-home" not in str(error) and "web_serch" in str(error)
