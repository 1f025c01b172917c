// What a running task can ask about itself: the resources it holds, as
// `corral.get_task_resources()` tells a Python task (docs/resources.md).
//
// A JavaScript worker runs several tasks at once on one event loop, so a
// global would be overwritten by the next task; AsyncLocalStorage follows each
// task through its awaits instead (the role a thread-local plays in Python).
//
//   import { getTaskResources, taskEnv } from "corral-js/task";
//   export async function train(config) {
//     const [gpu] = getTaskResources().GPU;          // e.g. 1
//     spawn("python", ["train.py"], { env: taskEnv() });
//   }

import { AsyncLocalStorage } from "node:async_hooks";

// One store per process, whichever copy of this module a task module imported
// (a task module may import corral-js from its own node_modules, the worker
// from another path): the worker's copy and the task's copy must agree.
const STORE = Symbol.for("corral-js.task-context");
/** @type {AsyncLocalStorage<{key: string, resources: Record<string, any>}>} */
const storage = (globalThis[STORE] ??= new AsyncLocalStorage());

/**
 * Run `fn` as the task `key` holding `resources`; what it starts (awaits,
 * timers, promises) sees the same context.  Used by the worker.
 * @template T
 * @param {{key: string, resources: Record<string, number | Array<number|string>>}} context
 * @param {() => T} fn
 * @returns {T}
 */
export function runAsTask(context, fn) {
  return storage.run({ key: context.key, resources: context.resources ?? {} }, fn);
}

/**
 * What the running task holds: for an indexed resource the indices it was
 * given (`{GPU: [1]}`: alone, or shared for a fractional demand), for the
 * others the amount it demanded (`{MEM: 5e9}`); `{}` for a task that demanded
 * nothing.  A fresh copy each call.
 * @returns {Record<string, number | Array<number|string>>}
 * @throws {Error} outside a task running on a Corral worker
 */
export function getTaskResources() {
  const context = storage.getStore();
  if (context === undefined) throw new Error("getTaskResources() called outside a task running on a Corral worker");
  const out = {};
  for (const [name, value] of Object.entries(context.resources)) out[name] = Array.isArray(value) ? [...value] : value;
  return out;
}

/**
 * An environment for a child process that should see only this task's
 * devices: a copy of `base` with `variable` set to the comma-joined indices of
 * `resource` the task holds (left as it is if it holds no indices of it).
 * @param {{resource?: string, variable?: string, base?: Record<string, string | undefined>}} [options]
 *   defaults: "GPU", "CUDA_VISIBLE_DEVICES", process.env
 * @returns {Record<string, string | undefined>}
 * @throws {Error} outside a task running on a Corral worker
 */
export function taskEnv({ resource = "GPU", variable = "CUDA_VISIBLE_DEVICES", base = process.env } = {}) {
  const env = { ...base };
  const held = getTaskResources()[resource];
  if (Array.isArray(held)) env[variable] = held.join(",");
  return env;
}
