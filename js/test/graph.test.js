// Planning task graphs (src/graph.js), with no cluster: which tasks are sent,
// in which order, with which references, and the errors for bad graphs.

import assert from "node:assert/strict";
import { test } from "node:test";

import { Client } from "../src/client.js";
import { REF_KEY } from "../src/codec.js";
import { Future } from "../src/future.js";
import { GraphError, flattenKeys, packResults, planGraph } from "../src/graph.js";

const ref = (key) => ({ [REF_KEY]: key });
const keysOf = (plan) => plan.tasks.map((t) => t.key);

test("only what the wanted keys need is planned, inputs first, depth first", () => {
  const graph = {
    a: ["lib:load", 1],
    b: ["lib:load", 2],
    c: ["lib:add", "a", "b"],
    d: ["lib:load", 3],
    e: ["lib:add", "c", "d"],
    unused: ["lib:fail"],
  };
  const plan = planGraph(graph, ["e"]);
  assert.deepEqual(keysOf(plan), ["a", "b", "c", "d", "e"]);
  assert.deepEqual(plan.tasks.find((t) => t.key === "c"), { key: "c", fn: "lib:add", args: [ref("a"), ref("b")], deps: ["a", "b"] });
  assert.deepEqual(planGraph(graph, ["c"]).tasks.map((t) => t.key), ["a", "b", "c"]);
  // Two roots sharing an input: it is planned once.
  assert.deepEqual(keysOf(planGraph(graph, ["c", "e"])), ["a", "b", "c", "d", "e"]);
});

test("references nest in arrays and objects; values are inlined; object keys are not references", () => {
  const graph = {
    n: 10,
    cfg: { scale: 2, label: "n" }, // a value: its strings are data
    x: ["lib:f", [["n", "x2"]], { n: "n", opts: "cfg" }, "not-a-key"],
    x2: ["lib:g"],
  };
  const plan = planGraph(graph, ["x"]);
  assert.deepEqual(keysOf(plan), ["x2", "x"]);
  const x = plan.tasks[1];
  assert.deepEqual(x.args, [[[10, ref("x2")]], { n: 10, opts: { scale: 2, label: "n" } }, "not-a-key"]);
  assert.deepEqual(x.deps, ["x2"]);
  assert.deepEqual(plan.outputs.get("x"), { kind: "task" });
  assert.deepEqual(planGraph(graph, ["n"]).outputs.get("n"), { kind: "value", value: 10 });
  assert.deepEqual(planGraph(graph, ["n"]).tasks, []);
});

test("futures stand for their keys: in arguments, as a node, inside a value", () => {
  const client = new Client("tcp://127.0.0.1:1"); // never connected: futures need only its books
  const data = new Future(client, "data-123");
  const other = new Future(client, "other-9");
  const graph = { d: data, wrapped: { f: other }, s: ["lib:sum", "d", data, "wrapped"] };
  const seen = [];
  const plan = planGraph(graph, ["s", "d"], { checkFuture: (f) => seen.push(f.key) });
  assert.deepEqual(plan.tasks, [{ key: "s", fn: "lib:sum", args: [ref("data-123"), ref("data-123"), { f: ref("other-9") }], deps: ["data-123", "other-9"] }]);
  assert.deepEqual(plan.outputs.get("d"), { kind: "future", future: data });
  assert.ok(seen.includes("data-123") && seen.includes("other-9"));
  // The client refuses another client's future through checkFuture.
  assert.throws(() => planGraph(graph, ["s"], { checkFuture: () => { throw new Error("belongs to another client"); } }), /another client/);
});

test("bad graphs are refused naming what is wrong", () => {
  assert.throws(() => planGraph({ a: ["lib:f", "b"], b: ["lib:g", "c"], c: ["lib:h", "a"] }, ["a"]), {
    name: "GraphError",
    message: 'the graph has a cycle: "a" -> "b" -> "c" -> "a"',
  });
  assert.throws(() => planGraph({ a: ["lib:f", "a"] }, ["a"]), /cycle: "a" -> "a"/);
  assert.throws(() => planGraph({ a: ["lib:f"] }, ["b"]), { name: "GraphError", message: 'key "b" is not in the graph' });
  assert.throws(() => planGraph({ a: [1, 2, 3] }, ["a"]), /graph key "a": a task is \[fnName, \.\.\.args\] .* starts with number 1/);
  assert.throws(() => planGraph({ a: ["lib:f", "b"], b: [] }, ["a"]), /graph key "b": a task is/);
  assert.throws(() => planGraph([["lib:f"]], ["0"]), /a graph is a plain object/);
  assert.throws(() => planGraph(new Map(), []), /a graph is a plain object .* got Map/);
  assert.throws(() => flattenKeys(["a", 3]), (err) => err instanceof GraphError && /got number 3/.test(err.message));
});

test("a long chain is planned without recursion", () => {
  const graph = { k0: ["lib:start"] };
  for (let i = 1; i < 50_000; i++) graph[`k${i}`] = ["lib:inc", `k${i - 1}`];
  const plan = planGraph(graph, ["k49999"]);
  assert.equal(plan.tasks.length, 50_000);
  assert.equal(plan.tasks[0].key, "k0");
  assert.equal(plan.tasks.at(-1).key, "k49999");
});

test("wanted keys come back in their nesting", () => {
  assert.deepEqual(flattenKeys(["y", ["z", ["y"]]]), ["y", "z"]);
  assert.deepEqual(packResults(["y", ["z", ["y"]]], (k) => k.toUpperCase()), ["Y", ["Z", ["Y"]]]);
  assert.equal(packResults("y", (k) => k + "!"), "y!");
});
