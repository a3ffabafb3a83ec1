"""Command line of the simulator.

    python -m tests.sim --seeds 10000 [--start N] [--nodes 3|5] [--steps N] [--jobs K]
    python -m tests.sim --seed N -v          # replay one seed, printing its trace
    python -m tests.sim --plant commit_previous_term --seeds 50   # against a deliberately broken core

Exit status 0 when every seed passed, 1 otherwise. Each failing seed is printed as `seed=N` with the
invariant it broke and the one-line command that replays it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import multiprocessing
import signal
import sys
import time
from collections import Counter
from typing import Any, Iterable

from .cluster import SimConfig, SimResult, replay_command, run_seed
from .network import NetworkConfig
from .planted import PLANTED_BUGS, planted


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, help="run this one seed")
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run (default 100)")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--nodes", type=int, default=3, choices=(3, 5))
    parser.add_argument("--steps", type=int, default=SimConfig.steps, help="ticks with faults per seed")
    parser.add_argument("--no-crashes", action="store_true", help="network faults only")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the trace (with --seed)")
    parser.add_argument("--trace-digest", action="store_true", help="print only the trace digest (with --seed)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a SimConfig field, e.g. --set pre_vote=False (a Python literal)")
    parser.add_argument("--plant", choices=sorted(PLANTED_BUGS), help="run against a planted bug (planted.py)")
    parser.add_argument("--stop-after", type=int, default=10, help="stop after this many failures (0 = never)")
    return parser.parse_args(argv)


def _overrides(settings: list[str]) -> dict[str, Any]:
    """`--set field=value` pairs as SimConfig keyword arguments."""
    names = {f.name for f in dataclasses.fields(SimConfig)}
    overrides: dict[str, Any] = {}
    for setting in settings:
        name, _, text = setting.partition("=")
        if name not in names:
            raise SystemExit(f"--set: SimConfig has no field {name!r} (fields: {', '.join(sorted(names))})")
        value = ast.literal_eval(text)
        overrides[name] = NetworkConfig(**value) if name == "network" and isinstance(value, dict) else value
    return overrides


def _run_one(job: tuple[int, SimConfig, str | None]) -> SimResult:
    seed, config, plant = job
    with planted(plant):
        result = run_seed(seed, config)
    result.trace = None
    return result


def _replay_text(seed: int, config: SimConfig, plant: str | None) -> str:
    command = replay_command(seed, config)
    return command.replace("python -m tests.sim", f"python -m tests.sim --plant {plant}", 1) if plant else command


def _report_failure(result: SimResult, config: SimConfig, plant: str | None) -> None:
    print(f"seed={result.seed} FAILED at tick {result.tick}: {result.failure}", flush=True)
    print(f"  replay: {_replay_text(result.seed, config, plant)}", flush=True)


def _results(seeds: Iterable[int], config: SimConfig, jobs: int, plant: str | None) -> Iterable[SimResult]:
    work = ((seed, config, plant) for seed in seeds)
    if jobs <= 1:
        yield from map(_run_one, work)
        return
    with multiprocessing.Pool(jobs) as pool:
        yield from pool.imap(_run_one, work, chunksize=8)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    config = SimConfig(nodes=args.nodes, steps=args.steps, crashes=not args.no_crashes, **_overrides(args.set))
    if args.seed is not None:
        with planted(args.plant):
            return _replay(args.seed, config, args.verbose, args.trace_digest, args.plant)
    started = time.monotonic()
    totals: Counter[str] = Counter()
    worst: Counter[str] = Counter()
    failed: list[SimResult] = []
    count = 0
    for result in _results(range(args.start, args.start + args.seeds), config, args.jobs, args.plant):
        count += 1
        for key, value in result.stats.items():
            if isinstance(value, int):
                totals[key] += value
                worst[key] = max(worst[key], value)
        totals["seeds_with_install"] += bool(result.stats.get("snapshots_installed"))
        if not result.ok:
            failed.append(result)
            _report_failure(result, config, args.plant)
            if args.stop_after and len(failed) >= args.stop_after:
                print(f"stopping after {len(failed)} failures", flush=True)
                break
    elapsed = time.monotonic() - started
    if args.plant:
        print(f"planted bug: {args.plant}")
    print(f"ran {count} seeds ({args.start}..{args.start + count - 1}), nodes={args.nodes}, steps={args.steps}, "
          f"in {elapsed:.1f} s: {count - len(failed)} passed, {len(failed)} failed")
    print(f"  totals: ticks {totals['ticks']}, committed entries {totals['committed']}, terms with a leader "
          f"{totals['terms_with_leader']}, acknowledged jobs {totals['acknowledged_jobs']}, lease grants "
          f"{totals['lease_grants']}, crashes {totals['nemesis_crashes']} (all nodes at once "
          f"{totals['nemesis_crash_all']}), partitions {totals['nemesis_partitions']}, messages "
          f"{totals['net_sent']} ({totals['net_lost']} lost, {totals['net_duplicated']} duplicated)")
    print(f"  snapshots: taken {totals['snapshots_taken']} (lost in a crash {totals['snapshots_lost']}), installed "
          f"{totals['snapshots_installed']}, restarts from a snapshot {totals['snapshot_restarts']} (log dropped "
          f"{totals['log_resets']}), transfers {totals['transfers']} ({totals['transfers_failed']} failed), entries "
          f"compacted on disk {totals['entries_compacted']}, crashes amid a snapshot "
          f"{totals['nemesis_snapshot_faults']}; seeds with an install {totals['seeds_with_install']}")
    if totals["members_added"] or totals["leader_transfers"]:
        print(f"  membership: {totals['members_added']} learners added, {totals['members_promoted']} promoted, "
              f"{totals['members_removed']} members removed, {totals['leader_transfers']} leadership transfers "
              f"started, {totals['changes_refused']} changes refused (one at a time, own term not committed, "
              f"transfer under way)")
    print(f"  worst ticks to a new commit after the faults stopped: {worst['liveness_ticks']}; "
          f"to converge: {worst['converge_ticks']}")
    if failed:
        by_invariant = Counter(r.invariant for r in failed)
        print("  failures by invariant: " + ", ".join(f"{k}: {v}" for k, v in by_invariant.most_common()))
        print("  failing seeds: " + " ".join(str(r.seed) for r in failed))
    return 1 if failed else 0


def _replay(seed: int, config: SimConfig, verbose: bool, digest_only: bool, plant: str | None) -> int:
    result = run_seed(seed, config, trace=True)
    if digest_only:
        print(result.trace_digest)
        return 0 if result.ok else 1
    if verbose:
        for line in result.trace or ():
            print(line)
    status = "passed" if result.ok else f"FAILED at tick {result.tick}: {result.failure}"
    print(f"seed={seed} {status}")
    if result.details:
        print(result.details)
    print("stats: " + ", ".join(f"{k}={v}" for k, v in sorted(result.stats.items())))
    print(f"trace digest {result.trace_digest} ({len(result.trace or ())} lines)")
    if not result.ok:
        print(f"  replay: {_replay_text(seed, config, plant)}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `... -v | head` ends quietly
    sys.exit(main())
