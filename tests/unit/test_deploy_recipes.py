"""The deploy recipes (deploy/systemd, deploy/Containerfile, deploy/k8s) say what the node reads.

There is no container engine or Kubernetes here, so the recipes are checked for the fields that
matter against the code they configure: every RAFTQ_ variable is one the node reads; the secrets
arrive as files; the data directory is the volume; the members list names the StatefulSet's own
stable pod names; the probes are `raftq admin probe` commands that parse. The systemd unit also
goes through systemd's own verifier where it is installed. The Kubernetes manifest is JSON, which
kubectl applies as it is, so the standard library reads it: no YAML dependency for one file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from argparse import Namespace
from pathlib import Path

import pytest

from raftq import admin
from raftq.cluster import constants
from raftq.cluster.main import peers_and_url

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "raftq@.service"


def node_variables() -> set[str]:
    """Every RAFTQ_ variable `raftq node` reads (flags through _env, secrets through read_secret)."""
    source = (ROOT / "cluster" / "main.py").read_text()
    names = set(re.findall(r'_env\("([A-Z_]+)"', source)) | set(re.findall(r'read_secret\([^,]+, "([A-Z_]+)"', source))
    assert {"NODE_ID", "MEMBERS", "TOKEN", "CLUSTER_SECRET", "TLS_KEY"} <= names, names
    return {f"RAFTQ_{name}" for name in names}


def unit_settings(text: str) -> list[tuple[str, str]]:
    """(key, value) of every setting line, in order (systemd allows a key more than once)."""
    return [tuple(line.split("=", 1)) for line in text.splitlines()
            if line and not line.startswith(("#", "[")) and "=" in line]


def test_the_systemd_unit_runs_one_node_per_instance_with_its_files():
    settings = unit_settings(UNIT.read_text())
    values = {key: [v for k, v in settings if k == key] for key, _ in settings}
    assert values["Restart"] == ["on-failure"] and values["RestartPreventExitStatus"] == ["2"]
    assert int(values["LimitNOFILE"][0]) >= 4 * constants.CONNECTIONS_MAX
    assert values["ExecStart"][0].endswith("/bin/raftq node")
    assert values["KillSignal"] == ["SIGTERM"]
    assert float(values["TimeoutStopSec"][0].rstrip("s")) > constants.SHUTDOWN_GRACE_S
    environment = dict(v.split("=", 1) for v in values["Environment"])
    assert set(environment) <= node_variables(), set(environment) - node_variables()
    assert environment["RAFTQ_NODE_ID"] == "%i" and environment["RAFTQ_DATA_DIR"] == "/var/lib/raftq/%i"
    assert values["StateDirectory"] == ["raftq/%i"]  # systemd makes /var/lib/raftq/%i for the service user
    credentials = dict(v.split(":", 1) for v in values["LoadCredential"])
    for variable, credential in (("RAFTQ_CLUSTER_SECRET_FILE", "cluster-secret"), ("RAFTQ_TOKEN_FILE", "token"),
                                 ("RAFTQ_TLS_KEY", "tls-key")):
        assert environment[variable] == f"%d/{credential}" and credential in credentials, variable
    assert environment["RAFTQ_TLS_PEER_CERTS"] == "1" and environment["RAFTQ_TLS_CA"].endswith("ca.pem")

    env_file = dict(unit_settings((DEPLOY / "systemd" / "raftq-n1.env").read_text()))
    assert set(env_file) <= node_variables()
    assert not {"RAFTQ_TOKEN", "RAFTQ_CLUSTER_SECRET"} & set(env_file), "secrets never go in the env file"
    peers, url = peers_and_url(Namespace(id="n1", members=env_file["RAFTQ_MEMBERS"], peers="", advertise_url=""))
    assert sorted(peers) == ["n2", "n3"] and url.startswith("https://")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_verifies_the_unit(tmp_path):
    # An instance of the template, run by an executable that exists here (verify checks it).
    instance = tmp_path / "raftq@n1.service"
    instance.write_text(UNIT.read_text().replace("/opt/raftq/bin/raftq", str(Path(sys.executable).parent / "raftq")))
    result = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "raftq@" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


def containerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(None, 1)) for line in lines]


def test_the_container_image_installs_every_package_and_runs_a_node_as_a_user():
    instructions = containerfile_instructions()
    by_name: dict[str, list[str]] = {}
    for name, argument in instructions:
        by_name.setdefault(name, []).append(argument)
    assert instructions[0][0] == "FROM" and "python:3.1" in instructions[0][1]
    package_dirs = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied = {source for argument in by_name["COPY"] for source in argument.split()[:-1]}
    assert package_dirs | {"pyproject.toml", "README.md"} <= copied, package_dirs - copied
    assert all((ROOT / source).exists() for source in copied)
    assert by_name["USER"] == ["raftq"] and "--uid 10001" in by_name["RUN"][0]
    env = dict(re.findall(r"(RAFTQ_[A-Z_]+)=(\S+)", " ".join(by_name["ENV"])))
    assert set(env) <= node_variables()
    assert by_name["VOLUME"] == [env["RAFTQ_DATA_DIR"]] and by_name["EXPOSE"] == [env["RAFTQ_PORT"]]
    assert env["RAFTQ_HOST"] == "0.0.0.0"  # so the node refuses to start unless told where it is reached
    assert by_name["STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads(by_name["ENTRYPOINT"][0]) == ["raftq", "node"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["raftq"] == "raftq.command:main"


def kubernetes_objects() -> dict[str, dict]:
    manifest = json.loads((DEPLOY / "k8s" / "raftq.json").read_text())
    assert manifest["kind"] == "List"
    return {item["kind"]: item for item in manifest["items"]}


def test_the_statefulset_gives_each_node_a_stable_name_a_volume_probes_and_its_secrets_as_files():
    objects = kubernetes_objects()
    namespace = objects["Namespace"]["metadata"]["name"]
    service, statefulset = objects["Service"], objects["StatefulSet"]
    spec, pod = statefulset["spec"], statefulset["spec"]["template"]["spec"]
    # Stable network ids: a headless service whose DNS names exist before the pods are ready
    # (the peers must reach each other to elect the leader that makes them ready).
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert spec["serviceName"] == service["metadata"]["name"]
    assert spec["podManagementPolicy"] == "Parallel"  # OrderedReady would wait for a leader that needs two pods
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"] == labels and service["spec"]["selector"] == labels
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert set(env) - {"POD_NAME"} <= node_variables()
    assert container["env"][0] == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert env["RAFTQ_NODE_ID"] == "$(POD_NAME)"
    name, port = statefulset["metadata"]["name"], int(env["RAFTQ_PORT"])
    assert container["ports"][0]["containerPort"] == port == service["spec"]["ports"][0]["port"]
    members = dict(item.split("=", 1) for item in env["RAFTQ_MEMBERS"].split(","))
    assert members == {f"{name}-{i}": f"https://{name}-{i}.{service['metadata']['name']}.{namespace}"
                                      f".svc.cluster.local:{port}" for i in range(spec["replicas"])}
    for pod_name in members:
        peers, url = peers_and_url(Namespace(id=pod_name, members=env["RAFTQ_MEMBERS"], peers="", advertise_url=""))
        assert len(peers) == spec["replicas"] - 1 and url == members[pod_name]
    # Per-pod volumes: the claim template is the data directory.
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    (claim,) = spec["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]]["mountPath"] == env["RAFTQ_DATA_DIR"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Secrets as files, from secret volumes, readable by the pod's own group only.
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    secret_dirs = {mounts[n]["mountPath"]: volumes[n]["secret"] for n in volumes if "secret" in volumes[n]}
    for variable in ("RAFTQ_CLUSTER_SECRET_FILE", "RAFTQ_TOKEN_FILE", "RAFTQ_TLS_KEY", "RAFTQ_TLS_CERT", "RAFTQ_TLS_CA"):
        folder = os.path.dirname(env[variable])
        assert folder in secret_dirs, (variable, env[variable])
        assert secret_dirs[folder]["defaultMode"] & 0o007 == 0
    assert not {"RAFTQ_TOKEN", "RAFTQ_CLUSTER_SECRET"} & set(env), "secrets come as files, not in the environment"
    security = pod["securityContext"]
    assert security["runAsUser"] == 10001 and security["fsGroup"] == security["runAsGroup"]
    # Probes on /v1/cluster through `raftq admin probe`, which reads the node's own token file.
    for kind, ready in (("startupProbe", False), ("livenessProbe", False), ("readinessProbe", True)):
        command = container[kind]["exec"]["command"]
        assert command[:2] == ["raftq", "admin"], command
        args = admin.build_parser().parse_args(command[2:])
        assert args.command == "probe" and args.ready is ready and args.nodes == f"https://localhost:{port}"
        assert os.path.dirname(args.ca) in secret_dirs
    assert pod["terminationGracePeriodSeconds"] > constants.SHUTDOWN_GRACE_S
