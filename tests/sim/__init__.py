"""Deterministic simulation of the Raft core and the queue state machine (STYLE §11.3).

N `RaftNode` + `QueueStateMachine` pairs on simulated disks (`storage.py`: log, hard state and
snapshots), joined by a seeded lossy network (`network.py`, which also carries snapshot
transfers), broken by a nemesis (`faults.py`), driven by a client workload (`workload.py`), and
checked after every step (`invariants.py`); `cluster.py` runs one seed, snapshots and log
compaction included.

    python -m tests.sim --seeds 1000              # many seeds, a summary, failing seeds listed
    python -m tests.sim --seed 17 -v              # replay one seed with its trace

One `random.Random(seed)` decides everything, so a seed replays exactly (same trace digest).
"""

from .cluster import SimConfig, SimResult, Simulation, replay_command, run_seed

__all__ = ["SimConfig", "SimResult", "Simulation", "replay_command", "run_seed"]
