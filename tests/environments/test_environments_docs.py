"""The examples of docs/environments.md run as written (Corral's names for the seed's)."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from corral import Client, LocalCluster

DOC = Path(__file__).resolve().parents[2] / "docs" / "environments.md"


def blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def block_with(text):
    (found,) = [b for b in blocks() if text in b and not b.startswith(">>>")]
    return found


@pytest.fixture(scope="module")
def client():
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False)
    with cluster, Client(cluster) as c:
        yield c


def test_the_seed_examples_run_with_corral_names(client):
    import psutil

    qualifies = psutil.virtual_memory().total > 30e9
    workers = sorted(client.scheduler_info()["workers"])
    namespace = {"__name__": "environments_doc_example", "client": client}
    exec(block_with("def has_high_memory(dask_worker)"), namespace)  # registers it
    assert client.environments() == {"high-memory": workers if qualifies else []}
    exec(block_with("class HighMemory(corral.WorkerEnvironment)"), namespace)
    exec(block_with("environment=HighMemory)"), namespace)  # replaces it
    assert client.environments() == {"high-memory": workers if qualifies else []}
    client.unregister_worker_environment("high-memory")


def test_the_database_example_runs(tmp_path):
    code = block_with("class DatabaseAccess(WorkerEnvironment)")
    path = tmp_path / "app.db"
    script = tmp_path / "example.py"
    script.write_text(code.replace("/tmp/app.db", str(path)))
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, timeout=120)
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT worker, value FROM rows").fetchall()
    assert sorted(v for _, v in rows) == list(range(100))
    assert len({w for w, _ in rows}) == 1  # only the worker with the DB resource
