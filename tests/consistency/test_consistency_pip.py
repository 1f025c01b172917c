"""``PipInstall``: a small local package installed offline on real worker processes.

The package is built by the test from a temporary folder (a ``pyproject.toml``
with an in-tree build backend, so pip needs no network and no build
dependencies) and installed with ``--target`` into a folder on the workers'
path, so the shared virtual environment is left untouched.
"""

from __future__ import annotations

import os
import sys
import textwrap
import uuid

import pytest
from consistency_helpers import worker_pids

from corral import Client, LocalCluster, PipInstall, PipInstallError

BACKEND = '''\
"""A build backend small enough to live in the test: one module, one wheel."""
import base64, hashlib, os, zipfile

NAME, VERSION = {name!r}, "1.0"
DIST = f"{{NAME}}-{{VERSION}}"


def _line(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{{path}},sha256={{digest}},{{len(data)}}"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, NAME + ".py"), "rb") as f:
        module = f.read()
    files = {{
        NAME + ".py": module,
        DIST + ".dist-info/METADATA": (
            f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n".encode()
        ),
        DIST + ".dist-info/WHEEL": (
            b"Wheel-Version: 1.0\\nGenerator: test\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
        ),
    }}
    record = [_line(p, d) for p, d in files.items()] + [DIST + ".dist-info/RECORD,,"]
    wheel = f"{{DIST}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(DIST + ".dist-info/RECORD", "\\n".join(record) + "\\n")
    return wheel
'''


def make_package(folder, name):
    folder.mkdir()
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = []
            build-backend = "backend"
            backend-path = ["."]

            [project]
            name = "{name}"
            version = "1.0"
            """
        )
    )
    (folder / "backend.py").write_text(BACKEND.format(name=name))
    (folder / f"{name}.py").write_text("VALUE = 42\n")
    return str(folder)


def value_of(name):
    import importlib

    return importlib.import_module(name).VALUE


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A cluster whose workers have an (empty) install target on their path."""
    root = tmp_path_factory.mktemp("pip")
    target = root / "target"
    target.mkdir()
    with pytest.MonkeyPatch.context() as m:
        m.syspath_prepend(str(target))  # LocalCluster hands its path to its workers
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster:
            yield cluster, root, str(target)


def test_pip_install_of_a_local_package_with_restart(setup):
    cluster, root, target = setup
    name = f"corral_testpkg_{uuid.uuid4().hex[:8]}"
    package = make_package(root / name, name)
    options = ["--no-index", "--no-build-isolation", "--no-deps", "--target", target]
    with Client(cluster) as c:
        before = worker_pids(c)
        with pytest.raises(Exception, match="No module named"):
            c.submit(value_of, name, pure=False).result()

        plugin = PipInstall([package], pip_options=options, restart_workers=True)
        assert sorted(c.register_plugin(plugin)) == sorted(before)

        # Returned once the workers were back: fresh processes that import the package.
        after = worker_pids(c)
        assert len(after) == 2 and not set(after.values()) & set(before.values())
        assert set(c.run(value_of, name).values()) == {42}
        assert c.submit(value_of, name, pure=False).result() == 42
        marker = plugin.marker_path()
        assert os.path.exists(marker)
        installed = os.stat(marker).st_mtime_ns

        # The same content again: no second install, no second restart.
        again = PipInstall([package], pip_options=options, restart_workers=True)
        assert again.name == plugin.name
        c.register_plugin(again)
        assert worker_pids(c) == after
        assert os.stat(marker).st_mtime_ns == installed
        restarts = [m for _, m in c.get_events("restarts") if m["action"] == "restarted"]
        assert len(restarts) == 2
        c.unregister_worker_plugin(plugin.name)


def test_a_package_that_cannot_be_installed_raises_with_pips_output(setup):
    cluster, _, _ = setup
    missing = f"corral-no-such-package-{uuid.uuid4().hex[:8]}"
    with Client(cluster) as c:
        plugin = PipInstall([missing], pip_options=["--no-index"])
        try:
            with pytest.raises(PipInstallError) as info:
                c.register_plugin(plugin)
            text = str(info.value)
            assert any(f"failed on worker {w}" in text for w in c.scheduler_info()["workers"])
            assert missing in text and "exited with status" in text
            assert "No matching distribution" in text  # pip's own words
            assert len(c.scheduler_info()["workers"]) == 2  # nobody restarted or died
        finally:
            c.unregister_worker_plugin(plugin.name)


def test_pip_install_command_and_arguments(monkeypatch):
    plugin = PipInstall(["a==1", "b"], pip_options=["--upgrade"])
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert plugin.command() == [sys.executable, "-m", "pip", "install", "--upgrade", "a==1", "b"]
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/uv" if name == "uv" else None)
    assert plugin.command() == [
        "/usr/bin/uv", "pip", "install", "--python", sys.executable, "--upgrade", "a==1", "b",
    ]  # fmt: skip
    assert PipInstall(["a==1", "b"], ["--upgrade"]).name == plugin.name
    assert PipInstall(["a==2", "b"], ["--upgrade"]).name != plugin.name
    assert PipInstall(["x"], restart=True).restart_workers  # dask's older name
    with pytest.raises(TypeError):
        PipInstall("numpy")
    with pytest.raises(ValueError):
        PipInstall([])
