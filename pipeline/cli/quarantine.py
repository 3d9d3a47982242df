"""`pipeline replay-quarantine`: show, replay or release the batches the root merger quarantined."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pipeline.cli.common import Subparsers
from pipeline.runtime import settings as settings_mod

if TYPE_CHECKING:
    from pipeline.core.topology import Topology


def register(sub: Subparsers) -> None:
    rq = sub.add_parser(
        "replay-quarantine",
        help="show, replay or release the batches the root merger quarantined",
        description="A batch the root's apply refuses (a Redis key of another type, a field holding a value "
        "the apply cannot take) and that stays refused for quarantine_after_s is quarantined: its partials "
        "are copied to T.partials-quarantine, T:quarantine records it, and the root stops that partials "
        "partition. Repair the key (for example DEL it), then run this: it applies each quarantined batch "
        "from its copies, exactly once (the positions in Redis guard it), publishes the totals, and lifts "
        "the quarantine; the root resumes the partition within 2 s. Exit 1 if a batch is still refused.",
    )
    rq.add_argument("topology", help="a name in topologies/ (live_likes, analytics) or module:ATTR")
    rq.add_argument("--name", help="the topology runs under another name (as `pipeline run --name`)")
    rq.add_argument(
        "--partition", type=int, action="append", help="only this partials partition (may be repeated)"
    )
    rq.add_argument("--list", action="store_true", help="only show what is quarantined, change nothing")
    rq.add_argument(
        "--release",
        action="store_true",
        help="lift the quarantine without applying: the root reads the batch again from the partials topic",
    )
    rq.add_argument("--kafka", help="Kafka bootstrap servers")
    rq.add_argument("--redis", help="Redis URL")
    rq.add_argument("--config", help="TOML settings file")
    rq.add_argument("--json", action="store_true", help="print one JSON object per batch")
    rq.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import asyncio

    from pipeline.runtime import worker

    try:
        settings = settings_mod.load(args.config, kafka=args.kafka, redis=args.redis)
    except (FileNotFoundError, ValueError) as exc:
        print(f"pipeline replay-quarantine: {exc}", file=sys.stderr)
        return 2
    topology = worker.load_topology(args.topology)
    if args.name:
        topology = topology.renamed(args.name)
    return asyncio.run(replay(topology, settings, args))


async def replay(
    topology: Topology, settings: settings_mod.Settings, args: argparse.Namespace
) -> int:
    import json

    from pipeline.io import kafka, quarantine, redis_client

    conn = kafka.connection_from(settings)
    client = redis_client.connect(settings)
    producer = None
    failed = 0
    try:
        state = quarantine.QuarantineState(client, topology)
        held = sorted((await state.all()).items())
        chosen = [q for p, q in held if not args.partition or p in args.partition]
        if not chosen:
            print(
                f"nothing quarantined for {topology.name}"
                + (f" in {args.partition}" if args.partition else "")
            )
            return 0
        if not (args.list or args.release):
            producer = kafka.producer(conn, f"{topology.group('merge')}.replay")
            await kafka.start(producer)
        for q in chosen:
            if args.list:
                outcome, detail, ok = "quarantined", q.reason, True
            elif args.release:
                ok = await state.release(q)
                outcome = "released" if ok else "changed meanwhile"
                detail = "the root reads the batch again from the partials topic" if ok else "run again"
            else:
                done = await quarantine.replay(conn, client, topology, q, producer)
                outcome, detail, ok = done.outcome, done.detail, done.ok
            failed += not ok
            if args.json:
                report = {"partition": q.partition, "outcome": outcome, "ok": ok, "detail": detail}
                print(json.dumps({**report, "quarantined": json.loads(q.to_json())}))
            else:
                print(
                    f"partition {q.partition}, offsets {q.first}-{q.last} ({q.messages} partials, "
                    f"quarantined by {q.by}): {outcome}: {detail}"
                )
    finally:
        if producer is not None:
            await producer.stop()
        await client.aclose()
    return 1 if failed else 0
