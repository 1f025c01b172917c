"""``client.upload_file``: modules and archives on current and later workers (real processes)."""

from __future__ import annotations

import importlib
import os
import sys
import uuid
import zipfile

import pytest
from consistency_helpers import worker_names

from corral import Client, LocalCluster


def version_of(name):
    """Import module ``name`` on the worker and return its ``VERSION``."""
    return importlib.import_module(name).VERSION


def versions_everywhere(client, name):
    return client.run(version_of, name)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as c:
        yield c


@pytest.fixture
def client(cluster):
    with Client(cluster) as c:
        yield c
    cluster.scale(1)


def unique(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def write(path, text):
    path.write_text(text)
    return str(path)


def test_module_then_a_new_version_on_current_and_later_workers(client, cluster, tmp_path):
    name = unique("shipped")
    path = write(tmp_path / f"{name}.py", "VERSION = 1\n\ndef get():\n    return VERSION\n")
    (first,) = client.scheduler_info()["workers"]
    assert client.upload_file(path) == {first: {"status": "OK"}}
    assert client.submit(version_of, name, pure=False).result() == 1

    # A function of the uploaded module, pickled by reference: the worker runs its own copy.
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
        assert client.submit(module.get, pure=False).result() == 1

        write(tmp_path / f"{name}.py", "VERSION = 2\n\ndef get():\n    return VERSION * 10\n")
        client.upload_file(path)  # reloaded where it was imported
        assert client.submit(version_of, name, pure=False).result() == 2
        assert client.submit(module.get, pure=False).result() == 20
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)

    # On the scheduler too (for run_on_scheduler and scheduler plugins).
    assert client.run_on_scheduler(version_of, name) == 2

    # A worker joining later gets the latest version.
    cluster.scale(2)
    assert versions_everywhere(client, name) == dict.fromkeys(worker_names(client).values(), 2)


@pytest.mark.parametrize("suffix", [".zip", ".whl"])
def test_archive_of_a_package_and_a_new_version(client, cluster, tmp_path, suffix):
    name = unique("zipped")

    def archive(version):
        path = tmp_path / f"{name}-1.0-py3-none-any{suffix}"
        with zipfile.ZipFile(path, "w") as z:
            z.writestr(f"{name}/__init__.py", "from .core import VERSION\n")
            z.writestr(f"{name}/core.py", f"VERSION = {version!r}\n")
            if suffix == ".whl":
                z.writestr(f"{name}-1.0.dist-info/METADATA", f"Name: {name}\nVersion: 1.0\n")
        return str(path)

    client.upload_file(archive("a"))
    assert set(versions_everywhere(client, name).values()) == {"a"}
    client.upload_file(archive("b"))  # the package and its submodule are imported anew
    assert set(versions_everywhere(client, name).values()) == {"b"}
    assert client.submit(version_of, f"{name}.core", pure=False).result() == "b"


def test_a_file_that_does_not_import_raises_with_the_workers_traceback(client, cluster, tmp_path):
    name = unique("broken")
    path = write(tmp_path / f"{name}.py", "VERSION = 1\n")
    client.upload_file(path)
    (worker,) = client.scheduler_info()["workers"]

    write(tmp_path / f"{name}.py", "VERSION = (\n")
    with pytest.raises(SyntaxError) as info:
        client.upload_file(path)
    text = "".join(__import__("traceback").format_exception(info.value))
    assert f"raised on {worker}" in text
    assert f"{name}.py" in text and "never closed" in text
    # Nothing changed: current workers keep the last good version, later ones get it too.
    assert client.submit(version_of, name, pure=False).result() == 1
    cluster.scale(2)
    assert set(versions_everywhere(client, name).values()) == {1}

    write(tmp_path / f"{name}.py", "VERSION = 3\nraise RuntimeError('no import for you')\n")
    with pytest.raises(RuntimeError, match="no import for you"):
        client.upload_file(path)
    assert set(versions_everywhere(client, name).values()) == {1}


def test_missing_unreadable_or_wrong_files_fail_before_sending(client, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        client.upload_file(str(tmp_path / "nothere.py"))
    with pytest.raises(IsADirectoryError, match="folder"):
        (tmp_path / "pkg.zip").mkdir()
        client.upload_file(str(tmp_path / "pkg.zip"))
    with pytest.raises(ValueError, match=r"\.py modules"):
        client.upload_file(write(tmp_path / "notes.txt", "hello"))
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.py"
        write(locked, "X = 1\n")
        locked.chmod(0)
        with pytest.raises(PermissionError, match="cannot read"):
            client.upload_file(str(locked))
    assert "upload_file-nothere.py" not in str(client.get_events("plugins"))
