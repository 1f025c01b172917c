"""The scheduler's side of consistent software: version checks and worker restarts.

The :class:`~corral.scheduler.server.Scheduler` owns one :class:`ConsistencyHost`.

Versions
    Every peer reports :func:`corral.versions.get_versions` in its handshake.
    A worker joining with versions that differ from the scheduler's (Python
    and the required packages), a connected client's or another worker's is
    logged and recorded under the event topic ``"versions"``.  In strict mode
    (``Scheduler(version_check="strict")``, or while a client that asked for
    ``version_check="strict"`` is connected) such a worker is refused in the
    handshake with a readable table, before it joins.

Restarts
    A worker run by a supervisor says so (op ``supervised``, with a slot id
    that survives its restarts).  ``restart_workers`` asks such workers to
    exit (op ``restart_worker``) and waits until a process of the same slot
    registered again, or until the timeout: the client then gets a
    ``TimeoutError`` naming the worker, and the rest of the cluster carries
    on.  For the scheduler a restart is a leave plus a join, so plugins and
    environments are set up on the new process as on any joining worker.
    A worker restarting on its own (``worker_restarting``, e.g. after
    ``PipInstall(restart_workers=True)``) is waited for the same way, and an
    answer owed to a client for a plugin registration waits for it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..protocol.messages import (
    CheckVersions,
    ErrorInfo,
    Handshake,
    KeyCancelled,
    Message,
    Outcome,
    ReleaseKeys,
    Reply,
    RestartWorker,
    RestartWorkers,
    Results,
    Supervised,
    WorkerRestarting,
)
from ..protocol.serialize import serialize
from ..versions import (
    VERSION_CHECK_MODES,
    check_mode,
    format_joining_worker,
    get_versions,
    joining_worker_mismatches,
)
from ..worker.execution import error_info

if TYPE_CHECKING:
    from ..comm import Connection
    from .server import Scheduler

logger = logging.getLogger("corral.scheduler.consistency")

#: Client ops handled here.
CONSISTENCY_CLIENT_OPS = frozenset({CheckVersions, RestartWorkers})
#: Worker ops handled here.
CONSISTENCY_WORKER_OPS = frozenset({Supervised, WorkerRestarting})

#: Seconds a worker restarting on its own (PipInstall) has to come back.
SELF_RESTART_TIMEOUT = 120.0


@dataclass
class _Restart:
    """A worker process expected back: by its slot, within a deadline."""

    old: str
    name: str
    slot: str
    reason: str
    timeout: float
    left: bool = False
    waiters: list[Callable[[str | None, ErrorInfo | None], None]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


class ConsistencyHost:
    """Version checks and restarts of one scheduler."""

    def __init__(self, scheduler: Scheduler, version_check: str = "warn") -> None:
        self.scheduler = scheduler
        self.mode = check_mode(version_check)
        self.client_versions: dict[str, Any] = {}
        self.strict_clients: set[str] = set()
        self.slots: dict[str, str] = {}  # worker address -> supervisor slot
        self._restarts: dict[str, _Restart] = {}  # slot -> expected restart
        self._versions = get_versions()

    # -- versions ------------------------------------------------------------------
    @property
    def strict(self) -> bool:
        """True when mismatched workers are refused."""
        return self.mode == "strict" or bool(self.strict_clients)

    def client_joined(self, client_id: str, versions: Any) -> None:
        """Remember a client's versions (from its handshake)."""
        self.client_versions[client_id] = versions

    def client_left(self, client_id: str) -> None:
        self.client_versions.pop(client_id, None)
        self.strict_clients.discard(client_id)

    def _mismatches(self, versions: Any, exclude: str | None = None) -> list[Any]:
        workers = {
            addr: ws.versions
            for addr, ws in self.scheduler.state.workers.items()
            if addr != exclude and getattr(ws, "runtime", "python") == "python"
        }
        return joining_worker_mismatches(versions, self._versions, self.client_versions, workers)

    def check_handshake(self, hs: Handshake) -> str | None:
        """The reason to refuse a worker in strict mode (``None``: let it in)."""
        if hs.role != "worker" or not self.strict:
            return None
        rows = self._mismatches(hs.versions)
        if not rows:
            return None
        who = hs.name or hs.id
        table = format_joining_worker(who, rows)
        why = "the scheduler" if self.mode == "strict" else "a client connected"
        reason = (
            f"versions do not match the cluster's and {why} asked for a strict version "
            f"check (version_check='strict'); install the same versions on this worker:\n{table}"
        )
        logger.warning("refused worker %s: mismatched versions\n%s", who, table)
        self.scheduler.log_event(
            "versions",
            {
                "action": "refused",
                "worker": who,
                "packages": {r[0]: r[1] for r in rows},
                "table": table,
            },
        )
        return reason

    def worker_joining(self, address: str, versions: Any) -> None:
        """Log and record a joining worker whose versions differ (not refused: warn mode)."""
        if self.mode == "off" and not self.strict_clients:
            return
        rows = self._mismatches(versions, exclude=address)
        if not rows:
            return
        table = format_joining_worker(address, rows)
        logger.warning("worker %s joined with mismatched versions:\n%s", address, table)
        self.scheduler.log_event(
            "versions",
            {
                "action": "mismatch",
                "worker": address,
                "packages": {r[0]: r[1] for r in rows},
                "table": table,
            },
        )

    def versions(self) -> dict[str, Any]:
        """The versions of the scheduler and of every worker."""
        return {
            "scheduler": self._versions,
            "workers": {addr: ws.versions for addr, ws in self.scheduler.state.workers.items()},
        }

    # -- ops -----------------------------------------------------------------------
    def handle_client(self, client_id: str, conn: Connection, msg: Message) -> None:
        """Carry out ``check_versions`` or ``restart_workers`` from a client."""
        if isinstance(msg, CheckVersions):
            if msg.mode not in VERSION_CHECK_MODES:
                conn.send(Reply(id=msg.id, error=f"unknown version_check mode {msg.mode!r}"))
                return
            if msg.mode == "strict":
                self.strict_clients.add(client_id)
            else:
                self.strict_clients.discard(client_id)
            conn.send(Reply(id=msg.id, result=self.versions()))
        elif isinstance(msg, RestartWorkers):
            try:
                self._restart_workers(client_id, conn, msg)
            except Exception as exc:
                logger.exception("restart_workers from %s failed", client_id)
                if not conn.closed:
                    conn.send(Results(id=msg.id, error=error_info(exc)))

    def handle_worker(self, address: str, msg: Message) -> None:
        """``supervised`` or ``worker_restarting`` from a worker."""
        if isinstance(msg, Supervised):
            self.slots[address] = msg.slot
            restart = self._restarts.get(msg.slot)
            if restart is not None and (restart.left or restart.old != address):
                # Back once the plugins handed to the new process are set up.
                self.scheduler._plugin_host.when_set_up(
                    address, functools.partial(self._finish, restart, address, None)
                )
        elif isinstance(msg, WorkerRestarting):
            slot = self.slots.get(address)
            if slot is None:
                logger.warning("worker %s restarts itself but is not supervised", address)
                return
            self._expect(address, slot, SELF_RESTART_TIMEOUT, msg.reason or "restarting itself")

    def worker_left(self, address: str) -> None:
        """A worker's connection closed."""
        slot = self.slots.pop(address, None)
        if slot is not None:
            restart = self._restarts.get(slot)
            if restart is not None and restart.old == address:
                restart.left = True

    # -- restarts ------------------------------------------------------------------
    def _expect(self, address: str, slot: str, timeout: float, reason: str) -> _Restart:
        restart = self._restarts.get(slot)
        if restart is not None:
            return restart
        ws = self.scheduler.state.workers.get(address)
        name = str(ws.name) if ws is not None and ws.name is not None else address
        restart = _Restart(address, name, slot, reason, timeout)
        self._restarts[slot] = restart
        loop = asyncio.get_running_loop()
        restart.timer = loop.call_later(timeout, self._expired, restart)
        self.scheduler.log_event(
            "restarts", {"action": "restart", "worker": address, "name": name, "reason": reason}
        )
        logger.info("restarting worker %s (%s)", address, reason)
        return restart

    def _expired(self, restart: _Restart) -> None:
        message = (
            f"worker {restart.old} (name {restart.name!r}) did not come back within "
            f"{restart.timeout:g}s after a restart ({restart.reason}); the rest of the "
            "cluster carries on without it"
        )
        logger.warning("%s", message)
        self._finish(restart, None, error_info(TimeoutError(message)))

    def _finish(self, restart: _Restart, new: str | None, error: ErrorInfo | None) -> None:
        if self._restarts.get(restart.slot) is not restart:
            return
        del self._restarts[restart.slot]
        if restart.timer is not None:
            restart.timer.cancel()
        if error is None:
            logger.info("worker %s is back as %s", restart.old, new)
            self.scheduler.log_event(
                "restarts",
                {"action": "restarted", "worker": restart.old, "name": restart.name, "new": new},
            )
        else:
            self.scheduler.log_event(
                "restarts",
                {"action": "timeout", "worker": restart.old, "name": restart.name},
            )
        for waiter in restart.waiters:
            try:
                waiter(new, error)
            except Exception:
                logger.exception("a restart waiter failed")

    def restarting(self, address: str) -> _Restart | None:
        """The restart expected of the worker at ``address``, if any."""
        for restart in self._restarts.values():
            if restart.old == address:
                return restart
        return None

    def after_restarts(
        self, outcomes: dict[str, Outcome], done: Callable[[dict[str, Outcome]], None]
    ) -> None:
        """Call ``done(outcomes)`` once the workers among them that restart came back.

        A worker that did not come back in time gets its outcome replaced by
        the timeout error.
        """
        waiting = {a: r for a in outcomes if (r := self.restarting(a)) is not None}
        if not waiting:
            done(outcomes)
            return
        result = dict(outcomes)
        left = set(waiting)

        def back(address: str, new: str | None, error: ErrorInfo | None) -> None:
            if error is not None and result[address].error is None:
                result[address] = Outcome(error=error)
            left.discard(address)
            if not left:
                done(result)

        for address, restart in waiting.items():
            restart.waiters.append(functools.partial(back, address))

    def _resolve(self, names: list[str]) -> tuple[list[str], list[str]]:
        workers = self.scheduler.state.workers
        by_name = {str(ws.name): addr for addr, ws in workers.items()}
        found, unknown = [], []
        for w in names:
            if w in workers:
                found.append(w)
            elif w in by_name:
                found.append(by_name[w])
            else:
                unknown.append(w)
        return list(dict.fromkeys(found)), unknown

    def _restart_workers(self, client_id: str, conn: Connection, msg: RestartWorkers) -> None:
        def reply(outcomes: dict[str, Outcome] | None = None, error: Any = None) -> None:
            if not conn.closed:
                conn.send(Results(id=msg.id, outcomes=outcomes or {}, error=error))

        if msg.workers is None:
            targets = list(self.scheduler.state.workers)
        else:
            targets, unknown = self._resolve(list(msg.workers))
            if unknown:
                reply(error=error_info(ValueError(f"unknown workers: {unknown}")))
                return
        unsupervised = [a for a in targets if a not in self.slots]
        if unsupervised:
            reply(
                error=error_info(
                    RuntimeError(
                        f"cannot restart workers {unsupervised}: they do not run under a "
                        "supervisor (nanny).  `corral worker` (without --no-nanny) and "
                        "LocalCluster(processes=True) supervise their workers; in-process "
                        "workers cannot be restarted"
                    )
                )
            )
            return
        reason = msg.reason or ("client.restart" if msg.forget else "restart_workers")
        self.scheduler.log_event(
            "restarts",
            {"action": "requested", "client": client_id, "workers": targets, "forget": msg.forget},
        )
        if msg.forget:
            self._forget_everything(reason)
        if not targets:
            reply({})
            return
        outcomes: dict[str, Outcome] = {}
        left = set(targets)

        def back(address: str, new: str | None, error: ErrorInfo | None) -> None:
            if error is not None:
                outcomes[address] = Outcome(error=error)
            else:
                outcomes[address] = Outcome(result=serialize(new, "msgpack"))
            left.discard(address)
            if not left:
                reply(outcomes)

        streams = self.scheduler._streams
        for address in targets:
            already = self.restarting(address)
            restart = already or self._expect(address, self.slots[address], msg.timeout, reason)
            if msg.wait:
                restart.waiters.append(functools.partial(back, address))
            stream = streams.get(address)
            if already is None and stream is not None and not stream.closed:
                stream.send(RestartWorker(reason=reason))
        if not msg.wait:
            reply({address: Outcome() for address in targets})

    def _forget_everything(self, reason: str) -> None:
        """``client.restart()``: every client's futures are cancelled, every task released."""
        scheduler = self.scheduler
        text = f"the cluster restarted ({reason}); its results are lost"
        for client_id, wanted in list(scheduler.state.clients.items()):
            keys = [ts.key for ts in wanted]
            if not keys:
                continue
            stream = scheduler._streams.get(client_id)
            if stream is not None and not stream.closed:
                stream.send_many([KeyCancelled(key=k, reason=text) for k in keys])
            scheduler._apply(client_id, [ReleaseKeys(keys=keys)])
        host = scheduler._plugin_host
        host._call("restart", scheduler)
        scheduler.log_event("restarts", {"action": "forgot-tasks", "time": time.time()})
