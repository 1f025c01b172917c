"""The examples of docs/consistency.md run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from corral import Client, LocalCluster, PipInstall
from corral.diagnostics.plugin import PipInstall as DaskPathPipInstall
from corral.versions import FAKE_VERSIONS_ENV

DOC = Path(__file__).resolve().parents[2] / "docs" / "consistency.md"


def block_with(text):
    (found,) = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if text in b]
    return found


def test_objects_from_main_travel_by_value(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(block_with("class Greeting"))
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hello world"


def test_the_upload_file_example(tmp_path, monkeypatch):
    (tmp_path / "mymodule.py").write_text("def process(x):\n    return x * 100\n")
    monkeypatch.chdir(tmp_path)
    with LocalCluster(n_workers=1, threads_per_worker=1) as cluster, Client(cluster) as client:
        namespace = {"__name__": "__main__", "client": client}
        exec(block_with('client.upload_file("mymodule.py")'), namespace)
        assert namespace["client"].submit(namespace["use_it"], 2).result() == 200


def test_names_the_page_promises():
    text = DOC.read_text()
    assert FAKE_VERSIONS_ENV in text
    assert DaskPathPipInstall is PipInstall
    assert "version_check" in Client.__init__.__code__.co_varnames
    for name in ("restart", "restart_workers", "upload_file", "get_versions"):
        assert f"client.{name}(" in text and callable(getattr(Client, name))
