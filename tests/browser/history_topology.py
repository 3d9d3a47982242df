"""A topology whose hourly buckets Redis keeps for 5 seconds only: past that, only the sink's
PostgreSQL rollups hold them (tests/browser/test_dashboard_history.py). Late events are accepted for
40 days, so a month of history can be sent in one go."""

from pipeline.topology import count, every, topology, total

HOUR = every(3600, retention_s=5, grace_s=40 * 86400)

TOPOLOGY = topology(
    "history",
    metrics=[count("views", "page_view", total(), HOUR)],
    priorities={"page_view": 0},
    flush_interval_ms=500,
)
