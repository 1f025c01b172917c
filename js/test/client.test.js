// The JavaScript client against a real cluster: a Python scheduler, two
// JavaScript workers (one offering GPU=1) and one Python worker.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { CancelledError, Client, HandshakeError, RemoteError } from "../src/index.js";
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
