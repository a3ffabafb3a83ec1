"""The `raftq` command: one entry point that dispatches to each package's own `main`.

Theory of operation
-------------------
The packages import downward only: `client/` (library, worker runtime, the client commands)
imports nothing of the broker, the chaos suite or the benchmark, so a client-only program never
loads them. The one place that knows all of them is this dispatcher, at the top:

    raftq node ...     -> cluster.main.main      (a broker process)
    raftq chaos ...    -> chaos.__main__.main    (the fault-injection suite)
    raftq bench ...    -> bench.main.main        (the benchmark)
    raftq anything     -> client.cli.main        (submit, worker, status, queues, job, dlq, ...)

Global options written before the command (`raftq --nodes URL bench`) belong to the client
commands; `bench` takes `--nodes` and `--token` itself, so those are passed on to it.
"""
