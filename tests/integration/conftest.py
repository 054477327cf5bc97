"""One real system for the pipeline tests: embedded broker, worker, mirror, API, Flower (`koubou up`)."""

from collections.abc import Iterator

import pytest

from tests.fakes.llm_server import FakeLLMServer
from tests.harness import System, make_system

FAST_MODELS = ("fake-model:1b", "llama3:latest")
SLOW_MODEL = "slow-model"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ollama_fake() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(models=FAST_MODELS) as server:
        yield server


@pytest.fixture(scope="session")
def openai_fake() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(models=(SLOW_MODEL,)) as server:
        yield server


@pytest.fixture(scope="session")
def system(
    tmp_path_factory: pytest.TempPathFactory, ollama_fake: FakeLLMServer, openai_fake: FakeLLMServer
) -> Iterator[System]:
    running = make_system(
        tmp_path_factory.mktemp("koubou-home"),
        OLLAMA_HOST=ollama_fake.url,
        OPENAI_API_BASE=f"{openai_fake.url}/v1",
        KOUBOU_DEFAULT_MODEL="fake-model:1b",
        # Two worker processes, fixed, so tests can fill the pool on purpose.
        KOUBOU_WORKER_AUTOSCALE="2,2",
        KOUBOU_RETRY_BASE_DELAY="0.2",
        KOUBOU_OLLAMA_SLOTS="2",
    ).start()
    try:
        yield running
    finally:
        survivors = running.stop()
        assert not survivors, f"koubou up left processes behind: {survivors}"
