"""Property test: the pure scheduler and worker state machines never oversubscribe.

Hypothesis drives a real :class:`SchedulerState` wired to real
:class:`WorkerState` machines (messages delivered in order, execution and
fetches finishing in any order), with workers offering plain, fractional and
indexed resources, clients submitting graphs with resource demands, resources
changed at run time from both sides, and workers dying.  Whenever a worker
starts a task, an independent tally checks that

* the worker offers every resource the task demands,
* what its running tasks demand, this one included, fits in what it offers now
  (after a shrink, running tasks keep what they hold but nothing new starts
  until it fits),
* a task on an indexed resource holds indices the worker offers, in the amount
  demanded, and no index is held beyond capacity (whole demands alone,
  fractions sharing up to 1).

After every stimulus both machines' ``validate()`` pass; at the end, with a
worker offering everything, every task the client wants is settled.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule
from state_helpers import ARGS

from corral.protocol.messages import (
    Compute,
    ErrorInfo,
    FreeKeys,
    KeyCancelled,
    KeyErred,
    KeyInMemory,
    KeyLost,
    RegisterWorker,
    ReleaseKeys,
    SetResources,
    Store,
    TaskSpec,
    UpdateGraph,
    UpdateWhoHas,
)
from corral.resources import resource_amounts
from corral.scheduler.state import ClientJoined, SchedulerState, WorkerLeft
from corral.worker.state import (
    ComputeEvent,
    DataStored,
    Execute,
    ExecuteFailure,
    ExecuteSuccess,
    FreeEvent,
    Gather,
    GatherDone,
    SendToScheduler,
    WorkerState,
)

CLIENT = "client-1"
POOL = tuple(f"tcp://10.0.0.{i}:7001" for i in range(1, 5))
OFFERS = (
    {},
    {"GPU": 1},
    {"GPU": [0, 1]},
    {"GPU": [0, 1, 2], "MEM": 1},
    {"MEM": 0.5},
    {"GPU": 2.5},
)
CHANGES = ({"GPU": 0}, {"GPU": [0]}, {"GPU": [1, 2]}, {"GPU": 3}, {"MEM": 0}, {"MEM": 2})
FULL = {"GPU": [0, 1, 2], "MEM": 2}
DEMANDS = (
    None,
    None,
    {"GPU": 1},
    {"GPU": 0.5},
    {"GPU": 0.3},
    {"GPU": 1.5},
    {"GPU": 2},
    {"MEM": 0.5},
    {"GPU": 0.25, "MEM": 0.25},
)
EPS = 1e-6


class SimWorker:
    def __init__(self, address: str, offer: dict[str, Any], nthreads: int) -> None:
        self.address = address
        self.offer = dict(offer)
        self.state = WorkerState(nthreads, dict(offer))
        # key -> (demand, held, run_id) of runs handed to the thread pool
        self.running: dict[str, tuple[dict[str, float], Any, int]] = {}
        self.gathers: list[Gather] = []


class ResourceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = SchedulerState(allowed_failures=1000)
        self.workers: dict[str, SimWorker] = {}
        self.wanted: set[str] = set()
        self.last: dict[str, Any] = {}
        self.counter = 0
        self.request_id = 0
        self.queue: list[tuple[str, str, list[Any]]] = []
        self.s.handle(CLIENT, [ClientJoined(CLIENT)])

    # -- delivery -------------------------------------------------------------------
    def to_scheduler(self, source: str, *events: Any) -> None:
        self.queue.append(("scheduler", source, list(events)))
        self.pump()

    def to_worker(self, address: str, *events: Any) -> None:
        self.queue.append(("worker", address, list(events)))
        self.pump()

    def pump(self) -> None:
        while self.queue:
            kind, who, events = self.queue.pop(0)
            if kind == "scheduler":
                left = any(isinstance(e, WorkerLeft) for e in events)
                if who in POOL and who not in self.workers and not left:
                    continue  # sent by a worker that died before it arrived
                out = self.s.handle(who, events)
                self.s.validate()
                for recipient, msgs in out.items():
                    if recipient == CLIENT:
                        for m in msgs:
                            if isinstance(m, KeyLost):
                                continue  # being recomputed: a final message follows
                            assert isinstance(m, KeyInMemory | KeyErred | KeyCancelled), m
                            self.last[m.key] = m
                    else:
                        assert recipient in self.workers, recipient
                        self.queue.append(
                            ("worker", recipient, [self.convert(recipient, m) for m in msgs])
                        )
            else:
                w = self.workers.get(who)
                if w is None:
                    continue
                for inst in w.state.handle([e for e in events if e is not None]):
                    self.instruction(w, inst)
                w.state.validate()

    def convert(self, address: str, m: Any) -> Any:
        if isinstance(m, Compute):
            return ComputeEvent(m.tasks)
        if isinstance(m, FreeKeys):
            return FreeEvent(m.keys)
        if isinstance(m, SetResources):
            self.workers[address].offer.update(m.resources)
            return m
        if isinstance(m, UpdateWhoHas):
            return m
        if isinstance(m, Store):
            return DataStored({k: 8 for k in m.data})
        return None

    def instruction(self, w: SimWorker, inst: Any) -> None:
        if isinstance(inst, Execute):
            self.check_start(w, inst)
            w.running[inst.key] = (dict(inst.spec.resources or {}), inst.held, inst.spec.run_id)
        elif isinstance(inst, SendToScheduler):
            self.queue.append(("scheduler", w.address, [inst.msg]))
        elif isinstance(inst, Gather):
            w.gathers.append(inst)

    # -- the independent tally ----------------------------------------------------------
    def check_start(self, w: SimWorker, inst: Execute) -> None:
        demand = dict(inst.spec.resources or {})
        amounts = resource_amounts(w.offer)
        assert inst.key not in w.running, f"{inst.key} started twice on {w.address}"
        for name, amount in demand.items():
            used = sum(d.get(name, 0) for d, _, _ in w.running.values())
            assert used + amount <= amounts.get(name, 0) + EPS, (
                f"{w.address} starts {inst.key} needing {name}={amount} with {used} of "
                f"{amounts.get(name, 0)} in use"
            )
        held = inst.held or {}
        for name, offered in w.offer.items():
            if not isinstance(offered, list) or not demand.get(name):
                assert name not in held
                continue
            taken = held[name]
            assert abs(sum(share for _, share in taken) - demand[name]) < EPS, (demand, taken)
            shares: dict[Any, float] = {}
            for _, h, _ in w.running.values():
                for index, share in (h or {}).get(name, []):
                    shares[index] = shares.get(index, 0) + share
            for index, share in taken:
                assert index in offered, f"{w.address} gave {name} index {index} it does not offer"
                assert 0 < share <= 1 + EPS
                assert shares.get(index, 0) + share <= 1 + EPS, (
                    f"{name} index {index} over capacity on {w.address}"
                )

    # -- workers --------------------------------------------------------------------
    def join(self, address: str, offer: dict[str, Any], nthreads: int) -> None:
        self.workers[address] = SimWorker(address, offer, nthreads)
        reg = RegisterWorker(address=address, nthreads=nthreads, resources=resource_amounts(offer))
        self.to_scheduler(address, reg)

    @rule(address=st.sampled_from(POOL), offer=st.sampled_from(OFFERS), nthreads=st.integers(1, 3))
    def worker_joins(self, address, offer, nthreads):
        if address not in self.workers:
            self.join(address, offer, nthreads)

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def worker_dies(self, data):
        address = data.draw(st.sampled_from(sorted(self.workers)))
        del self.workers[address]
        self.to_scheduler(address, WorkerLeft(address))

    @precondition(lambda self: self.workers)
    @rule(data=st.data(), change=st.sampled_from(CHANGES), from_client=st.booleans())
    def resources_change(self, data, change, from_client):
        address = data.draw(st.sampled_from(sorted(self.workers)))
        if from_client:
            self.request_id += 1
            self.to_scheduler(
                CLIENT, SetResources(resources=change, worker=address, id=self.request_id)
            )
        else:  # Worker.set_resources on the worker itself
            self.workers[address].offer.update(change)
            self.to_worker(address, SetResources(resources=change))
            self.to_scheduler(address, SetResources(resources=change))

    @precondition(lambda self: any(w.running for w in self.workers.values()))
    @rule(data=st.data(), ok=st.sampled_from([True, True, True, False]))
    def a_run_ends(self, data, ok):
        busy = sorted(a for a, w in self.workers.items() if w.running)
        w = self.workers[data.draw(st.sampled_from(busy))]
        key = data.draw(st.sampled_from(sorted(w.running)))
        _, _, run_id = w.running.pop(key)
        if ok:
            event: Any = ExecuteSuccess(
                key=key, run_id=run_id, nbytes=8, typename="int", start=0, stop=1
            )
        else:
            err = ErrorInfo(typename="ValueError", message=key)
            event = ExecuteFailure(key=key, run_id=run_id, error=err, start=0, stop=1)
        self.to_worker(w.address, event)

    @precondition(lambda self: any(w.gathers for w in self.workers.values()))
    @rule(data=st.data())
    def a_fetch_ends(self, data):
        busy = sorted(a for a, w in self.workers.items() if w.gathers)
        w = self.workers[data.draw(st.sampled_from(busy))]
        g = w.gathers.pop(data.draw(st.integers(0, len(w.gathers) - 1)))
        self.to_worker(w.address, self.fetch(g))

    def fetch(self, g: Gather) -> GatherDone:
        peer = self.workers.get(g.peer)
        if peer is None:
            return GatherDone(g.peer, {}, list(g.keys), failed=True)
        received = {}
        for key in g.keys:
            ts = peer.state.tasks.get(key)
            if ts is not None and ts.state == "memory":
                received[key] = 8
        return GatherDone(g.peer, received, [k for k in g.keys if k not in received])

    # -- the client -------------------------------------------------------------------
    @rule(data=st.data())
    def client_submits(self, data):
        batch: list[TaskSpec] = []
        older = sorted(k for k in self.s.tasks)[-6:]
        for _ in range(data.draw(st.integers(1, 6), label="ntasks")):
            self.counter += 1
            key = f"t{self.counter}"
            candidates = [t.key for t in batch] + older
            deps = (
                data.draw(st.lists(st.sampled_from(candidates), max_size=2, unique=True))
                if candidates
                else []
            )
            batch.append(
                TaskSpec(
                    key=key,
                    args=ARGS,
                    deps=deps,
                    priority=[self.counter],
                    resources=data.draw(st.sampled_from(DEMANDS)),
                )
            )
        wanted = [t.key for t in batch]
        self.wanted.update(wanted)
        self.to_scheduler(CLIENT, UpdateGraph(tasks=batch, wanted=wanted))

    @precondition(lambda self: self.wanted)
    @rule(data=st.data())
    def client_releases(self, data):
        keys = data.draw(
            st.lists(st.sampled_from(sorted(self.wanted)), min_size=1, max_size=3, unique=True)
        )
        self.wanted.difference_update(keys)
        self.to_scheduler(CLIENT, ReleaseKeys(keys=keys))

    # -- the end --------------------------------------------------------------------
    def teardown(self) -> None:
        spare = next((a for a in POOL if a not in self.workers), None)
        if spare is None:
            spare = POOL[0]
            del self.workers[spare]
            self.to_scheduler(spare, WorkerLeft(spare))
        self.join(spare, FULL, 2)
        for _ in range(5_000):
            w = next((w for w in self.workers.values() if w.running or w.gathers), None)
            if w is None:
                break
            if w.gathers:
                self.to_worker(w.address, self.fetch(w.gathers.pop(0)))
            else:
                key = sorted(w.running)[0]
                _, _, run_id = w.running.pop(key)
                self.to_worker(
                    w.address,
                    ExecuteSuccess(
                        key=key, run_id=run_id, nbytes=8, typename="int", start=0, stop=1
                    ),
                )
        else:
            raise AssertionError("the cluster never went quiet")
        for key in self.wanted:
            ts = self.s.tasks.get(key)
            assert ts is None or ts.state in ("memory", "erred"), (key, ts.state, self.s.story(key))
            assert isinstance(self.last.get(key), KeyInMemory | KeyErred | KeyCancelled), key


ResourceMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_no_schedule_oversubscribes = ResourceMachine.TestCase
