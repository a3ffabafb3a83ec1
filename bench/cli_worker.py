"""The handlers `raftq bench --pool cli` runs in a real `raftq worker` process.

The bench starts `raftq worker raftq.bench.cli_worker:handlers` with the worker's default flags
(plus --concurrency, and --prefetch when the run sets one), so the worker measured is the one
users start. This module is what that command imports: it reads the queues, the job kind and,
for kind "echo", the echo server's address from the environment the bench gives the process
(see `raftq.bench.roles.cli_worker_env`).
"""

from __future__ import annotations

import os

from raftq.bench.roles import CLI_CPU_LOOPS_ENV, CLI_KIND_ENV, CLI_QUEUES_ENV, handler_for

handlers = {queue: handler_for(os.environ[CLI_KIND_ENV], int(os.environ.get(CLI_CPU_LOOPS_ENV, "1")))
            for queue in os.environ[CLI_QUEUES_ENV].split(",")}
