"""The layout by role: the tree matches the table in docs/ARCHITECTURE.md, and imports point down.

Read with `ast`, every import counts, including those inside functions (a lazy import is still a
dependency). Strings given to importlib (the worker runner's tier table, the CLI's lazy handlers) are
not imports, on purpose: that is how the CLI reaches the harness without the runtime depending on it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"

PUBLIC_API = {"__init__.py", "__main__.py", "client.py", "sync_client.py", "read.py", "topology.py"}
RUNTIME = {"core", "io", "tiers", "web", "runtime"}  # with PUBLIC_API: what `pip install .` runs
TOOLING = ("pipeline.harness", "pipeline.bench", "pipeline.cli", "tests")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pipeline import x` may import the module pipeline.x
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            raise AssertionError(f"{path.relative_to(ROOT)}: a relative import (this project's are absolute)")
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _project_modules(path: Path) -> set[str]:
    """The modules of this project `path` imports (a `from pipeline import x` names a real module)."""
    out = set()
    for m in _imports(path):
        if not _under(m, "pipeline", "topologies", "tests"):
            continue
        if (ROOT / (m.replace(".", "/") + ".py")).exists() or (ROOT / m.replace(".", "/")).is_dir():
            out.add(m)
    return out


def _violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in paths
        for m in sorted(_project_modules(p))
        if _under(m, *forbidden)
    ]


def test_the_top_of_pipeline_holds_the_public_api_only() -> None:
    top = {p.name for p in PACKAGE.glob("*.py")}
    assert top == PUBLIC_API, f"move {sorted(top - PUBLIC_API)} into the folder of its role"


def test_the_tree_matches_the_table_in_architecture() -> None:
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = doc[doc.index("## Layout") :]
    section = section[: section.index("\n## ", 1)]
    rows = re.findall(r"^\| `(pipeline/[\w/]*)` \| (.+) \|$", section, re.M)
    listed = {folder for folder, _job in rows}
    packages = {"pipeline/"} | {
        f"{p.parent.relative_to(ROOT)}/" for p in PACKAGE.glob("*/__init__.py")
    }
    assert listed == packages, (
        f"folders without a row: {sorted(packages - listed)}; "
        f"rows without a folder: {sorted(listed - packages)}"
    )
    assert all(job.strip() for _folder, job in rows)


def test_nothing_the_runtime_runs_imports_the_harness_the_benchmarks_or_the_cli() -> None:
    paths = [PACKAGE / name for name in sorted(PUBLIC_API - {"__main__.py"})]
    for folder in sorted(RUNTIME):
        paths += _modules(folder)
    assert not _violations(paths, TOOLING)


def test_the_core_imports_only_the_core() -> None:
    outside = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in _modules("core")
        for m in sorted(_project_modules(p))
        if not _under(m, "pipeline.core")
    ]
    assert not outside


def test_io_imports_no_tier_and_nothing_above() -> None:
    above = ("pipeline.tiers", "pipeline.web", "pipeline.client", "pipeline.runtime.worker", *TOOLING)
    assert not _violations(_modules("io"), above)


def test_the_harness_imports_no_benchmark_and_no_cli() -> None:
    assert not _violations(_modules("harness"), ("pipeline.bench", "pipeline.cli", "tests"))


def test_the_benchmarks_import_no_cli() -> None:
    assert not _violations(_modules("bench"), ("pipeline.cli", "tests"))


def test_cli_commands_dispatch_through_set_defaults() -> None:
    from pipeline.cli import build_parser

    parser = build_parser()
    for argv in (
        ["run", "live_likes", "--tier", "merge"],
        ["demo"],
        ["bench", "fanout"],
        ["bench", "sink"],
        ["run", "analytics", "--tier", "sink"],
        ["bench", "all"],
        ["plan", "--rate", "1000"],
        ["token", "--viewer", "v", "--channels", "c"],
        ["chaos"],
        ["soak"],
        ["replay-quarantine", "live_likes"],
        ["servers"],
    ):
        assert callable(parser.parse_args(argv).func), argv
    source = (PACKAGE / "cli" / "__init__.py").read_text()
    assert "args.command ==" not in source, "dispatch through set_defaults(func=...), not an if-chain"


# The keys readers read (docs/CONTRACT.md, "Redis keys"): named in the core, read in one place.
READ_KEYS = {"agg_key", "uniq_key", "top_key", "seq_key", "stats_key"}
ONE_READER = PACKAGE / "io" / "redis_reader.py"


def test_one_module_of_the_runtime_reads_the_aggregates_from_redis() -> None:
    """Outside the core, only io/redis_reader.py names the keys of the aggregates, and only the reader
    API (read.py) and the harness's thin wrappers (io/redis_query.py) use it: the dashboard and the
    broadcast snapshots read through `pipeline.read`, so a new layout or store is one change."""
    paths = [PACKAGE / name for name in sorted(PUBLIC_API)]
    for folder in sorted(RUNTIME - {"core"}):
        paths += _modules(folder)
    naming, using = [], []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            names = {alias.name for alias in node.names}
            if node.module == "pipeline.core.redis_layout" and names & READ_KEYS and path != ONE_READER:
                naming.append(f"{path.relative_to(ROOT)} imports {sorted(names & READ_KEYS)}")
            reader = node.module == "pipeline.io" and "redis_reader" in names
            if node.module == "pipeline.io.redis_reader" or reader:
                using.append(str(path.relative_to(ROOT)))
    assert not naming
    assert sorted(using) == ["pipeline/io/redis_query.py", "pipeline/read.py"]


IO_LIBRARIES = {
    *("aiokafka", "kafka", "redis", "asyncpg", "psycopg", "psycopg2"),
    *("socket", "ssl", "asyncio", "aiohttp"),
}


def test_the_core_imports_no_io_library() -> None:
    """Sans-I/O: no Kafka, Redis, PostgreSQL, socket or event loop under pipeline/core."""
    found = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in _modules("core")
        for m in sorted(_imports(p))
        if m.partition(".")[0] in IO_LIBRARIES
    ]
    assert not found


def test_the_postgresql_sink_is_split_by_role() -> None:
    """Its logic in the core (rows, offsets, retention), its SQL in io/, its loop in tiers/; only the
    I/O module and the harness's server talk to PostgreSQL."""
    assert (PACKAGE / "core" / "sink_plan.py").is_file()
    assert (PACKAGE / "io" / "postgres_sink.py").is_file()
    assert (PACKAGE / "tiers" / "sink.py").is_file()
    talking = sorted(
        str(p.relative_to(ROOT))
        for p in PACKAGE.rglob("*.py")
        if any(m.partition(".")[0] == "asyncpg" for m in _imports(p))
    )
    allowed = {
        "pipeline/io/postgres_sink.py",
        "pipeline/io/postgres_history.py",
        "pipeline/tiers/sink.py",
        "pipeline/harness/local_postgres.py",
        "pipeline/harness/chaos.py",
        "pipeline/bench/sink_bench.py",
    }
    assert set(talking) <= allowed, talking
