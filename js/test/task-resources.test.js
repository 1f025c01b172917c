// Indexed resources on a real JavaScript worker: it offers GPU=[0,1] and
// FPGA=[5] with four task slots, and each task asks getTaskResources() which
// indices it holds, before and after awaiting (other tasks run meanwhile).
// Tasks that overlap in time never hold the same index beyond its capacity.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client, getTaskResources, taskEnv } from "../src/index.js";
import { startCluster } from "./cluster.js";

let cluster;
let client;

before(async () => {
  cluster = await startCluster({ js: [{ name: "js-devices", nthreads: 4, resources: "GPU=[0,1],FPGA=[5],MEM=10" }] });
  client = await Client.connect(cluster.address);
  await client.waitForWorkers(1, { timeout: 60 });
});

after(async () => {
  await client?.close();
  await cluster?.stop();
});

/** The most any index is held at once, from each run's [start, stop] and indices, weighting each by `share`. */
function peakShares(runs, resource, share) {
  const peaks = new Map();
  for (const run of runs) {
    for (const index of run.before[resource]) {
      let load = 0;
      for (const other of runs) {
        if (other.start < run.stop && run.start < other.stop && other.before[resource].includes(index)) load += share;
      }
      peaks.set(index, Math.max(peaks.get(index) ?? 0, load));
    }
  }
  return peaks;
}

test("each task is told the indices it holds; whole ones are never shared", { timeout: 60_000 }, async () => {
  const futures = Array.from({ length: 6 }, () => client.submit("mathlib:heldResources", [150], { resources: { GPU: 1 }, pure: false }));
  const runs = await client.gather(futures);
  for (const run of runs) {
    assert.equal(run.before.GPU.length, 1, JSON.stringify(run));
    assert.ok([0, 1].includes(run.before.GPU[0]), JSON.stringify(run));
    assert.deepEqual(run.after, run.before); // its own, after other tasks ran meanwhile
    assert.equal(run.cuda, String(run.before.GPU[0])); // taskEnv() for a child process
  }
  for (const [index, peak] of peakShares(runs, "GPU", 1)) assert.equal(peak, 1, `GPU ${index} held by ${peak} tasks at once`);
  // Two GPUs, four slots: both were used, two at a time.
  assert.deepEqual(new Set(runs.map((r) => r.before.GPU[0])), new Set([0, 1]));
});

test("fractional demands share an index up to 1; a mixed demand holds two", { timeout: 60_000 }, async () => {
  const halves = Array.from({ length: 4 }, () => client.submit("mathlib:heldResources", [150], { resources: { GPU: 0.5 }, pure: false }));
  const runs = await client.gather(halves);
  const peaks = peakShares(runs, "GPU", 0.5);
  for (const [index, peak] of peaks) assert.ok(peak <= 1, `GPU ${index} held ${peak} times over`);
  assert.ok([...peaks.values()].includes(1), `two halves shared a GPU: ${JSON.stringify([...peaks])}`);
  const both = await client.submit("mathlib:heldResources", [0], { resources: { GPU: 1.5 }, pure: false }).result();
  assert.deepEqual([...both.before.GPU].sort(), [0, 1]);
  assert.equal(both.cuda, both.before.GPU.join(","));
});

test("other resources show the amount; a task demanding nothing holds nothing", { timeout: 60_000 }, async () => {
  const run = await client.submit("mathlib:heldResources", [0], { resources: { FPGA: 1, MEM: 4 }, pure: false }).result();
  assert.deepEqual(run.before, { FPGA: [5], MEM: 4 });
  assert.equal(run.cuda, process.env.CUDA_VISIBLE_DEVICES ?? null); // holds no GPU: left as it was
  const plain = await client.submit("mathlib:heldResources", [0], { pure: false }).result();
  assert.deepEqual(plain.before, {});
});

test("setResources with indices: new tasks get the new indices", { timeout: 60_000 }, async () => {
  const [address] = Object.keys((await client.schedulerInfo()).workers);
  await client.setResources(address, { FPGA: [9, 11] });
  const runs = await client.gather([0, 1].map(() => client.submit("mathlib:heldResources", [100], { resources: { FPGA: 1 }, pure: false })));
  assert.deepEqual(runs.map((r) => r.before.FPGA[0]).sort(), [11, 9]);
  assert.equal((await client.schedulerInfo()).workers[address].resources.FPGA, 2);
  await assert.rejects(client.setResources("tcp://127.0.0.1:9", { FPGA: 1 }), /tcp:\/\/127.0.0.1:9/);
  await assert.rejects(client.setResources(address, { FPGA: [1, 1] }), /setResources: resources: FPGA lists index 1 twice/);
  await client.setResources(address, { FPGA: [5] });
});

test("a demand larger than the offer waits on the scheduler; outside a task there is nothing to ask", async () => {
  const f = client.submit("mathlib:heldResources", [0], { resources: { GPU: 3 }, pure: false });
  let why = {};
  for (let i = 0; i < 100 && !why[f.key]; i++) {
    why = await client.whyPending([f]);
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.match(why[f.key], /GPU/);
  client.cancel(f);
  assert.throws(() => getTaskResources(), /outside a task running on a Corral worker/);
  assert.throws(() => taskEnv(), /outside a task/);
});
