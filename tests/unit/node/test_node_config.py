"""The node's flags and config: secrets from files or the environment, refused unsafe setups."""

from __future__ import annotations

import pytest

from raftq.cluster.errors import ConfigError
from raftq.cluster.main import build_parser, config_from_args

PEERS = ["--peers", "n2=http://127.0.0.1:7002,n3=http://127.0.0.1:7003"]


def config(argv, monkeypatch, **env):
    for name in ("RAFTQ_CLUSTER_SECRET", "RAFTQ_TOKEN", "RAFTQ_CLUSTER_SECRET_FILE", "RAFTQ_TOKEN_FILE",
                 "RAFTQ_INSECURE_NO_CLUSTER_SECRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return config_from_args(build_parser().parse_args(["--data-dir", "unused", *argv]))


def test_a_node_with_peers_needs_a_secret_unless_opted_out_by_name(monkeypatch):
    with pytest.raises(ConfigError, match="needs a cluster secret.*--insecure-no-cluster-secret"):
        config(PEERS, monkeypatch)
    assert config([*PEERS, "--insecure-no-cluster-secret"], monkeypatch).cluster_secret is None
    assert config(PEERS, monkeypatch, RAFTQ_INSECURE_NO_CLUSTER_SECRET="1").insecure_no_cluster_secret
    assert config([], monkeypatch).cluster_secret is None  # a cluster of one has no peers to trust


def test_secrets_come_from_files_or_the_environment_never_a_flag_value(monkeypatch, tmp_path):
    secret_file = tmp_path / "secret"
    secret_file.write_text("  s" * 8 + "ecret-from-file\n")
    secret_file.chmod(0o600)
    token_file = tmp_path / "token"
    token_file.write_text("tok\n")
    made = config([*PEERS, "--cluster-secret-file", str(secret_file), "--token-file", str(token_file)], monkeypatch)
    assert made.cluster_secret == secret_file.read_text().strip() and made.client_token == "tok"
    made = config(PEERS, monkeypatch, RAFTQ_CLUSTER_SECRET="e" * 20, RAFTQ_TOKEN="t2")
    assert (made.cluster_secret, made.client_token) == ("e" * 20, "t2")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--cluster-secret", "on-the-command-line"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--token", "on-the-command-line"])


def test_bad_secrets_are_refused_with_the_reason(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="cannot read the cluster secret"):
        config([*PEERS, "--cluster-secret-file", str(tmp_path / "missing")], monkeypatch)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        config([*PEERS, "--cluster-secret-file", str(tmp_path / "empty")], monkeypatch)
    with pytest.raises(ConfigError, match="at least 16 characters"):
        config(PEERS, monkeypatch, RAFTQ_CLUSTER_SECRET="short")


def test_a_network_address_without_token_or_tls_is_refused_unless_opted_out(monkeypatch):
    with pytest.raises(ConfigError, match="refusing to serve '0.0.0.0'.*--insecure-open-to-network"):
        config(["--host", "0.0.0.0"], monkeypatch)
    with pytest.raises(ConfigError, match="not a loopback address"):
        config(["--host", "node1.example"], monkeypatch)
    advertised = ["--advertise-url", "http://node1.example:7001"]
    assert config(["--host", "0.0.0.0", *advertised], monkeypatch, RAFTQ_TOKEN="t").client_token == "t"
    assert config(["--host", "0.0.0.0", *advertised, "--insecure-open-to-network"],
                  monkeypatch).insecure_open_to_network
    for loopback in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert config(["--host", loopback], monkeypatch).loopback_only


def test_a_wildcard_listen_address_needs_an_advertised_url(monkeypatch):
    # Clients and peers are sent to a node's advertised URL (status, redirects): 0.0.0.0 names no host.
    for wildcard in ("0.0.0.0", "::"):
        with pytest.raises(ConfigError, match="--advertise-url"):
            config(["--host", wildcard], monkeypatch, RAFTQ_TOKEN="t")
    with pytest.raises(ConfigError, match="must start with http"):
        config(["--advertise-url", "node1.example:7001"], monkeypatch)
    node = config(["--host", "0.0.0.0", "--advertise-url", "https://n1.example:7001"], monkeypatch, RAFTQ_TOKEN="t")
    assert node.url == "https://n1.example:7001"


def test_the_start_up_warning_names_each_gap(monkeypatch):
    gaps = config([*PEERS, "--insecure-no-cluster-secret"], monkeypatch).security_gaps()
    assert [gap.split(" (")[0] for gap in gaps] == [
        "client API without a token", "peer links without a cluster secret", "client API and peer links unencrypted"]
    assert len(config(PEERS, monkeypatch, RAFTQ_CLUSTER_SECRET="s" * 16, RAFTQ_TOKEN="t").security_gaps()) == 1


def test_text_log_lines_escape_whatever_the_message_holds():
    import logging

    from raftq.cluster.main import _TextFormatter

    record = logging.LogRecord("raftq.api", logging.INFO, __file__, 1, "refused %s", ("a\r\nFAKE\x00\u2028b",), None)
    line = _TextFormatter("%(levelname)s %(message)s").format(record)
    assert line == "INFO refused a\\r\\nFAKE\\x00\\u2028b" and len(line.splitlines()) == 1


def test_members_is_one_list_for_every_node(monkeypatch):
    members = ["--members", "a=https://a.example:7001,b=https://b.example:7001,c=https://c.example:7001",
               "--insecure-no-cluster-secret"]
    node = config(["--id", "b", *members], monkeypatch)
    assert node.peers == {"a": "https://a.example:7001", "c": "https://c.example:7001"}
    assert node.url == "https://b.example:7001"
    with pytest.raises(ConfigError, match="does not list this node"):
        config(["--id", "d", *members], monkeypatch)
    with pytest.raises(ConfigError, match="not both"):
        config(["--id", "b", *members, "--peers", "a=https://a.example:7001"], monkeypatch)


def test_a_secret_readable_by_other_users_is_warned_about(tmp_path, monkeypatch, caplog):
    import os

    secret = tmp_path / "token"
    secret.write_text("s" * 20)
    for mode, warned in ((0o600, False), (0o440, False), (0o644, True), (0o604, True)):
        secret.chmod(mode)  # the group is ours (the test's egid made the file)
        caplog.clear()
        config(["--token-file", str(secret)], monkeypatch)
        assert ("readable by other users" in caplog.text) is warned, (oct(mode), caplog.text)
    if os.geteuid() == 0:
        os.chown(secret, -1, os.getegid() + 1)  # a group the process is not in
        secret.chmod(0o640)
        caplog.clear()
        config(["--token-file", str(secret)], monkeypatch)
        assert "readable by other users" in caplog.text


def test_join_needs_a_secret_a_url_and_no_peer_list(monkeypatch):
    secret = {"RAFTQ_CLUSTER_SECRET": "s" * 24}
    made = config(["--join", "http://127.0.0.1:7001/"], monkeypatch, **secret)
    assert made.join_url == "http://127.0.0.1:7001" and made.peers == {}
    with pytest.raises(ConfigError, match="needs a cluster secret"):
        config(["--join", "http://127.0.0.1:7001"], monkeypatch)
    with pytest.raises(ConfigError, match="--join and --peers exclude each other"):
        config(["--join", "http://127.0.0.1:7001", *PEERS], monkeypatch, **secret)
    with pytest.raises(ConfigError, match="must start with http"):
        config(["--join", "127.0.0.1:7001"], monkeypatch, **secret)
