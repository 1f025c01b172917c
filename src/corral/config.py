"""Configuration: one YAML file, ``CORRAL_*`` environment variables, then arguments.

Where a value comes from, lowest precedence first:

1. the defaults in :data:`OPTIONS`;
2. the YAML file named by ``$CORRAL_CONFIG``, else
   ``$XDG_CONFIG_HOME/corral/corral.yaml`` (``~/.config/corral/corral.yaml``);
3. environment variables: ``CORRAL_<SECTION>__<KEY>`` (``-`` written ``_``,
   levels joined by ``__``: ``CORRAL_SCHEDULER__PORT=9000``,
   ``CORRAL_WORKER__MEMORY_LIMIT=4GB``), and the older single names that
   Corral read before this module existed (``CORRAL_WORKER_RESOURCES``,
   ``CORRAL_PRELOAD``, ``CORRAL_AUTH_TOKEN_FILE``, ...: see ``env`` in
   :data:`OPTIONS`);
4. command line options and constructor arguments (``corral scheduler
   --port``, ``Scheduler(dashboard_address=...)``): a value given there wins.

Unknown keys, unknown ``CORRAL_..__..`` variables and bad values raise
:class:`ConfigError` naming the file (or variable) and the key.  ``corral
config show`` prints the effective configuration and where each value came
from.  The full list is in ``docs/configuration.md``.

Example::

    from corral import config
    config.get("scheduler.port")           # 8786, or what the file/env says
    config.get("worker.nthreads", 4)       # 4: an explicit value wins
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CorralError

#: Environment variable naming the configuration file ("" for none at all).
CONFIG_ENV = "CORRAL_CONFIG"

_UNSET: Any = object()


class ConfigError(CorralError, ValueError):
    """A configuration file or variable has an unknown key or a bad value."""


# -- value checks: take what YAML or an environment variable gives, return the value --
def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def optional(value: Any) -> Any:
        if value is None or (
            isinstance(value, str) and value.strip().lower() in ("", "null", "none", "~")
        ):
            return None
        return check(value)

    optional.__doc__ = f"{check.__doc__} or null"
    return optional


def _int(low: int | None = None, high: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {value!r}") from None
        if not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"between {low} and {high}"
            raise ValueError(f"expected an integer {bounds}, got {value!r}")
        return value

    check.__doc__ = "an integer" + (f" >= {low}" if low is not None else "")
    return check


def _float(
    low: float = 0.0, high: float | None = None, *, strict: bool = False
) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if (
            number != number
            or number < low
            or (strict and number == low)
            or (high is not None and number > high)
        ):
            what = f"greater than {low}" if strict else f"at least {low}"
            if high is not None:
                what = f"between {low} and {high}"
            raise ValueError(f"expected a number {what}, got {value!r}")
        return number

    check.__doc__ = "a number"
    return check


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _bool(value: Any) -> bool:
    """true or false"""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"expected true or false, got {value!r}")


def _gc_threshold(value: Any) -> tuple[int, ...]:
    """up to three integers >= 0 (gc.set_threshold), as a list or a string like 50000,20,10"""
    if isinstance(value, str):
        value = [part for part in value.replace(" ", "").split(",") if part]
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= 3:
        raise ValueError(f"expected up to three integers, got {value!r}")
    check = _int(0)
    return tuple(check(v) for v in value)


def _str(value: Any) -> str:
    """a string"""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    check.__doc__ = " | ".join(choices)
    return check


def _str_list(value: Any) -> list[str]:
    """a list of strings (or one comma-separated string)"""
    if value is None:
        return []
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"expected a list of strings, got {value!r}")


def _size(value: Any) -> int | str:
    """bytes: a number, a size like 4GB or 512MiB, or auto"""
    from .deploy.local import parse_bytes

    if isinstance(value, bool):
        raise ValueError(f"expected a size like 4GB, a number of bytes or auto, got {value!r}")
    if value is None:
        return 0
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"expected a positive size, got {value!r}")
        return int(value)
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        parse_bytes(value)  # raises ValueError with the reason
        return value.strip()
    raise ValueError(f"expected a size like 4GB, a number of bytes or auto, got {value!r}")


def _frame_size(value: Any) -> str | int:
    """bytes: a size like 256MiB (at least 64 KiB)"""
    from .comm.connection import parse_frame_size

    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a size like 256MiB, got {value!r}")
    parse_frame_size(value.strip() if isinstance(value, str) else value)
    return value.strip() if isinstance(value, str) else value


def _resources(value: Any) -> str | dict[str, Any]:
    """resources: a mapping {GPU: 2} or the --resources syntax "GPU=2,MEM=1e9" / "auto" """
    from .resources import parse_resources, validate_worker_resources

    if value is None:
        return {}
    try:
        if isinstance(value, Mapping):
            # YAML reads 100e9 (no dot) as a string: take numbers written that way too.
            return validate_worker_resources(
                {k: _number_or_same(v) for k, v in value.items()}, "resources"
            )
        if isinstance(value, str):
            # "auto" asks the hardware (nvidia-smi): checked when a worker starts, not here.
            rest = ",".join(p for p in value.split(",") if p.strip().lower() != "auto")
            parse_resources(rest, "resources")
            return value.strip()
    except ValueError as exc:
        raise ValueError(str(exc).removeprefix("resources: ")) from None
    raise ValueError(f"expected a mapping like {{GPU: 2}} or a string like 'GPU=2', got {value!r}")


def _number_or_same(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _address(value: Any) -> str:
    """[HOST]:PORT, e.g. :8787 (the scheduler's interface) or 0.0.0.0:8787"""
    text = _str(value).strip()
    parse_address(text, "127.0.0.1")
    return text


def parse_address(text: str, default_host: str) -> tuple[str, int]:
    """``":8787"`` -> ``(default_host, 8787)``; ``"0.0.0.0:80"``, ``"[::1]:80"``, ``"8787"``."""
    text = text.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.rstrip("/")
    if text.isdigit():
        host, port_text = "", text
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"expected [HOST]:PORT such as ':8787', got {text!r}")
    host = host.strip("[]") or default_host
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"expected [HOST]:PORT such as ':8787', got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be between 0 and 65535, got {port}")
    return host, port


def _log_level(value: Any) -> str:
    """DEBUG | INFO | WARNING | ERROR | CRITICAL"""
    import logging

    text = _str(value).strip().upper()
    if not isinstance(logging.getLevelName(text), int):
        raise ValueError(f"expected a log level (DEBUG, INFO, WARNING, ERROR), got {value!r}")
    return text


# -- the schema -------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """One configuration key: its default, how values are checked, what it does."""

    key: str
    default: Any
    check: Callable[[Any], Any]
    doc: str
    env: tuple[str, ...] = ()  # older variables read as this key (first set wins)

    @property
    def env_var(self) -> str:
        """The ``CORRAL_<SECTION>__<KEY>`` variable of this key."""
        return "CORRAL_" + self.key.upper().replace(".", "__").replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("scheduler.host", "127.0.0.1", _str, "Interface the scheduler listens on."),
    Option("scheduler.port", 8786, _int(0, 65535), "Scheduler port (0: any free one)."),
    Option(
        "scheduler.version-check",
        "warn",
        _choice("warn", "strict", "off"),
        "Workers whose package versions differ: warn, strict (refuse them) or off.",
    ),
    Option(
        "scheduler.preload",
        [],
        _str_list,
        "Preload modules of the scheduler (names or .py files).",
        env=("CORRAL_SCHEDULER_PRELOAD", "CORRAL_PRELOAD"),
    ),
    Option("dashboard.enabled", True, _bool, "Serve the dashboard and /metrics."),
    Option(
        "dashboard.address",
        ":8787",
        _address,
        "Where the dashboard listens: [HOST]:PORT; no host: the scheduler's interface; "
        "a busy port falls back to a free one.",
    ),
    Option(
        "dashboard.auth",
        "token",
        _choice("token", "none"),
        "Who may see the dashboard: token (the cluster's token, or with mutual TLS a"
        " certificate signed by its CA, when the cluster has one) or none (anyone who"
        " reaches it).",
    ),
    Option(
        "dashboard.tls",
        True,
        _bool,
        "Serve the dashboard over HTTPS with the scheduler's TLS certificate when it has one.",
    ),
    Option(
        "dashboard.interval",
        0.5,
        _float(0.05),
        "Seconds between samples of the scheduler state (one sample serves every viewer).",
    ),
    Option(
        "dashboard.task-stream-length",
        10000,
        _int(100),
        "Finished tasks kept for the task stream (a ring buffer).",
    ),
    Option("worker.nthreads", None, _optional(_int(1)), "Threads per worker (null: one per core)."),
    Option(
        "worker.memory-limit",
        "auto",
        _size,
        "Memory per worker: 4GB, 512MiB, bytes, auto (the machine's memory / workers), 0: none.",
    ),
    Option(
        "worker.resources",
        {},
        _resources,
        "Resources a worker offers: {GPU: 2, MEMORY: 100e9} or 'GPU=[0,1]' or 'auto'.",
        env=("CORRAL_WORKER_RESOURCES",),
    ),
    Option(
        "worker.preload",
        [],
        _str_list,
        "Preload modules of every worker.",
        env=("CORRAL_WORKER_PRELOAD", "CORRAL_PRELOAD"),
    ),
    Option(
        "worker.memory-pause-fraction",
        0.8,
        _float(0.0, 1.0),
        "Pause (start no task) above this fraction of the memory limit; 0: never.",
    ),
    Option(
        "worker.memory-terminate-fraction",
        0.95,
        _float(0.0, 1.0),
        "Restart the worker above this fraction of the memory limit; 0: never.",
    ),
    Option(
        "worker.local-directory",
        None,
        _optional(_str),
        "Scratch space of workers (null: a temporary one).",
    ),
    Option("client.timeout", 30.0, _float(0.0, strict=True), "Seconds a client waits to connect."),
    Option(
        "client.direct-results",
        True,
        _bool,
        "Receive small results straight from the worker that computed them"
        " (watch_results), instead of relayed by the scheduler.",
    ),
    Option(
        "client.direct-results-max-workers",
        64,
        _int(0),
        "Most workers one client watches for direct results (one connection each).",
    ),
    Option(
        "comm.max-frame-size",
        "4GiB",
        _frame_size,
        "Largest frame a server accepts from a peer.",
        env=("CORRAL_MAX_FRAME_SIZE",),
    ),
    Option(
        "auth.token-file",
        None,
        _optional(_str),
        "File holding the shared token (the variable CORRAL_AUTH_TOKEN, if set, wins).",
        env=("CORRAL_AUTH_TOKEN_FILE",),
    ),
    Option("tls.ca-file", None, _optional(_str), "CA certificate (PEM) peers must be signed by."),
    Option("tls.cert", None, _optional(_str), "This process's TLS certificate (PEM)."),
    Option("tls.key", None, _optional(_str), "The private key (PEM) of tls.cert."),
    Option(
        "process.gc-threshold",
        [50_000, 20, 10],
        _optional(_gc_threshold),
        "gc.set_threshold of scheduler and worker processes (null: Python's own 700,10,10).",
    ),
    Option("logging.level", "INFO", _log_level, "Log level of corral scheduler / corral worker."),
    Option(
        "logging.buffer-size",
        10000,
        _int(0),
        "Log records each process keeps in memory (client.get_worker_logs()).",
    ),
)

BY_KEY: dict[str, Option] = {o.key: o for o in OPTIONS}
_BY_ENV: dict[str, Option] = {o.env_var: o for o in OPTIONS}
_SECTIONS = {o.key.rsplit(".", 1)[0] for o in OPTIONS}


def defaults() -> dict[str, Any]:
    """Every key's default value, by dotted key."""
    return {o.key: _copy(o.default) for o in OPTIONS}


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value)) if isinstance(value, list | dict) else value


# -- loading ----------------------------------------------------------------------------
def config_path(environ: Mapping[str, str] | None = None) -> tuple[str | None, bool]:
    """``(path, explicit)``: the file to read (``None``: none) and whether it was named."""
    env = os.environ if environ is None else environ
    if CONFIG_ENV in env:
        path = env[CONFIG_ENV].strip()
        return (os.path.expanduser(path) if path else None), True
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "corral", "corral.yaml"), False


class Config:
    """Effective configuration: values by dotted key, and where each came from."""

    def __init__(
        self, values: dict[str, Any], sources: dict[str, str], path: str | None, found: bool
    ):
        self.values = values
        self.sources = sources
        self.path = path
        self.found = found

    def __getitem__(self, key: str) -> Any:
        if key not in self.values:
            raise KeyError(f"unknown configuration key {key!r}{_did_you_mean(key, BY_KEY)}")
        return self.values[key]

    def get(self, key: str, value: Any = None) -> Any:
        """``value`` if given (an argument wins), else the configured value of ``key``."""
        return value if value is not None else self[key]

    def source(self, key: str) -> str:
        """Where ``key``'s value came from: ``default``, the file, or a variable."""
        return self.sources.get(key, "default")

    def nested(self) -> dict[str, Any]:
        """The values as nested sections, the layout of the YAML file."""
        out: dict[str, Any] = {}
        for key, value in self.values.items():
            node = out
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return out

    def dump(self, sources: bool = True) -> str:
        """YAML text of the effective values, with the source of each non-default one."""
        where = f"{self.path} ({'read' if self.found else 'not found'})" if self.path else "none"
        lines = [f"# Corral configuration; file: {where}"]
        section: list[str] = []
        for o in OPTIONS:
            *parents, leaf = o.key.split(".")
            common = 0
            while common < min(len(parents), len(section)) and parents[common] == section[common]:
                common += 1
            for depth in range(common, len(parents)):
                lines.append("  " * depth + f"{parents[depth]}:")
            section = parents
            text = "  " * len(parents) + f"{leaf}: {_yaml_scalar(self.values[o.key])}"
            src = self.source(o.key)
            if sources and src != "default":
                text = f"{text:<48} # from {src}"
            lines.append(text)
        return "\n".join(lines) + "\n"


def _yaml_scalar(value: Any) -> str:
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def _did_you_mean(name: str, known: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _check(option: Option, value: Any, source: str) -> Any:
    """The checked value; a :class:`ConfigError` naming the file and key, or the variable."""
    try:
        return option.check(value)
    except ValueError as exc:
        if source.startswith("$"):
            raise ConfigError(f"environment variable {source[1:]}: {exc}") from None
        raise ConfigError(f"{source}: {option.key}: {exc}") from None


def _read_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the configuration file: {exc.strerror or exc}"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (scheduler:, worker:, ...), "
            f"got {type(data).__name__}"
        )
    flat: dict[str, Any] = {}

    def walk(node: Mapping[Any, Any], prefix: str) -> None:
        for name, value in node.items():
            key = f"{prefix}{name}"
            if key in BY_KEY:
                flat[key] = value
            elif key in _SECTIONS or any(s.startswith(key + ".") for s in _SECTIONS):
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"{path}: {key}: expected a section (a mapping of keys), got {value!r}"
                    )
                walk(value, key + ".")
            else:
                choices = {k: None for k in BY_KEY} | {s: None for s in _SECTIONS}
                raise ConfigError(f"{path}: unknown key {key}{_did_you_mean(key, choices)}")

    walk(data, "")
    return flat


def load(path: str | None = _UNSET, environ: Mapping[str, str] | None = None) -> Config:
    """Read the file and the environment; raise :class:`ConfigError` on any problem.

    ``path`` overrides ``$CORRAL_CONFIG`` (``None``: no file); ``environ``
    overrides ``os.environ`` (tests).
    """
    env = os.environ if environ is None else environ
    explicit = True
    if path is _UNSET:
        path, explicit = config_path(env)
    values = defaults()
    sources: dict[str, str] = {}
    found = False
    if path is not None:
        if os.path.exists(path):
            found = True
            for key, raw in _read_file(path).items():
                values[key] = _check(BY_KEY[key], raw, path)
                sources[key] = path
        elif explicit:
            raise ConfigError(
                f"{path}: the configuration file named by ${CONFIG_ENV} does not exist"
            )
    for name in sorted(env):
        if name.startswith("CORRAL_") and "__" in name:
            option = _BY_ENV.get(name)
            if option is None:
                raise ConfigError(
                    f"environment variable {name}: unknown configuration key"
                    f"{_did_you_mean(name, _BY_ENV)}"
                )
    for option in OPTIONS:
        for name in (option.env_var, *option.env):
            text = env.get(name)
            if text is not None and (name == option.env_var or text.strip()):
                values[option.key] = _check(option, text, f"${name}")
                sources[option.key] = f"${name}"
                break
    return Config(values, sources, path, found)


_cache: tuple[Any, Config] | None = None


def current() -> Config:
    """The configuration of this process now (re-read when the file or variables change)."""
    global _cache
    path, _ = config_path()
    try:
        mtime = os.stat(path).st_mtime_ns if path else None
    except OSError:
        mtime = None
    signature = (
        path,
        mtime,
        tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("CORRAL_"))),
    )
    if _cache is None or _cache[0] != signature:
        _cache = (signature, load())
    return _cache[1]


def get(key: str, value: Any = None) -> Any:
    """``value`` when not ``None`` (an argument wins), else the configured value of ``key``."""
    if value is not None:
        return value
    return current()[key]
