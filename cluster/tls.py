"""TLS for the node: the server side of its one listener, and the client side of its peer links.

One listener serves clients and peers. With `--tls-cert`/`--tls-key` it speaks only TLS (1.2 or
newer). The node's own requests to peers (Raft messages, snapshot chunks, the dashboard's status
fetches) verify the peer's certificate against `--tls-ca` (the system CAs when none is given) and
its host name against the peer URL; they present the node's own certificate as a client
certificate, so that a cluster started with `--tls-peer-certs` can require one on `/raft/*`.

`--tls-peer-certs` makes the listener ask every client for a certificate signed by `--tls-ca`
(CERT_OPTIONAL: a client without one still connects, since API clients have none; one with a bad
one is refused in the handshake), and `/raft/*` then refuses a request whose connection presented
none. That is mutual TLS between peers on top of the cluster secret, as etcd's
`--peer-client-cert-auth` and NATS's cluster `tls {}` do.
"""

from __future__ import annotations

import ssl

from aiohttp import web

from raftq.cluster.config import NodeConfig
from raftq.cluster.errors import ConfigError


def server_context(config: NodeConfig) -> ssl.SSLContext | None:
    """The listener's context, or None without TLS.

    Raises:
        ConfigError: a certificate, key or CA file cannot be loaded.
    """
    if not config.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, config)
    if config.tls_peer_certs:
        assert config.tls_ca is not None  # NodeConfig.validate
        _load_ca(context, config.tls_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def peer_client_context(config: NodeConfig) -> ssl.SSLContext | None:
    """The context for this node's requests to peers, or None when no peer URL is https."""
    if not any(url.startswith("https://") for url in [*config.peers.values(), *config.public_urls.values()]):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if config.tls_ca:
        _load_ca(context, config.tls_ca)
    if config.tls:
        _load_chain(context, config)  # our client certificate, for peers that require one
    return context


def presented_client_certificate(request: web.Request) -> bool:
    """Whether the request's connection presented a verified client certificate."""
    transport = request.transport
    return bool(transport is not None and transport.get_extra_info("peercert"))


def _load_chain(context: ssl.SSLContext, config: NodeConfig) -> None:
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {config.tls_cert!r} with key {config.tls_key!r}: {exc}") \
            from None


def _load_ca(context: ssl.SSLContext, ca_file: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS CA file {ca_file!r}: {exc}") from None
