"""Settings: defaults < TOML file < environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.runtime import settings


def test_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text('kafka = "broker:9092"\ninstance = "from-file"\nmetrics_port = 9100\n')
    monkeypatch.delenv(settings.CONFIG_ENV, raising=False)
    monkeypatch.setenv("PIPELINE_INSTANCE", "from-env")
    loaded = settings.load(str(config))
    assert (loaded.kafka, loaded.instance, loaded.metrics_port) == ("broker:9092", "from-env", 9100)
    assert settings.load(str(config), instance="from-flag", kafka=None).instance == "from-flag"
    assert settings.load(str(config)).redis == "redis://127.0.0.1:6379/0"  # default


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        settings.load(str(tmp_path / "nope.toml"))


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "pipeline.toml"
    config.write_text('redis = "redis://cache:6379/2"\n')
    monkeypatch.setenv(settings.CONFIG_ENV, str(config))
    assert settings.load().redis == "redis://cache:6379/2"
