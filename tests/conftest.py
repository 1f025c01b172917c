"""Shared fixtures: real schedulers and workers over real sockets."""

from __future__ import annotations

import pytest

from corral import Client, LocalCluster


@pytest.fixture
def cluster():
    """Two in-process workers (one thread each) and a scheduler, on a background loop."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False) as c:
        yield c


@pytest.fixture
def client(cluster):
    """A synchronous client connected to :func:`cluster`."""
    with Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def process_cluster():
    """Two worker subprocesses and a scheduler subprocess (shared by a module)."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as c:
        yield c
