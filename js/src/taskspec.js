// TaskSpecs (docs/protocol.md, section 7) for tasks of a non-Python runtime,
// as section 10 describes them: the function named by a string in a msgpack
// payload, arguments `[args, kwargs]` in another, and each dependency as
// {"__corral_ref__": key}.  Shared by the client's submit, map and graphs;
// every option is checked here, before anything is sent.

import crypto from "node:crypto";

import { REF_KEY, SerializationError, packValue } from "./codec.js";
import { validateDemand } from "./resources.js";

/** Plain data nested deeper than this is refused (as the codec does): most likely it contains itself. */
const MAX_DEPTH = 100;

/** Random hex, for keys of impure tasks and ids. */
export function randomId(bytes = 8) {
  return crypto.randomBytes(bytes).toString("hex");
}

const isPlainObject = (v) =>
  v !== null && typeof v === "object" && (Object.getPrototypeOf(v) === Object.prototype || Object.getPrototypeOf(v) === null);

/**
 * Throw a TypeError if `options` is not an object or names an option `call` does not know.
 * @param {any} options
 * @param {Iterable<string>} known
 * @param {string} call  names the call in the error, e.g. "submit"
 */
export function checkOptions(options, known, call) {
  if (!isPlainObject(options)) throw new TypeError(`${call}: options must be an object, got ${describe(options)}`);
  const names = new Set(known);
  const unknown = Object.keys(options).filter((k) => !names.has(k));
  if (unknown.length) {
    throw new TypeError(`${call}: unknown option ${unknown.map((k) => JSON.stringify(k)).join(", ")} (known: ${[...names].join(", ")})`);
  }
}

function describe(v) {
  if (v === null) return "null";
  if (Array.isArray(v)) return "an array";
  if (typeof v === "object") return v.constructor?.name ?? "an object";
  return `${typeof v} ${JSON.stringify(v)}`;
}

/** Options that every task of a submit, map or graph may take. */
export const SHARED_TASK_OPTIONS = ["resources", "workers", "allowOtherWorkers", "retries", "priority", "runtime"];

/**
 * The shared options of a call, checked: a bad value throws naming it.
 * @param {object} options
 * @param {string} call
 * @returns {{resources?: Record<string, number>, workers?: string[], allowOtherWorkers?: boolean, retries?: number, priority: number, runtime: string}}
 */
export function sharedTaskOptions(options, call) {
  const resources = validateDemand(options.resources, `${call}: resources`);
  let workers = options.workers;
  if (typeof workers === "string") workers = [workers];
  if (workers != null && !(Array.isArray(workers) && workers.every((w) => typeof w === "string" && w))) {
    throw new TypeError(`${call}: workers must be an address or name, or an array of them, got ${describe(options.workers)}`);
  }
  const retries = options.retries ?? 0;
  if (!Number.isInteger(retries) || retries < 0) throw new TypeError(`${call}: retries must be a non-negative integer, got ${describe(retries)}`);
  const priority = options.priority ?? 0;
  if (typeof priority !== "number" || !Number.isFinite(priority)) throw new TypeError(`${call}: priority must be a finite number, got ${describe(priority)}`);
  const runtime = options.runtime ?? "js";
  if (typeof runtime !== "string" || !runtime) throw new TypeError(`${call}: runtime must be a non-empty string, got ${describe(runtime)}`);
  if (runtime === "python") {
    throw new TypeError(`${call}: a JavaScript client cannot send Python tasks (they are pickled Python functions); name a function of another runtime`);
  }
  return {
    resources: Object.keys(resources).length ? resources : undefined,
    workers: workers?.length ? workers : undefined,
    allowOtherWorkers: options.allowOtherWorkers ? true : undefined,
    retries: retries || undefined,
    priority,
    runtime,
  };
}

/**
 * The payload naming function `fnName`, and its id (a content hash: the same
 * function travels once per message).
 * @param {string} fnName  e.g. "mathlib:add"
 * @returns {{fid: string, payload: {serializer: "msgpack", frames: Uint8Array[]}}}
 */
export function functionPayload(fnName) {
  if (typeof fnName !== "string" || !fnName) {
    throw new TypeError(`a task's function is named by a string, e.g. 'mathlib:add'; got ${describe(fnName)}`);
  }
  const payload = { serializer: "msgpack", frames: [packValue(fnName)] };
  const fid = crypto.createHash("sha256").update("msgpack").update(payload.frames[0]).digest("hex").slice(0, 24);
  return { fid, payload };
}

/**
 * The key of a task: `name-digest`, the digest of its function and arguments
 * when pure (the same computation gets the same key), random otherwise.
 */
export function taskKey(fnName, fid, argsPayload, pure = true) {
  const short = fnName.split(":").pop().split(".").pop() || "task";
  let digest;
  if (pure === false) digest = randomId(16);
  else {
    const h = crypto.createHash("sha256").update(fid);
    for (const f of argsPayload.frames) h.update(f);
    digest = h.digest("hex").slice(0, 32);
  }
  return `${short}-${digest}`;
}

/**
 * A copy of plain data in which `visit` may replace values: it returns
 * `undefined` to go on into a value (arrays and plain objects), or `{replace:
 * x}` to put `x` there instead.  Typed arrays and dates are kept as they are.
 * @param {any} value
 * @param {(v: any) => ({replace: any} | undefined)} visit
 */
export function replaceIn(value, visit, depth = 0) {
  const r = visit(value);
  if (r !== undefined) return r.replace;
  if (value === null || typeof value !== "object" || ArrayBuffer.isView(value) || value instanceof Date) return value;
  if (depth > MAX_DEPTH) throw new SerializationError(`value nested more than ${MAX_DEPTH} levels deep (does it contain itself?)`);
  if (Array.isArray(value)) return value.map((v) => replaceIn(v, visit, depth + 1));
  const out = {};
  for (const [k, v] of Object.entries(value)) out[k] = replaceIn(v, visit, depth + 1);
  return out;
}

/** The wire form of a dependency inside arguments. */
export function refTo(key) {
  return { [REF_KEY]: key };
}

/**
 * A TaskSpec map, ready for update_graph.
 * @param {{key: string, fid: string, args: object, deps: string[], priority: number[]}} task
 * @param {ReturnType<typeof sharedTaskOptions>} options
 */
export function taskSpec({ key, fid, args, deps, priority }, options) {
  return {
    key,
    args,
    fn: fid,
    deps,
    priority,
    resources: options.resources,
    workers: options.workers,
    allow_other_workers: options.allowOtherWorkers,
    retries: options.retries,
    runtime: options.runtime,
  };
}
