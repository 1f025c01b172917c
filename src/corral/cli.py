"""The ``corral`` command: ``corral scheduler``, ``corral worker``, ``corral demo``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import click

from ._loop import new_event_loop
from ._version import __version__
from .preload import PreloadError
from .resources import parse_resources
from .scheduler.server import DEFAULT_PORT, Scheduler

logger = logging.getLogger("corral.cli")

# Options the command does not know go to the click command of a --preload module.
_PRELOAD_CONTEXT = {"ignore_unknown_options": True, "allow_extra_args": True}
_PRELOAD_HELP = (
    "Module name or .py file imported before any connection; its corral_setup(service) "
    "runs at start, corral_teardown(service) at stop.  Repeatable.  A click-command "
    "corral_setup takes the extra options given after it."
)


@contextlib.contextmanager
def _preload_errors() -> Any:
    """Turn a failing preload into a clear message and exit status 1."""
    try:
        yield
    except PreloadError as exc:
        raise click.ClickException(str(exc)) from None


def _setup_logging(level: str) -> None:
    from .logs import setup_logging

    setup_logging(level)  # and keep a bounded in-memory log (client.get_worker_logs)


class _ConfigProblem(click.ClickException):
    exit_code = 2


def _config() -> Any:
    """The effective configuration (file < CORRAL_* variables); errors exit with status 2."""
    from . import config

    try:
        return config.current()
    except config.ConfigError as exc:
        raise _ConfigProblem(str(exc)) from None


def _tune_gc() -> None:
    """Collect cycles less often in this scheduler or worker process.

    The servers allocate a few small objects per message and keep few
    cycles; Python's default (a collection every 700 net allocations) spent
    about a fifth of their CPU time on a map of no-op tasks.
    """
    import gc

    threshold = _config()["process.gc-threshold"]
    if threshold is not None:
        gc.set_threshold(*threshold)


def _run_until_signal(
    start: Callable[[], Awaitable[Any]],
    stop: Callable[[], Awaitable[Any]],
    finished: Callable[[], Awaitable[Any]],
) -> None:
    """Start a service, serve until SIGTERM/SIGINT or until it finishes, then stop it."""
    _tune_gc()
    loop = new_event_loop()
    asyncio.set_event_loop(loop)

    async def main() -> None:
        await start()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        done = asyncio.ensure_future(finished())
        waiter = asyncio.ensure_future(stop_requested.wait())
        await asyncio.wait({done, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        await stop()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


# -- security options (docs/security.md) -------------------------------------------------
def _security_options(f: Any) -> Any:
    """``--auth-token-file``, ``--tls-*`` and ``--max-frame-size``, shared by both commands."""
    options = [
        click.option(
            "--auth-token-file",
            default=None,
            type=click.Path(dir_okay=False),
            help="File holding the shared authentication token (else $CORRAL_AUTH_TOKEN).",
        ),
        click.option("--tls-cert", default=None, help="TLS certificate (PEM); turns on tls://."),
        click.option("--tls-key", default=None, help="TLS private key (PEM) of --tls-cert."),
        click.option(
            "--tls-ca-file",
            default=None,
            help="CA certificate (PEM) peers' certificates must be signed by (mutual TLS).",
        ),
        click.option(
            "--max-frame-size",
            default=None,
            help="Largest frame accepted from a peer, e.g. 256MiB (default: "
            "$CORRAL_MAX_FRAME_SIZE or 4GiB).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _security(tls_cert: str | None, tls_key: str | None, tls_ca_file: str | None) -> Any:
    """The ``Security`` of the ``--tls-*`` options (``None`` without any)."""
    if not (tls_cert or tls_key or tls_ca_file):
        return None
    if not tls_cert:
        raise click.UsageError("TLS needs --tls-cert (and --tls-key) on this side too")
    from .comm.security import Security

    try:
        return Security(tls_ca_file=tls_ca_file, tls_cert=tls_cert, tls_key=tls_key)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc)) from None


def _configured_security(
    cfg: Any,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca_file: str | None,
    max_frame_size: str | None,
) -> tuple[Any, Any, Any, Any]:
    """The TLS files and frame size limit: options given, else the configuration's."""
    if not (tls_cert or tls_key or tls_ca_file):
        tls_cert, tls_key, tls_ca_file = cfg["tls.cert"], cfg["tls.key"], cfg["tls.ca-file"]
    if max_frame_size is None and cfg.source("comm.max-frame-size") != "default":
        max_frame_size = str(cfg["comm.max-frame-size"])
    return tls_cert, tls_key, tls_ca_file, max_frame_size


def _max_frame(text: str | None) -> int | None:
    if text is None:
        return None
    from .comm.connection import parse_frame_size

    try:
        return parse_frame_size(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-frame-size") from None


def _token(token_file: str | None, scheduler_info: dict[str, Any] | None = None) -> str | None:
    """--auth-token-file, else $CORRAL_AUTH_TOKEN, else the scheduler file's token, else
    the configured ``auth.token-file`` ($CORRAL_AUTH_TOKEN_FILE or the config file's)."""
    from .comm.security import TOKEN_ENV, resolve_token

    if not token_file and not os.environ.get(TOKEN_ENV) and not (scheduler_info or {}).get("token"):
        token_file = _config()["auth.token-file"]
    try:
        return resolve_token(None, token_file, scheduler_info)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--auth-token-file") from None


@click.group()
@click.version_option(__version__, prog_name="corral")
def main() -> None:
    """Corral: a distributed task scheduler for clusters that are not uniform."""


@main.command(context_settings=_PRELOAD_CONTEXT)
@click.option(
    "--host", default=None, help="Interface to listen on [config scheduler.host: 127.0.0.1]."
)
@click.option(
    "--port",
    default=None,
    type=int,
    help=f"Port (0: any free one) [config scheduler.port: {DEFAULT_PORT}].",
)
@click.option(
    "--dashboard-address",
    default=None,
    help="Where the dashboard and /metrics listen: [HOST]:PORT; no HOST: the scheduler's "
    "interface [config dashboard.address: :8787].",
)
@click.option(
    "--dashboard/--no-dashboard",
    default=None,
    help="Serve the dashboard and /metrics [config dashboard.enabled: true].",
)
@click.option(
    "--dashboard-auth",
    type=click.Choice(["token", "none"]),
    default=None,
    help="token: the dashboard asks for the cluster's token when it has one (or, with mutual "
    "TLS, a client certificate); none: open to anyone who reaches it [config dashboard.auth: "
    "token].",
)
@click.option(
    "--dashboard-tls/--no-dashboard-tls",
    default=None,
    help="Serve the dashboard over HTTPS with --tls-cert when given [config dashboard.tls: true].",
)
@click.option("--scheduler-file", default=None, help="Write the address here as JSON.")
@click.option(
    "--auth",
    type=click.Choice(["generate", "none"]),
    default=None,
    help="generate: make a random token and write it into --scheduler-file (mode 0600) "
    "for workers and clients that read it; none: no token, whatever the environment says.",
)
@_security_options
@click.option(
    "--version-check",
    type=click.Choice(["warn", "strict", "off"]),
    default=None,
    help="Workers whose Python/package versions differ from the cluster's: warn (log and "
    "record them), strict (refuse them), off (do not check) [config scheduler.version-check: "
    "warn].",
)
@click.option("--preload", multiple=True, help=_PRELOAD_HELP)
@click.option("--log-level", default=None, help="[config logging.level: INFO]")
@click.pass_context
def scheduler(
    ctx: click.Context,
    host: str | None,
    port: int | None,
    dashboard_address: str | None,
    dashboard: bool | None,
    dashboard_auth: str | None,
    dashboard_tls: bool | None,
    scheduler_file: str | None,
    auth: str | None,
    auth_token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca_file: str | None,
    max_frame_size: str | None,
    version_check: str | None,
    preload: tuple[str, ...],
    log_level: str | None,
) -> None:
    """Start a scheduler and serve until Ctrl-C or SIGTERM.

    Defaults come from the configuration (``corral config show``): the file,
    then ``CORRAL_*`` variables; options given here win.
    """
    cfg = _config()
    _setup_logging(cfg.get("logging.level", log_level))
    host = cfg.get("scheduler.host", host)
    port = cfg.get("scheduler.port", port)
    version_check = cfg.get("scheduler.version-check", version_check)
    if dashboard is None:
        dashboard = bool(dashboard_address) or cfg["dashboard.enabled"]
    dashboard_at: str | bool = (
        cfg.get("dashboard.address", dashboard_address) if dashboard else False
    )
    if dashboard_address is not None:
        from .config import parse_address

        try:
            parse_address(dashboard_address, "127.0.0.1")
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--dashboard-address") from None
    tls_cert, tls_key, tls_ca_file, max_frame_size = _configured_security(
        cfg, tls_cert, tls_key, tls_ca_file, max_frame_size
    )
    if auth == "generate":
        if not scheduler_file:
            raise click.UsageError("--auth generate needs --scheduler-file (the token goes there)")
        if auth_token_file:
            raise click.UsageError("give --auth generate or --auth-token-file, not both")
        from .comm.security import generate_token

        token: str | None = generate_token()
    elif auth == "none":
        token = None
    else:
        token = _token(auth_token_file)
    security = _security(tls_cert, tls_key, tls_ca_file)
    with _preload_errors():
        service = Scheduler(
            host=host,
            port=port,
            scheduler_file=scheduler_file,
            token=token,
            preload=list(preload) or cfg["scheduler.preload"] or None,
            preload_argv=list(ctx.args),
            security=security,
            max_frame_bytes=_max_frame(max_frame_size),
            token_in_scheduler_file=auth == "generate",
            version_check=version_check,
            dashboard_address=dashboard_at,
            dashboard_auth=dashboard_auth,
            dashboard_tls=dashboard_tls,
        )

    async def start() -> None:
        await service.start()
        click.echo(f"Scheduler at: {service.address}", err=True)
        if service.dashboard_link:
            click.echo(f"Dashboard at: {service.dashboard_link}", err=True)

    with _preload_errors():
        _run_until_signal(start, service.close, service.finished)


def _scheduler_address(address: str | None, scheduler_file: str | None) -> str:
    return str(_scheduler_info(address, scheduler_file)["address"])


def _scheduler_info(address: str | None, scheduler_file: str | None) -> dict[str, Any]:
    """``{"address": ...}``, or the scheduler file's JSON (with its ``token``, if any)."""
    if address:
        return {"address": address}
    if not scheduler_file:
        raise click.UsageError("give the scheduler ADDRESS or --scheduler-file")
    from .comm.security import read_scheduler_file

    try:
        return read_scheduler_file(scheduler_file, timeout=60)
    except TimeoutError:
        raise click.ClickException(f"{scheduler_file} did not appear in 60s") from None


@main.command(context_settings=_PRELOAD_CONTEXT)
@click.argument("address", required=False)
@click.option("--scheduler-file", default=None, help="Read the scheduler address from this file.")
@click.option(
    "--nthreads",
    default=None,
    type=int,
    help="Threads per worker process [config worker.nthreads].",
)
@click.option("--nworkers", default=1, show_default=True, type=int, help="Worker processes.")
@click.option("--name", default=None, help="Worker name (suffixed -i with several workers).")
@click.option(
    "--memory-limit",
    default=None,
    help="Bytes per worker, e.g. 4GB [config worker.memory-limit: auto].",
)
@click.option(
    "--resources",
    default=None,
    help='Abstract resources, e.g. "GPU=2,MEMORY=100e9"; "GPU=[0,1]" for indexed ones; '
    '"auto" to detect GPUs and memory.  Default: $CORRAL_WORKER_RESOURCES, else config '
    "worker.resources.",
)
@click.option("--host", default=None, help="Interface for the peer port.")
@click.option(
    "--local-directory",
    default=None,
    help="Scratch space for this worker [config worker.local-directory].",
)
@click.option(
    "--nanny/--no-nanny",
    default=True,
    show_default=True,
    help="Run each worker process under a supervisor that restarts it when it crashes or "
    "is asked to restart (client.restart, PipInstall(restart_workers=True)).  "
    "--no-nanny: one worker in this process, which cannot be restarted.",
)
@click.option(
    "--memory-pause-fraction",
    default=None,
    type=float,
    help="Pause (start no task) above this fraction of --memory-limit; 0: never "
    "[config worker.memory-pause-fraction: 0.8].",
)
@click.option(
    "--memory-terminate-fraction",
    default=None,
    type=float,
    help="Above this fraction of --memory-limit the process exits (status 79) and its "
    "supervisor starts a fresh one; its tasks move elsewhere; 0: never "
    "[config worker.memory-terminate-fraction: 0.95].",
)
@click.option(
    "--memory-spill-fraction",
    default=0.0,
    show_default=True,
    type=float,
    help="Above this fraction of --memory-limit, move the least recently used results to "
    "files under --local-directory; 0: never.",
)
@_security_options
@click.option("--preload", multiple=True, help=_PRELOAD_HELP)
@click.option("--log-level", default=None, help="[config logging.level: INFO]")
@click.pass_context
def worker(
    ctx: click.Context,
    address: str | None,
    scheduler_file: str | None,
    nthreads: int | None,
    nworkers: int,
    name: str | None,
    memory_limit: str | None,
    resources: str | None,
    host: str | None,
    local_directory: str | None,
    nanny: bool,
    memory_pause_fraction: float | None,
    memory_terminate_fraction: float | None,
    memory_spill_fraction: float,
    auth_token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca_file: str | None,
    max_frame_size: str | None,
    preload: tuple[str, ...],
    log_level: str | None,
) -> None:
    """Start worker processes that connect to the scheduler at ADDRESS.

    Options for a --preload module's click command come after ADDRESS.
    Defaults come from the configuration (``corral config show``).
    """
    from .deploy.local import _memory_limit

    cfg = _config()
    _setup_logging(cfg.get("logging.level", log_level))
    if nworkers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--nworkers")
    nthreads = cfg.get("worker.nthreads", nthreads)
    local_directory = cfg.get("worker.local-directory", local_directory)
    memory_pause_fraction = cfg.get("worker.memory-pause-fraction", memory_pause_fraction)
    memory_terminate_fraction = cfg.get(
        "worker.memory-terminate-fraction", memory_terminate_fraction
    )
    preload = tuple(preload) or tuple(cfg["worker.preload"])
    tls_cert, tls_key, tls_ca_file, max_frame_size = _configured_security(
        cfg, tls_cert, tls_key, tls_ca_file, max_frame_size
    )
    try:
        if resources is not None:
            parsed_resources = parse_resources(resources)
        else:
            # $CORRAL_WORKER_RESOURCES (same syntax), else the config file's worker.resources
            offer = cfg["worker.resources"]
            source = cfg.source("worker.resources").lstrip("$")
            parsed_resources = parse_resources(offer, source) if isinstance(offer, str) else offer
        limit = _memory_limit(cfg.get("worker.memory-limit", memory_limit), nworkers)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    info = _scheduler_info(address, scheduler_file)
    target = str(info["address"])
    token = _token(auth_token_file, info)
    security = _security(tls_cert, tls_key, tls_ca_file)
    if nanny:
        sys.exit(_supervise(nworkers, name, sys.argv[1:]))
    from .errors import HandshakeError
    from .nanny import EXIT_REFUSED, child_info
    from .worker.server import Worker

    supervision = child_info()  # set when a supervisor started this process

    with _preload_errors():
        service = Worker(
            target,
            nthreads=nthreads,
            name=name,
            memory_limit=limit,
            resources=parsed_resources,
            host=host,
            local_directory=local_directory,
            token=token,
            preload=list(preload) or None,
            preload_argv=list(ctx.args),
            security=security,
            max_frame_bytes=_max_frame(max_frame_size),
            memory_pause_fraction=memory_pause_fraction or None,
            memory_terminate_fraction=memory_terminate_fraction or None,
            memory_spill_fraction=memory_spill_fraction or None,
            nanny_slot=supervision.slot if supervision else None,
            nanny_channel=supervision.channel if supervision else None,
        )

    async def start() -> None:
        await service.start()
        click.echo(f"Worker {service.name} at {service.address} -> {target}", err=True)
        if supervision is not None:
            supervision.mark_ready()
            loop = asyncio.get_running_loop()
            supervision.watch_parent(
                lambda: loop.call_soon_threadsafe(os.kill, os.getpid(), signal.SIGTERM)
            )

    try:
        with _preload_errors():
            _run_until_signal(start, service.close, service.finished)
    except HandshakeError as exc:  # refused: strict version check, wrong token
        click.echo(f"corral worker: {exc}", err=True)
        sys.exit(EXIT_REFUSED)
    if service.exit_code:  # a restart, or memory above its terminate mark: see corral.nanny
        sys.exit(service.exit_code)


def _supervise(nworkers: int, name: str | None, argv: list[str]) -> int:
    """Run ``nworkers`` supervised worker processes (:mod:`corral.nanny`); return a status.

    Each child is ``corral worker --no-nanny`` with the same options; a child
    asking for a restart or crashing is started again; SIGTERM/SIGINT stop
    them all.
    """
    from .nanny import supervise

    base = [a for a in argv if a not in ("--nanny", "--no-nanny")]
    cleaned: list[str] = []
    skip = False
    for arg in base:
        if skip:
            skip = False
            continue
        if arg in ("--nworkers", "--name"):
            skip = True
            continue
        if arg.startswith(("--nworkers=", "--name=")):
            continue
        cleaned.append(arg)

    def command(i: int) -> tuple[str, list[str]]:
        worker_name = name if nworkers == 1 else (f"{name}-{i}" if name else None)
        cmd = [sys.executable, "-m", "corral", *cleaned, "--no-nanny"]
        label = worker_name or f"process {i}"
        return label, cmd + (["--name", worker_name] if worker_name else [])

    return supervise([command(i) for i in range(nworkers)])


@main.command()
@click.option("--n-workers", default=2, show_default=True, type=int)
@click.option("--tasks", default=2000, show_default=True, type=int)
def demo(n_workers: int, tasks: int) -> None:
    """Run a small real workload on a local cluster and print what happened."""
    from .demo import run_demo

    run_demo(n_workers=n_workers, tasks=tasks)


@main.group(name="config")
def config_group() -> None:
    """The configuration: ~/.config/corral/corral.yaml (or $CORRAL_CONFIG), then CORRAL_*
    variables, then command line options (docs/configuration.md)."""


@config_group.command(name="show")
@click.argument("key", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (no comments).")
def config_show(key: str | None, as_json: bool) -> None:
    """Print the effective configuration, or the value of KEY (e.g. scheduler.port).

    Values that do not come from the defaults are followed by their source.
    """
    import json

    cfg = _config()
    if key is not None:
        try:
            value = cfg[key]
        except KeyError as exc:
            raise _ConfigProblem(str(exc.args[0])) from None
        click.echo(json.dumps(value) if as_json or not isinstance(value, str) else value)
        return
    if as_json:
        click.echo(json.dumps(cfg.nested(), indent=2))
    else:
        click.echo(cfg.dump(), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
