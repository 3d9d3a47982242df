"""Logs an operator can grep and metrics an operator can graph.

Logs are structlog JSON lines on stderr. Each worker serves Prometheus metrics
on its own port; all series carry `topology`, `tier` and `instance` labels so
several workers on one host stay apart.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from prometheus_client import Counter, Gauge, Histogram, start_http_server

LABELS = ("topology", "tier", "instance")

EVENTS_IN = Counter("pipeline_events_in_total", "Valid events consumed by tier 1", LABELS)
RECORDS_IN = Counter("pipeline_records_in_total", "Messages consumed by a tier (valid or not)", LABELS)
PARTIALS_OUT = Counter("pipeline_partials_out_total", "Partial aggregates sent by tier 1", LABELS)
PARTIALS_IN = Counter("pipeline_partials_in_total", "Partial aggregates merged by the root", LABELS)
CELLS_OUT = Counter("pipeline_cells_out_total", "Aggregate cells carried by partials", LABELS)
REDIS_COMMANDS = Counter("pipeline_redis_commands_total", "Redis commands run by applies", LABELS)
REDIS_APPLIES = Counter("pipeline_redis_applies_total", "Atomic applies (one round trip each)", LABELS)
STALE_APPLIES = Counter(
    "pipeline_stale_applies_total", "Applies refused because their range was already applied", LABELS
)
APPLIES_REFUSED = Counter(
    "pipeline_applies_refused_total",
    "Applies refused before any write: a key holds another type, or a field a value, that the apply "
    "cannot take (alert on it)",
    LABELS,
)
ROOT_BLOCKED = Gauge(
    "pipeline_root_blocked", "1 while the root holds or has quarantined a batch its apply refuses", LABELS
)
BATCHES_QUARANTINED = Counter(
    "pipeline_batches_quarantined_total",
    "Batches still refused after quarantine_after_s, copied to T.partials-quarantine (alert on it)",
    LABELS,
)
ROOT_QUARANTINED = Gauge(
    "pipeline_root_quarantined",
    "1 while a quarantined batch stops this partials partition (pipeline replay-quarantine lifts it)",
    (*LABELS, "partition"),
)
UPDATES_OUT = Counter("pipeline_updates_out_total", "Channel updates published", LABELS)
DEAD_LETTERS = Counter(
    "pipeline_dead_letters_total", "Events sent to the dead-letter topic", (*LABELS, "field")
)
TRANSACTIONS = Counter("pipeline_transactions_total", "Kafka transactions committed", LABELS)
TX_ABORTS = Counter("pipeline_transaction_aborts_total", "Kafka transactions aborted", LABELS)
LAG = Gauge(
    "pipeline_consumer_lag", "Records behind the end of an assigned partition", (*LABELS, "partition")
)
COALESCING_RATIO = Gauge(
    "pipeline_coalescing_ratio",
    "Inputs per output of the tier since start (events/partials, cells/commands)",
    LABELS,
)
WINDOW_CELLS = Gauge("pipeline_window_cells", "Cells held in the open window", LABELS)
COMMENT_HISTORY = Counter(
    "pipeline_comment_history_appended_total",
    "Comments the root appended to the channels' histories in Redis (each once, replays skipped)",
    LABELS,
)

# Durations, in Prometheus' default buckets (5 ms to 10 s)
WINDOW_FLUSH_SECONDS = Histogram(
    "pipeline_window_flush_seconds",
    "Tier 1: closing a window, from the flush decision to its committed transaction (partials, offsets)",
    LABELS,
)
TX_COMMIT_SECONDS = Histogram(
    "pipeline_transaction_commit_seconds", "Tier 1: the Kafka transaction commit of a window alone", LABELS
)
ROOT_APPLY_SECONDS = Histogram(
    "pipeline_root_apply_seconds", "Tier 2: one atomic apply to Redis (the Lua script's round trip)", LABELS
)
PUSH_AGE_SECONDS = Histogram(
    "pipeline_broadcast_push_age_seconds",
    "Tier 3: the age of an update when it is pushed to viewers, from the root's apply (by wall clocks)",
    LABELS,
)


class _CurrentStderr:
    """Whatever sys.stderr is when a line is written, not when logging was configured.

    A command run in-process (tests, the benchmark suite) may swap or close the stream it had.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(stream=_CurrentStderr(), level=level.upper(), format="%(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )


def serve_metrics(port: int, host: str = "127.0.0.1") -> int:
    """Start the Prometheus endpoint; port 0 picks a free one. Returns the port."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)


def log(**context: Any) -> Any:
    return structlog.get_logger().bind(**context)
