"""The one settings object: environment variables and `$KOUBOU_HOME/config/.env`."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from functools import lru_cache
from pathlib import Path
from collections.abc import Callable, Mapping
from urllib.parse import quote, urlsplit
from typing import Annotated, Literal

from dotenv import dotenv_values
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .constants import TaskType

Port = Annotated[int, Field(ge=1, le=65535)]

HOME_SUBDIRS = ("config", "db", "logs/agents", "logs/workers", "logs/system", "redis", "run")
OLLAMA_DEFAULT_HOST = "http://127.0.0.1:11434"
MIB = 1024 * 1024
#: The most files one task may name, whatever KOUBOU_MAX_FILES says (the request model's bound).
MAX_FILES_CAP = 1000
#: Context windows koubou may send (Ollama's num_ctx), whatever the settings say.
MIN_NUM_CTX, MAX_NUM_CTX_CAP = 256, 1_048_576


class ConfigError(Exception):
    """A setting has a bad value; the message names the variable."""


class BackendEntry(BaseModel):
    """One LLM server in `$KOUBOU_HOME/config/backends.yaml`."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=100)
    kind: Literal["ollama", "openai"]
    url: str = Field(pattern=r"^https?://")
    slots: int = Field(1, ge=1, le=1024, description="Requests it serves at once.")
    api_key: str | None = None


class BackendsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backends: list[BackendEntry] = Field(min_length=1)


class Settings(BaseSettings):
    """koubou's configuration. Every field is read from the variable named in its alias."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=True)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource, *_: object, **__: object
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings() merges the environment and the .env file itself, so that the
        # file's location can depend on KOUBOU_HOME and tests can pass an environment.
        return (init_settings,)

    home: Path = Field(Path(".koubou"), validation_alias="KOUBOU_HOME")
    broker_url: str | None = Field(None, validation_alias="KOUBOU_BROKER_URL")
    result_backend_url: str | None = Field(None, validation_alias="KOUBOU_RESULT_BACKEND")
    database_url_setting: str | None = Field(None, validation_alias="KOUBOU_DATABASE_URL")
    api_host: str = Field("127.0.0.1", validation_alias="KOUBOU_API_HOST")
    api_port: Port = Field(8765, validation_alias="KOUBOU_API_PORT")
    api_threads: int = Field(128, ge=1, le=4096, validation_alias="KOUBOU_API_THREADS")
    flower_port: Port = Field(5555, validation_alias="KOUBOU_FLOWER_PORT")
    flower_auth_setting: str | None = Field(None, validation_alias="KOUBOU_FLOWER_AUTH")
    redis_port: Port = Field(6380, validation_alias="KOUBOU_REDIS_PORT")
    # The embedded broker listens beyond loopback only when told to, and then with a password.
    redis_bind: str = Field("127.0.0.1", min_length=1, validation_alias="KOUBOU_REDIS_BIND")
    redis_password_setting: str | None = Field(None, min_length=8, validation_alias="KOUBOU_REDIS_PASSWORD")
    ollama_host: str = Field(OLLAMA_DEFAULT_HOST, validation_alias="OLLAMA_HOST")
    openai_api_base: str | None = Field(None, validation_alias="OPENAI_API_BASE")
    openai_api_key: str | None = Field(None, validation_alias="OPENAI_API_KEY")
    # How many requests each backend serves at once (its parallel capacity), enforced cluster-wide.
    ollama_slots_setting: int | None = Field(None, ge=1, le=1024, validation_alias="KOUBOU_OLLAMA_SLOTS")
    ollama_num_parallel: int | None = Field(None, ge=1, le=1024, validation_alias="OLLAMA_NUM_PARALLEL")
    openai_slots: int = Field(4, ge=1, le=1024, validation_alias="KOUBOU_OPENAI_SLOTS")
    default_model: str = Field("gpt-oss:20b", min_length=1, validation_alias="KOUBOU_DEFAULT_MODEL")
    worker_id: str | None = Field(None, validation_alias="WORKER_ID")
    worker_autoscale: str = Field("4,1", validation_alias="KOUBOU_WORKER_AUTOSCALE")
    # The task types a worker serves, so the queues it reads: e.g. `code` only on the box that can run them.
    worker_types: tuple[TaskType, ...] = Field(tuple(TaskType), validation_alias="KOUBOU_WORKER_TYPES")
    max_task_time: int = Field(600, ge=1, le=86400, validation_alias="KOUBOU_MAX_TASK_TIME")
    priority_ageing: float = Field(120.0, gt=0, le=86400, validation_alias="KOUBOU_PRIORITY_AGEING")
    retry_max: int = Field(3, ge=0, le=20, validation_alias="KOUBOU_RETRY_MAX")
    retry_window: float = Field(60.0, ge=0, le=3600, validation_alias="KOUBOU_RETRY_WINDOW")
    retry_base_delay: float = Field(1.0, gt=0, le=60, validation_alias="KOUBOU_RETRY_BASE_DELAY")
    demo_model: bool = Field(True, validation_alias="KOUBOU_DEMO_MODEL")
    demo_port: Port = Field(8767, validation_alias="KOUBOU_DEMO_PORT")
    # Files a task names (read by the API, shipped with the task): where they may be, how many, how big.
    workspace_roots_setting: str | None = Field(None, validation_alias="KOUBOU_WORKSPACE_ROOTS")
    max_files: int = Field(20, ge=0, le=MAX_FILES_CAP, validation_alias="KOUBOU_MAX_FILES")
    max_file_bytes: int = Field(1 * MIB, ge=1, le=256 * MIB, validation_alias="KOUBOU_MAX_FILE_BYTES")
    max_files_bytes: int = Field(4 * MIB, ge=1, le=256 * MIB, validation_alias="KOUBOU_MAX_FILES_BYTES")
    # The context window sent to Ollama: one steady default (a change reloads the model), more
    # only when the prompt needs it, never more than the maximum.
    num_ctx: int = Field(8192, ge=MIN_NUM_CTX, le=MAX_NUM_CTX_CAP, validation_alias="KOUBOU_NUM_CTX")
    max_num_ctx: int = Field(131072, ge=MIN_NUM_CTX, le=MAX_NUM_CTX_CAP, validation_alias="KOUBOU_MAX_NUM_CTX")
    # Clients of the API (CLI, Python client, MCP server):
    api_url_setting: str | None = Field(None, validation_alias="KOUBOU_API_URL")
    api_token: str | None = Field(None, validation_alias="KOUBOU_API_TOKEN")
    mcp_port: Port = Field(8766, validation_alias="KOUBOU_MCP_PORT")
    # Code tasks (the Codex CLI, koubou/backends/codex.py):
    codex_bin: str | None = Field(None, validation_alias="KOUBOU_CODEX_BIN")
    # The seed's switch: only the operator can let Codex run commands outside its sandbox.
    codex_unsafe_no_sandbox: bool = Field(False, validation_alias="CODEX_UNSAFE_ALLOW_NO_SANDBOX")
    # Ollama's OpenAI API cannot set num_ctx per request: koubou asks for a variant with this context.
    codex_num_ctx: int = Field(16384, ge=0, le=1_048_576, validation_alias="KOUBOU_CODEX_NUM_CTX")

    @field_validator("ollama_host")
    @classmethod
    def _ollama_url(cls, value: str) -> str:
        # Ollama itself accepts a bare `host:port` in OLLAMA_HOST.
        value = value.strip()
        if not value:
            raise ValueError("must not be empty")
        if "://" not in value:
            value = f"http://{value}"
        return value.rstrip("/")

    @field_validator("openai_api_base")
    @classmethod
    def _openai_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not re.match(r"^https?://", value.strip()):
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:1234/v1")
        return value.strip().rstrip("/")

    @field_validator("broker_url", "result_backend_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not re.match(r"^(redis|rediss|valkey|valkeys)://", value.strip()):
            raise ValueError("must be a redis:// or rediss:// URL")
        return value.strip()

    @field_validator("flower_auth_setting")
    @classmethod
    def _user_password(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[^:\s]+:\S+", value):
            raise ValueError("must be user:password")
        return value

    @field_validator("worker_autoscale")
    @classmethod
    def _autoscale(cls, value: str) -> str:
        match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", value)
        if not match or int(match[1]) < int(match[2]) or int(match[1]) < 1:
            raise ValueError("must be MAX,MIN with MAX >= MIN >= 0 and MAX >= 1, e.g. 4,1")
        return f"{int(match[1])},{int(match[2])}"

    @model_validator(mode="after")
    def _num_ctx_within_maximum(self) -> Settings:
        if self.num_ctx > self.max_num_ctx:
            raise ValueError(f"KOUBOU_NUM_CTX ({self.num_ctx}) must not exceed KOUBOU_MAX_NUM_CTX ({self.max_num_ctx})")
        return self

    @field_validator("worker_types", mode="before")
    @classmethod
    def _task_types(cls, value: object) -> object:
        # `general,code` in the environment; an unknown name is then refused by the enum.
        if isinstance(value, str):
            value = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
        if not value:
            raise ValueError(f"must name at least one task type of {', '.join(TaskType)}")
        return value

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def workspace_roots(self) -> tuple[Path, ...]:
        """Where task files may be read: KOUBOU_WORKSPACE_ROOTS (os.pathsep-separated, like PATH;
        relative entries against the current directory), else the current directory. Symlinks resolved."""
        entries = [e for e in (self.workspace_roots_setting or "").split(os.pathsep) if e.strip()]
        return tuple(dict.fromkeys(Path(e.strip()).expanduser().resolve() for e in entries or [os.getcwd()]))

    @property
    def api_url(self) -> str:
        """Where clients reach the API: KOUBOU_API_URL, else built from KOUBOU_API_HOST/PORT."""
        if self.api_url_setting:
            return self.api_url_setting.rstrip("/")
        host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::", "") else self.api_host
        return f"http://{host}:{self.api_port}"

    @property
    def flower_auth_file(self) -> Path:
        return self.home_dir / "config" / "flower-auth"

    def flower_auth(self) -> str:
        """Flower's `user:password`: KOUBOU_FLOWER_AUTH, else one generated once and kept (mode 600)."""
        if self.flower_auth_setting:
            return self.flower_auth_setting
        return _stored_secret(self.flower_auth_file, lambda: f"koubou:{secrets.token_urlsafe(18)}")

    @property
    def redis_password_file(self) -> Path:
        return self.home_dir / "config" / "redis-password"

    @property
    def redis_bind_is_loopback(self) -> bool:
        return all(_is_loopback(host) for host in self.redis_bind.split())

    def embedded_broker_password(self) -> str | None:
        """KOUBOU_REDIS_PASSWORD; else, when the broker listens beyond loopback, one generated once."""
        if self.redis_password_setting:
            return self.redis_password_setting
        if self.redis_bind_is_loopback:
            return None
        return _stored_secret(self.redis_password_file, lambda: secrets.token_urlsafe(24))

    @property
    def uses_embedded_broker(self) -> bool:
        """True when koubou must start its own broker (no KOUBOU_BROKER_URL)."""
        return self.broker_url is None

    @property
    def broker(self) -> str:
        if self.broker_url:
            return self.broker_url
        password = self.embedded_broker_password()
        auth = f":{quote(password, safe='')}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.redis_port}/0"

    @property
    def result_backend(self) -> str:
        return self.result_backend_url or self.broker

    @property
    def database_url(self) -> str:
        return self.database_url_setting or f"sqlite:///{self.home_dir / 'db' / 'koubou.db'}"

    @property
    def ollama_slots(self) -> int:
        """KOUBOU_OLLAMA_SLOTS, else Ollama's own OLLAMA_NUM_PARALLEL, else 1 (Ollama's default)."""
        return self.ollama_slots_setting or self.ollama_num_parallel or 1

    @property
    def codex_settings_file(self) -> Path:
        """Codex's own settings for code tasks (the seed's place)."""
        return self.home_dir / "config" / "codex.toml"

    @property
    def codex_run_dir(self) -> Path:
        """Where each code task gets its workspace and Codex home, removed when it ends."""
        return self.home_dir / "run" / "codex"

    @property
    def backends_file(self) -> Path:
        return self.home_dir / "config" / "backends.yaml"

    def configured_backends(self) -> list[BackendEntry] | None:
        """The backends file's entries, or None when there is no file (the environment decides)."""
        path = self.backends_file
        if not path.is_file():
            return None
        try:
            parsed = BackendsFile.model_validate(yaml.safe_load(path.read_text()) or {})
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        except ValidationError as error:
            raise ConfigError(f"{path}: " + _describe(error).removeprefix("invalid configuration: ")) from None
        return parsed.backends

    @property
    def ollama_configured(self) -> bool:
        return "ollama_host" in self.model_fields_set

    @property
    def any_backend_configured(self) -> bool:
        return self.ollama_configured or self.openai_api_base is not None or self.backends_file.is_file()

    @property
    def autoscale_bounds(self) -> tuple[int, int]:
        high, low = self.worker_autoscale.split(",")
        return int(high), int(low)

    def ensure_home(self) -> Path:
        """Create the seed's `$KOUBOU_HOME` layout (idempotent) and return its path."""
        for sub in HOME_SUBDIRS:
            (self.home_dir / sub).mkdir(parents=True, exist_ok=True)
        return self.home_dir


def _is_loopback(host: str) -> bool:
    if host in ("localhost", "-::1"):
        return True
    try:
        return ipaddress.ip_address(host.lstrip("-")).is_loopback
    except ValueError:
        return False


def _stored_secret(path: Path, make: Callable[[], str]) -> str:
    """A secret kept in a file only its owner can read, created on first use."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_text().strip()
        with os.fdopen(fd, "w") as handle:
            handle.write(make() + "\n")
    return path.read_text().strip()


def redacted(url: str) -> str:
    """The URL with its password replaced by ***, for logs and messages."""
    parts = urlsplit(url)
    if parts.password:
        return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()
    return url


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        if not item["loc"]:  # a check across settings: its message names them
            lines.append(item["msg"].removeprefix("Value error, "))
            continue
        name = ".".join(str(part) for part in item["loc"])
        lines.append(f"{name}={item.get('input')!r}: {item['msg']}")
    return "invalid configuration: " + "; ".join(lines)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from `environ` (default: the process environment) over the home's .env."""
    env = dict(os.environ if environ is None else environ)
    env_file = Path(env.get("KOUBOU_HOME") or ".koubou").expanduser() / "config" / ".env"
    file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if env_file.is_file() else {}
    known = {field.validation_alias for field in Settings.model_fields.values()}
    values = {key: value for key, value in {**file_values, **env}.items() if key in known}
    try:
        return Settings(**values)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
