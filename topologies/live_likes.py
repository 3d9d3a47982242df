"""Likes on comments of live videos: per-comment totals and a leaderboard per video.

Events: {"type": "like", "key": COMMENT_ID, "channel": VIDEO_ID} and
{"type": "comment", "key": COMMENT_ID, "channel": VIDEO_ID, "user": USER_ID}.
"""

from pipeline.topology import Partitions, count, topology

TOPOLOGY = topology(
    "live_likes",
    metrics=[
        count("likes", on="like", leaderboard=100),
        count("comments", on="comment"),
    ],
    # Comments matter more than likes: under overload, likes are shed first.
    priorities={"like": 0, "comment": 1},
    flush_interval_ms=250,
    # comments also reach viewers whole, as a live feed
    feed_types={"comment"},
    partitions=Partitions(events=6, partials=3, updates=3),
    description="likes per comment, channel = live video, 250 ms flush, top comments per video",
)
