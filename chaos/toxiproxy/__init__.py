"""A Toxiproxy-compatible server in asyncio, for raftq's chaos suite.

No toxiproxy-server binary is packaged for PyPI or Debian, so this package implements the
parts of Shopify/toxiproxy (v2.12) that toxiproxy-python and the chaos suite use: the HTTP
API with the same paths, JSON shapes, status codes and error bodies, TCP proxies that can
be disabled and re-enabled, and the seven built-in toxics with the same attributes and
behaviour (latency, bandwidth, slow_close, timeout, reset_peer, slicer, limit_data).

Theory of operation
-------------------
* ``server.py`` — the HTTP API (aiohttp) over a dict of proxies, one lock for changes, and
  three ways to run it: ``ToxiproxyServer`` (``async with``), ``ToxiproxyThread`` (a
  background thread for synchronous tests) and ``ToxiproxyProcess`` (a child process polled
  on ``GET /version``). ``python -m raftq.chaos.toxiproxy`` is the command line.
* ``proxy.py`` — a proxy is a listener; each accepted client opens one upstream connection
  and gets two links, ``upstream`` (client -> server) and ``downstream`` (server -> client).
* ``toxics.py`` — a link is a chain of asyncio tasks joined by small bounded pipes:
  reader -> one stage per toxic -> writer. Adding, updating or removing a toxic rewires
  the chain of every open connection without losing or reordering bytes (except where the
  toxic drops them by design). Toxicity is drawn per connection when a stage starts.
* ``errors.py`` — the real server's error messages and statuses.

Known differences from the real server are listed in ``DIFFERENCES`` below.
"""

from .errors import ApiError
from .server import DEFAULT_PORT, VERSION, ToxiproxyProcess, ToxiproxyServer, ToxiproxyThread
from .toxics import TOXIC_TYPES

DIFFERENCES = """\
- GET /version says "2.12.0+raftq" (the release copied, plus whose server it is).
- No /metrics endpoint (the real one only serves it with --proxy-metrics/--runtime-metrics).
- No 25 s handler timeout; handlers here finish quickly.
- JSON decode error texts after "bad request body: " are Python's, not Go's; type errors
  ("json: cannot unmarshal ...") and every other message are the real ones.
- slicer: the event loop's timers are ~1 ms, so a delay of a few microseconds is kept on
  average (paced against a due time) rather than slept between each pair of slices.
- Attributes the real server would crash or spin on (slicer average_size 0 or a variation
  above the average, negative bandwidth) are made safe; bandwidth rate 0 holds data until the
  toxic changes, which is what the real one ends up doing.
- reset_peer always closes with an RST; the real one sets SO_LINGER 0 only on connections
  that existed when the toxic was already there, so one added to a live connection sends FIN.
- Toxicity is drawn when a stage (re)starts: connection start, toxic add, toxic update.
  The real server also re-draws the toxic *in front of* one that is added or removed.
- When a toxic is added, the real server interrupts the previous last toxic, which sends
  any chunk it was delaying straight on; here that chunk goes through the new toxic too.
"""

__all__ = ["ApiError", "DEFAULT_PORT", "DIFFERENCES", "TOXIC_TYPES", "VERSION", "ToxiproxyProcess",
           "ToxiproxyServer", "ToxiproxyThread"]
