"""Where the local Apache Kafka's jars are looked for when no folder is given."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.harness import local_kafka

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_jar_folder_is_the_checkouts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(local_kafka.LIBS_ENV, raising=False)
    fetched = ROOT / ".kafka" / "lib"
    expected = fetched if any(fetched.glob("kafka_2.13-*.jar")) else None
    assert local_kafka.kafka_libs() == expected
    # a folder given in the environment wins, and one without the broker's jar is not taken
    (tmp_path / "kafka_2.13-4.1.1.jar").write_bytes(b"")
    monkeypatch.setenv(local_kafka.LIBS_ENV, str(tmp_path))
    assert local_kafka.kafka_libs() == tmp_path
    monkeypatch.setenv(local_kafka.LIBS_ENV, str(tmp_path / "missing"))
    assert local_kafka.kafka_libs() is None
