"""Page views and clicks per page, per minute and per hour, with distinct visitors.

Events: {"type": "page_view" | "click", "key": PAGE, "channel": SITE, "user": USER_ID, "ts": MS}.
Late events within the grace period correct their bucket; later ones are dropped and counted.
"""

from pipeline.topology import Partitions, count, distinct_users, every, topology, total

MINUTE = every(60, retention_s=2 * 24 * 3600, grace_s=30)
HOUR = every(3600, retention_s=35 * 24 * 3600, grace_s=300)

TOPOLOGY = topology(
    "analytics",
    metrics=[
        count("views", "page_view", total(), MINUTE, HOUR, leaderboard=50),
        count("clicks", "click", total(), MINUTE, HOUR, leaderboard=50),
        distinct_users("visitors", "page_view", total(), MINUTE, HOUR),
    ],
    # Impressions are worth less than clicks: under overload, page views are shed first.
    priorities={"page_view": 0, "click": 1},
    flush_interval_ms=1000,
    partitions=Partitions(events=6, partials=3, updates=3),
    description="views and clicks per page per minute/hour, distinct visitors, late-event grace",
)
