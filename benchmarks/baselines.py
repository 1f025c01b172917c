"""Raw loopback-TCP baselines measured in the benchmark subprocess.

They give a same-machine lower bound for latency and upper bound for
bandwidth, so the scheduler numbers can be read as "x of raw".  The
ping-pong runs between two threads of this process; the bulk copy comes
from a child process, as a worker-to-worker transfer does.  Both talk over
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable


def percentile(values: list[float], q: float) -> float:
    """Return the ``q``-th percentile (0-100) of ``values``, linear interpolation."""
    if not values:
        raise ValueError("percentile of an empty list")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def asyncio_ping_pong(
    round_trips: int = 2000,
    size: int = 64,
    warmup: int = 500,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    cpus: tuple[int, int] | None = None,
) -> list[float]:
    """Measure asyncio TCP round trips between two threads; return seconds each.

    An echo server runs in one thread's event loop, a client in another
    thread's loop sends ``size`` bytes and waits for the echo.  The first
    ``warmup`` round trips are discarded.  ``loop_factory`` makes both
    loops (pass ``uvloop.new_event_loop`` to measure uvloop).  ``cpus``
    pins the server and client threads to those CPUs (Linux only).
    """
    ready = threading.Event()
    server_loop = loop_factory()
    port_box: list[int] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.readexactly(size)
                writer.write(data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def pin(index: int) -> None:
        if cpus is not None:
            os.sched_setaffinity(0, {cpus[index]})  # pid 0: the calling thread

    def serve() -> None:
        pin(0)
        asyncio.set_event_loop(server_loop)
        server = server_loop.run_until_complete(asyncio.start_server(echo, "127.0.0.1", 0))
        port_box.append(server.sockets[0].getsockname()[1])
        ready.set()
        server_loop.run_forever()
        server.close()
        server_loop.run_until_complete(server.wait_closed())
        server_loop.close()

    samples: list[float] = []
    errors: list[BaseException] = []

    async def ping() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_box[0])
        payload = b"x" * size
        for i in range(warmup + round_trips):
            start = time.perf_counter()
            writer.write(payload)
            await writer.drain()
            await reader.readexactly(size)
            if i >= warmup:
                samples.append(time.perf_counter() - start)
        writer.close()
        await writer.wait_closed()

    def client() -> None:
        pin(1)
        loop = loop_factory()
        try:
            loop.run_until_complete(ping())
        except BaseException as exc:  # re-raised in the calling thread
            errors.append(exc)
        finally:
            loop.close()

    server_thread = threading.Thread(target=serve, name="raw-echo-server", daemon=True)
    server_thread.start()
    if not ready.wait(10):
        raise RuntimeError("raw echo server did not start")
    client_thread = threading.Thread(target=client, name="raw-echo-client", daemon=True)
    client_thread.start()
    client_thread.join()
    server_loop.call_soon_threadsafe(server_loop.stop)
    server_thread.join(10)
    if errors:
        raise errors[0]
    return samples


def pick_cpus(same_core: bool) -> tuple[int, int] | None:
    """Return CPUs to pin the two ping-pong threads to, or None if unsupported.

    ``same_core`` puts both threads on one CPU; otherwise on two different
    CPUs (when the process may use at least two).
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if same_core:
        return (allowed[0], allowed[0])
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else None


def ping_pong_p50s(
    rounds: int = 5,
    round_trips: int = 2000,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    cpus: tuple[int, int] | None = None,
) -> list[float]:
    """Return the p50 round trip (seconds) of each of ``rounds`` ping-pong runs.

    Unpinned threads give bimodal results from process to process (both on
    one core: about 3x faster than on two), hence the ``cpus`` option.
    """
    return [
        percentile(asyncio_ping_pong(round_trips, loop_factory=loop_factory, cpus=cpus), 50)
        for _ in range(rounds)
    ]


def _copy_sender(port: int, nbytes: int) -> None:
    """Child process of :func:`tcp_copy_seconds`: connect, wait for "go", send."""
    import numpy as np

    # The transfer workload's bytes: random float64 in a NumPy array.
    payload = np.random.default_rng(0).random(nbytes // 8).data.cast("B")
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if sock.recv(1) == b"g":
            sock.sendall(payload)


def tcp_copy_seconds(nbytes: int) -> float:
    """Copy ``nbytes`` over loopback TCP from another process; return seconds.

    Like a worker-to-worker transfer, sender and receiver are separate
    processes (two threads of one process would also contend for the GIL
    between system calls).  The sender has the workload's kind of bytes
    already in memory, a NumPy array of random floats (zeros would be read
    from one cached page); the receiver ``recv_into`` a
    NumPy buffer faulted in before the clock starts (NumPy asks for huge
    pages, as a receiver that cares about speed would).  The clock runs from
    the receiver's "go" until it holds every byte.
    """
    import multiprocessing

    import numpy as np

    sink = np.empty(nbytes, dtype=np.uint8)
    sink.fill(1)  # fault every page in now, not while the bytes arrive
    view = sink.data.cast("B")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(120)
        port = listener.getsockname()[1]
        sender = multiprocessing.get_context("spawn").Process(
            target=_copy_sender, args=(port, nbytes), daemon=True
        )
        sender.start()
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(120)
                start = time.perf_counter()
                conn.sendall(b"g")
                got = 0
                while got < nbytes:
                    n = conn.recv_into(view[got:], nbytes - got)
                    if n == 0:
                        raise ConnectionError("the raw copy's sender closed early")
                    got += n
                elapsed = time.perf_counter() - start
        finally:
            sender.join(30)
            if sender.is_alive():
                sender.kill()
    return elapsed


def tcp_copy_mb_per_s(nbytes: int, repeats: int = 3) -> float:
    """Return the median loopback TCP copy bandwidth in MB/s (1 MB = 1e6 bytes)."""
    rates = [nbytes / 1e6 / tcp_copy_seconds(nbytes) for _ in range(repeats)]
    return statistics.median(rates)
