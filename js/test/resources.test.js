// Resources (src/resources.js): the CLI syntax, validation of offers and
// demands, and the pool's books for indexed resources, with the cases of
// tests/resources/test_resources_spec.py for the Python pool.

import assert from "node:assert/strict";
import os from "node:os";
import { test } from "node:test";

import { detectGpus, detectResources } from "../src/detect.js";
import {
  ResourceError,
  ResourcePool,
  parseResources,
  resourceAmounts,
  taskResources,
  validateDemand,
  validateOffer,
} from "../src/resources.js";

test("parse amounts, scientific notation and indices", () => {
  assert.deepEqual(parseResources("GPU=2,MEMORY=100e9"), { GPU: 2, MEMORY: 100e9 });
  assert.deepEqual(parseResources(" GPU = 0.5 , "), { GPU: 0.5 });
  assert.deepEqual(parseResources(""), {});
  assert.deepEqual(parseResources("GPU=[0, 1],MEM=4"), { GPU: [0, 1], MEM: 4 });
  assert.deepEqual(parseResources("GPU=[GPU-ab12,3]"), { GPU: ["GPU-ab12", 3] });
  assert.deepEqual(parseResources("GPU=[]"), { GPU: [] });
  assert.deepEqual(resourceAmounts(parseResources("GPU=[0,1],MEM=4")), { GPU: 2, MEM: 4 });
});

test("bad specs are refused naming the resource and the value", () => {
  const cases = [
    ["GPU=-1", /GPU must be a finite non-negative number, got -1/],
    ["GPU=nan", /GPU must be a finite non-negative number, got NaN/],
    ["GPU=inf", /GPU must be a finite non-negative number, got Infinity/],
    ["GPU=two", /GPU: "two" is not a number/],
    ["GPU", /"GPU" is not of the form NAME=AMOUNT/],
    ["=2", /"=2" is not of the form/],
    ["GPU=[0,1", /GPU: "\[0,1" has no closing bracket/],
    ["GPU=[0,0]", /GPU lists index 0 twice/],
    ["auto", /'auto' is understood only where resources can be detected/],
  ];
  for (const [text, match] of cases) assert.throws(() => parseResources(text), (err) => err instanceof ResourceError && match.test(err.message), text);
});

test("auto stands for what the detector finds; items after it override", () => {
  const detect = () => ({ GPU: [3, 1], MEMORY: 64 });
  assert.deepEqual(parseResources("auto", "--resources", { detect }), { GPU: [3, 1], MEMORY: 64 });
  assert.deepEqual(parseResources("auto,MEMORY=10,LIC=1", "--resources", { detect }), { GPU: [3, 1], MEMORY: 10, LIC: 1 });
});

test("task demands are validated", () => {
  const cases = [
    [{ GPU: -1 }, /GPU must be a finite non-negative number, got -1/],
    [{ GPU: NaN }, /got NaN/],
    [{ GPU: Infinity }, /got Infinity/],
    [{ GPU: "1" }, /GPU must be a number, got "1"/],
    [{ GPU: true }, /GPU must be a number, got true/],
    [{ GPU: [0] }, /lists of indices are for what workers offer/],
    [{ "": 1 }, /names must be non-empty strings/],
    ["GPU=1", /must be an object of name to amount/],
  ];
  for (const [demand, match] of cases) assert.throws(() => validateDemand(demand), match, JSON.stringify(demand));
  assert.deepEqual(validateDemand({ GPU: 1, MEM: 0.5, X: 0 }), { GPU: 1, MEM: 0.5, X: 0 });
  assert.deepEqual(validateDemand(undefined), {});
});

test("worker offers are validated", () => {
  const cases = [
    [{ GPU: [-1] }, /GPU index -1 is negative/],
    [{ GPU: [1.5] }, /GPU index 1.5 is not an integer or a string/],
    [{ GPU: [""] }, /GPU has an empty index/],
    [{ GPU: [1, 1] }, /GPU lists index 1 twice/],
    [{ GPU: -2 }, /GPU must be a finite non-negative number, got -2/],
  ];
  for (const [offer, match] of cases) assert.throws(() => validateOffer(offer), match, JSON.stringify(offer));
});

test("pool: amounts", () => {
  const pool = new ResourcePool({ MEM: 10 });
  assert.ok(pool.fits({ MEM: 10 }) && !pool.fits({ MEM: 11 }) && !pool.fits({ GPU: 1 }));
  assert.ok(pool.fits({ GPU: 0 }) && pool.fits({}));
  const held = pool.acquire({ MEM: 6 });
  assert.deepEqual(held, {});
  assert.deepEqual(pool.available, { MEM: 4 });
  assert.ok(!pool.fits({ MEM: 5 }));
  pool.release({ MEM: 6 }, held);
  assert.deepEqual(pool.available, { MEM: 10 });
  assert.throws(() => pool.acquire({ MEM: 11 }), /does not fit/);
});

test("pool: whole indices are exclusive", () => {
  const pool = new ResourcePool({ GPU: [0, 1, 2] });
  const a = pool.acquire({ GPU: 1 });
  const b = pool.acquire({ GPU: 2 });
  assert.deepEqual(a, { GPU: [[0, 1]] });
  assert.deepEqual(b, { GPU: [[1, 1], [2, 1]] });
  assert.ok(!pool.fits({ GPU: 0.1 }));
  pool.release({ GPU: 1 }, a);
  const c = pool.acquire({ GPU: 1 });
  assert.deepEqual(c, { GPU: [[0, 1]] });
  pool.validate([[{ GPU: 1 }, c], [{ GPU: 2 }, b]]);
});

test("pool: fractions share one index, best fit", () => {
  const pool = new ResourcePool({ GPU: [0, 1] });
  const a = pool.acquire({ GPU: 0.5 });
  const b = pool.acquire({ GPU: 0.5 });
  assert.deepEqual(a, { GPU: [[0, 0.5]] });
  assert.deepEqual(b, { GPU: [[0, 0.5]] }); // two halves share GPU 0
  assert.deepEqual(pool.acquire({ GPU: 0.6 }), { GPU: [[1, 0.6]] });
  // 0.4 GPU is free in total, on GPU 1: no more than that fits.
  assert.ok(Math.abs(pool.available.GPU - 0.4) < 1e-9);
  assert.ok(!pool.fits({ GPU: 0.41 }));
  assert.ok(pool.fits({ GPU: 0.4 }));
  pool.release({ GPU: 0.5 }, a);
  assert.ok(!pool.fits({ GPU: 1 })); // 0.5 of GPU 0 and 0.4 of GPU 1: no whole GPU
  assert.deepEqual(pool.acquire({ GPU: 0.5 }), { GPU: [[0, 0.5]] });
});

test("pool: a mixed demand holds whole indices and a share of another", () => {
  const pool = new ResourcePool({ GPU: [0, 1, 2] });
  assert.deepEqual(pool.acquire({ GPU: 1.5 }), { GPU: [[0, 1], [1, 0.5]] });
  assert.deepEqual(pool.acquire({ GPU: 0.5 }), { GPU: [[1, 0.5]] });
  assert.deepEqual(pool.acquire({ GPU: 1 }), { GPU: [[2, 1]] });
  assert.ok(!pool.fits({ GPU: 0.01 }));
});

test("pool: shrinking leaves running tasks their indices; gone indices are forgotten once free", () => {
  const pool = new ResourcePool({ GPU: [0, 1], MEM: 10 });
  const held = pool.acquire({ GPU: 2, MEM: 8 });
  pool.update({ GPU: [0], MEM: 4 });
  assert.deepEqual(pool.available, { GPU: -1, MEM: -4 });
  assert.ok(!pool.fits({ MEM: 1 }));
  pool.validate([[{ GPU: 2, MEM: 8 }, held]]); // held beyond the new totals: allowed
  pool.release({ GPU: 2, MEM: 8 }, held);
  assert.deepEqual(pool.available, { GPU: 1, MEM: 4 });
  assert.deepEqual([...pool.usage.GPU], [[0, 0]]);
  assert.deepEqual(pool.acquire({ GPU: 1 }), { GPU: [[0, 1]] });
  assert.deepEqual(pool.offer(), { GPU: [0], MEM: 4 });
});

test("pool: validate catches books that disagree with the tasks, and oversubscription", () => {
  const pool = new ResourcePool({ MEM: 1 });
  assert.throws(() => pool.validate([[{ MEM: 1 }, null]]), /MEM: books say 0 used, tasks hold 1/);
  pool.acquire({ MEM: 1 });
  pool.used.MEM = 2;
  pool.available.MEM = -1;
  assert.throws(() => pool.validate([[{ MEM: 1 }, null], [{ MEM: 1 }, null]]), /oversubscribed/);
  const gpus = new ResourcePool({ GPU: [0] });
  const a = gpus.acquire({ GPU: 1 });
  assert.throws(() => gpus.validate([[{ GPU: 1 }, a], [{ GPU: 0 }, { GPU: [[0, 1]] }]]), /index 0 held 2 times over/);
});

test("a task's view: indices of indexed resources, amounts of the others", () => {
  assert.deepEqual(taskResources({ GPU: 1, MEM: 5 }, { GPU: [[1, 1]] }), { GPU: [1], MEM: 5 });
  assert.deepEqual(taskResources(null, null), {});
});

test("GPUs are detected from CUDA_VISIBLE_DEVICES, else nvidia-smi; none without NVIDIA tooling", () => {
  assert.deepEqual(detectGpus({ CUDA_VISIBLE_DEVICES: "0,2" }), [0, 2]);
  assert.deepEqual(detectGpus({ CUDA_VISIBLE_DEVICES: "GPU-5d2c,GPU-77aa" }), ["GPU-5d2c", "GPU-77aa"]);
  assert.deepEqual(detectGpus({ CUDA_VISIBLE_DEVICES: "" }), []);
  assert.deepEqual(detectGpus({ CUDA_VISIBLE_DEVICES: "-1" }), []);
  assert.deepEqual(detectGpus({ CUDA_VISIBLE_DEVICES: "1,-1,2" }), [1]); // CUDA stops at the first invalid entry
  assert.deepEqual(detectGpus({ PATH: "/nonexistent" }), []);
  assert.deepEqual(detectResources({ CUDA_VISIBLE_DEVICES: "3,1" }), { GPU: [3, 1], MEMORY: os.totalmem() });
  assert.deepEqual(detectResources({ PATH: "/nonexistent" }), { MEMORY: os.totalmem() });
});
