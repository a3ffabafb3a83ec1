"""The broker node: a Raft-replicated job queue, one process per node (`raftq node`).

Theory of operation
-------------------
Three layers, each importing only the ones below it:

    api/                 the HTTP edge: validate, build a command, `await node.propose(...)`,
                         map the outcome to an answer; `/raft/*` takes peers' messages
    server.py            the asyncio shell, `Node`: one task (`_drive`) owns the core, the log
                         and the state machine; everything else reaches it through inboxes and
                         futures. It carries out each Ready in `ready_handler.py`'s order (the
                         deterministic simulator drives the same handler) and delegates to
                         `snapshotting.py`, `housekeeping.py` (leader only) and `node_view.py`
                         (what status and metrics read)
    raft/, queue/        pure and deterministic: the Raft core (tick / step / ready / advance)
                         and the queue state machine (apply(entry) -> outcome)

and beside them the node's dependencies, handed to `Node` or opened from its config:
`storage/` (WAL with hard state, snapshot files: `NodeStorage`) and `transport/` (HTTP to peers,
or an in-memory network of nodes in one process). A 2xx answer means the command's entry is
applied here, hence committed on a majority's disk. Limits both sides of the wire share live in
`raftq/protocol.py`.
"""
