"""Importing aiohttp without the tables a node never reads: 2.3 MiB of every node's memory.

aiohttp builds three things at import that a node does not use:

* two TLS client contexts (connector.py), for requests that pass no context of their own. Each
  loads the system's whole CA bundle, about 140 certificates: 2 MiB of a node's 44. A node's
  requests never use them: its peer links, snapshot transfers and status fetches pass the
  context `tls.peer_client_context` builds whenever a peer URL is https, and pass none only when
  every URL is http.
* the system's MIME types database (web_fileresponse.py, read from /etc/mime.types), for
  serving files: 0.3 MiB. A node serves no files.

So the node imports aiohttp, before anything else does, with SSL_CERT_FILE naming an empty file
and no MIME types file to read. OpenSSL then loads no bundle into those two contexts (their
lookup in the system's hashed certificate directory, which reads a certificate only when a
handshake needs it, stays), and mimetypes keeps Python's built-in table. Both settings are put
back at once, so every context the node builds itself loads the bundle as usual.

Only the node's entry points call this: a client program's own aiohttp requests keep aiohttp's
defaults.
"""

from __future__ import annotations

import mimetypes
import os
import sys

_CA_FILE_VARIABLE = "SSL_CERT_FILE"  # OpenSSL's; read when a context loads the default CAs


def import_aiohttp() -> None:
    """Imports aiohttp as the module docstring says; does nothing if it is imported already."""
    if "aiohttp" in sys.modules:
        return
    saved_ca_file = os.environ.get(_CA_FILE_VARIABLE)
    saved_mime_files = mimetypes.knownfiles
    os.environ[_CA_FILE_VARIABLE] = os.devnull
    mimetypes.knownfiles = []
    try:
        import aiohttp.web  # noqa: F401  (imports the connector and the file response)
    finally:
        mimetypes.knownfiles = saved_mime_files
        if saved_ca_file is None:
            del os.environ[_CA_FILE_VARIABLE]
        else:
            os.environ[_CA_FILE_VARIABLE] = saved_ca_file
