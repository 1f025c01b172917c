"""Protocol conformance: drive a worker through the documented ops over real sockets.

The test plays the scheduler (a small server accepting the worker's
handshake and ``register_worker``, sending ``compute``, ``free_keys``,
``store``, ``update_who_has``, ``close_worker``) and a peer (a server holding
data the worker must fetch with ``get_data``, and a client asking the worker
for results).  The same scenarios run against every worker implementation,
each started as its own process exactly as a user starts it:

* the Python worker: ``python -m corral worker ADDR --no-nanny``;
* the JavaScript worker: ``node js/bin/corral-worker.js ADDR`` (skipped only
  where ``node`` is not installed; CI has it).

Every message a worker sends is decoded with the reference decoder
(``corral.protocol.messages``), which is strict: a missing or mistyped field
fails the test.  What differs between implementations is only how a task
names its function and arguments (``docs/protocol.md`` section 4 for Python,
section 10 for other runtimes).
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from corral.comm import accept, connect, start_server
from corral.comm.handshake import answer_challenge
from corral.errors import CommClosedError, HandshakeError
from corral.protocol.messages import (
    AddKeys,
    CloseWorker,
    Compute,
    ComputeTask,
    Data,
    FreeKeys,
    GetData,
    Heartbeat,
    Message,
    MissingData,
    RegisterWorker,
    Store,
    TaskErred,
    TaskFinished,
    Unregister,
    UpdateWhoHas,
)
from corral.protocol.serialize import (
    REF_KEY,
    Payload,
    Ref,
    deserialize,
    payload_digest,
    serialize,
    serialize_function,
)

ROOT = Path(__file__).resolve().parents[2]
JS_WORKER = ROOT / "js" / "bin" / "corral-worker.js"
MATHLIB = ROOT / "js" / "test" / "fixtures" / "mathlib.js"
TOKEN = "conformance-token"
TIMEOUT = 30.0

pytestmark = pytest.mark.timeout(120)


# -- the worker implementations under test ---------------------------------------------
@dataclass
class Flavor:
    """One worker implementation: how to start it and how its tasks are encoded."""

    name: str
    runtime: str
    command: Callable[[str, list[str]], list[str]]
    functions: dict[str, Any]  # task name -> what encode_fn takes
    encode_fn: Callable[[Any], Payload]
    ref: Callable[[str], Any]
    encode_args: Callable[[list[Any], dict[str, Any]], Payload]


def _py_fail(message: str) -> None:
    raise ValueError(message)


def _py_sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


# Module-level functions of this test module cannot be imported by the worker
# process: send them by value.
_py_fail.__module__ = "__main__"
_py_sleep.__module__ = "__main__"

PYTHON = Flavor(
    name="python",
    runtime="python",
    command=lambda addr, extra: [
        sys.executable,
        "-m",
        "corral",
        "worker",
        addr,
        "--no-nanny",
        *extra,
    ],
    functions={"add": operator.add, "fail": _py_fail, "sleep": _py_sleep},
    encode_fn=serialize_function,
    ref=Ref,
    encode_args=lambda args, kwargs: serialize((tuple(args), kwargs)),
)

JAVASCRIPT = Flavor(
    name="js",
    runtime="js",
    command=lambda addr, extra: ["node", str(JS_WORKER), addr, "--module", str(MATHLIB), *extra],
    functions={"add": "mathlib:add", "fail": "mathlib:fail", "sleep": "mathlib:sleep_seconds"},
    encode_fn=lambda name: serialize(name, "msgpack"),
    ref=lambda key: {REF_KEY: key},
    encode_args=lambda args, kwargs: serialize([args, kwargs], "msgpack"),
)


def _node_missing() -> bool:
    return shutil.which("node") is None


FLAVORS = [
    pytest.param(PYTHON, id="python"),
    pytest.param(
        JAVASCRIPT,
        id="js",
        marks=pytest.mark.skipif(_node_missing(), reason="node is not installed"),
    ),
]


def _check_js_deps() -> None:
    if not (ROOT / "js" / "node_modules" / "@msgpack" / "msgpack").exists():
        pytest.fail("the JavaScript worker's dependencies are not installed: run (cd js && npm ci)")


# -- the test's side: a fake scheduler and a peer ---------------------------------------
class WorkerLink:
    """The fake scheduler's connection to one worker."""

    def __init__(self, conn: Any, handshake: Any) -> None:
        self.conn = conn
        self.handshake = handshake
        self.heartbeats: list[Heartbeat] = []
        self.seen: list[Message] = []

    async def expect(self, *kinds: type[Message], timeout: float = TIMEOUT) -> Any:
        """The next message of one of ``kinds`` (heartbeats are recorded and skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"no {[k.op for k in kinds]} within {timeout}s; saw {self.seen}"
                )
            msg = await self.conn.recv(timeout=left)
            self.seen.append(msg)
            if isinstance(msg, Heartbeat):
                self.heartbeats.append(msg)
                if Heartbeat not in kinds:
                    continue
            if isinstance(msg, kinds):
                return msg
            raise AssertionError(f"expected {[k.op for k in kinds]}, got {msg!r}")

    async def collect(self, n: int, *kinds: type[Message]) -> list[Any]:
        return [await self.expect(*kinds) for _ in range(n)]


@dataclass
class Peer:
    """A peer port holding data: answers ``get_data`` and records what was asked."""

    data: dict[str, Payload]
    requests: list[GetData] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    address: str = ""
    server: Any = None

    async def start(self) -> Peer:
        self.server = await start_server("127.0.0.1", 0, self._serve)
        self.address = f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, conn: Any) -> None:
        try:
            hs = await accept(
                conn,
                role="worker",
                server_id="worker-testpeer",
                token=TOKEN,
                allowed_roles=("peer", "client", "worker"),
            )
        except HandshakeError:
            return
        self.roles.append(hs.role)
        while True:
            try:
                msg = await conn.recv()
            except CommClosedError:
                return
            assert isinstance(msg, GetData), msg
            self.requests.append(msg)
            conn.send(
                Data(
                    data={k: self.data[k] for k in msg.keys if k in self.data},
                    missing=[k for k in msg.keys if k not in self.data],
                )
            )

    def close(self) -> None:
        self.server.close()


class Harness:
    """A fake scheduler, with one worker process of ``flavor`` connected to it."""

    def __init__(self, flavor: Flavor, tmp_path: Path) -> None:
        self.flavor = flavor
        self.tmp_path = tmp_path
        self.links: asyncio.Queue[WorkerLink] = asyncio.Queue()
        self.proc: subprocess.Popen[bytes] | None = None
        self.server: Any = None
        self.address = ""
        self._fid = 0

    async def __aenter__(self) -> Harness:
        self.server = await start_server("127.0.0.1", 0, self._accept)
        self.address = f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    async def _accept(self, conn: Any) -> None:
        with contextlib.suppress(HandshakeError):
            hs = await accept(
                conn,
                role="scheduler",
                server_id="scheduler-conformance",
                token=TOKEN,
                allowed_roles=("worker",),
            )
            await self.links.put(WorkerLink(conn, hs))

    def start_worker(self, *extra: str, token: str | None = TOKEN) -> None:
        if self.flavor is JAVASCRIPT:
            _check_js_deps()
        env = dict(os.environ)
        env.pop("CORRAL_AUTH_TOKEN", None)
        if token is not None:
            env["CORRAL_AUTH_TOKEN"] = token
        self.log = self.tmp_path / f"{self.flavor.name}-worker.log"
        self.proc = subprocess.Popen(
            self.flavor.command(self.address, list(extra)),
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def connected_worker(self) -> tuple[WorkerLink, RegisterWorker]:
        """Wait for the worker's handshake and its ``register_worker``."""
        try:
            link = await asyncio.wait_for(self.links.get(), TIMEOUT)
        except asyncio.TimeoutError:
            raise AssertionError(f"the worker did not connect; output:\n{self.output()}") from None
        reg = await link.expect(RegisterWorker)
        return link, reg

    def task(
        self,
        key: str,
        fn: str,
        args: list[Any],
        kwargs: dict[str, Any] | None = None,
        run_id: int = 1,
        **fields: Any,
    ) -> tuple[ComputeTask, dict[str, Payload]]:
        """A ``compute`` task calling the flavor's function ``fn`` (and its functions table)."""
        payload = self.flavor.encode_fn(self.flavor.functions[fn])
        fid = payload_digest(payload)
        spec = ComputeTask(
            key=key,
            args=self.flavor.encode_args(args, kwargs or {}),
            run_id=run_id,
            fn=fid,
            **fields,
        )
        return spec, {fid: payload}

    def compute(self, link: WorkerLink, *tasks: tuple[ComputeTask, dict[str, Payload]]) -> None:
        functions: dict[str, Payload] = {}
        for _, fns in tasks:
            functions.update(fns)
        link.conn.send(Compute(tasks=[t for t, _ in tasks], functions=functions))

    def exit_code(self, timeout: float = TIMEOUT) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker did not exit; output:\n{self.output()}") from None


def mp(value: Any) -> Payload:
    return serialize(value, "msgpack")


async def ask(address: str, keys: list[str], serializers: list[str] | None = None) -> Data:
    """Ask a worker's peer port for ``keys`` as a client would."""
    conn, _ = await connect(address, role="client", my_id="client-conformance", token=TOKEN)
    try:
        conn.send(GetData(keys=keys, serializers=serializers))
        reply = await conn.recv(timeout=TIMEOUT)
        assert isinstance(reply, Data), reply
        return reply
    finally:
        conn.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- the scenarios -------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", FLAVORS)
def test_register_compute_fetch_serve_error_free_store_close(
    flavor: Flavor, tmp_path: Path
) -> None:
    async def scenario() -> None:
        peer = await Peer({"x": mp(3), "y": mp(4)}).start()
        async with Harness(flavor, tmp_path) as h:
            h.start_worker("--nthreads", "2", "--resources", "GPU=1,MEM=2e9", "--name", "w-1")
            link, reg = await h.connected_worker()
            # The handshake (with the token's HMAC, checked by accept) and the registration.
            assert link.handshake.role == "worker"
            assert reg.address.startswith("tcp://127.0.0.1:")
            assert reg.nthreads == 2
            assert reg.name == "w-1"
            assert reg.runtime == flavor.runtime
            assert reg.resources == {"GPU": 1, "MEM": 2e9}

            # compute: the inputs live on the peer; both come in one get_data.
            h.compute(
                link,
                h.task(
                    "z",
                    "add",
                    [flavor.ref("x"), flavor.ref("y")],
                    who_has={"x": [peer.address], "y": [peer.address]},
                    nbytes={"x": 1, "y": 1},
                    send_result=True,
                    priority=[0.0, 1.0],
                ),
            )
            added = await link.expect(AddKeys)
            assert set(added.nbytes) == {"x", "y"}
            assert all(isinstance(n, int) for n in added.nbytes.values())
            assert peer.roles == ["peer"]
            assert [sorted(r.keys) for r in peer.requests] == [["x", "y"]]
            done = await link.expect(TaskFinished)
            assert (done.key, done.run_id) == ("z", 1)
            assert done.nbytes > 0
            assert done.start <= done.stop
            assert done.result is not None and deserialize(done.result) == 7

            # get_data from the worker: values in msgpack when asked for it; unknown keys missing.
            got = await ask(reg.address, ["z", "x", "nope"], serializers=["msgpack"])
            assert {k: p.serializer for k, p in got.data.items()} == {
                "z": "msgpack",
                "x": "msgpack",
            }
            assert deserialize(got.data["z"]) == 7 and deserialize(got.data["x"]) == 3
            assert got.missing == ["nope"]

            # A failing task is a task_erred with the remote traceback.
            h.compute(link, h.task("e", "fail", ["boom"], run_id=5))
            erred = await link.expect(TaskErred)
            assert (erred.key, erred.run_id) == ("e", 5)
            assert "boom" in erred.error.message
            assert erred.error.typename
            assert erred.error.traceback_text

            # A task whose function is not there is an error too, never a closed connection.
            # (Workers MAY cache functions by id: use an id never sent.)
            bad, _ = h.task("b", "add", [1, 2], run_id=6)
            bad.fn = "no-such-function-id"
            link.conn.send(Compute(tasks=[bad], functions={}))
            erred = await link.expect(TaskErred)
            assert erred.key == "b"

            # free_keys drops the data.
            link.conn.send(FreeKeys(keys=["z"]))
            for _ in range(100):
                if "z" in (await ask(reg.address, ["z"])).missing:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("z still served after free_keys")

            # store keeps scattered data; it is served back.
            link.conn.send(Store(data={"s": mp({"a": [1, 2]})}))
            for _ in range(100):
                got = await ask(reg.address, ["s"], serializers=["msgpack"])
                if "s" in got.data:
                    break
                await asyncio.sleep(0.05)
            assert deserialize(got.data["s"]) == {"a": [1, 2]}

            # An input already held (stored) is not fetched again.
            requests_before = len(peer.requests)
            h.compute(
                link, h.task("s2", "add", [flavor.ref("s2in"), 1], who_has={"s2in": [peer.address]})
            )
            link.conn.send(Store(data={"s2in": mp(41)}))
            # (The store may arrive while the fetch is under way: then it is reported.)
            done = await link.expect(TaskFinished, AddKeys)
            if isinstance(done, AddKeys):
                done = await link.expect(TaskFinished)
            assert (
                done.key,
                deserialize((await ask(reg.address, ["s2"], ["msgpack"])).data["s2"]),
            ) == ("s2", 42)
            link.conn.send(Store(data={"s3in": mp(1)}))
            while "s3in" not in (await ask(reg.address, ["s3in"])).data:
                await asyncio.sleep(0.05)
            requests_before = len(peer.requests)
            h.compute(
                link, h.task("s3", "add", [flavor.ref("s3in"), 1], who_has={"s3in": [peer.address]})
            )
            done = await link.expect(TaskFinished)
            assert done.key == "s3"
            assert len(peer.requests) == requests_before

            # Heartbeats arrive about every second.
            if not link.heartbeats:
                await link.expect(Heartbeat, timeout=5)

            # close_worker: the worker says goodbye and exits cleanly.
            link.conn.send(CloseWorker(reason="test over"))
            await link.expect(Unregister)
            assert h.exit_code() == 0, h.output()
        peer.close()

    run(scenario())


@pytest.mark.parametrize("flavor", FLAVORS)
def test_missing_data_update_who_has_and_resources(flavor: Flavor, tmp_path: Path) -> None:
    async def scenario() -> None:
        peer = await Peer({"m": mp(10)}).start()
        dead = "tcp://127.0.0.1:9"  # nothing listens there
        async with Harness(flavor, tmp_path) as h:
            h.start_worker("--nthreads", "2", "--resources", "GPU=1")
            link, _ = await h.connected_worker()

            # The only holder is unreachable: the worker asks the scheduler.
            h.compute(link, h.task("t", "add", [flavor.ref("m"), 5], who_has={"m": [dead]}))
            missing = await link.expect(MissingData)
            assert (missing.key, missing.holder) == ("m", dead)
            link.conn.send(UpdateWhoHas(who_has={"m": [peer.address]}))
            await link.expect(AddKeys)
            done = await link.expect(TaskFinished)
            assert done.key == "t"

            # Two tasks demanding the only GPU never run at once, though 2 may run.
            sleep = 0.4
            h.compute(
                link,
                h.task("g1", "sleep", [sleep], resources={"GPU": 1}),
                h.task("g2", "sleep", [sleep], resources={"GPU": 1}),
                h.task("plain", "sleep", [sleep]),
            )
            finished = {m.key: m for m in await link.collect(3, TaskFinished)}
            g1, g2, plain = finished["g1"], finished["g2"], finished["plain"]
            first, second = sorted([g1, g2], key=lambda m: m.start)
            assert second.start >= first.stop - 0.01, (first, second)
            # The task without demands ran alongside the first GPU task.
            assert plain.start < first.stop
            link.conn.send(CloseWorker())
            await link.expect(Unregister)
            assert h.exit_code() == 0
        peer.close()

    run(scenario())


@pytest.mark.parametrize("flavor", FLAVORS)
def test_sigterm_unregisters_and_the_peer_port_is_guarded(flavor: Flavor, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Harness(flavor, tmp_path) as h:
            h.start_worker()
            link, reg = await h.connected_worker()

            # The peer port checks the token, like the scheduler's.
            with pytest.raises(HandshakeError, match="authentication failed"):
                await connect(reg.address, role="peer", my_id="peer-x", token="wrong")
            # An op a peer port does not serve closes that connection, and only it.
            conn, _ = await connect(reg.address, role="peer", my_id="peer-y", token=TOKEN)
            conn.send(FreeKeys(keys=["a"]))
            with pytest.raises((CommClosedError, TimeoutError)):
                await conn.recv(timeout=TIMEOUT)
            assert (await ask(reg.address, ["a"])).missing == ["a"]

            # SIGTERM: unregister, close, exit 0.
            assert h.proc is not None
            h.proc.send_signal(signal.SIGTERM)
            bye = await link.expect(Unregister)
            assert isinstance(bye.reason, str)
            assert h.exit_code() == 0, h.output()

    run(scenario())


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_wrong_token_is_refused_and_the_worker_exits(flavor: Flavor, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Harness(flavor, tmp_path) as h:
            h.start_worker(token="not-the-token")
            code = await asyncio.get_running_loop().run_in_executor(None, h.exit_code)
            assert code != 0
            assert "authentication failed" in h.output()
            assert h.links.empty()

    run(scenario())


def test_the_hmac_example_of_the_spec() -> None:
    """docs/protocol.md section 5 gives this example; the JavaScript code is tested on it too."""
    digest = answer_challenge("secret", bytes(range(32)))
    assert digest is not None
    assert digest.hex() == "47860bcbb991426bea828dbf6097dff33339b093e3b9f61d9aef8a052f93e402"
