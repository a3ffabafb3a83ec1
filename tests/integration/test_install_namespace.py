"""raftq installs under one `raftq` namespace: a user's project with its own `client.py` and
`cluster/` package beside its `tasks.py` keeps both, and raftq still works from it.

The test builds that project in a temporary folder, installs raftq into a fresh virtual environment
from the repository (a real, non-editable `pip install`, so it also proves the wheel carries every
package and the dashboard page), and from the project runs a producer script and
`raftq worker tasks:app --burst` against real nodes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raftq.cluster.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]

TASKS = '''
import client                      # the user's own client.py, not raftq's
from cluster import settings       # the user's own cluster/ package
from raftq import App

app = App(settings.NODES, default_queue="greetings")


@app.task
def greet(name):
    line = client.greeting(name)
    with open(settings.OUT, "a") as out:
        out.write(line + "\\n")
    return line
'''

PRODUCE = '''
import sys
from tasks import greet
handles = [greet.submit(name) for name in ("ada", "grace", "edsger")]
print(" ".join(handles))
'''


def _source_copy(where: Path) -> Path:
    """The repository's files (without .venv, var/, build output): pip builds in the source tree,
    and a build there would leave `build/` behind in the checkout."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip(f"needs a git checkout to know the repository's files: {listed.stderr.strip()}")
    for name in listed.stdout.splitlines():
        if (REPO / name).is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, where / name)
    return where


def _fresh_venv(where: Path, source: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", str(source)],
                             capture_output=True, text=True, timeout=600)
    if install.returncode != 0:
        pytest.fail(f"pip install of the repository failed:\n{install.stdout[-3000:]}\n{install.stderr[-3000:]}")
    return python


def test_a_user_project_with_its_own_client_and_cluster_modules(tmp_path):
    project = tmp_path / "project"
    (project / "cluster").mkdir(parents=True)
    out = tmp_path / "greetings.txt"
    (project / "client.py").write_text("def greeting(name):\n    return 'hello ' + name\n")
    (project / "tasks.py").write_text(textwrap.dedent(TASKS))
    (project / "produce.py").write_text(textwrap.dedent(PRODUCE))
    python = _fresh_venv(tmp_path / "venv", _source_copy(tmp_path / "source"))
    raftq_command = python.parent / "raftq"

    with LocalCluster(str(tmp_path / "nodes"), size=1) as nodes:
        (project / "cluster" / "__init__.py").write_text("")
        (project / "cluster" / "settings.py").write_text(
            f"NODES = {','.join(nodes.urls)!r}\nOUT = {str(out)!r}\n")
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
        produced = subprocess.run([str(python), "produce.py"], cwd=project, env=env, capture_output=True, text=True,
                                  timeout=60)
        assert produced.returncode == 0, f"producer failed:\n{produced.stderr[-3000:]}"
        job_ids = produced.stdout.split()
        assert len(job_ids) == 3, produced.stdout

        worker = subprocess.run([str(raftq_command), "--nodes", ",".join(nodes.urls), "worker", "tasks:app", "--burst"],
                                cwd=project, env=env, capture_output=True, text=True, timeout=120)
        assert worker.returncode == 0, f"worker failed:\n{worker.stdout[-2000:]}\n{worker.stderr[-3000:]}"
        assert sorted(out.read_text().split("\n")[:-1]) == ["hello ada", "hello edsger", "hello grace"]

        # The installed package is the wheel's copy, not the repository's folders.
        where = subprocess.run([str(python), "-c", "import raftq.client, raftq.cluster.api.dashboard as d, importlib.resources as r;"
                                "print(raftq.client.__file__); print(len(r.files('raftq.cluster.api').joinpath('dashboard.html').read_bytes()))"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert where.returncode == 0, where.stderr
        installed_at, page_bytes = where.stdout.split()
        assert str(tmp_path / "venv") in installed_at and int(page_bytes) > 1000, where.stdout
