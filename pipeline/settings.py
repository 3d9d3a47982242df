"""Worker configuration: defaults, then a TOML file, then environment (PIPELINE_*), then flags.

One object so that every tier and every command reads its settings the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "PIPELINE_CONFIG"


class Settings(BaseSettings):
    """Settings shared by every worker. Environment variables are PIPELINE_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="PIPELINE_", extra="ignore")

    kafka: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    redis: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    instance: str = Field("1", description="Stable worker identity: static membership and transactional id")
    metrics_port: int = Field(0, description="Prometheus port (0 picks a free one, logged at start)")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoint binds")
    log_level: str = Field("info", description="debug, info, warning or error")
    max_poll_records: int = Field(20_000, description="Records per fetch batch")
    idle_backoff_ms: int = Field(100, description="Pause fetching this long when a fetch finds nothing")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get(CONFIG_ENV)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)


def load(config: str | None = None, **overrides: Any) -> Settings:
    """Settings from an optional TOML file, the environment and explicit overrides (flags win)."""
    if config:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config file {config} does not exist")
        os.environ[CONFIG_ENV] = config
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
