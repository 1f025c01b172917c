"""The supervisor ("nanny") of worker processes: restart on request and on crash.

A supervised worker is an ordinary ``corral worker --no-nanny`` process
started by a supervisor, which is either ``corral worker`` itself (the
default: ``--nanny``) or a ``LocalCluster(processes=True)``.  The two talk
through the environment, the exit status and, for nanny plugins only, a
private folder:

* the supervisor gives each child ``CORRAL_NANNY_SLOT`` (an id that stays the
  same across restarts of that child), ``CORRAL_NANNY_READY`` (a file the
  child creates once it is connected) and ``CORRAL_NANNY_PID`` (the child
  stops itself if that process goes away);
* the child tells the scheduler its slot (op ``supervised``), so the scheduler
  knows it can be restarted and recognises it when it comes back;
* a child asked to restart (op ``restart_worker``, or a plugin such as
  ``PipInstall(restart_workers=True)``) leaves the scheduler cleanly and exits
  with :data:`EXIT_RESTART`; the supervisor starts a fresh process at once;
* a child that crashes (any other non-zero status, a signal) after it was
  ready is restarted too, with a growing delay if it keeps crashing;
* nanny plugins (:class:`corral.NannyPlugin`) reach the supervisor through
  the child: the scheduler hands them to it (``setup_plugin`` with ``nanny``)
  and the child passes them on through a private folder,
  ``CORRAL_NANNY_PLUGINS`` (:mod:`corral.nanny_channel`); the supervisor sets
  them up in its own process with the :class:`Slot` as the ``nanny``, and the
  child restarts when the plugin asks for it (``restart = True``), so that
  ``Slot.env`` changes reach the fresh process;
* a child that exits with status 0 (closed by the scheduler, or stopped) or
  with :data:`EXIT_REFUSED` (the scheduler refused it: a strict version check,
  a wrong token) is not restarted, nor is one that failed before it was ready
  the first time (a bad preload): restarting would fail the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from . import nanny_channel

logger = logging.getLogger("corral.nanny")

#: Exit status of a worker that asks its supervisor for a fresh process.
EXIT_RESTART = 75
#: Exit status of a worker the scheduler refused (not restarted).
EXIT_REFUSED = 78

SLOT_ENV = "CORRAL_NANNY_SLOT"
READY_ENV = "CORRAL_NANNY_READY"
PARENT_ENV = "CORRAL_NANNY_PID"

#: A child failing before it is ready this many times in a row is given up.
MAX_START_FAILURES = 5
#: A crash within this many seconds of the start counts towards the back-off.
QUICK_CRASH_SECONDS = 3.0
#: Quick crashes in a row restarted at once; after that the delay doubles (0.5 s to 10 s).
QUICK_CRASHES_FREE = 3


class Slot:
    """One supervised worker: its command, and the process currently running it.

    It is the ``nanny`` that :class:`corral.NannyPlugin` hooks receive:
    ``env`` (the environment of the next worker process; change it and ask
    for a restart), ``label``, ``id``, ``proc`` and ``pid`` (the current
    process) and ``plugins`` (its nanny plugins by name).
    """

    def __init__(
        self, command: list[str], env: dict[str, str] | None = None, label: str = ""
    ) -> None:
        self.command = list(command)
        self.id = f"{uuid.uuid4().hex[:12]}"
        self.label = label or self.id
        self._dir = tempfile.mkdtemp(prefix="corral-nanny-")
        self.ready_file = os.path.join(self._dir, "ready")
        channel = os.path.join(self._dir, "plugins")
        os.mkdir(channel)
        self._plugins = nanny_channel.SupervisorEnd(channel, self)
        self.env = dict(os.environ if env is None else env)
        self.env.update(
            {
                SLOT_ENV: self.id,
                READY_ENV: self.ready_file,
                PARENT_ENV: str(os.getpid()),
                nanny_channel.CHANNEL_ENV: channel,
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.starts = 0
        self.start_failures = 0
        self.quick_crashes = 0
        self.restart_at: float | None = None  # when a crashed child is started again
        self.outcome: int | None = None  # exit status once the slot is finished

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start (or start again) the child process."""
        with contextlib.suppress(OSError):
            os.unlink(self.ready_file)
        self.proc = subprocess.Popen(self.command, env=self.env)
        self.started = time.monotonic()
        self.starts += 1
        self.restart_at = None
        return self.proc

    @property
    def ready(self) -> bool:
        """True if the current child reported that it connected."""
        return os.path.exists(self.ready_file)

    def exited(self, code: int) -> str:
        """Decide what to do about the child's exit: ``"restart"``, ``"done"`` or ``"failed"``.

        Sets :attr:`restart_at` for a restart and :attr:`outcome` otherwise.
        """
        ready = self.ready
        if code == 0:
            self.outcome = 0
            return "done"
        if code == EXIT_REFUSED:
            logger.error("worker %s was refused by the scheduler; not restarting it", self.label)
            self.outcome = code
            return "failed"
        if not ready:
            self.start_failures += 1
            if self.starts == 1 or self.start_failures >= MAX_START_FAILURES:
                logger.error(
                    "worker %s exited with status %s before it connected; not restarting it",
                    self.label,
                    code,
                )
                self.outcome = code
                return "failed"
        else:
            self.start_failures = 0
        delay = 0.0
        if code == EXIT_RESTART:
            logger.info("worker %s asked for a restart; starting a fresh process", self.label)
            self.quick_crashes = 0
        else:
            if time.monotonic() - self.started < QUICK_CRASH_SECONDS:
                self.quick_crashes += 1
            else:
                self.quick_crashes = 0
            extra = self.quick_crashes - QUICK_CRASHES_FREE
            delay = min(0.5 * 2 ** (extra - 1), 10.0) if extra > 0 else 0.0
            logger.warning(
                "worker %s exited with status %s; restarting it%s",
                self.label,
                code,
                f" in {delay:.1f}s" if delay else "",
            )
        self.restart_at = time.monotonic() + delay
        return "restart"

    def due(self) -> bool:
        """True when a restart decided by :meth:`exited` may start now."""
        return self.restart_at is not None and time.monotonic() >= self.restart_at

    @property
    def plugins(self) -> dict[str, Any]:
        """The nanny plugins set up on this slot, by name."""
        return self._plugins.plugins

    @property
    def pid(self) -> int | None:
        """The process id of the current worker process, if one was started."""
        return self.proc.pid if self.proc is not None else None

    def serve_plugins(self) -> None:
        """Set up / tear down the nanny plugins the child handed over (supervisor loop)."""
        self._plugins.serve()

    def cleanup(self) -> None:
        """Tear down the slot's nanny plugins and remove its temporary folder."""
        self._plugins.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def supervise(commands: list[tuple[str, list[str]]], stop_timeout: float = 30.0) -> int:
    """Run one child per ``(label, command)``; restart as described above; return a status.

    Blocks until every child finished for good or SIGTERM/SIGINT arrives
    (then the children get SIGTERM, and SIGKILL after ``stop_timeout``).
    Returns 0, or the status of a child that failed for good.
    """
    slots = [Slot(cmd, label=label) for label, cmd in commands]
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        stopping.set()
        for s in slots:
            if s.proc is not None and s.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    s.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for s in slots:
        s.spawn()
    running = list(slots)
    failures: list[int] = []
    try:
        while running:
            time.sleep(0.1)
            for s in list(running):
                assert s.proc is not None
                s.serve_plugins()
                if s.restart_at is not None:
                    if stopping.is_set():
                        running.remove(s)
                    elif s.due():
                        s.spawn()
                    continue
                code = s.proc.poll()
                if code is None:
                    continue
                if stopping.is_set():
                    running.remove(s)
                    continue
                action = s.exited(code)
                if action != "restart":
                    running.remove(s)
                    if action == "failed":
                        failures.append(code)
            if stopping.is_set():
                deadline = time.monotonic() + stop_timeout
                for s in running:
                    if s.proc is not None and s.proc.poll() is None:
                        try:
                            s.proc.wait(max(0.1, deadline - time.monotonic()))
                        except subprocess.TimeoutExpired:
                            s.proc.kill()
                            s.proc.wait(5)
                break
    finally:
        for s in slots:
            s.cleanup()
    if failures and not stopping.is_set():
        return failures[0]
    return 0


# -- the child's side -------------------------------------------------------------------
class ChildInfo:
    """What a supervised child read from its environment (removed from it, for its tasks)."""

    def __init__(
        self,
        slot: str,
        ready_file: str | None,
        parent: int | None,
        channel: str | None = None,
    ) -> None:
        self.slot = slot
        self.ready_file = ready_file
        self.parent = parent
        self.channel = channel  # the nanny plugin folder (corral.nanny_channel)

    def mark_ready(self) -> None:
        """Tell the supervisor this child connected."""
        if self.ready_file:
            with contextlib.suppress(OSError), open(self.ready_file, "w") as f:
                f.write(str(os.getpid()))

    def watch_parent(self, on_orphaned: Callable[[], object], interval: float = 0.5) -> None:
        """Call ``on_orphaned()`` (once) if the supervisor process goes away."""
        parent = self.parent
        if not parent:
            return

        def watch() -> None:
            while True:
                time.sleep(interval)
                if os.getppid() != parent:
                    logger.warning("the supervisor (pid %d) went away; stopping", parent)
                    on_orphaned()
                    return

        threading.Thread(target=watch, name="corral-nanny-watch", daemon=True).start()


def child_info(environ: dict[str, str] | Any = None) -> ChildInfo | None:
    """The supervision this process runs under (``None`` if none); clears the variables."""
    env = os.environ if environ is None else environ
    slot = env.pop(SLOT_ENV, None)
    ready = env.pop(READY_ENV, None)
    parent = env.pop(PARENT_ENV, None)
    channel = env.pop(nanny_channel.CHANNEL_ENV, None)
    if not slot:
        return None
    try:
        parent_pid = int(parent) if parent else None
    except ValueError:
        parent_pid = None
    return ChildInfo(slot, ready, parent_pid, channel)


def python_command(*args: str) -> list[str]:
    """``python -m corral ARGS`` with this interpreter."""
    return [sys.executable, "-m", "corral", *args]
