// The pure worker state machine (src/state.js): exact instructions out for
// events in, as tests/test_worker_state.py does for the Python one, and a
// randomized run checking the invariants after every event.

import assert from "node:assert/strict";
import { test } from "node:test";

import { InvalidTransition, WorkerState } from "../src/state.js";

const P1 = "tcp://10.0.1.1:7001";
const P2 = "tcp://10.0.1.2:7001";
const P3 = "tcp://10.0.1.3:7001";
const args = { serializer: "msgpack", frames: [Uint8Array.of(0x92, 0x90, 0x80)] };

function ctask(key, extra = {}) {
  return { key, args, run_id: extra.run_id ?? 1, fn: "f", who_has: {}, nbytes: {}, priority: [], ...extra };
}

class W {
  constructor(nthreads = 1, resources = {}) {
    this.state = new WorkerState(nthreads, resources);
  }

  on(...events) {
    const out = this.state.handle(events);
    this.state.validate();
    return out;
  }

  states() {
    return Object.fromEntries([...this.state.tasks.values()].map((t) => [t.key, t.state]));
  }
}

const compute = (...tasks) => ({ type: "compute", tasks });
const ok = (key, runId = 1, nbytes = 8) => ({ type: "execute-success", key, runId, nbytes, typename: "number", start: 1, stop: 2 });
const failed = (key, runId = 1) => ({
  type: "execute-failure",
  key,
  runId,
  error: { typename: "Error", message: "boom", traceback_text: "" },
  start: 1,
  stop: 2,
});
const gathered = (peer, received, missing = [], failed = false) => ({ type: "gather-done", peer, received, missing, failed });
const execute = (spec) => ({ type: "execute", key: spec.key, spec });
const gather = (peer, keys) => ({ type: "gather", peer, keys });
const send = (msg) => ({ type: "send", msg });
const done = (key, runId = 1, nbytes = 8) =>
  send({ op: "task_finished", key, run_id: runId, nbytes, typename: "number", start: 1, stop: 2, result: undefined });
const executes = (out) => out.filter((i) => i.type === "execute").map((i) => i.key);

test("a task without inputs runs and reports; freeing it drops the data", () => {
  const w = new W();
  const a = ctask("a");
  assert.deepEqual(w.on(compute(a)), [execute(a)]);
  assert.deepEqual(w.states(), { a: "executing" });
  assert.deepEqual(w.on(ok("a")), [done("a")]);
  assert.deepEqual(
    w.state.story("a").map((e) => e.slice(1, 3)),
    [
      ["released", "ready"],
      ["ready", "executing"],
      ["executing", "memory"],
    ],
  );
  assert.deepEqual(w.on({ type: "free", keys: ["a"] }), [{ type: "release-data", keys: ["a"] }]);
  assert.deepEqual(w.states(), {});
});

test("a failure reports the error and forgets the task", () => {
  const w = new W();
  w.on(compute(ctask("a", { run_id: 3 })));
  const out = w.on(failed("a", 3));
  assert.equal(out.length, 1);
  assert.equal(out[0].msg.op, "task_erred");
  assert.equal(out[0].msg.run_id, 3);
  assert.equal(out[0].msg.error.message, "boom");
  assert.deepEqual(w.states(), {});
});

test("nthreads bounds what runs and priority orders it", () => {
  const w = new W(2);
  const tasks = [0, 1, 2, 3, 4].map((i) => ctask(`t${i}`, { priority: [5 - i] }));
  assert.deepEqual(executes(w.on(compute(...tasks))), ["t4", "t3"]);
  assert.deepEqual(executes(w.on(ok("t3"))), ["t2"]);
  assert.deepEqual(executes(w.on(ok("t4"), ok("t2"))), ["t1", "t0"]);
});

test("resources are never oversubscribed, whatever nthreads", () => {
  const w = new W(4, { GPU: 1 });
  const tasks = ["g1", "g2", "g3"].map((k) => ctask(k, { resources: { GPU: 1 } }));
  assert.deepEqual(executes(w.on(compute(...tasks, ctask("plain")))), ["g1", "plain"]);
  assert.deepEqual(w.states(), { g1: "executing", g2: "constrained", g3: "constrained", plain: "executing" });
  assert.equal(w.state.availableResources.GPU, 0);
  assert.deepEqual(executes(w.on(ok("g1"))), ["g2"]);
  assert.deepEqual(executes(w.on(failed("g2"))), ["g3"]);
  w.on(ok("g3"));
  assert.equal(w.state.availableResources.GPU, 1);
});

test("a demand larger than what is left waits without blocking smaller ones", () => {
  const w = new W(4, { MEM: 10 });
  const big = ctask("big", { resources: { MEM: 8 }, priority: [2] });
  const small = ctask("small", { resources: { MEM: 3 }, priority: [1] });
  const small2 = ctask("small2", { resources: { MEM: 3 }, priority: [3] });
  assert.deepEqual(executes(w.on(compute(big, small, small2))), ["small", "small2"]);
  assert.deepEqual(executes(w.on(ok("small"))), []);
  assert.deepEqual(executes(w.on(ok("small2"))), ["big"]);
});

test("set_resources: running tasks keep what they hold, nothing new starts until it fits", () => {
  const w = new W(4, { GPU: 2 });
  const tasks = ["a", "b", "c"].map((k) => ctask(k, { resources: { GPU: 1 } }));
  assert.deepEqual(executes(w.on(compute(...tasks))), ["a", "b"]);
  assert.deepEqual(executes(w.on({ type: "set-resources", resources: { GPU: 1 } })), []);
  assert.deepEqual(executes(w.on(ok("a"))), []);
  assert.deepEqual(executes(w.on(ok("b"))), ["c"]);
});

test("inputs are fetched, several keys per peer in one gather, then the task runs", () => {
  const w = new W();
  const t = ctask("t", { who_has: { x: [P1], y: [P1], z: [P2] }, nbytes: { x: 5, y: 6, z: 7 } });
  const out = w.on(compute(t));
  assert.deepEqual(out, [gather(P1, ["x", "y"]), gather(P2, ["z"])]);
  assert.deepEqual(w.states(), { t: "waiting", x: "flight", y: "flight", z: "flight" });
  assert.deepEqual(w.on(gathered(P1, { x: 5, y: 6 })), [send({ op: "add_keys", nbytes: { x: 5, y: 6 } })]);
  assert.deepEqual(w.on(gathered(P2, { z: 7 })), [send({ op: "add_keys", nbytes: { z: 7 } }), execute(t)]);
  assert.deepEqual(w.on(ok("t")), [done("t")]);
});

test("an input missing on one peer comes from another, then the scheduler is asked", () => {
  const w = new W();
  const t = ctask("t", { who_has: { x: [P1, P2] }, nbytes: { x: 5 } });
  assert.deepEqual(w.on(compute(t)), [gather(P1, ["x"])]);
  assert.deepEqual(w.on(gathered(P1, {}, ["x"])), [gather(P2, ["x"])]);
  assert.deepEqual(w.on(gathered(P2, {}, [], true)), [send({ op: "missing_data", key: "x", holder: P2 })]);
  assert.deepEqual(w.states(), { t: "waiting", x: "missing" });
  assert.deepEqual(w.on({ type: "update-who-has", whoHas: { x: [P3] } }), [gather(P3, ["x"])]);
  assert.deepEqual(w.on(gathered(P3, { x: 5 })), [send({ op: "add_keys", nbytes: { x: 5 } }), execute(t)]);
});

test("an input without any holder is asked for at once", () => {
  const w = new W();
  const t = ctask("t", { who_has: { x: [] } });
  assert.deepEqual(w.on(compute(t)), [send({ op: "missing_data", key: "x", holder: "" })]);
});

test("scattered data wakes a waiting task; the fetch in flight is then ignored", () => {
  const w = new W();
  const t = ctask("t", { who_has: { x: [P1] }, nbytes: { x: 5 } });
  w.on(compute(t));
  assert.deepEqual(w.on({ type: "stored", nbytes: { x: 5 } }), [execute(t)]);
  assert.deepEqual(w.on(gathered(P1, { x: 5 })), []);
});

test("an input already here is not fetched", () => {
  const w = new W();
  w.on(compute(ctask("a")));
  w.on(ok("a"));
  const b = ctask("b", { who_has: { a: ["me"] }, nbytes: { a: 8 } });
  assert.deepEqual(w.on(compute(b)), [execute(b)]);
});

test("a task freed while running is cancelled and its result dropped", () => {
  const w = new W(1, { GPU: 1 });
  w.on(compute(ctask("a", { resources: { GPU: 1 } })));
  assert.deepEqual(w.on({ type: "free", keys: ["a"] }), []);
  assert.deepEqual(w.states(), { a: "cancelled" });
  assert.deepEqual(w.on(ok("a")), [{ type: "release-data", keys: ["a"] }]);
  assert.deepEqual(w.states(), {});
  assert.equal(w.state.availableResources.GPU, 1);
});

test("a task freed then assigned again while running reports the new run", () => {
  const w = new W();
  w.on(compute(ctask("a", { run_id: 1 })));
  w.on({ type: "free", keys: ["a"] });
  assert.deepEqual(w.on(compute(ctask("a", { run_id: 2 }))), []);
  assert.deepEqual(w.on(ok("a", 1)), [done("a", 2)]);
});

test("a freed fetch that lands with no new owner is dropped", () => {
  const w = new W();
  w.on(compute(ctask("t", { who_has: { x: [P1] }, nbytes: { x: 5 } })));
  w.on({ type: "free", keys: ["t", "x"] });
  assert.deepEqual(w.on(gathered(P1, { x: 5 })), [{ type: "release-data", keys: ["x"] }]);
});

test("an input that is a cancelled run here is awaited", () => {
  const w = new W(2);
  w.on(compute(ctask("x", { run_id: 1 })));
  w.on({ type: "free", keys: ["x"] });
  const t = ctask("t", { run_id: 3, who_has: { x: [P1] }, nbytes: { x: 5 } });
  w.on(compute(t));
  assert.deepEqual(w.on(ok("x", 1)), [send({ op: "add_keys", nbytes: { x: 8 } }), execute(t)]);
});

test("stale results are ignored", () => {
  const w = new W();
  assert.deepEqual(w.on(ok("never")), []);
  assert.deepEqual(w.on(failed("never")), []);
  assert.deepEqual(w.on(gathered(P1, { zzz: 1 })), []);
  assert.deepEqual(w.on({ type: "free", keys: ["zzz"] }), []);
  assert.deepEqual(w.on({ type: "update-who-has", whoHas: { zzz: [P1] } }), []);
});

test("an illegal transition throws at once, naming the key and both states", () => {
  const w = new W();
  w.on(compute(ctask("a")), ok("a"));
  w.state.tasks.get("a").state = "forgotten"; // corrupt the record on purpose
  assert.throws(() => w.state.handle([{ type: "stored", nbytes: {} }, compute(ctask("a", { run_id: 2 }))]), InvalidTransition);
  assert.throws(() => w.state.handle([compute(ctask("a", { run_id: 2 }))]), /"a": forgotten -> ready/);
});

// A small seeded generator: the randomized run is reproducible.
function rng(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

test("randomized: invariants hold and resources are never oversubscribed", () => {
  for (let seed = 1; seed <= 30; seed++) {
    const r = rng(seed);
    const pick = (xs) => xs[Math.floor(r() * xs.length)];
    const w = new W(1 + Math.floor(r() * 3), { GPU: 2, MEM: 10 });
    const running = new Set();
    const flights = new Map();
    let n = 0;
    for (let step = 0; step < 300; step++) {
      const roll = r();
      let out;
      if (roll < 0.3) {
        const tasks = [];
        for (let i = 0; i < 1 + Math.floor(r() * 3); i++) {
          const whoHas = {};
          if (r() < 0.5) whoHas[`d${Math.floor(r() * 6)}`] = r() < 0.1 ? [] : [pick([P1, P2, P3])];
          const res = r() < 0.4 ? { [pick(["GPU", "MEM"])]: pick([0.5, 1, 2, 3]) } : undefined;
          tasks.push(ctask(`t${n++}`, { who_has: whoHas, nbytes: {}, resources: res, priority: [Math.floor(r() * 5)] }));
        }
        out = w.on(compute(...tasks));
      } else if (roll < 0.55 && running.size) {
        const key = pick([...running]);
        running.delete(key);
        out = w.on(r() < 0.8 ? ok(key) : failed(key));
      } else if (roll < 0.75 && flights.size) {
        const peer = pick([...flights.keys()]);
        const keys = flights.get(peer);
        flights.delete(peer);
        const f = r();
        const received = {};
        if (f < 0.7) for (const k of keys) received[k] = 3;
        out = w.on(gathered(peer, received, f < 0.7 ? [] : keys, f > 0.9));
      } else if (roll < 0.85) {
        // The scheduler frees tasks; an input only once no task here needs it.
        const keys = [`t${Math.floor(r() * n)}`];
        const d = w.state.tasks.get(`d${Math.floor(r() * 6)}`);
        if (d && !d.dependents.size) keys.push(d.key);
        out = w.on({ type: "free", keys });
      } else if (roll < 0.92) {
        const whoHas = { [`d${Math.floor(r() * 6)}`]: r() < 0.3 ? [] : [pick([P1, P2, P3])] };
        out = w.on({ type: "update-who-has", whoHas });
      } else {
        out = w.on({ type: "stored", nbytes: { [`d${Math.floor(r() * 6)}`]: 4 } });
      }
      for (const inst of out) {
        if (inst.type === "execute") running.add(inst.key);
        if (inst.type === "gather") flights.set(inst.peer, inst.keys);
      }
      for (const [name, used] of Object.entries(w.state.resourcePool.used)) {
        assert.ok(used <= w.state.resourcePool.total[name] + 1e-9, `seed ${seed}: ${name} oversubscribed`);
      }
    }
  }
});
