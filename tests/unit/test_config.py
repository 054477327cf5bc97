from pathlib import Path

import pytest

from koubou.config import ConfigError, load_settings
from koubou.constants import TaskType
from koubou.routing import build_router


def test_defaults_follow_the_seed(tmp_path: Path) -> None:
    settings = load_settings({"KOUBOU_HOME": str(tmp_path)})
    assert settings.api_host == "127.0.0.1" and settings.api_port == 8765
    assert settings.flower_port == 5555
    assert settings.broker == "redis://127.0.0.1:6380/0"
    assert settings.uses_embedded_broker
    assert settings.result_backend == settings.broker
    assert settings.database_url == f"sqlite:///{tmp_path.resolve()}/db/koubou.db"
    assert settings.ollama_host == "http://127.0.0.1:11434"
    assert settings.default_model == "gpt-oss:20b"
    assert not settings.any_backend_configured


def test_env_file_in_home_is_read_and_environment_wins(tmp_path: Path) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / ".env").write_text("OLLAMA_HOST=gpu-box:11434\nKOUBOU_API_PORT=9000\n")
    settings = load_settings({"KOUBOU_HOME": str(tmp_path), "KOUBOU_API_PORT": "9100"})
    assert settings.ollama_host == "http://gpu-box:11434"
    assert settings.ollama_configured
    assert settings.api_port == 9100


def test_broker_url_names_the_redis_to_use(tmp_path: Path) -> None:
    settings = load_settings({"KOUBOU_HOME": str(tmp_path), "KOUBOU_BROKER_URL": "redis://10.0.0.5:6390/2"})
    assert not settings.uses_embedded_broker
    assert settings.broker == settings.result_backend == "redis://10.0.0.5:6390/2"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KOUBOU_API_PORT", "http"),
        ("KOUBOU_API_PORT", "70000"),
        ("KOUBOU_BROKER_URL", "amqp://guest@localhost//"),
        ("OPENAI_API_BASE", "localhost:1234"),
        ("KOUBOU_WORKER_AUTOSCALE", "1,4"),
        ("KOUBOU_WORKER_TYPES", "gpu"),
        ("KOUBOU_WORKER_TYPES", " , "),
        ("KOUBOU_MAX_TASK_TIME", "0"),
    ],
)
def test_a_bad_value_fails_naming_the_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"KOUBOU_HOME": str(tmp_path), name: value})
    assert name in str(caught.value)


def test_worker_types_default_to_every_type_and_read_a_comma_list(tmp_path: Path) -> None:
    assert load_settings({"KOUBOU_HOME": str(tmp_path)}).worker_types == (TaskType.GENERAL, TaskType.CODE)
    only_code = load_settings({"KOUBOU_HOME": str(tmp_path), "KOUBOU_WORKER_TYPES": " code "})
    assert only_code.worker_types == (TaskType.CODE,)
    both = load_settings({"KOUBOU_HOME": str(tmp_path), "KOUBOU_WORKER_TYPES": "code,general,code"})
    assert both.worker_types == (TaskType.CODE, TaskType.GENERAL)


def test_home_layout_is_created(tmp_path: Path) -> None:
    home = load_settings({"KOUBOU_HOME": str(tmp_path / "h")}).ensure_home()
    for sub in ("config", "db", "logs/agents", "logs/workers", "logs/system"):
        assert (home / sub).is_dir()


def write_backends(home: Path, text: str) -> None:
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "backends.yaml").write_text(text)


def test_a_backends_file_defines_the_backends_and_their_slots(tmp_path: Path) -> None:
    write_backends(tmp_path, """
backends:
  - {name: gpu-box, kind: ollama, url: "http://10.0.0.7:11434", slots: 4}
  - {name: lmstudio, kind: openai, url: "http://10.0.0.8:1234/v1", slots: 2}
""")
    settings = load_settings({"KOUBOU_HOME": str(tmp_path)})
    router = build_router(settings)
    assert [(b.name, b.kind, router.slots_of(b)) for b in router.backends] == [
        ("gpu-box", "ollama", 4), ("lmstudio", "openai", 2)
    ]  # fmt: skip
    assert settings.any_backend_configured  # so the demo model never starts


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("backends:\n  - {kind: vllm, url: 'http://x:1'}\n", "kind"),
        ("backends:\n  - {kind: ollama, url: 'ftp://x'}\n", "url"),
        ("backends:\n  - {kind: ollama, url: 'http://x:1', slots: 0}\n", "slots"),
        ("backends: []\n", "backends"),
        ("backends: [\n", "YAML"),
    ],
)
def test_a_bad_backends_file_fails_naming_the_file_and_field(tmp_path: Path, text: str, named: str) -> None:
    write_backends(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        build_router(load_settings({"KOUBOU_HOME": str(tmp_path)}))
    assert "backends.yaml" in str(caught.value) and named in str(caught.value)


def test_two_backends_with_one_name_are_refused(tmp_path: Path) -> None:
    write_backends(tmp_path, "backends:\n  - {name: a, kind: ollama, url: 'http://x:1'}\n"
                             "  - {name: a, kind: openai, url: 'http://y:2/v1'}\n")  # fmt: skip
    with pytest.raises(ConfigError, match="two backends"):
        build_router(load_settings({"KOUBOU_HOME": str(tmp_path)}))
