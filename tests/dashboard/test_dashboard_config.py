"""Configuration: defaults < YAML file < CORRAL_* variables < arguments, and clear errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from corral import Client, LocalCluster, config
from corral.cli import main
from corral.config import ConfigError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No CORRAL_* configuration from the machine running the tests; no ~/.config file."""
    for name in list(os.environ):
        if name.startswith("CORRAL_") and (
            "__" in name
            or name in ("CORRAL_CONFIG", "CORRAL_WORKER_RESOURCES", "CORRAL_PRELOAD")
            or name.endswith("_PRELOAD")
            or name in ("CORRAL_MAX_FRAME_SIZE", "CORRAL_AUTH_TOKEN_FILE")
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "corral.yaml"
    path.write_text(text)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- loading -------------------------------------------------------------------------------
def test_defaults_without_a_file():
    cfg = config.load()
    assert not cfg.found and cfg.path.endswith(os.path.join("corral", "corral.yaml"))
    assert cfg["scheduler.port"] == 8786
    assert cfg["dashboard.address"] == ":8787"
    assert cfg["dashboard.auth"] == "token" and cfg["dashboard.tls"] is True
    assert cfg["worker.nthreads"] is None and cfg["worker.memory-limit"] == "auto"
    assert cfg.source("scheduler.port") == "default"
    assert set(cfg.values) == {o.key for o in config.OPTIONS}


def test_file_then_environment_then_arguments(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        """
scheduler:
  port: 9001
  preload: [one.py]
dashboard:
  address: ":9100"
worker:
  nthreads: 4
  memory-limit: 2GB
  resources: {GPU: 2}
""",
    )
    monkeypatch.setenv("CORRAL_CONFIG", path)
    cfg = config.load()
    assert cfg["scheduler.port"] == 9001 and cfg.source("scheduler.port") == path
    assert cfg["worker.resources"] == {"GPU": 2}
    assert cfg["scheduler.preload"] == ["one.py"]
    monkeypatch.setenv("CORRAL_SCHEDULER__PORT", "9002")
    monkeypatch.setenv("CORRAL_WORKER__MEMORY_LIMIT", "3GiB")
    monkeypatch.setenv("CORRAL_WORKER_RESOURCES", "GPU=[0,1],FPGA=1")  # the older variable
    monkeypatch.setenv("CORRAL_PRELOAD", "two.py,three.py")
    cfg = config.load()
    assert (
        cfg["scheduler.port"] == 9002 and cfg.source("scheduler.port") == "$CORRAL_SCHEDULER__PORT"
    )
    assert cfg["worker.memory-limit"] == "3GiB"
    assert cfg["worker.resources"] == "GPU=[0,1],FPGA=1"
    assert cfg.source("worker.resources") == "$CORRAL_WORKER_RESOURCES"
    assert cfg["scheduler.preload"] == cfg["worker.preload"] == ["two.py", "three.py"]
    assert cfg["worker.nthreads"] == 4 and cfg["dashboard.address"] == ":9100"  # the file's
    monkeypatch.setenv("CORRAL_WORKER__RESOURCES", "GPU=8")  # the new name wins over the old
    monkeypatch.setenv("CORRAL_SCHEDULER_PRELOAD", "sched.py")  # the specific one wins
    cfg = config.load()
    assert cfg["worker.resources"] == "GPU=8"
    assert cfg["scheduler.preload"] == ["sched.py"] and cfg["worker.preload"] == [
        "two.py",
        "three.py",
    ]
    # An argument wins over everything.
    assert cfg.get("scheduler.port", 9003) == 9003 and cfg.get("scheduler.port") == 9002
    monkeypatch.setenv("CORRAL_CONFIG", path)
    assert config.get("scheduler.port") == 9002 and config.get("scheduler.port", 1) == 1
    dumped = cfg.dump()
    assert "port: 9002" in dumped and "# from $CORRAL_SCHEDULER__PORT" in dumped
    assert "nthreads: 4" in dumped and f"# from {path}" in dumped
    assert cfg.nested()["worker"]["nthreads"] == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("scheduler:\n  prot: 1\n", "unknown key scheduler.prot (did you mean scheduler.port?)"),
        ("schedular:\n  port: 1\n", "unknown key schedular (did you mean scheduler?)"),
        ("scheduler:\n  port: eighty\n", "scheduler.port: expected an integer, got 'eighty'"),
        ("scheduler:\n  port: 70000\n", "scheduler.port: expected an integer between 0 and 65535"),
        ("worker:\n  memory-limit: 4 parsecs\n", "worker.memory-limit: unknown size unit"),
        ("worker:\n  resources: {GPU: -1}\n", "worker.resources: "),
        ("worker:\n  nthreads: 0\n", "worker.nthreads: expected an integer at least 1"),
        ("dashboard:\n  enabled: maybe\n", "dashboard.enabled: expected true or false"),
        ("dashboard:\n  address: nowhere\n", "dashboard.address: expected [HOST]:PORT"),
        ("dashboard:\n  auth: password\n", "dashboard.auth: expected one of token, none"),
        ("dashboard:\n  tls: sometimes\n", "dashboard.tls: expected true or false"),
        ("scheduler:\n  version-check: loud\n", "scheduler.version-check: expected one of warn"),
        ("logging:\n  level: CHATTY\n", "logging.level: expected a log level"),
        ("worker: 3\n", "worker: expected a section"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("scheduler:\n  port: [1\n", "line 3, column 1: not valid YAML"),
    ],
)
def test_bad_files_name_the_file_and_the_key(tmp_path, monkeypatch, text, message):
    path = write(tmp_path, text)
    monkeypatch.setenv("CORRAL_CONFIG", path)
    with pytest.raises(ConfigError) as info:
        config.load()
    assert str(info.value).startswith(path + ":"), str(info.value)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "CORRAL_SCHEDULER__PROT",
            "1",
            "CORRAL_SCHEDULER__PROT: unknown configuration key "
            "(did you mean CORRAL_SCHEDULER__PORT?)",
        ),
        ("CORRAL_WORKER__NTHREADS", "many", "CORRAL_WORKER__NTHREADS: expected an integer"),
        (
            "CORRAL_WORKER_RESOURCES",
            "MEMORY=lots",
            "CORRAL_WORKER_RESOURCES: MEMORY: 'lots' is not a number",
        ),
        (
            "CORRAL_PROCESS__GC_THRESHOLD",
            "1,2,3,4",
            "CORRAL_PROCESS__GC_THRESHOLD: expected up to three integers",
        ),
        (
            "CORRAL_CONFIG",
            "/nonexistent/corral.yaml",
            "/nonexistent/corral.yaml: the configuration file",
        ),
    ],
)
def test_bad_environment_variables_are_named(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        config.load()
    assert message in str(info.value), str(info.value)


def test_empty_config_variable_means_no_file(monkeypatch, tmp_path):
    xdg = tmp_path / "xdg" / "corral"
    xdg.mkdir(parents=True)
    (xdg / "corral.yaml").write_text("scheduler:\n  port: 1234\n")
    assert config.load()["scheduler.port"] == 1234  # the default place is read
    monkeypatch.setenv("CORRAL_CONFIG", "")
    cfg = config.load()
    assert cfg.path is None and cfg["scheduler.port"] == 8786


# -- the command line ------------------------------------------------------------------------
def test_config_show(tmp_path, monkeypatch):
    path = write(tmp_path, "worker:\n  resources: 'GPU=2'\n")
    monkeypatch.setenv("CORRAL_CONFIG", path)
    monkeypatch.setenv("CORRAL_SCHEDULER__PORT", "9999")
    runner = CliRunner()
    out = runner.invoke(main, ["config", "show"])
    assert out.exit_code == 0, out.output
    assert f"file: {path} (read)" in out.output
    assert "port: 9999" in out.output and "$CORRAL_SCHEDULER__PORT" in out.output
    assert "resources: GPU=2" in out.output
    out = runner.invoke(main, ["config", "show", "scheduler.port"])
    assert out.output.strip() == "9999"
    out = runner.invoke(main, ["config", "show", "--json"])
    assert json.loads(out.output)["scheduler"]["port"] == 9999
    out = runner.invoke(main, ["config", "show", "scheduler.prot"])
    assert out.exit_code == 2 and "did you mean scheduler.port" in out.output
    (tmp_path / "corral.yaml").write_text("worker:\n  nthreds: 2\n")
    out = runner.invoke(main, ["config", "show"])
    assert out.exit_code == 2
    assert f"{path}: unknown key worker.nthreds (did you mean worker.nthreads?)" in out.output


def _run_scheduler(env: dict[str, str], args: list[str], tmp_path) -> dict:
    sched_file = tmp_path / f"scheduler-{len(list(tmp_path.iterdir()))}.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "scheduler", "--scheduler-file", str(sched_file), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no scheduler file"
            time.sleep(0.05)
        time.sleep(0.05)
        return json.loads(sched_file.read_text())
    finally:
        proc.terminate()
        proc.wait(30)


def test_scheduler_command_precedence(tmp_path):
    p_file, p_arg = free_port(), free_port()
    d_file, d_env, d_arg = free_port(), free_port(), free_port()
    path = write(tmp_path, f"scheduler:\n  port: {p_file}\ndashboard:\n  address: ':{d_file}'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_CONFIG"] = path
    info = _run_scheduler(env, [], tmp_path)
    assert info["address"].endswith(f":{p_file}") and info["services"] == {"dashboard": d_file}
    env["CORRAL_DASHBOARD__ADDRESS"] = f"127.0.0.1:{d_env}"
    info = _run_scheduler(env, [], tmp_path)
    assert info["address"].endswith(f":{p_file}") and info["services"] == {"dashboard": d_env}
    info = _run_scheduler(env, ["--port", str(p_arg), "--dashboard-address", f":{d_arg}"], tmp_path)
    assert info["address"].endswith(f":{p_arg}") and info["services"] == {"dashboard": d_arg}
    info = _run_scheduler(env, ["--port", "0", "--no-dashboard"], tmp_path)
    assert "services" not in info


def test_commands_refuse_a_bad_configuration(tmp_path):
    path = write(tmp_path, "scheduler:\n  port: -5\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env["CORRAL_CONFIG"] = path
    for command in (["scheduler"], ["worker", "tcp://127.0.0.1:1", "--no-nanny"]):
        out = subprocess.run(
            [sys.executable, "-m", "corral", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2, out
        assert (
            f"{path}: scheduler.port: expected an integer between 0 and 65535, got -5" in out.stderr
        )


def test_worker_command_takes_its_defaults_from_the_configuration(tmp_path):
    path = write(
        tmp_path,
        "worker:\n  nthreads: 3\n  memory-limit: 1GB\n  resources: {GPU: 1, FPGA: 2}\n",
    )
    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=False) as cluster,
        Client(cluster) as client,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env.update(CORRAL_CONFIG=path, CORRAL_WORKER__NTHREADS="2", CORRAL_AUTH_TOKEN=cluster.token)
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "worker", cluster.scheduler_address, "--no-nanny",
             "--resources", "GPU=4"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client.wait_for_workers(1, timeout=60)
            (w,) = client.scheduler_info()["workers"].values()
        finally:
            proc.terminate()
            proc.wait(30)
    assert w["nthreads"] == 2  # the variable beats the file
    assert w["memory_limit"] == 10**9  # the file
    assert w["resources"] == {"GPU": 4.0}  # the argument beats the file


def _worker_gc_threshold(extra_env: dict[str, str]) -> tuple[int, ...]:
    import gc

    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=False) as cluster,
        Client(cluster) as client,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env.update(extra_env, CORRAL_AUTH_TOKEN=cluster.token)
        proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "worker", cluster.scheduler_address, "--no-nanny"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client.wait_for_workers(1, timeout=60)
            (threshold,) = client.run(gc.get_threshold).values()
        finally:
            proc.terminate()
            proc.wait(30)
    return tuple(threshold)


def test_worker_process_collects_cycles_less_often():
    assert _worker_gc_threshold({}) == (50_000, 20, 10)
    assert _worker_gc_threshold({"CORRAL_PROCESS__GC_THRESHOLD": "9000,5,5"}) == (9000, 5, 5)
    assert _worker_gc_threshold({"CORRAL_PROCESS__GC_THRESHOLD": "null"}) == (700, 10, 10)


def test_client_timeout_from_the_configuration(monkeypatch):
    monkeypatch.setenv("CORRAL_CLIENT__TIMEOUT", "7")
    with LocalCluster(n_workers=1, processes=False, dashboard_address=False) as cluster:
        with Client(cluster) as client:
            assert client.timeout == 7.0
        with Client(cluster, timeout=3) as client:
            assert client.timeout == 3.0
