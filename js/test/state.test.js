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
const gathered = (peer, received, missing = [], failed = false, versions = undefined) => ({
  type: "gather-done",
  peer,
  received,
  missing,
  failed,
  versions,
});
const stored = (nbytes, versions = undefined) => ({ type: "stored", nbytes, versions });
const whoHas = (wh, versions = undefined) => ({ type: "update-who-has", whoHas: wh, versions });
const free = (...keys) => ({ type: "free", keys });
const release = (...keys) => ({ type: "release-data", keys });
const addKeys = (nbytes, versions = {}) => send({ op: "add_keys", nbytes, versions });
const missingData = (key, holder = "") => send({ op: "missing_data", key, holder });
const execute = (spec, resources = {}) => ({ type: "execute", key: spec.key, spec, resources });
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

/** key -> the resources its execute instruction says it holds. */
const held = (out) => Object.fromEntries(out.filter((i) => i.type === "execute").map((i) => [i.key, i.resources]));

test("indexed resources: each running task is told its own indices, never more than offered", () => {
  const w = new W(4, { GPU: [0, 1] });
  const out = w.on(compute(...[0, 1, 2].map((i) => ctask(`t${i}`, { resources: { GPU: 1 } }))));
  assert.deepEqual(held(out), { t0: { GPU: [0] }, t1: { GPU: [1] } });
  assert.equal(w.states().t2, "constrained");
  // The index t1 gave back goes to the next task.
  assert.deepEqual(held(w.on(ok("t1"))), { t2: { GPU: [1] } });
  // A task demanding nothing holds nothing; an amount resource is shown as the amount.
  const w2 = new W(2, { GPU: [3], MEM: 10 });
  assert.deepEqual(held(w2.on(compute(ctask("plain"), ctask("both", { resources: { GPU: 1, MEM: 4 } })))), {
    plain: {},
    both: { GPU: [3], MEM: 4 },
  });
});

test("indexed resources: fractions share an index up to 1, whole demands hold theirs alone", () => {
  const w = new W(8, { GPU: [0, 1] });
  const halves = [0, 1, 2].map((i) => ctask(`h${i}`, { resources: { GPU: 0.5 } }));
  assert.deepEqual(held(w.on(compute(...halves))), { h0: { GPU: [0] }, h1: { GPU: [0] }, h2: { GPU: [1] } });
  // 0.5 of GPU 1 is free, but no whole GPU: a whole demand waits, a 0.5 fits.
  assert.deepEqual(held(w.on(compute(ctask("whole", { resources: { GPU: 1 } }), ctask("h3", { resources: { GPU: 0.5 } })))), {
    h3: { GPU: [1] },
  });
  assert.equal(w.states().whole, "constrained");
  w.on(ok("h0"));
  assert.deepEqual(held(w.on(ok("h1"))), { whole: { GPU: [0] } });
  // 1.5 takes one index alone and half of another.
  const w2 = new W(4, { GPU: [0, 1, 2] });
  assert.deepEqual(held(w2.on(compute(ctask("m", { resources: { GPU: 1.5 } }), ctask("q", { resources: { GPU: 0.5 } })))), {
    m: { GPU: [0, 1] },
    q: { GPU: [1] },
  });
});

test("indexed resources come back after an error and a cancel; shrinking never stops running tasks", () => {
  const w = new W(4, { GPU: [0, 1] });
  w.on(compute(ctask("a", { resources: { GPU: 1 } }), ctask("b", { resources: { GPU: 1 } })));
  w.on(failed("a"));
  w.on(free("b")); // cancelled while running: still holds GPU 1
  assert.deepEqual(held(w.on(compute(ctask("c", { resources: { GPU: 2 } })))), {});
  assert.deepEqual(held(w.on(ok("b"))), { c: { GPU: [0, 1] } });
  // Offer one GPU while c holds two: c goes on, nothing else starts.
  w.on({ type: "set-resources", resources: { GPU: [1] } });
  assert.deepEqual(held(w.on(compute(ctask("d", { resources: { GPU: 1 } })))), {});
  assert.deepEqual(held(w.on(ok("c"))), { d: { GPU: [1] } });
  assert.deepEqual([...w.state.resourcePool.usage.GPU.keys()], [1]); // index 0 is gone once free
});

test("randomized: running tasks' indices are never shared beyond one whole index", () => {
  for (let seed = 1; seed <= 30; seed++) {
    const r = rng(seed);
    const pick = (xs) => xs[Math.floor(r() * xs.length)];
    const w = new W(2 + Math.floor(r() * 4), { GPU: [0, 1, 2], MEM: 10 });
    /** key -> [demand of GPU, indices it was told] */
    const running = new Map();
    let n = 0;
    for (let step = 0; step < 200; step++) {
      const roll = r();
      let out;
      if (roll < 0.45) {
        const demand = r() < 0.8 ? { GPU: pick([0.25, 0.5, 0.6, 1, 1.5, 2]) } : { MEM: pick([3, 6]) };
        out = w.on(compute(ctask(`t${n++}`, { resources: demand, priority: [Math.floor(r() * 3)] })));
      } else if (roll < 0.85 && running.size) {
        const key = pick([...running.keys()]);
        running.delete(key);
        out = w.on(r() < 0.8 ? ok(key) : failed(key));
      } else if (roll < 0.93) {
        out = w.on({ type: "set-resources", resources: { GPU: pick([[0, 1, 2], [1, 2], [0, 4], [2]]) } });
      } else {
        const key = `t${Math.floor(r() * n)}`;
        out = w.on(free(key)); // a running one is cancelled: it still holds its share until it ends
      }
      for (const inst of out) {
        if (inst.type === "execute") running.set(inst.key, [inst.spec.resources.GPU ?? 0, inst.resources.GPU ?? []]);
      }
      // Shares per index, from what the tasks were told (whole indices first, then the fraction's).
      const shares = new Map();
      for (const [key, [demand, indices]] of running) {
        const whole = Math.floor(demand + 1e-9);
        assert.equal(indices.length, whole + (demand - whole > 1e-9 ? 1 : 0), `seed ${seed}: ${key} told ${indices} for ${demand}`);
        indices.forEach((index, i) => shares.set(index, (shares.get(index) ?? 0) + (i < whole ? 1 : demand - whole)));
      }
      for (const [index, share] of shares) assert.ok(share <= 1 + 1e-9, `seed ${seed}: GPU ${index} held ${share} times`);
    }
  }
});

test("inputs are fetched, several keys per peer in one gather, then the task runs", () => {
  const w = new W();
  const t = ctask("t", { who_has: { x: [P1], y: [P1], z: [P2] }, nbytes: { x: 5, y: 6, z: 7 } });
  const out = w.on(compute(t));
  assert.deepEqual(out, [gather(P1, ["x", "y"]), gather(P2, ["z"])]);
  assert.deepEqual(w.states(), { t: "waiting", x: "flight", y: "flight", z: "flight" });
  assert.deepEqual(w.on(gathered(P1, { x: 5, y: 6 })), [send({ op: "add_keys", nbytes: { x: 5, y: 6 }, versions: {} })]);
  assert.deepEqual(w.on(gathered(P2, { z: 7 })), [send({ op: "add_keys", nbytes: { z: 7 }, versions: {} }), execute(t)]);
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
  assert.deepEqual(w.on(gathered(P3, { x: 5 })), [send({ op: "add_keys", nbytes: { x: 5 }, versions: {} }), execute(t)]);
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

test("a freed fetch that lands serves a newer fetch of the same key, if of the version it wants", () => {
  const w = new W();
  w.on(compute(ctask("t1", { who_has: { x: [P1] }, nbytes: { x: 5 } })));
  w.on(free("t1", "x"));
  const t2 = ctask("t2", { run_id: 2, who_has: { x: [P1, P2] }, nbytes: { x: 5 } });
  // P1 is still busy with the freed fetch: x is asked of P2.
  assert.deepEqual(w.on(compute(t2)), [gather(P2, ["x"])]);
  assert.deepEqual(w.on(gathered(P1, { x: 5 })), [addKeys({ x: 5 }), execute(t2)]);
  // P2's answer, whatever it is, changes nothing.
  assert.deepEqual(w.on(gathered(P2, {}, ["x"])), []);
  assert.deepEqual(w.states(), { t2: "executing", x: "memory" });
  // The newer fetch wants another version (x was scattered over): what lands is dropped.
  const v = new W();
  v.on(compute(ctask("t1", { who_has: { x: [P1] }, nbytes: { x: 5 } })));
  v.on(free("t1", "x"));
  const t3 = ctask("t3", { run_id: 3, who_has: { x: [P2] }, nbytes: { x: 5 }, versions: { x: 4 } });
  assert.deepEqual(v.on(compute(t3)), [gather(P2, ["x"])]);
  assert.deepEqual(v.on(gathered(P1, { x: 5 })), [release("x")]);
  assert.deepEqual(v.on(gathered(P2, { x: 5 }, [], false, { x: 4 })), [addKeys({ x: 5 }, { x: 4 }), execute(t3)]);
});

test("an input that is a cancelled run here is awaited", () => {
  const w = new W(2);
  w.on(compute(ctask("x", { run_id: 1 })));
  w.on({ type: "free", keys: ["x"] });
  const t = ctask("t", { run_id: 3, who_has: { x: [P1] }, nbytes: { x: 5 } });
  w.on(compute(t));
  assert.deepEqual(w.on(ok("x", 1)), [send({ op: "add_keys", nbytes: { x: 8 }, versions: {} }), execute(t)]);
});

test("data stored over a running task keeps the data and frees the slot", () => {
  // The scheduler scattered over a key running here: free_keys, then store.
  const w = new W(1, { GPU: 1 });
  w.on(compute(ctask("k", { resources: { GPU: 1 } })));
  w.on(free("k"));
  assert.deepEqual(w.on(stored({ k: 3 })), []);
  assert.deepEqual(w.states(), { k: "memory" });
  // The run ends: its slot and resources come back; the stored data stays.
  assert.deepEqual(w.on(ok("k")), []);
  assert.deepEqual(w.states(), { k: "memory" });
  assert.equal(w.state.executing.size, 0);
  assert.equal(w.state.availableResources.GPU, 1);
  const h = ctask("h", { resources: { GPU: 1 } });
  assert.deepEqual(w.on(compute(h)), [execute(h, { GPU: 1 })]);
});

test("data stored over a running task, then freed, still frees the slot", () => {
  const w = new W(1, { GPU: 1 });
  w.on(compute(ctask("k", { resources: { GPU: 1 } })));
  w.on(stored({ k: 3 }));
  assert.deepEqual(w.on(free("k")), [release("k")]);
  assert.deepEqual(w.on(failed("k")), []);
  w.on(compute(ctask("k2", { resources: { GPU: 1 } })));
  w.on(free("k2"));
  w.on(stored({ k2: 3 }));
  w.on(free("k2"));
  // The run's value, stored by the IO layer as it ended, is not kept either.
  assert.deepEqual(w.on(ok("k2")), [release("k2")]);
  assert.equal(w.state.executing.size, 0);
  assert.equal(w.state.availableResources.GPU, 1);
  assert.deepEqual(w.states(), {});
});

test("a scatter over a key held here keeps the new value", () => {
  // free_keys then store for the same key in one batch; the IO layer stored
  // the new value before the batch ran.
  const w = new W();
  w.on(stored({ k: 3 }));
  const out = w.on(free("k"), stored({ k: 4 }));
  assert.deepEqual(out.filter((i) => i.type === "release-data").flatMap((i) => i.keys), []);
  assert.deepEqual(w.states(), { k: "memory" });
  assert.equal(w.state.tasks.get("k").nbytes, 4);
});

// -- versions: a key scattered over has a new value; copies of the old one never pass for it

test("fetched copies are reported with the version the scheduler named", () => {
  const w = new W();
  const t = ctask("t", { who_has: { s: [P1], c: [P2] }, nbytes: { s: 5, c: 6 }, versions: { s: 4 } });
  assert.deepEqual(w.on(compute(t)), [gather(P1, ["s"]), gather(P2, ["c"])]);
  assert.deepEqual(w.on(gathered(P1, { s: 5 })), [addKeys({ s: 5 }, { s: 4 })]);
  // c is a computed value: version 0, not listed (but versions is there: this worker tracks them).
  assert.deepEqual(w.on(gathered(P2, { c: 6 })), [addKeys({ c: 6 }, {}), execute(t)]);
});

test("a copy of an older value is dropped and the named one fetched", () => {
  const w = new W();
  w.on(compute(ctask("t1", { who_has: { s: [P1] }, nbytes: { s: 5 }, versions: { s: 1 } })));
  w.on(gathered(P1, { s: 5 }));
  w.on(ok("t1"));
  // s was scattered over since (version 2, on P2): t2 must not use the copy here.
  const t2 = ctask("t2", { run_id: 2, who_has: { s: [P2] }, nbytes: { s: 7 }, versions: { s: 2 } });
  assert.deepEqual(w.on(compute(t2)), [release("s"), gather(P2, ["s"])]);
  assert.deepEqual(w.states(), { t1: "memory", t2: "waiting", s: "flight" });
  assert.deepEqual(w.on(gathered(P2, { s: 7 })), [addKeys({ s: 7 }, { s: 2 }), execute(t2)]);
});

test("scattered data is held with its version", () => {
  const w = new W();
  w.on(stored({ s: 3 }, { s: 5 }));
  const same = ctask("same", { who_has: { s: [P1] }, nbytes: { s: 3 }, versions: { s: 5 } });
  assert.deepEqual(w.on(compute(same)), [execute(same)]);
  const other = ctask("other", { run_id: 2, who_has: { s: [P1] }, nbytes: { s: 3 }, versions: { s: 6 } });
  assert.deepEqual(w.on(compute(other)), [release("s"), gather(P1, ["s"])]);
});

test("a fetch in flight of an older value is dropped when it lands", () => {
  const w = new W(2);
  const t1 = ctask("t1", { who_has: { s: [P1] }, nbytes: { s: 5 }, versions: { s: 1 } });
  assert.deepEqual(w.on(compute(t1)), [gather(P1, ["s"])]);
  // A task naming version 2 (on P2) arrives while version 1 travels from P1.
  const t2 = ctask("t2", { run_id: 2, who_has: { s: [P2] }, nbytes: { s: 5 }, versions: { s: 2 } });
  assert.deepEqual(w.on(compute(t2)), []);
  // What lands is version 1: dropped, and version 2 fetched for both tasks.
  assert.deepEqual(w.on(gathered(P1, { s: 5 })), [release("s"), gather(P2, ["s"])]);
  const out = w.on(gathered(P2, { s: 5 }));
  assert.deepEqual(out[0], addKeys({ s: 5 }, { s: 2 }));
  assert.deepEqual(executes(out).sort(), ["t1", "t2"]);
});

test("a peer serving another version than named is not used", () => {
  // The peer has not yet read the store of the new value (or was named before it).
  const w = new W();
  const t = ctask("t", { who_has: { s: [P1] }, nbytes: { s: 5 }, versions: { s: 2 } });
  w.on(compute(t));
  // P1 says its value is version 1: dropped, and the scheduler asked where v2 is
  // (blaming no holder: P1 may well get version 2 in a moment).
  assert.deepEqual(w.on(gathered(P1, { s: 5 }, [], false, { s: 1 })), [release("s"), missingData("s", "")]);
  assert.deepEqual(w.on(whoHas({ s: [P1] }, { s: 2 })), [gather(P1, ["s"])]);
  assert.deepEqual(w.on(gathered(P1, { s: 5 }, [], false, { s: 2 })), [addKeys({ s: 5 }, { s: 2 }), execute(t)]);
});

test("a peer that does not say versions is taken at its word", () => {
  const w = new W();
  const t = ctask("t", { who_has: { s: [P1] }, nbytes: { s: 5 }, versions: { s: 2 } });
  w.on(compute(t));
  assert.deepEqual(w.on(gathered(P1, { s: 5 })), [addKeys({ s: 5 }, { s: 2 }), execute(t)]);
});

test("update_who_has of another version drops the copy held here", () => {
  // The scheduler's answer to an add_keys of a copy of a value scattered over since.
  const w = new W();
  w.on(compute(ctask("t", { who_has: { s: [P1] }, nbytes: { s: 5 }, versions: { s: 1 } })));
  w.on(gathered(P1, { s: 5 }));
  w.on(ok("t"));
  assert.deepEqual(w.on(whoHas({ s: [P2] }, { s: 2 })), [release("s")]);
  assert.deepEqual(w.states(), { t: "memory" });
  // The same version changes nothing.
  const w2 = new W();
  w2.on(stored({ s: 3 }, { s: 2 }));
  assert.deepEqual(w2.on(whoHas({ s: [P2] }, { s: 2 })), []);
  assert.deepEqual(w2.states(), { s: "memory" });
  // Nor does a computed value told of without versions (version 0 both).
  const w3 = new W();
  w3.on(compute(ctask("t", { who_has: { c: [P1] }, nbytes: { c: 5 } })));
  w3.on(gathered(P1, { c: 5 }));
  assert.deepEqual(w3.on(whoHas({ c: [P1, P2] })), []);
  assert.equal(w3.states().c, "memory");
});

test("update_who_has of another version refetches for a task not started", () => {
  const w = new W(1);
  w.on(compute(ctask("busy", { priority: [0] })));
  const t = ctask("t", { run_id: 2, who_has: { s: [P1] }, nbytes: { s: 5 }, versions: { s: 1 } });
  w.on(compute(t));
  w.on(gathered(P1, { s: 5 }));
  assert.equal(w.states().t, "ready"); // the only slot is busy
  assert.deepEqual(w.on(whoHas({ s: [P2] }, { s: 2 })), [release("s"), gather(P2, ["s"])]);
  assert.equal(w.states().t, "waiting");
  assert.deepEqual(w.on(ok("busy")), [done("busy")]); // t does not start without s
  assert.deepEqual(w.on(gathered(P2, { s: 5 })), [addKeys({ s: 5 }, { s: 2 }), execute(t)]);
});

test("a freed input that a task not started needs is asked for again", () => {
  // The scheduler scattered over a key held here (free_keys) while a task here needs it.
  const w = new W(1);
  w.on(compute(ctask("busy", { priority: [0] })));
  const t = ctask("t", { run_id: 2, who_has: { s: [P1] }, nbytes: { s: 5 }, versions: { s: 1 } });
  w.on(compute(t));
  w.on(gathered(P1, { s: 5 }));
  assert.deepEqual(w.on(free("s")), [release("s"), missingData("s", "")]);
  assert.deepEqual(w.on(whoHas({ s: [P2] }, { s: 2 })), [gather(P2, ["s"])]);
  w.on(ok("busy"));
  assert.deepEqual(w.on(gathered(P2, { s: 5 })), [addKeys({ s: 5 }, { s: 2 }), execute(t)]);
  // Freed in one message with the tasks that need it (in any order): simply dropped.
  const w2 = new W(1);
  w2.on(compute(ctask("busy", { priority: [0] })));
  w2.on(compute(t));
  w2.on(gathered(P1, { s: 5 }));
  assert.deepEqual(w2.on(free("s", "t")), [release("s")]);
  assert.deepEqual(w2.states(), { busy: "executing" });
});

test("a cancelled run serves local tasks only when they want the computed value", () => {
  const w = new W(2);
  w.on(compute(ctask("x", { run_id: 1 })));
  w.on(free("x"));
  // x was scattered over meanwhile: t wants that value, not the run's.
  const t = ctask("t", { run_id: 3, who_has: { x: [P1] }, nbytes: { x: 5 }, versions: { x: 7 } });
  w.on(compute(t));
  assert.deepEqual(w.on(ok("x", 1)), [release("x"), gather(P1, ["x"])]);
  assert.deepEqual(w.on(gathered(P1, { x: 5 })), [addKeys({ x: 5 }, { x: 7 }), execute(t)]);
});

test("a key held as scattered data is computed when assigned", () => {
  // Its computed value is another value: the copy is not reported as the run's result.
  const w = new W();
  w.on(stored({ k: 3 }, { k: 2 }));
  const k = ctask("k", { run_id: 5 });
  assert.deepEqual(w.on(compute(k)), [release("k"), execute(k)]);
  assert.deepEqual(w.on(ok("k", 5)), [done("k", 5)]);
  assert.equal(w.state.tasks.get("k").version, 0);
});

test("two runs of a key each give back what they hold", () => {
  // A run dropped mid-run (stored over, then freed) and a new run of the key.
  const w = new W(2, { GPU: 1 });
  w.on(compute(ctask("k", { run_id: 1, resources: { GPU: 1 } })));
  w.on(free("k"), stored({ k: 3 }, { k: 1 }));
  w.on(free("k"), stored({ k: 3 }, { k: 2 }));
  const k = ctask("k", { run_id: 3 });
  assert.deepEqual(w.on(compute(k)), [release("k"), execute(k)]);
  assert.equal(w.state.availableResources.GPU, 0); // the first run still holds it
  // The first run ends: its GPU comes back, its value goes; the new run goes on.
  assert.deepEqual(w.on(ok("k", 1)), [release("k")]);
  assert.equal(w.state.availableResources.GPU, 1);
  assert.deepEqual(w.states(), { k: "executing" });
  assert.deepEqual(w.on(ok("k", 3)), [done("k", 3)]);
  assert.equal(w.state.executing.size, 0);
});

test("stale results are ignored", () => {
  const w = new W();
  // The IO layer stores a run's value only while the record wants it; whatever it did, it goes.
  assert.deepEqual(w.on(ok("never")), [{ type: "release-data", keys: ["never"] }]);
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

test("randomized with versions: a task starts with the value it names, a copy reported as current is it", () => {
  // A scheduler and an IO layer around the state machine, both simulated as
  // in tests/test_worker_state.py: every value carries its version, so the
  // checks see which value a task starts with and which one a copy is.
  const PEERS = [P1, P2, P3];
  const DATA = ["d0", "d1", "d2", "d3"];
  for (let seed = 1; seed <= 40; seed++) {
    const r = rng(seed);
    const pick = (xs) => xs[Math.floor(r() * xs.length)];
    const w = new W(1 + Math.floor(r() * 2), { GPU: 1 });
    const peers = new Map(PEERS.map((p) => [p, new Map()])); // peer -> key -> version held
    // peer -> key -> the version the scheduler stored there that the peer has not
    // read yet: the scheduler names it a holder, the peer still serves the old value.
    const lag = new Map(PEERS.map((p) => [p, new Map()]));
    for (const k of DATA) peers.get(pick(PEERS)).set(k, 0);
    const store = new Map(); // the IO layer's data: key -> version
    const current = new Map(); // the scheduler's: key -> the version of its value now (absent: 0)
    const jobs = []; // [key, runId]
    const flights = new Map(); // peer -> keys
    const missing = new Set();
    let counter = 0;
    let n = 0;
    const cur = (k) => current.get(k) ?? 0;
    const said = (p, k) => (lag.get(p).has(k) ? lag.get(p).get(k) : peers.get(p).get(k));
    const holders = (k) => PEERS.filter((p) => said(p, k) === cur(k));
    const readStore = (p, k) => {
      peers.get(p).set(k, lag.get(p).get(k));
      lag.get(p).delete(k);
    };
    const where = (s) => `seed ${seed}: ${s}`;

    const handle = (...events) => {
      for (const inst of w.on(...events)) {
        if (inst.type === "release-data") for (const k of inst.keys) store.delete(k);
        else if (inst.type === "gather") flights.set(inst.peer, inst.keys);
        else if (inst.type === "execute") {
          for (const dep of Object.keys(inst.spec.who_has)) {
            assert.ok(store.has(dep), where(`${inst.key} started without its input ${dep}`));
            // Assigned since the last scatter over the input: exactly that value.
            const named = inst.spec.versions?.[dep] ?? 0;
            if (named === cur(dep)) assert.equal(store.get(dep), named, where(`${inst.key} got ${dep} v${store.get(dep)}`));
          }
          jobs.push([inst.key, inst.spec.run_id]);
        } else if (inst.msg.op === "add_keys") {
          assert.ok(inst.msg.versions, where("add_keys without versions"));
          for (const key of Object.keys(inst.msg.nbytes)) {
            assert.ok(store.has(key), where(`${key} reported but not stored`));
            // A copy reported as of the current value is of the current value.
            const v = inst.msg.versions[key] ?? 0;
            if (v === cur(key)) assert.equal(store.get(key), v, where(`${key} reported as v${v}`));
          }
        } else if (inst.msg.op === "missing_data") {
          missing.add(inst.msg.key);
        }
      }
      for (const ts of w.state.tasks.values()) {
        if (ts.state !== "memory") continue;
        assert.ok(store.has(ts.key), where(`${ts.key} in memory but not in the store`));
        if (ts.version === cur(ts.key)) assert.equal(store.get(ts.key), ts.version, where(`${ts.key} held as v${ts.version}`));
      }
    };
    const finishJob = () => {
      const [key, runId] = jobs.splice(Math.floor(r() * jobs.length), 1)[0];
      if (r() < 0.85) {
        // As the IO layer: a run's value never goes over data stored since.
        const state = w.state.tasks.get(key)?.state;
        if (state === "executing" || state === "cancelled") store.set(key, 0);
        handle(ok(key, runId));
      } else {
        handle(failed(key, runId));
      }
    };
    const finishGather = (reachable) => {
      const peer = pick([...flights.keys()]);
      const keys = flights.get(peer);
      flights.delete(peer);
      if (!reachable) return handle(gathered(peer, {}, [], true));
      const held = peers.get(peer);
      for (const k of keys) if (lag.get(peer).has(k) && r() < 0.5) readStore(peer, k);
      const received = {};
      const versions = {}; // the peer says which version each is (data.versions)
      for (const k of keys) {
        if (!held.has(k)) continue;
        received[k] = 10;
        versions[k] = held.get(k);
        // As the IO layer: only into a key still wanted, never over data since.
        const state = w.state.tasks.get(k)?.state;
        if (["flight", "fetch", "missing"].includes(state)) store.set(k, held.get(k));
      }
      handle(gathered(peer, received, keys.filter((k) => !Object.hasOwn(received, k)), false, versions));
    };
    const answerMissing = () => {
      const key = pick([...missing]);
      missing.delete(key);
      if (!holders(key).length) {
        const p = pick(PEERS); // found (or made) elsewhere
        peers.get(p).set(key, cur(key));
        lag.get(p).delete(key);
      }
      handle(whoHas({ [key]: holders(key) }, cur(key) ? { [key]: cur(key) } : undefined));
    };
    const scatter = (key) => {
      current.set(key, ++counter);
      for (const held of peers.values()) held.delete(key); // the old value is freed everywhere...
      for (const held of lag.values()) held.delete(key);
      return counter;
    };

    for (let step = 0; step < 250; step++) {
      const roll = r();
      if (roll < 0.3) {
        const tasks = [];
        for (let i = 0; i < 1 + Math.floor(r() * 3); i++) {
          const who = {};
          for (const dep of DATA.filter((k) => holders(k).length && r() < 0.35)) {
            const hs = holders(dep);
            if (r() < 0.2) {
              const stale = pick(PEERS); // a stale location: it lost its copy
              if (peers.get(stale).get(dep) !== cur(dep)) peers.get(stale).delete(dep);
              hs.push(stale);
            }
            who[dep] = [...new Set(hs)].sort();
          }
          const versions = Object.fromEntries(Object.keys(who).filter(cur).map((k) => [k, cur(k)]));
          const res = r() < 0.3 ? { GPU: 1 } : undefined;
          tasks.push(ctask(`t${n++}`, { who_has: who, versions, resources: res, priority: [Math.floor(r() * 3), n] }));
        }
        handle(compute(...tasks));
      } else if (roll < 0.5 && jobs.length) {
        finishJob();
      } else if (roll < 0.68 && flights.size) {
        finishGather(r() < 0.9);
      } else if (roll < 0.76 && missing.size) {
        answerMissing();
      } else if (roll < 0.86) {
        // A client scatters over a key onto peers; the worker learns it one
        // way (free_keys of its copy, or the answer to its add_keys), or later.
        const key = pick(DATA);
        const old = PEERS.map((p) => peers.get(p).get(key));
        const v = scatter(key);
        PEERS.forEach((p, i) => {
          if (r() < 0.5) return;
          if (old[i] !== undefined && r() < 0.4) {
            peers.get(p).set(key, old[i]); // ...but where the new one is stored, not yet read
            lag.get(p).set(key, v);
          } else {
            peers.get(p).set(key, v);
          }
        });
        const ts = w.state.tasks.get(key);
        if (ts?.state !== "memory") continue;
        const how = r();
        if (how < 0.4) handle(free(key));
        else if (how < 0.8) handle(whoHas({ [key]: holders(key) }, { [key]: v }));
      } else if (roll < 0.92) {
        // ... or onto this worker (free_keys of a copy here first, in one batch).
        const key = pick(DATA);
        const v = scatter(key);
        store.set(key, v);
        if (w.state.tasks.get(key)?.state === "memory") handle(free(key), stored({ [key]: 3 }, { [key]: v }));
        else handle(stored({ [key]: 3 }, { [key]: v }));
      } else if (roll < 0.97) {
        // The scheduler frees a task, and an input once no task here needs it.
        const keys = [`t${Math.floor(r() * n)}`];
        const d = w.state.tasks.get(pick(DATA));
        if (d && !d.dependents.size) keys.push(d.key);
        handle(free(...keys));
      } else {
        const peer = pick(PEERS);
        const held = [...peers.get(peer).keys()];
        if (held.length) {
          const k = pick(held);
          peers.get(peer).delete(k);
          lag.get(peer).delete(k);
        }
      }
    }
    // Everything assigned ends: runs, fetches and questions are answered.
    for (const p of PEERS) for (const k of [...lag.get(p).keys()]) readStore(p, k);
    for (let i = 0; i < 1000 && (jobs.length || flights.size || missing.size); i++) {
      if (jobs.length) finishJob();
      else if (flights.size) finishGather(true);
      else answerMissing();
    }
    const stuck = [...w.state.tasks.values()].filter((t) => t.spec && !["memory", "error"].includes(t.state));
    assert.deepEqual(stuck.map((t) => `${t.key} ${t.state}`), [], where("tasks that never ran"));
  }
});
