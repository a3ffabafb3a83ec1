"""`python -m raftq.chaos` (also `raftq chaos`): run the chaos suite once and check the history.

    python -m raftq.chaos --duration 600 --seed 7                 # every fault kind, 10 minutes
    python -m raftq.chaos --duration 60 --seed 1 --faults isolate-leader,kill-all --nodes 5
    python -m raftq.chaos --duration 600 --seed 7 --rate 1000     # the same under load (batches of 50)
    python -m raftq.chaos --list                                  # the fault kinds and their goals

Exit status: 0 when the checker finds no violation, 1 when it finds one (the summary names the
job and the history lines), 2 when the run itself could not be carried out.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from typing import Sequence

from raftq.chaos.nemesis import FAULTS
from raftq.chaos.runner import RunConfig, run
from raftq.chaos.workload import WorkloadConfig

#: By default a producer may have this many seconds of its submit requests unanswered (at least
#: WorkloadConfig.inflight_max): a fault that holds every answer back for longer shows as unsent.
INFLIGHT_WINDOW_S = 3.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raftq chaos", description="Fault injection against a local raftq cluster, "
                                "with a history checker (lost, unexpected, ack-after-ack, stale-lease acks).")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds of fault/heal cycles; at least one round of every selected fault runs (default 60)")
    p.add_argument("--seed", type=int, default=None, help="seed of the schedule and the workers (default: random)")
    p.add_argument("--faults", default="all",
                   help=f"comma-separated fault kinds, or 'all' (default): {', '.join(FAULTS)}")
    p.add_argument("--nodes", type=int, choices=(3, 5), default=3, help="cluster size (default 3)")
    p.add_argument("--out", default=None, help="run directory (default: a new temporary directory, kept)")
    p.add_argument("--hold", type=float, default=6.0, help="seconds each fault stays on (default 6)")
    p.add_argument("--heal", type=float, default=3.0, help="healthy seconds after each heal (default 3)")
    p.add_argument("--rate", type=float, default=20.0, help="jobs offered per second, all producers (default 20)")
    p.add_argument("--batch", type=int, default=None,
                   help="jobs per submit request (default: 1 up to --rate 100, else rate/20, so each producer sends "
                        "5 requests a second: 50 at --rate 1000)")
    p.add_argument("--prefetch", type=int, default=None,
                   help="jobs a worker leases per request, worked at once and acked in one request "
                        "(default 3, or 4 x --batch up to 200 when --batch is above 1)")
    p.add_argument("--producers", type=int, default=4)
    p.add_argument("--inflight", type=int, default=None,
                   help="submit requests one producer may have unanswered; one that comes due past this is not "
                        f"sent and counts against goodput (open loop; default: {INFLIGHT_WINDOW_S:g} s of its "
                        f"requests, at least {WorkloadConfig.inflight_max})")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--tick", type=float, default=0.1, help="the nodes' Raft tick in seconds (default 0.1)")
    p.add_argument("--snapshot-every", type=int, default=None,
                   help="the nodes snapshot every this many entries (default 100: compaction all the time; "
                        "1000 when --rate is above 100, so that snapshots of the bigger state come every few seconds)")
    p.add_argument("--compact-keep", type=int, default=10,
                   help="entries kept behind a snapshot (default 10: a cut-off follower needs InstallSnapshot)")
    p.add_argument("--list", action="store_true", help="list the fault kinds and their goals, then exit")
    p.add_argument("--quiet", action="store_true", help="only the summary (no progress log)")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    names = [f.strip() for f in args.faults.split(",") if f.strip()]
    faults = list(FAULTS) if names in ([], ["all"]) else names
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 1_000_000)
    batch = max(1, args.batch if args.batch is not None else (1 if args.rate <= 100 else round(args.rate / 20)))
    prefetch = args.prefetch if args.prefetch is not None else (3 if batch == 1 else min(200, 4 * batch))
    # Under load a batch is worked in a few milliseconds; at the default rate the old pace stays.
    work_s = WorkloadConfig.work_s if batch == 1 else (0.002, 0.02)
    requests_per_s = args.rate / max(1, args.producers) / batch  # per producer
    inflight = args.inflight if args.inflight is not None else max(
        WorkloadConfig.inflight_max, math.ceil(INFLIGHT_WINDOW_S * requests_per_s))
    workload = WorkloadConfig(rate=args.rate, producers=args.producers, inflight_max=inflight,
                              workers=args.workers, submit_batch=batch,
                              prefetch=prefetch, work_s=work_s)
    snapshot_every = args.snapshot_every if args.snapshot_every is not None else (100 if args.rate <= 100 else 1000)
    return RunConfig(duration_s=args.duration, seed=seed, faults=faults, nodes=args.nodes, out_dir=args.out,
                     hold_s=args.hold, heal_s=args.heal, tick_s=args.tick, workload=workload,
                     snapshot_every=snapshot_every, compact_keep=args.compact_keep)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for name, fault in FAULTS.items():
            print(f"{name:<20} {fault.goal}")
        return 0
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        config.validate()
    except ValueError as exc:
        print(f"raftq chaos: {exc}", file=sys.stderr)
        return 2
    try:
        outcome = run(config)
    except Exception as exc:
        logging.getLogger("chaos").exception("the chaos run failed (seed %d): %s", config.seed, exc)
        print(f"raftq chaos: the run failed: {exc} (seed {config.seed}; replay: {config.replay_command()})",
              file=sys.stderr)
        return 2
    print(outcome.summary)
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
