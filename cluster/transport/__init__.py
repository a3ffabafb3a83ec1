"""How Raft messages travel between nodes: `interfaces.Transport` (fire and forget, one Message
type), `http.py` (peers over HTTP, one sender task per peer), `memory.py` (nodes of one process,
for tests that run several real nodes in one event loop)."""
