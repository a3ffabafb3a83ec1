"""A node imports aiohttp without its CA bundle and MIME tables (cluster/lean_aiohttp.py), and
puts back what it changed for the import.

Each check runs in a fresh interpreter: the point is what happens at a process's first import of
aiohttp, which this test process has long done.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys

import pytest

_REPORT = """
import json, mimetypes, os, ssl, sys
{imports}
from aiohttp import connector
print(json.dumps({{
    "aiohttp_contexts_ca": [connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
                            connector._SSL_CONTEXT_UNVERIFIED.cert_store_stats()["x509_ca"]],
    "own_context_ca": ssl.create_default_context().cert_store_stats()["x509_ca"],
    "ssl_cert_file": os.environ.get("SSL_CERT_FILE"),
    "mime_files": mimetypes.knownfiles,
}}))
"""


def _report(imports: str, env_extra: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    env.update(env_extra or {})
    done = subprocess.run([sys.executable, "-c", _REPORT.format(imports=imports)], capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _system_bundle_ca_count() -> int:
    paths = ssl.get_default_verify_paths()
    if not paths.cafile:
        pytest.skip(f"this system has no CA bundle file ({paths}): nothing the import could skip")
    return _report("")["own_context_ca"]


def test_the_node_imports_aiohttp_without_loading_the_ca_bundle_into_its_contexts():
    bundle = _system_bundle_ca_count()
    plain = _report("")
    assert plain["aiohttp_contexts_ca"] == [bundle, bundle], plain  # what a plain import costs

    node = _report("import raftq.cluster.main")
    assert node["aiohttp_contexts_ca"] == [0, 0], node
    # Contexts the node builds itself (its TLS peer links) still load the bundle,
    assert node["own_context_ca"] == bundle, node
    # and nothing the import changed is left changed.
    assert node["ssl_cert_file"] is None and node["mime_files"] == plain["mime_files"], (node, plain)


def test_a_ca_file_the_operator_set_is_put_back():
    bundle = ssl.get_default_verify_paths().cafile
    if not bundle:
        pytest.skip("this system has no CA bundle file")
    node = _report("import raftq.cluster.main", {"SSL_CERT_FILE": bundle})
    assert node["ssl_cert_file"] == bundle and node["own_context_ca"] > 0, node


def test_the_raftq_command_imports_no_aiohttp_before_it_knows_the_command():
    """`raftq node` goes through the dispatcher: had it imported the client (hence aiohttp)
    first, the node's import would come too late."""
    done = subprocess.run([sys.executable, "-c", "import sys, raftq.command; print('aiohttp' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", (done.stdout, done.stderr)
