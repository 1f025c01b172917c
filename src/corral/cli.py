"""The ``corral`` command: ``corral scheduler``, ``corral worker``, ``corral demo``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import click

from ._loop import new_event_loop
from ._version import __version__
from .preload import PreloadError
from .resources import parse_resources, resources_from_env
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
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )


def _run_until_signal(
    start: Callable[[], Awaitable[Any]], stop: Callable[[], Awaitable[Any]], finished: Callable[[], Awaitable[Any]]
) -> None:
    """Start a service, serve until SIGTERM/SIGINT or until it finishes, then stop it."""
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


@click.group()
@click.version_option(__version__, prog_name="corral")
def main() -> None:
    """Corral: a distributed task scheduler for clusters that are not uniform."""


@main.command(context_settings=_PRELOAD_CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="Port (0: any free one).")
@click.option("--scheduler-file", default=None, help="Write the address here as JSON.")
@click.option("--preload", multiple=True, help=_PRELOAD_HELP)
@click.option("--log-level", default="INFO", show_default=True)
@click.pass_context
def scheduler(
    ctx: click.Context,
    host: str,
    port: int,
    scheduler_file: str | None,
    preload: tuple[str, ...],
    log_level: str,
) -> None:
    """Start a scheduler and serve until Ctrl-C or SIGTERM."""
    _setup_logging(log_level)
    token = os.environ.get("CORRAL_AUTH_TOKEN") or None
    with _preload_errors():
        service = Scheduler(
            host=host,
            port=port,
            scheduler_file=scheduler_file,
            token=token,
            preload=list(preload) or None,
            preload_argv=list(ctx.args),
        )

    async def start() -> None:
        await service.start()
        click.echo(f"Scheduler at: {service.address}", err=True)

    with _preload_errors():
        _run_until_signal(start, service.close, service.finished)


def _scheduler_address(address: str | None, scheduler_file: str | None) -> str:
    if address:
        return address
    if not scheduler_file:
        raise click.UsageError("give the scheduler ADDRESS or --scheduler-file")
    deadline = time.monotonic() + 60
    while not os.path.exists(scheduler_file):
        if time.monotonic() > deadline:
            raise click.ClickException(f"scheduler file {scheduler_file} did not appear in 60s")
        time.sleep(0.1)
    with open(scheduler_file) as f:
        return str(json.load(f)["address"])


@main.command(context_settings=_PRELOAD_CONTEXT)
@click.argument("address", required=False)
@click.option("--scheduler-file", default=None, help="Read the scheduler address from this file.")
@click.option("--nthreads", default=None, type=int, help="Threads per worker process.")
@click.option("--nworkers", default=1, show_default=True, type=int, help="Worker processes.")
@click.option("--name", default=None, help="Worker name (suffixed -i with several workers).")
@click.option("--memory-limit", default="auto", show_default=True, help="Bytes per worker, e.g. 4GB.")
@click.option(
    "--resources",
    default=None,
    help='Abstract resources, e.g. "GPU=2,MEMORY=100e9"; "GPU=[0,1]" for indexed ones; '
    '"auto" to detect GPUs and memory.  Default: $CORRAL_WORKER_RESOURCES.',
)
@click.option("--host", default=None, help="Interface for the peer port.")
@click.option("--local-directory", default=None, help="Scratch space for this worker.")
@click.option("--nanny/--no-nanny", default=None, help="Supervise worker processes (restart on crash).")
@click.option("--preload", multiple=True, help=_PRELOAD_HELP)
@click.option("--log-level", default="INFO", show_default=True)
@click.pass_context
def worker(
    ctx: click.Context,
    address: str | None,
    scheduler_file: str | None,
    nthreads: int | None,
    nworkers: int,
    name: str | None,
    memory_limit: str,
    resources: str | None,
    host: str | None,
    local_directory: str | None,
    nanny: bool | None,
    preload: tuple[str, ...],
    log_level: str,
) -> None:
    """Start worker processes that connect to the scheduler at ADDRESS.

    Options for a --preload module's click command come after ADDRESS.
    """
    from .deploy.local import _memory_limit

    _setup_logging(log_level)
    if nworkers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--nworkers")
    try:
        if resources is not None:
            parsed_resources = parse_resources(resources)
        else:
            parsed_resources = resources_from_env()  # CORRAL_WORKER_RESOURCES, same syntax
        limit = _memory_limit(memory_limit, nworkers)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    target = _scheduler_address(address, scheduler_file)
    if nanny is None:
        nanny = nworkers > 1
    if nanny:
        _supervise(nworkers, name, sys.argv[1:])
        return
    from .worker.server import Worker

    with _preload_errors():
        service = Worker(
            target,
            nthreads=nthreads,
            name=name,
            memory_limit=limit,
            resources=parsed_resources,
            host=host,
            local_directory=local_directory,
            token=os.environ.get("CORRAL_AUTH_TOKEN") or None,
            preload=list(preload) or None,
            preload_argv=list(ctx.args),
        )

    async def start() -> None:
        await service.start()
        click.echo(f"Worker {service.name} at {service.address} -> {target}", err=True)

    with _preload_errors():
        _run_until_signal(start, service.close, service.finished)


def _supervise(nworkers: int, name: str | None, argv: list[str]) -> None:
    """Run ``nworkers`` worker processes; restart any that crash; stop all on a signal."""
    base = [a for a in argv if a not in ("--nanny",)]
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

    def command(i: int) -> list[str]:
        worker_name = f"{name}-{i}" if name else None
        cmd = [sys.executable, "-m", "corral", *cleaned, "--no-nanny"]
        return cmd + (["--name", worker_name] if worker_name else [])

    procs = {i: subprocess.Popen(command(i)) for i in range(nworkers)}
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while procs:
        time.sleep(0.2)
        for i, p in list(procs.items()):
            code = p.poll()
            if code is None:
                continue
            if stopping or code == 0:
                del procs[i]
            else:
                logger.warning("worker process %d exited with code %s; restarting it", i, code)
                procs[i] = subprocess.Popen(command(i))


@main.command()
@click.option("--n-workers", default=2, show_default=True, type=int)
@click.option("--tasks", default=2000, show_default=True, type=int)
def demo(n_workers: int, tasks: int) -> None:
    """Run a small real workload on a local cluster and print what happened."""
    from .demo import run_demo

    run_demo(n_workers=n_workers, tasks=tasks)


if __name__ == "__main__":  # pragma: no cover
    main()
