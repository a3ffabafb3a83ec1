"""The chaos suite: real node processes under real faults, and a checker of what clients saw.

Theory of operation
-------------------
`runner.py` runs one Jepsen-shaped run: a topology of broker processes with one proxy per directed
peer link (`topology.py`, driven through a Toxiproxy-API server, `toxiproxy/`), a workload of
producers and worker processes that record every request and answer into a history
(`workload.py`, `history.py`), a seeded nemesis that partitions, slows, kills (SIGKILL) and
pauses (SIGSTOP) nodes, skews their clocks and damages their files at rest (`nemesis.py`,
`faketime.py`, `disk_damage.py`), then a final heal, convergence, a drain, and `checker.py` over
the history: no acknowledged job lost, no ack on an expired or foreign lease accepted, no delayed
job or run-out lease early (nor much late), duplicates counted. `raftq chaos` (`__main__.py`) is its
command line; nothing of the broker is imported except to start it as processes.
"""
