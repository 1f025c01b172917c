// Task graphs as plain objects, dask-style (docs/javascript.md, "Task graphs"):
//
//   {
//     x: 1,                                  // a value: used as it is
//     y: ["mathlib:add", "x", 10],           // a task: [function name, ...arguments]
//     z: ["mathlib:sum", ["x", "y", data]],  // `data` a Future: its value
//   }
//
// Inside a task's arguments (nested in arrays and plain objects too), a string
// equal to a key of the graph stands for that key's value, and a Future for
// its own.  `planGraph` checks a graph, keeps only what the wanted keys need,
// orders the tasks inputs first (depth first, so a branch finishes before the
// next starts and its inputs can be freed early) and resolves references.
// Pure: no IO.

import { Future } from "./future.js";
import { refTo, replaceIn } from "./taskspec.js";

/** A graph, or the keys asked of it, is malformed; the message names the key. */
export class GraphError extends Error {
  constructor(message) {
    super(message);
    this.name = "GraphError";
  }
}

const show = (v) => {
  if (typeof v === "string") return JSON.stringify(v);
  if (v === null || v === undefined) return String(v);
  if (Array.isArray(v)) return "an array";
  if (typeof v === "object") return v.constructor?.name ?? "an object";
  return `${typeof v} ${String(v)}`;
};

/**
 * The keys asked for, flattened (nested arrays of strings), first occurrence kept.
 * @param {string | any[]} keys
 * @returns {string[]}
 */
export function flattenKeys(keys) {
  const out = new Set();
  const walk = (k) => {
    if (typeof k === "string") out.add(k);
    else if (Array.isArray(k)) k.forEach(walk);
    else throw new GraphError(`keys are strings, or (nested) arrays of strings; got ${show(k)}`);
  };
  walk(keys);
  return [...out];
}

/**
 * `keys` with every key replaced by `valueOf(key)`, in the same nesting.
 * @param {string | any[]} keys
 * @param {(key: string) => any} valueOf
 */
export function packResults(keys, valueOf) {
  return Array.isArray(keys) ? keys.map((k) => packResults(k, valueOf)) : valueOf(keys);
}

/** Whether `node` is a task, `[fnName, ...args]`; throws for an array that is not one. */
function isTask(key, node) {
  if (!Array.isArray(node)) return false;
  if (typeof node[0] !== "string" || !node[0]) {
    throw new GraphError(
      `graph key ${JSON.stringify(key)}: a task is [fnName, ...args] with fnName a string such as "mathlib:add", ` +
        `but it starts with ${show(node[0])} (an array as data goes inside a task's arguments, e.g. ["mathlib:sum", [1, 2]])`,
    );
  }
  return true;
}

/**
 * Plan the tasks that computing `wanted` needs.
 *
 * @param {Record<string, any>} graph  {key: [fnName, ...args] | Future | value}
 * @param {string[]} wanted  keys of the graph
 * @param {{checkFuture?: (f: Future) => void}} [options]  called on every Future met (the client checks it owns it)
 * @returns {{
 *   tasks: Array<{key: string, fn: string, args: any[], deps: string[]}>,
 *   outputs: Map<string, {kind: "task"} | {kind: "future", future: Future} | {kind: "value", value: any}>,
 * }}  tasks inputs first; `args` with every dependency as {"__corral_ref__": key}
 * @throws {GraphError} for a graph that is not a plain object, a wanted key not
 *   in it, a malformed task, or a cycle
 */
export function planGraph(graph, wanted, { checkFuture = () => {} } = {}) {
  const proto = graph !== null && typeof graph === "object" ? Object.getPrototypeOf(graph) : undefined;
  if (Array.isArray(graph) || (proto !== Object.prototype && proto !== null)) {
    throw new GraphError(`a graph is a plain object {key: [fnName, ...args] | value}, got ${show(graph)}`);
  }
  const has = (k) => Object.hasOwn(graph, k);
  for (const key of wanted) {
    if (!has(key)) throw new GraphError(`key ${JSON.stringify(key)} is not in the graph`);
  }

  // The graph keys of tasks a task's arguments refer to, in argument order.
  const upstream = new Map();
  const refsOf = (key) => {
    let refs = upstream.get(key);
    if (refs) return refs;
    const node = graph[key];
    const found = new Set();
    if (isTask(key, node)) {
      replaceIn(node.slice(1), (v) => {
        if (v instanceof Future) return { replace: null }; // on the cluster already: nothing to order
        if (typeof v === "string" && has(v)) {
          if (isTask(v, graph[v])) found.add(v);
          return { replace: null }; // a value or a Future: nothing to order
        }
        return undefined;
      });
    }
    refs = [...found];
    upstream.set(key, refs);
    return refs;
  };

  // Depth-first post-order from the wanted keys; iterative, so a long chain
  // does not overflow the stack.  A key met again while on the path is a cycle.
  const VISITING = 1;
  const ORDERED = 2;
  const mark = new Map();
  const order = [];
  for (const root of wanted) {
    if (mark.has(root)) continue;
    mark.set(root, VISITING);
    const stack = [{ key: root, refs: refsOf(root), next: 0 }];
    while (stack.length) {
      const top = stack[stack.length - 1];
      if (top.next < top.refs.length) {
        const dep = top.refs[top.next++];
        const m = mark.get(dep);
        if (m === ORDERED) continue;
        if (m === VISITING) {
          const path = stack.slice(stack.findIndex((f) => f.key === dep)).map((f) => f.key);
          throw new GraphError(`the graph has a cycle: ${[...path, dep].map((k) => JSON.stringify(k)).join(" -> ")}`);
        }
        mark.set(dep, VISITING);
        stack.push({ key: dep, refs: refsOf(dep), next: 0 });
      } else {
        stack.pop();
        mark.set(top.key, ORDERED);
        if (Array.isArray(graph[top.key])) order.push(top.key);
      }
    }
  }

  // Futures stand for their keys anywhere; inside a value too (a value is not
  // searched for graph keys: it is data).
  const futureRef = (v) => {
    if (!(v instanceof Future)) return undefined;
    checkFuture(v);
    return { replace: refTo(v.key) };
  };
  const tasks = order.map((key) => {
    const deps = new Set();
    const args = replaceIn(graph[key].slice(1), (v) => {
      if (v instanceof Future) {
        deps.add(v.key);
        return futureRef(v);
      }
      if (typeof v !== "string" || !has(v)) return undefined;
      const node = graph[v];
      if (Array.isArray(node)) {
        deps.add(v);
        return { replace: refTo(v) };
      }
      if (node instanceof Future) {
        checkFuture(node);
        deps.add(node.key);
        return { replace: refTo(node.key) };
      }
      return { replace: replaceIn(node, (x) => (x instanceof Future ? (deps.add(x.key), futureRef(x)) : undefined)) };
    });
    return { key, fn: graph[key][0], args, deps: [...deps] };
  });

  const outputs = new Map();
  for (const key of wanted) {
    const node = graph[key];
    if (Array.isArray(node)) outputs.set(key, { kind: "task" });
    else if (node instanceof Future) {
      checkFuture(node);
      outputs.set(key, { kind: "future", future: node });
    } else outputs.set(key, { kind: "value", value: node });
  }
  return { tasks, outputs };
}
