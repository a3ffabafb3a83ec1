"""The benchmark tool, `raftq bench`: jobs/s, latency and memory of a raftq cluster, in the spirit of `nats bench`.

    raftq bench                                   the default scenario set (see --list)
    raftq bench --scenario e2e --jobs 50000 --batch 100 --workers 1 --concurrency 4
    raftq bench --scenario submit --batch 1 --producers 4 --nodes http://10.0.0.1:7001,...
    raftq bench nats --figure submit1 --jobs 1000    the same figure on NATS JetStream (bench/nats_peer.py)
    raftq bench snapshot                             a million live jobs: each node's loop pause while it
                                                     snapshots them (bench/snapshot_pause.py)
    raftq bench floor                                the fixed stack without raftq: one-job submits and
                                                     memory a raftq figure cannot go below (bench/stack_floor.py)

Theory of operation
-------------------
Unless `--nodes` names a cluster, every run gets a fresh 3-node cluster of its own on loopback
(`cluster.localcluster.LocalCluster`, data in a temporary folder on disk), so that no run pays
for the jobs, log and memory an earlier one left behind; every run also uses a queue of its own.
A run starts its producers and workers as separate processes (`bench.roles`), waits
until each has warmed up, starts the clock, and stops it at the last ack (drain, e2e) or at the
end of the last submit (submit). The three scenarios:

    submit   P producers submit N jobs in requests of B jobs; nobody works on them.
    drain    N jobs are queued first (not timed), then W workers lease, run and ack them.
    e2e      P producers and W workers at once: jobs/s submit to ack, and each job's end-to-end
             latency (its payload carries its submit time; the worker notes when its ack came back).

Around each run it reads, from the leader's /metrics, the growth of the WAL (bytes per job) and
the group commit size (log entries per fsync); from /proc, the peak RSS of every node (reset at
the start of the run) and of the workers. Each scenario runs `--runs` times (3): the report gives
the median and the spread (max - min, in % of the median) of jobs/s, and the median of each
run's latency percentiles (with the largest max).

Worker pools: "single" is the lean loop (no Worker runtime): `--concurrency` lanes, each fetching
B jobs, running them one after another and acking them with one ack_many. "threads",
"processes" and "asyncio" run `client.worker.Worker` as users do, with `--concurrency` slots and
its default prefetch buffer (`--prefetch` sets another; 0 fetches only for free slots), so B only
sets the producers' batch there.

The fsync policy is not a knob: every 2xx is on disk on a majority of nodes.

Modules: `main` (the command line, the scenarios and the runs), `roles` (the producer and worker
processes), `measure` (metrics, /proc and machine facts), `report` (tables, JSON, the chart),
`nats_peer` (the comparison figures on a NATS JetStream cluster), `snapshot_pause` (the loop pause
of a snapshot of a million live jobs), `stack_floor` (the same hops and fsyncs as a one-job submit
on the fixed stack, with none of raftq's work). The benchmark imports the client and `cluster.localcluster`; nothing imports the benchmark.
"""
