"""The HTTP edge of a node (aiohttp): `app.py` builds the application (routes, auth, the one place
errors become HTTP answers), `views.py` serves clients (`/v1/...`), `raft_views.py` serves peers
(`/raft/...`), `validation.py` turns bodies into commands or a 4xx, `wire.py` speaks msgpack/JSON.

Views stay thin: decode and validate, then ask the node (`propose`, `read_barrier`, its read
methods); they never step the Raft core or change the state machine themselves.
"""
