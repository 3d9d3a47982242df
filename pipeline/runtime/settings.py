"""Worker configuration: defaults, then a TOML file, then environment (PIPELINE_*), then flags.

One object so that every tier and every command reads its settings the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
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
    kafka_security_protocol: str = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (managed Kafka: SASL_SSL)"
    )
    kafka_sasl_mechanism: str = Field("SCRAM-SHA-512", description="SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN")
    kafka_sasl_username: str = Field("", description="SASL user")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (never logged)")
    kafka_ssl_cafile: str = Field("", description="CA certificate (PEM) to trust; empty: the system's")
    kafka_ssl_certfile: str = Field("", description="Client certificate (PEM), for brokers that ask for one")
    kafka_ssl_keyfile: str = Field("", description="Client key (PEM)")
    redis: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL (rediss:// for TLS; a password here is never logged)",
    )
    redis_username: str = Field("", description="Redis ACL user (when the URL names none)")
    redis_password: SecretStr = Field(
        SecretStr(""), description="Redis password (when the URL has none; never logged)"
    )
    redis_ssl_cafile: str = Field("", description="CA certificate (PEM) to trust for rediss://")
    instance: str = Field("1", description="Stable worker identity: static membership and transactional id")
    metrics_port: int = Field(0, description="Prometheus port (0 picks a free one, logged at start)")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoint binds")
    log_level: str = Field("info", description="debug, info, warning or error")
    max_poll_records: int = Field(20_000, description="Records per fetch batch")
    max_partial_bytes: int = Field(
        900_000,
        description="Tier 1 splits a window's partial into messages of at most this size (a broker "
        "refuses messages over its max.message.bytes, about 1 MB by default)",
    )
    fetch_min_bytes: int = Field(
        64 * 1024,
        description="Tier 1 fetches wait (at most 100 ms) for this much data: fewer, larger fetches; "
        "a window is 250 ms anyway",
    )
    idle_backoff_ms: int = Field(100, description="Pause fetching this long when a fetch finds nothing")
    memory_trim_interval_s: float = Field(
        10.0, description="Return freed heap pages to the OS this often (glibc malloc_trim; 0: never)"
    )
    quarantine_after_s: float = Field(
        30.0,
        description="The root holds a batch its apply refuses (a key or a value it cannot take) and tries it "
        "again every 2 s; still refused after this long, the batch is quarantined and its partition waits "
        "for `pipeline replay-quarantine` (0: at the first refusal)",
    )
    leave_group_on_stop: bool = Field(
        True,
        description="A stopped worker leaves its consumer group, so its partitions move at once; "
        "false keeps them for a restart with the same identity (no rebalance on a rolling restart)",
    )

    # ingest gateway (tier "ingest") and the writers' hot-key splitting
    ingest_host: str = Field("127.0.0.1", description="Address the ingest gateway binds")
    ingest_port: int = Field(8080, description="HTTP port of the ingest gateway (0: any free port, logged)")
    ingest_api_keys: str = Field("", description="Comma-separated API keys accepted by the gateway")
    ingest_open: bool = Field(False, description="Serve without API keys (only when none are configured)")
    ingest_max_body_bytes: int = Field(1024 * 1024, description="Larger request bodies get 413")
    ingest_max_events: int = Field(10_000, description="More events in one request get 413")
    ingest_lag_shed: int = Field(50_000, description="Tier-1 lag (events) from which low classes are shed")
    ingest_lag_high: int = Field(200_000, description="Tier-1 lag (events) from which requests get 429")
    ingest_latency_high_ms: float = Field(2_000, description="Broker ack latency that throttles (0: off)")
    ingest_lag_interval_ms: int = Field(1_000, description="How often the gateway samples tier-1 lag")
    ingest_ack_timeout_ms: int = Field(5_000, description="No broker ack within this: 503")
    ingest_cors_origins: str = Field("", description="Comma-separated browser origins allowed (CORS); *: any")
    split_threshold_eps: float = Field(1_000, description="A key seen this often (events/s) is split")
    split_budget_eps: float = Field(1_000, description="Events/s per sub-key: k = ceil(rate / budget)")
    split_max_k: int = Field(64, description="Most sub-keys per key (also capped by the partition count)")
    split_cooldown_s: float = Field(10, description="A cooled key stays split this long before rejoining")
    split_static_k: int = Field(0, description="Static mode: split every key this many ways (0: off)")

    # broadcast nodes (tier "broadcast"): viewers over WebSocket and SSE (docs/BROADCAST.md)
    broadcast_host: str = Field("127.0.0.1", description="Address a broadcast node binds")
    broadcast_port: int = Field(8765, description="HTTP port of a broadcast node (0: any free port, logged)")
    broadcast_public_url: str = Field(
        "", description="URL viewers reach this node at (default http://host:port)"
    )
    broadcast_secret: SecretStr = Field(SecretStr(""), description="HMAC secret of viewer tokens (required)")
    broadcast_push_rate: float = Field(4.0, description="Pushes per second per viewer and channel, at most")
    broadcast_max_blocked_s: float = Field(5.0, description="A viewer blocked this long is disconnected")
    broadcast_max_lag_bytes: int = Field(
        64 * 1024, description="Bytes waiting in a viewer's socket buffer beyond which it counts as blocked"
    )
    broadcast_comment_rate: float = Field(10.0, description="Comments per second per viewer; a sample beyond")
    broadcast_max_message_bytes: int = Field(4096, description="Largest viewer -> node WebSocket message")
    broadcast_client_messages_per_s: float = Field(5.0, description="Viewer messages per second allowed")
    broadcast_max_channels: int = Field(50, description="Channels one connection may watch")
    broadcast_node_ttl_s: float = Field(5.0, description="A node that misses heartbeats this long leaves")
    broadcast_reorder_wait_ms: int = Field(1000, description="Wait for a missing seq, then re-snapshot")
    broadcast_dev_tokens: bool = Field(
        False, description="Serve /api/dev-token to operators (development only)"
    )
    # the comment history: written by the root tiers, read by broadcast nodes (docs/BROADCAST.md)
    comment_history_count: int = Field(100, ge=1, description="Recent comments kept per channel in Redis")
    comment_history_age_s: float = Field(
        3600, gt=0, description="Comments older than this leave a channel's history (a quiet channel's goes)"
    )
    # the dashboard and its query API on the broadcast nodes (pipeline/web/auth.py)
    operator_api_keys: SecretStr = Field(
        SecretStr(""),
        description="Comma-separated operator keys: the dashboard and every /api route (none: closed "
        "to all but viewer tokens, which read only their channels)",
    )
    operator_session_ttl_s: float = Field(
        12 * 3600, description="How long a dashboard sign-in (its session cookie) lasts"
    )

    # the PostgreSQL sink (tier "sink"): durable rollups, exactly once (pipeline/tiers/sink.py)
    postgres: str = Field(
        "",
        description="PostgreSQL URL (postgresql://user:pass@host:5432/db): the sink tier writes its "
        "rollups there, and the dashboard reads the buckets Redis no longer holds from it (empty: no "
        "history; a password here is never logged)",
    )
    sink_retention: str = Field(
        "",
        description="Seconds each bucket size is kept in PostgreSQL, SIZE=SECONDS,... (0: for good); "
        "default: buckets under an hour 7 days, an hour or more for good",
    )
    sink_max_records: int = Field(2_000, description="Partials per sink batch (one transaction each)")
    sink_retention_every_s: float = Field(60.0, description="How often the sink deletes expired buckets")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # earlier sources win: flags, then the environment, then the file
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


def load(config: str | None = None, **overrides: Any) -> Settings:
    """Settings from an optional TOML file (or $PIPELINE_CONFIG), the environment, and flags (flags win)."""
    path = config or os.environ.get(CONFIG_ENV)
    cls: type[Settings] = Settings
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        config_dict = SettingsConfigDict(**{**Settings.model_config, "toml_file": Path(path)})
        cls = type("FileSettings", (Settings,), {"model_config": config_dict})
    return cls(**{k: v for k, v in overrides.items() if v is not None})
