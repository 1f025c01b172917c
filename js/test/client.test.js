// The JavaScript client against a real cluster: a Python scheduler, two
// JavaScript workers (one offering GPU=1) and one Python worker.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { CancelledError, Client, GraphError, HandshakeError, RemoteError } from "../src/index.js";
import { startCluster } from "./cluster.js";

const TOKEN = "js-client-test-token";
let cluster;
let client;

before(async () => {
  cluster = await startCluster({ js: [{ name: "js-plain" }, { name: "js-gpu", resources: "GPU=1" }], python: 1, token: TOKEN });
  client = await Client.connect(cluster.address, { token: TOKEN });
  await client.waitForWorkers(3, { timeout: 60 });
});

after(async () => {
  await client?.close();
  await cluster?.stop();
});

test("submit a task naming a function; get its result", async () => {
  const f = client.submit("mathlib:add", [1, 2]);
  assert.equal(await f.result(), 3);
  assert.equal(f.status, "finished");
  // The same function and arguments give the same key (pure by default).
  assert.equal(client.submit("mathlib:add", [1, 2]).key, f.key);
});

test("futures are dependencies: their values are passed", async () => {
  const a = client.submit("mathlib:add", [1, 2]);
  const b = client.submit("mathlib:add", [a, 10]);
  const c = client.submit("mathlib:sum", [[a, b, { x: 1 }.x]]);
  assert.equal(await c.result(), 3 + 13 + 1);
  const squares = client.map("mathlib:add", [1, 2, 3].map((i) => [i, i]), { spread: true });
  assert.deepEqual(await client.gather(squares), [2, 4, 6]);
  const total = client.submit("mathlib:sum", [squares]);
  assert.equal(await total.result(), 12);
});

test("keyword arguments, nested names and plain data", async () => {
  assert.deepEqual(await client.submit("mathlib:scale", [[1, 2]], { kwargs: { factor: 3 } }).result(), [3, 6]);
  assert.equal(await client.submit("mathlib:stats.mean", [[1, 2, 3, 6]]).result(), 3);
  const value = { s: "é", n: null, b: true, f: 1.5, big: 2 ** 40, list: [1, [2]], bytes: Uint8Array.of(1, 2) };
  const back = await client.submit("mathlib:echo", [value]).result();
  assert.ok(back.bytes instanceof Uint8Array);
  assert.deepEqual({ ...back, bytes: [...back.bytes] }, { ...value, bytes: [1, 2] });
});

test("errors reject with the remote message and JavaScript stack", async () => {
  const f = client.submit("mathlib:fail", ["no good"]);
  await assert.rejects(f.result(), (err) => {
    assert.ok(err instanceof RemoteError);
    assert.equal(err.typename, "RangeError");
    assert.equal(err.message, "no good");
    assert.match(err.tracebackText, /mathlib\.js/);
    return true;
  });
  assert.equal((await f.exception()).message, "no good");
  // A task depending on a failed one fails with the same error.
  const g = client.submit("mathlib:add", [f, 1]);
  await assert.rejects(g.result(), /no good/);
  const missing = client.submit("mathlib:nope", []);
  await assert.rejects(missing.result(), (err) => err.typename === "FunctionNotFound");
});

test("large results are fetched from the worker holding them", async () => {
  const f = client.submit("mathlib:bytes", [300_000]);
  const v = await f.result();
  assert.equal(v.byteLength, 300_000);
  assert.equal(v[299_999], 7);
});

test("tasks run on JavaScript workers only; resources are honoured", async () => {
  const info = await client.schedulerInfo();
  const byAddress = info.workers;
  const runtimes = Object.values(byAddress).map((w) => w.runtime).sort();
  assert.deepEqual(runtimes, ["js", "js", "python"]);
  const futures = client.map("mathlib:add", [...Array(20).keys()].map((i) => [i, 100]), { spread: true });
  await client.gather(futures);
  const who = await client.request("who_has", { keys: futures.map((f) => f.key) });
  for (const holders of Object.values(who)) for (const a of holders) assert.equal(byAddress[a].runtime, "js");
  // GPU tasks: only the GPU worker, one at a time although it has 2 slots.
  const gpu = [0, 1, 2].map((i) => client.submit("mathlib:sleep", [150, i], { resources: { GPU: 1 }, pure: false }));
  const spans = (await client.gather(gpu)).sort((a, b) => a.start - b.start);
  for (let i = 1; i < spans.length; i++) assert.ok(spans[i].start >= spans[i - 1].stop, JSON.stringify(spans));
  const gpuHolders = Object.values(await client.request("who_has", { keys: gpu.map((f) => f.key) })).flat();
  assert.ok(gpuHolders.every((a) => byAddress[a].name === "js-gpu"), JSON.stringify(gpuHolders));
});

test("a task no worker can run waits; why_pending says why; cancel", async () => {
  const f = client.submit("mathlib:add", [1, 1], { resources: { TPU: 1 }, pure: false });
  let why = {};
  for (let i = 0; i < 50 && !why[f.key]; i++) {
    why = await client.whyPending([f]);
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.match(why[f.key], /TPU/);
  client.cancel(f);
  await assert.rejects(f.result(), CancelledError);
});

test("released futures free their data on the workers", async () => {
  const f = client.submit("mathlib:add", [40, 2], { pure: false });
  assert.equal(await f.result(), 42);
  f.release();
  for (let i = 0; i < 100; i++) {
    const who = await client.request("who_has", { keys: [f.key] });
    if (!who[f.key]?.length) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.fail("the key was not released");
});

test("a wrong token is refused", async () => {
  await assert.rejects(Client.connect(cluster.address, { token: "wrong", timeout: 5 }), HandshakeError);
  await assert.rejects(Client.connect(cluster.address, { token: null, timeout: 5 }), /requires an authentication token/);
});

test("small results come pushed by the workers that computed them (watch_results)", async () => {
  const info = await client.schedulerInfo();
  const jsWorkers = Object.values(info.workers).filter((w) => w.runtime === "js").map((w) => w.address);
  const batch = async (offset) => {
    const futures = Array.from({ length: 20 }, (_, i) => client.submit("mathlib:add", [i, offset], { pure: false }));
    assert.deepEqual(await client.gather(futures), futures.map((_, i) => i + offset));
    return futures;
  };
  await batch(1000); // relayed results name the workers: the client starts watching them
  const deadline = Date.now() + 30_000;
  while (!jsWorkers.every((a) => client.watching.get(a))) {
    assert.ok(Date.now() < deadline, "the client watches both JavaScript workers");
    await new Promise((r) => setTimeout(r, 20));
  }
  // Count what the scheduler relays; once a whole batch came pushed, every worker pushes.
  const relayed = new Set();
  const original = client.conn.onMessages;
  client.conn.setHandler((ops) => {
    for (const op of ops) if (op.op === "key_in_memory") relayed.add(op.key);
    original(ops);
  });
  try {
    for (;;) {
      const futures = await batch(2000);
      if (!futures.some((f) => relayed.has(f.key))) break;
      assert.ok(Date.now() < deadline, "results are still relayed by the scheduler");
    }
    relayed.clear();
    const futures = await batch(3000);
    assert.ok(!futures.some((f) => relayed.has(f.key)), "the scheduler relayed pushed results");
  } finally {
    client.conn.setHandler(original);
  }
});

// -- scatter ------------------------------------------------------------------------------

/** address -> {name, runtime} of the cluster's workers. */
async function workersByName() {
  const info = await client.schedulerInfo();
  return Object.fromEntries(Object.values(info.workers).map((w) => [w.runtime === "python" ? "python" : w.name, w.address]));
}

test("scatter: an array, a named object, one value; futures are finished and their values fetched", { timeout: 60_000 }, async () => {
  const [xs, s] = await client.scatter([[1, 2, 3], "text"]);
  assert.equal(xs.status, "finished");
  assert.match(xs.key, /^Array-[0-9a-f]{32}$/);
  assert.deepEqual(await xs.result(), [1, 2, 3]);
  assert.equal(await s.result(), "text");
  const who = await client.request("who_has", { keys: [xs.key, s.key] });
  assert.equal(who[xs.key].length, 1); // on one worker
  const named = await client.scatter({ "scatter-table": { a: [1, 2] }, "scatter-n": 5 });
  assert.deepEqual(Object.keys(named), ["scatter-table", "scatter-n"]);
  assert.equal(named["scatter-table"].key, "scatter-table"); // the property is the key
  assert.deepEqual(await named["scatter-table"].result(), { a: [1, 2] });
  const one = await client.scatter(Uint8Array.of(9, 8));
  assert.deepEqual([...(await one.result())], [9, 8]);
  // Scattered futures are dependencies like any other, in submit and in graphs.
  assert.equal(await client.submit("mathlib:sum", [xs]).result(), 6);
  assert.equal(await client.get({ n: named["scatter-n"], t: ["mathlib:add", "n", 1] }, "t"), 6);
});

test("scatter: equal values share a key (hash), hash: false gives each its own", { timeout: 60_000 }, async () => {
  const [a, b] = await client.scatter([[7, 7], [7, 7]]);
  assert.equal(a.key, b.key);
  const [c, d] = await client.scatter([[7, 7], [7, 7]], { hash: false });
  assert.notEqual(c.key, d.key);
  assert.notEqual(c.key, a.key);
  assert.deepEqual(await client.gather([a, b, c, d]), [[7, 7], [7, 7], [7, 7], [7, 7]]);
});

test("scatter to named workers, and broadcast; data on a Python worker reaches JavaScript tasks", { timeout: 60_000 }, async () => {
  const byName = await workersByName();
  const [onPython] = await client.scatter([[10, 20, 30]], { workers: byName.python });
  assert.deepEqual((await client.request("who_has", { keys: [onPython.key] }))[onPython.key], [byName.python]);
  assert.equal(await client.submit("mathlib:sum", [onPython], { workers: byName["js-plain"] }).result(), 60);
  const everywhere = await client.scatter({ "scatter-broadcast": [4, 5] }, { broadcast: true });
  const holders = (await client.request("who_has", { keys: ["scatter-broadcast"] }))["scatter-broadcast"];
  assert.deepEqual([...holders].sort(), Object.values(byName).sort());
  assert.deepEqual(await everywhere["scatter-broadcast"].result(), [4, 5]);
});

test("scatter over a key gives it a new value; released, it is freed", { timeout: 60_000 }, async () => {
  const first = await client.scatter({ "scatter-over": [1] });
  assert.deepEqual(await first["scatter-over"].result(), [1]);
  const second = await client.scatter({ "scatter-over": [2, 2] });
  assert.deepEqual(await second["scatter-over"].result(), [2, 2]);
  assert.deepEqual(await first["scatter-over"].result(), [2, 2]); // one key, one value: the new one
  assert.equal(await client.submit("mathlib:sum", [second["scatter-over"]], { pure: false }).result(), 4);
  first["scatter-over"].release();
  second["scatter-over"].release();
  for (let i = 0; i < 100; i++) {
    const who = await client.request("who_has", { keys: ["scatter-over"] });
    if (!who["scatter-over"]?.length) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.fail("the scattered key was not released");
});

test("scatter refuses what it cannot place, naming why", async () => {
  await assert.rejects(client.scatter([1], { workers: "tcp://127.0.0.1:9" }), /unknown workers/);
  const f = client.submit("mathlib:add", [1, 1]);
  await assert.rejects(client.scatter([[f]]), /cannot scatter a Future/);
  await assert.rejects(client.scatter([() => 1]), /a function is not plain data/);
  await assert.rejects(client.scatter([1], { broadcst: true }), /scatter: unknown option "broadcst"/);
  assert.deepEqual(await client.scatter([]), []);
});

// -- graphs ------------------------------------------------------------------------------

test("get: a graph's keys, in the nesting asked for; values and futures as nodes", { timeout: 60_000 }, async () => {
  const [ys] = await client.scatter([[1, 2, 3]]);
  const graph = {
    ten: 10,
    a: ["mathlib:add", 1, 2],
    b: ["mathlib:add", "a", "ten"],
    ys,
    c: ["mathlib:sum", ["a", "a", "a"]],
    total: ["mathlib:sum", "ys"],
    scaled: ["mathlib:scale", "ys", { factor: "ten" }],
  };
  assert.equal(await client.get(graph, "b"), 13);
  assert.deepEqual(await client.get(graph, ["a", ["b", "ten"], "c"]), [3, [13, 10], 9]);
  assert.deepEqual(await client.get(graph, ["total", "scaled", "ys"]), [6, [10, 20, 30], [1, 2, 3]]);
});

test("a graph goes in one update_graph; only what the keys need is computed", { timeout: 60_000 }, async () => {
  const sent = [];
  const send = client.conn.send;
  client.conn.send = (...ops) => {
    sent.push(...ops);
    return send.apply(client.conn, ops);
  };
  let futures;
  try {
    const graph = {
      x: ["mathlib:add", 100, 1, "gx"],
      y: ["mathlib:add", "x", 1],
      z: ["mathlib:add", "y", "x"],
      broken: ["mathlib:fail", "never run"],
    };
    futures = client.compute(graph, ["z", "y"]);
    assert.deepEqual(await client.gather(futures), [203, 102]);
  } finally {
    client.conn.send = send;
  }
  const graphs = sent.filter((op) => op.op === "update_graph");
  assert.equal(graphs.length, 1);
  assert.deepEqual(graphs[0].tasks.map((t) => t.key), ["x", "y", "z"]); // inputs first; "broken" left out
  assert.deepEqual(graphs[0].wanted, ["z", "y"]);
  assert.deepEqual(graphs[0].tasks.find((t) => t.key === "z").deps, ["y", "x"]);
  assert.equal(Object.keys(graphs[0].functions).length, 1); // one function, sent once
  for (const f of futures) f.release();
});

test("compute returns futures; graph tasks depend on submitted futures and feed submitted tasks", { timeout: 60_000 }, async () => {
  const seed = client.submit("mathlib:add", [2, 3]);
  const [s, [t]] = client.compute({ s: ["mathlib:add", seed, 1], t: ["mathlib:scale", ["s", "s"], { factor: 2 }] }, ["s", ["t"]]);
  assert.equal(await s.result(), 6);
  assert.deepEqual(await t.result(), [12, 12]);
  assert.equal(await client.submit("mathlib:sum", [t]).result(), 24);
});

test("a failing graph task fails the keys that need it; get rejects with the remote error", { timeout: 60_000 }, async () => {
  const graph = { bad: ["mathlib:fail", "graph says no"], after: ["mathlib:add", "bad", 1], fine: ["mathlib:add", 1, 1] };
  await assert.rejects(client.get(graph, ["fine", "after"]), (err) => err instanceof RemoteError && err.message === "graph says no");
  const [fine, after] = client.compute(graph, ["fine", "after"]);
  assert.equal(await fine.result(), 2);
  assert.equal((await after.exception()).typename, "RangeError");
});

test("graph options apply to every task: resources route the whole graph", { timeout: 60_000 }, async () => {
  const graph = { p: ["mathlib:sleep", 50, 1], q: ["mathlib:sleep", 50, 2], both: ["mathlib:describe", ["p", "q"]] };
  const futures = client.compute(graph, ["p", "q", "both"], { resources: { GPU: 1 } });
  await client.gather(futures);
  const byName = await workersByName();
  const who = await client.request("who_has", { keys: ["p", "q", "both"] });
  for (const key of ["p", "q", "both"]) assert.ok(who[key].includes(byName["js-gpu"]), `${key} ran on the GPU worker: ${JSON.stringify(who)}`);
  // One GPU: one task at a time.
  const [p, q] = await client.gather(futures.slice(0, 2));
  assert.ok(p.stop <= q.start || q.stop <= p.start, JSON.stringify([p, q]));
  for (const f of futures) f.release();
});

test("bad graphs and options are refused before anything is sent", async () => {
  await assert.rejects(client.get({ a: ["mathlib:add", "b", 1], b: ["mathlib:add", "a", 1] }, "a"), (err) => err instanceof GraphError && /cycle/.test(err.message));
  await assert.rejects(client.get({ a: ["mathlib:add", 1, 1] }, "nope"), /key "nope" is not in the graph/);
  assert.throws(() => client.compute({ v: 3 }, "v"), /graph key "v" is a value, not a task/);
  assert.throws(() => client.compute({ a: ["mathlib:echo", () => 1] }, "a"), /graph key "a": its arguments are not plain data/);
  assert.throws(() => client.compute({ a: ["mathlib:add", 1, 1] }, "a", { resources: { GPU: -1 } }), /compute: resources: GPU must be a finite non-negative number, got -1/);
  assert.throws(() => client.compute({ a: ["mathlib:add", 1, 1] }, "a", { resource: { GPU: 1 } }), /compute: unknown option "resource"/);
  assert.throws(() => client.submit("mathlib:add", [1, 1], { retries: -1 }), /submit: retries must be a non-negative integer/);
  assert.throws(() => client.submit("mathlib:add", [1, 1], { runtime: "python" }), /cannot send Python tasks/);
});
