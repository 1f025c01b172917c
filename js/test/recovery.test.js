// A worker holding a result dies (SIGKILL): the scheduler says key_lost, the
// client's future goes back to pending, and it finishes again once the result
// is computed anew on the worker that is left.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client } from "../src/index.js";
import { startCluster } from "./cluster.js";

let cluster;
let client;

before(async () => {
  cluster = await startCluster({ js: [{ name: "js-doomed" }, { name: "js-left" }] });
  client = await Client.connect(cluster.address);
  await client.waitForWorkers(2, { timeout: 60 });
});

after(async () => {
  await client?.close();
  await cluster?.stop();
});

test("a lost result makes its future pending until it is computed again", { timeout: 60_000 }, async () => {
  const info = await client.schedulerInfo();
  const address = (name) => Object.values(info.workers).find((w) => w.name === name).address;
  const f = client.submit("mathlib:add", [40, 2], { workers: address("js-doomed"), allowOtherWorkers: true });
  assert.equal(await f.result(), 42);
  // Each op on its own, to see the future's status right after key_lost.
  const seen = [];
  const original = client.conn.onMessages;
  client.conn.setHandler((ops) => {
    for (const op of ops) {
      original([op]);
      if (op.key === f.key) seen.push([op.op, f.status]);
    }
  });
  try {
    cluster.procs[1].kill("SIGKILL"); // js-doomed: the first JavaScript worker started
    const deadline = Date.now() + 30_000;
    while (!seen.some(([op]) => op === "key_in_memory")) {
      assert.ok(Date.now() < deadline, `no recomputed result: ${JSON.stringify(seen)}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  } finally {
    client.conn.setHandler(original);
  }
  assert.deepEqual(seen, [
    ["key_lost", "pending"],
    ["key_in_memory", "finished"],
  ]);
  assert.equal(await f.result(), 42);
  assert.deepEqual((await client.request("who_has", { keys: [f.key] }))[f.key], [address("js-left")]);
});
