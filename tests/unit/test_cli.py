"""The command line explains itself and refuses bad input with a message, not a traceback."""

from __future__ import annotations

import pytest

from pipeline.cli import build_parser, main


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("run", "demo", "bench", "servers"):
        assert command in out
    assert "PIPELINE_" in out  # says how settings are given


def test_run_requires_a_tier(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "live_likes"])
    assert exit_.value.code == 2
    assert "--tier" in capsys.readouterr().err


def test_unknown_topology_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="no topology 'nope'"):
        main(["run", "nope", "--tier", "coalesce"])


def test_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "live_likes", "--tier", "merge", "--config", "/nonexistent.toml"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_replay_quarantine_is_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["replay-quarantine", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--list", "--release", "--partition", "--name"):
        assert flag in out
    with pytest.raises(SystemExit, match="no topology 'nope'"):
        main(["replay-quarantine", "nope", "--list"])


def test_the_sink_tier_needs_a_postgres_url(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PIPELINE_POSTGRES", raising=False)
    assert main(["run", "analytics", "--tier", "sink"]) == 2
    assert "PostgreSQL URL" in capsys.readouterr().err
    args = build_parser().parse_args(["run", "analytics", "--tier", "sink", "--postgres", "postgresql://h/db"])
    assert args.tier == "sink" and args.postgres == "postgresql://h/db"
