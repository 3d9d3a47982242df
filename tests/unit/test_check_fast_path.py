"""The common-shape shortcut of `check_event` (equivalence in general: test_model.py)."""

from __future__ import annotations

from pipeline.core.model import check_event

TYPES = frozenset({"like", "comment"})


def test_common_shape_gets_defaults() -> None:
    assert check_event({"type": "like", "key": "k", "channel": "c"}, TYPES, 5) == (
        "like",
        "k",
        "c",
        5,
        1,
        None,
        None,
        0,
    )


def test_three_fields_of_another_shape_keep_their_values() -> None:
    assert check_event({"type": "like", "key": "k", "value": 7}, TYPES, 5)[4] == 7
    assert check_event({"type": "like", "key": "k", "ts": 9}, TYPES, 5)[3] == 9
