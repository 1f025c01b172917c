// A Corral client in JavaScript: submit tasks naming functions of a runtime's
// workers (JavaScript workers by default), pass futures as dependencies,
// submit whole graphs, scatter local data, gather results.  Speaks
// docs/protocol.md; tasks follow its convention for non-Python runtimes
// (section 10): msgpack payloads, the function named by a string, arguments
// `[args, kwargs]`, dependencies as {"__corral_ref__": key}.
//
//   import { Client } from "corral-js/client";
//   const client = await Client.connect("tcp://127.0.0.1:8786");
//   const a = client.submit("mathlib:add", [1, 2]);
//   const b = client.submit("mathlib:add", [a, 10]);
//   console.log(await b.result());                                     // 13
//   const [xs] = await client.scatter([[1, 2, 3]]);
//   console.log(await client.get({ s: ["mathlib:sum", xs], t: ["mathlib:add", "s", 1] }, "t"));   // 7
//   await client.close();

import { SerializationError, decodePayload, msgpackPayload } from "./codec.js";
import { CommClosedError, connect } from "./comm.js";
import { CancelledError, Future, FutureState, RemoteError } from "./future.js";
import { GraphError, flattenKeys, packResults, planGraph } from "./graph.js";
import { validateOffer } from "./resources.js";
import { packScatter, shapeScatterResult } from "./scatter.js";
import {
  SHARED_TASK_OPTIONS,
  checkOptions,
  functionPayload,
  randomId,
  refTo,
  replaceIn,
  sharedTaskOptions,
  taskKey,
  taskSpec,
} from "./taskspec.js";
import { TlsSettings } from "./tls.js";

export { CancelledError, Future, GraphError, RemoteError };

const SUBMIT_OPTIONS = [...SHARED_TASK_OPTIONS, "key", "pure", "kwargs"];
const MAP_OPTIONS = [...SHARED_TASK_OPTIONS, "keys", "pure", "kwargs", "spread"];
const GRAPH_OPTIONS = SHARED_TASK_OPTIONS;
const SCATTER_OPTIONS = ["workers", "broadcast", "hash"];

/** A connection to a Corral scheduler: submit tasks and graphs, scatter data, hold futures. */
export class Client {
  /**
   * @param {string} address  tcp://host:port (or tls://host:port) of the scheduler
   * @param {object} [options]
   * @param {string} [options.token]  auth token (default $CORRAL_AUTH_TOKEN)
   * @param {string} [options.name]
   * @param {number} [options.timeout]  seconds to connect (default 30)
   * @param {TlsSettings | {caFile?: string, certFile?: string, keyFile?: string}} [options.tls]
   *   TLS settings, for a tls:// scheduler and tls:// workers (docs/security.md)
   * @param {boolean} [options.directResults]  receive small results straight from the
   *   workers that computed them (watch_results; default true)
   * @param {number} [options.directResultsMaxWorkers]  most workers watched (default 64)
   */
  constructor(address, options = {}) {
    checkOptions(options, ["token", "name", "timeout", "tls", "directResults", "directResultsMaxWorkers"], "Client");
    this.address = address;
    this.token = options.token ?? (process.env.CORRAL_AUTH_TOKEN || null);
    this.name = options.name;
    this.timeout = options.timeout ?? 30;
    this.tls = TlsSettings.from(options.tls);
    this.id = `client-${randomId()}`;
    this.status = "created";
    this.conn = null;
    /** @type {Map<string, FutureState>} */
    this.futures = new Map();
    this.requests = new Map();
    this.nextRequest = 1;
    this.order = 0;
    /** @type {Map<string, {conn: Promise<any>, queue: Promise<any>}>} */
    this.workers = new Map();
    /** Workers pushing this client's small results: address -> connection (null: connecting, or refused). */
    this.watching = new Map();
    this.watchMax = options.directResults === false ? 0 : (options.directResultsMaxWorkers ?? 64);
  }

  /**
   * Connect to the scheduler at `address`; resolves to the open client.
   * @param {string} address
   * @param {object} [options]  as the constructor's
   * @returns {Promise<Client>}
   */
  static async connect(address, options = {}) {
    return new Client(address, options).start();
  }

  /** Connect (retrying while the scheduler is not up yet, up to `timeout`); resolves to this client. */
  async start() {
    const deadline = Date.now() + this.timeout * 1000;
    let delay = 50;
    for (;;) {
      try {
        ({ conn: this.conn } = await connect(this.address, { role: "client", id: this.id, name: this.name, token: this.token, tls: this.tls }));
        break;
      } catch (err) {
        if (!["ECONNREFUSED", "ECONNRESET"].includes(err.code) || Date.now() + delay > deadline) throw err;
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 1.5, 1000);
      }
    }
    this.conn.setHandler((ops) => this.#onMessages(ops));
    this.conn.onClose(() => this.#onClosed());
    this.status = "running";
    return this;
  }

  /** Close the connections; the scheduler releases every key this client wanted. */
  async close() {
    if (this.status === "closed") return;
    this.status = "closed";
    this.conn?.close("client closing");
    for (const w of this.workers.values()) w.conn.then((c) => c.close(), () => {});
    this.workers.clear();
    for (const conn of this.watching.values()) conn?.close("client closing");
    this.watching.clear();
  }

  #onClosed() {
    const err = new CommClosedError(`lost the scheduler at ${this.address}`);
    for (const fut of this.requests.values()) fut.reject(err);
    this.requests.clear();
    for (const fs of this.futures.values()) if (fs.status === "pending") fs.fail("cancelled", err);
    this.status = "closed";
  }

  // -- futures bookkeeping ---------------------------------------------------------
  /** @internal The shared state of `key`, one more Future holding it. */
  _acquire(key) {
    let fs = this.futures.get(key);
    if (!fs) {
      fs = new FutureState(key);
      this.futures.set(key, fs);
    }
    fs.refs++;
    return fs;
  }

  /** @internal One Future less holds `fs`; the last one tells the scheduler. */
  _release(fs) {
    fs.refs--;
    if (fs.refs > 0) return;
    if (this.futures.get(fs.key) === fs) this.futures.delete(fs.key);
    if (this.status === "running") this.conn.send({ op: "release_keys", keys: [fs.key] });
  }

  #onMessages(ops) {
    for (const msg of ops) {
      switch (msg.op) {
        case "key_in_memory": {
          this.futures.get(msg.key)?.finish(msg.who_has, msg.typename, msg.result);
          if (msg.result && this.watching.size < this.watchMax) {
            for (const address of msg.who_has ?? []) if (!this.watching.has(address)) this.#watch(address);
          }
          break;
        }
        case "key_erred":
          this.futures.get(msg.key)?.fail("error", new RemoteError(msg.error));
          break;
        case "key_cancelled":
          this.futures.get(msg.key)?.fail("cancelled", new CancelledError(msg.key, msg.reason ?? "cancelled", Boolean(msg.lost)));
          break;
        case "key_lost": {
          // Every copy was lost; the scheduler computes it again (the same value).
          const fs = this.futures.get(msg.key);
          if (fs && fs.status === "finished") {
            fs.status = "pending";
            fs.whoHas = [];
          }
          break;
        }
        case "reply": {
          const req = this.requests.get(msg.id);
          if (!req) break;
          this.requests.delete(msg.id);
          if (msg.error != null) req.reject(new Error(msg.error));
          else req.resolve(msg.result ?? null);
          break;
        }
        default:
          break; // ops this client never asked for (results of Python-only requests)
      }
    }
  }

  /** Ask the worker at `address` to push this client's small results (docs/protocol.md, watch_results). */
  #watch(address) {
    this.watching.set(address, null);
    connect(address, { role: "client", id: this.id, token: this.token, tls: this.tls }).then(
      ({ conn }) => {
        if (this.status !== "running") {
          conn.close("client closing");
          return;
        }
        this.watching.set(address, conn);
        let pushed = false;
        conn.setHandler((ops) => {
          pushed = true;
          for (const msg of ops) {
            if (msg.op !== "key_in_memory") continue;
            const fs = this.futures.get(msg.key);
            if (fs && fs.status === "pending") fs.finish(msg.who_has, msg.typename, msg.result); // the scheduler does not relay it
          }
        });
        // Lost after it worked (the worker left): watched again once a result names it.
        // One that closed at once (a worker without watch_results) is left alone.
        conn.onClose(() => {
          if (pushed && this.watching.get(address) === conn) this.watching.delete(address);
        });
        conn.send({ op: "watch_results" });
      },
      () => {}, // results keep coming through the scheduler
    );
  }

  /** Send `msg` with a fresh `id`; resolves to the `reply`'s result, rejects with its error. */
  #ask(msg) {
    if (this.status !== "running") return Promise.reject(new CommClosedError("client is closed"));
    const id = this.nextRequest++;
    return new Promise((resolve, reject) => {
      this.requests.set(id, { resolve, reject });
      this.conn.send({ ...msg, id });
    });
  }

  /**
   * Ask the scheduler a question (docs/protocol.md, "Request methods").
   * @param {string} method  e.g. "who_has"
   * @param {object} [args]
   * @returns {Promise<any>} the reply's result; rejects with an Error carrying the reply's error
   */
  request(method, args = {}) {
    return this.#ask({ op: "request", method, args });
  }

  // -- submitting --------------------------------------------------------------------
  /** The wire arguments of a submit: futures become references (their keys are the deps). */
  #packArgs(args, kwargs) {
    const deps = new Set();
    const withRefs = (v) => {
      if (!(v instanceof Future)) return undefined;
      this.#checkMine(v);
      deps.add(v.key);
      return { replace: refTo(v.key) };
    };
    return { payload: msgpackPayload([replaceIn(args, withRefs), replaceIn(kwargs ?? {}, withRefs)]), deps: [...deps] };
  }

  #checkMine(future) {
    if (future.client !== this) throw new Error(`${future} belongs to another client`);
  }

  #taskSpec(fnName, fid, args, options, shared, index) {
    if (options.kwargs != null && (typeof options.kwargs !== "object" || Array.isArray(options.kwargs))) {
      throw new TypeError(`kwargs must be an object of keyword arguments, got ${JSON.stringify(options.kwargs)}`);
    }
    if (options.key !== undefined && (typeof options.key !== "string" || !options.key)) {
      throw new TypeError(`key must be a non-empty string, got ${JSON.stringify(options.key)}`);
    }
    const { payload, deps } = this.#packArgs(args, options.kwargs);
    const key = options.key ?? taskKey(fnName, fid, payload, options.pure);
    const priority = [-shared.priority, this.order++];
    if (index !== undefined) priority.push(index);
    return taskSpec({ key, fid, args: payload, deps, priority }, shared);
  }

  /**
   * Run the function named `fn` on a worker of `options.runtime` (default "js").
   * Futures anywhere in `args` (or `options.kwargs`) are dependencies: the
   * worker passes their values.
   * @param {string} fn  e.g. "mathlib:add"
   * @param {any[]} [args]
   * @param {object} [options]  key, pure (true), kwargs, resources ({GPU: 1}),
   *   workers, allowOtherWorkers, retries, priority, runtime ("js")
   * @returns {Future}
   * @throws {TypeError} for a bad option (named), before anything is sent
   */
  submit(fn, args = [], options = {}) {
    if (!Array.isArray(args)) throw new TypeError("submit(fn, args, options): args must be an array");
    checkOptions(options, SUBMIT_OPTIONS, "submit");
    const shared = sharedTaskOptions(options, "submit");
    this.#checkOpen();
    const { fid, payload } = functionPayload(fn);
    const spec = this.#taskSpec(fn, fid, args, options, shared);
    const future = new Future(this, spec.key);
    this.conn.send({ op: "update_graph", tasks: [spec], wanted: [spec.key], functions: { [fid]: payload } });
    return future;
  }

  /**
   * One task per item: `fn(item)` (or `fn(...item)` with `{spread: true}`).
   * The function name travels once.
   * @param {string} fn
   * @param {Iterable<any>} items
   * @param {object} [options]  as submit's (but `keys`, one per item, instead of `key`), and spread
   * @returns {Future[]}
   */
  map(fn, items, options = {}) {
    checkOptions(options, MAP_OPTIONS, "map");
    const shared = sharedTaskOptions(options, "map");
    this.#checkOpen();
    const { fid, payload } = functionPayload(fn);
    const specs = [...items].map((item, i) => {
      if (options.spread && !Array.isArray(item)) throw new TypeError(`map with spread: item ${i} must be an array of arguments`);
      return this.#taskSpec(fn, fid, options.spread ? item : [item], { kwargs: options.kwargs, pure: options.pure, key: options.keys?.[i] }, shared, i);
    });
    const futures = specs.map((s) => new Future(this, s.key));
    this.conn.send({ op: "update_graph", tasks: specs, wanted: specs.map((s) => s.key), functions: { [fid]: payload } });
    return futures;
  }

  /**
   * Start computing `keys` of a task graph; futures back, in the nesting of `keys`.
   *
   *   const graph = { x: ["mathlib:add", 1, 2], y: ["mathlib:add", "x", 10] };
   *   const y = client.compute(graph, "y");                 // a Future
   *   const [x2, [y2]] = client.compute(graph, ["x", ["y"]]);
   *
   * The graph is `{key: [fnName, ...args] | Future | value}`: in a task's
   * arguments a string naming a key of the graph stands for that key's value,
   * and a Future for its own.  Only what `keys` need is sent, in one
   * `update_graph`; the graph's keys are the tasks' keys on the cluster.
   * @param {Record<string, any>} graph
   * @param {string | any[]} keys  a key, or (nested) arrays of keys
   * @param {object} [options]  resources, workers, allowOtherWorkers, retries,
   *   priority, runtime ("js"): for every task of the graph
   * @returns {Future | any[]}
   * @throws {GraphError} for a malformed graph (naming the key), or a key whose node is a
   *   value (nothing to compute: `get` returns it, `scatter` places it); TypeError for a bad option
   */
  compute(graph, keys, options = {}) {
    checkOptions(options, GRAPH_OPTIONS, "compute");
    const flat = flattenKeys(keys);
    const futures = this.#submitGraph(graph, flat, options, "compute", false);
    return packResults(keys, (k) => futures.get(k));
  }

  /**
   * Compute `keys` of a task graph (see `compute`) and resolve to their values,
   * in the nesting of `keys`; the results are released on the cluster once
   * here.  A key whose node is a value resolves to that value.
   *
   *   await client.get({ x: ["mathlib:add", 1, 2], y: ["mathlib:add", "x", 10] }, ["x", "y"]);   // [3, 13]
   * @param {Record<string, any>} graph
   * @param {string | any[]} keys
   * @param {object} [options]  as compute's
   * @returns {Promise<any>} rejects with the first failure (RemoteError, CancelledError)
   */
  async get(graph, keys, options = {}) {
    checkOptions(options, GRAPH_OPTIONS, "get");
    const flat = flattenKeys(keys);
    const values = new Map();
    const futures = this.#submitGraph(graph, flat, options, "get", true, values);
    try {
      const entries = [...futures];
      const got = await Promise.all(entries.map(([, f]) => f.result()));
      entries.forEach(([k], i) => values.set(k, got[i]));
      return packResults(keys, (k) => values.get(k));
    } finally {
      for (const f of futures.values()) f.release();
    }
  }

  /**
   * Send the tasks `flat` needs; return a Future per wanted key that is a task
   * or a Future.  Wanted keys whose node is a value go into `values` when
   * allowed, else are an error.
   */
  #submitGraph(graph, flat, options, call, allowValues, values = new Map()) {
    const shared = sharedTaskOptions(options, call);
    this.#checkOpen();
    const plan = planGraph(graph, flat, { checkFuture: (f) => this.#checkMine(f) });
    for (const [key, out] of plan.outputs) {
      if (out.kind !== "value") continue;
      if (!allowValues) {
        throw new GraphError(`graph key ${JSON.stringify(key)} is a value, not a task: nothing to compute (get returns it; scatter puts a value on the cluster)`);
      }
      values.set(key, out.value);
    }
    // Everything is packed before anything is sent or held: a bad task leaves no trace.
    const functions = {};
    const fids = new Map();
    const order = this.order++;
    const specs = plan.tasks.map((task, index) => {
      let fid = fids.get(task.fn);
      if (fid === undefined) {
        const fp = functionPayload(task.fn);
        fid = fp.fid;
        fids.set(task.fn, fid);
        functions[fid] = fp.payload;
      }
      let args;
      try {
        args = msgpackPayload([task.args, {}]);
      } catch (err) {
        throw new GraphError(`graph key ${JSON.stringify(task.key)}: its arguments are not plain data: ${err.message}`);
      }
      return taskSpec({ key: task.key, fid, args, deps: task.deps, priority: [-shared.priority, order, index] }, shared);
    });
    const futures = new Map();
    const wanted = [];
    for (const [key, out] of plan.outputs) {
      if (out.kind === "task") {
        futures.set(key, new Future(this, key));
        wanted.push(key);
      } else if (out.kind === "future") {
        futures.set(key, new Future(this, out.future.key));
      }
    }
    if (specs.length) this.conn.send({ op: "update_graph", tasks: specs, wanted, functions });
    return futures;
  }

  /**
   * Place local data on workers; resolves to futures pointing at it.
   *
   *   const [xs] = await client.scatter([[1, 2, 3]]);             // one array value
   *   const { table } = await client.scatter({ table: rows });     // named: the key is "table"
   *   const one = await client.scatter(42);                        // one Future
   *
   * An array scatters each item, a plain object each property (named by it),
   * anything else one value.  Values are plain data (msgpack), so Python and
   * JavaScript tasks alike can take them.
   * @param {any} data
   * @param {object} [options]
   * @param {string | string[]} [options.workers]  only these workers (addresses or names)
   * @param {boolean} [options.broadcast]  a copy on every (chosen) worker
   * @param {boolean} [options.hash]  keys from the values' content (default true: equal
   *   values share a key); false: random keys
   * @returns {Promise<Future | Future[] | Record<string, Future>>} in the shape of `data`
   * @throws {TypeError} for a bad option or a Future in the data; SerializationError for a
   *   value that is not plain data; rejects with the scheduler's error (e.g. "unknown workers: [...]")
   */
  async scatter(data, options = {}) {
    checkOptions(options, SCATTER_OPTIONS, "scatter");
    const { workers } = sharedTaskOptions({ workers: options.workers }, "scatter");
    this.#checkOpen();
    const { shape, items } = packScatter(data, { hash: options.hash ?? true });
    if (!items.length) return shapeScatterResult(shape, items, []);
    const byKey = new Map(items.map((it) => [it.key, it]));
    // Held while the scheduler stores the data: a release meanwhile (another
    // Future of the key) must not free what is being scattered.
    const holds = [...byKey.keys()].map((key) => this._acquire(key));
    let whoHas;
    try {
      whoHas = await this.#ask({
        op: "scatter",
        data: Object.fromEntries([...byKey].map(([k, it]) => [k, it.payload])),
        nbytes: Object.fromEntries([...byKey].map(([k, it]) => [k, it.nbytes])),
        workers,
        broadcast: options.broadcast ? true : undefined,
      });
    } catch (err) {
      for (const fs of holds) this._release(fs);
      throw err;
    }
    // A new value, even for a key this client knew: what was decoded before is not it.
    for (const fs of holds) fs.finish(whoHas?.[fs.key] ?? [], byKey.get(fs.key).typename, null, { fresh: true });
    const futures = items.map((it) => new Future(this, it.key));
    for (const fs of holds) this._release(fs);
    return shapeScatterResult(shape, items, futures);
  }

  #checkOpen() {
    if (this.status !== "running") throw new CommClosedError("client is not connected");
  }

  // -- results -------------------------------------------------------------------------
  /** @internal The value of `future` (decoded once; fetched from a worker if it did not come along). */
  async _value(future) {
    const fs = future.state;
    await fs.done();
    if (fs.status !== "finished") throw fs.error;
    if (fs.hasValue) return fs.value;
    if (fs.payload && fs.payload.serializer === "msgpack") {
      fs.value = decodePayload(fs.payload);
      fs.hasValue = true;
      fs.payload = null;
      return fs.value;
    }
    fs.fetching ??= this.#fetch(fs).finally(() => {
      fs.fetching = null;
    });
    await fs.fetching;
    return fs.value;
  }

  async #fetch(fs) {
    for (let attempt = 0; attempt < 5; attempt++) {
      let holders = fs.whoHas;
      if (!holders.length || attempt) {
        const who = await this.request("who_has", { keys: [fs.key] });
        holders = who[fs.key] ?? [];
        fs.whoHas = holders;
      }
      if (holders.length) {
        const address = holders[attempt % holders.length];
        try {
          const reply = await this.#getData(address, [fs.key]);
          const payload = reply.data?.[fs.key];
          if (payload) {
            fs.value = decodePayload(payload); // throws SerializationError for a pickle
            fs.hasValue = true;
            return;
          }
        } catch (err) {
          if (err instanceof SerializationError) throw err;
        }
      }
      await new Promise((r) => setTimeout(r, 50 * (attempt + 1)));
    }
    throw new CommClosedError(`could not fetch ${fs.key} from any worker holding it`);
  }

  /** One get_data at a time per worker connection (answers come in order). */
  #getData(address, keys) {
    let w = this.workers.get(address);
    if (!w) {
      const conn = connect(address, { role: "client", id: this.id, token: this.token, tls: this.tls }).then((r) => r.conn);
      conn.catch(() => this.workers.delete(address));
      w = { conn, queue: Promise.resolve() };
      this.workers.set(address, w);
    }
    const run = w.queue.then(async () => {
      const conn = await w.conn;
      conn.send({ op: "get_data", keys, serializers: ["msgpack"] });
      try {
        const reply = await conn.recv(this.timeout * 10);
        if (reply.op !== "data") throw new CommClosedError(`unexpected reply ${reply.op} from ${address}`);
        return reply;
      } catch (err) {
        conn.abort("no reply to get_data");
        this.workers.delete(address);
        throw err;
      }
    });
    w.queue = run.catch(() => {});
    return run;
  }

  /**
   * The values of futures (an array, or a single future), in the same shape.
   * @param {Future | Iterable<Future | any>} futures  non-futures pass through
   * @returns {Promise<any>}
   */
  async gather(futures) {
    if (futures instanceof Future) return futures.result();
    return Promise.all([...futures].map((f) => (f instanceof Future ? f.result() : f)));
  }

  /**
   * Cancel these futures' tasks (and the tasks depending on them).
   * @param {Future | Iterable<Future>} futures
   */
  cancel(futures) {
    const list = futures instanceof Future ? [futures] : [...futures];
    this.conn.send({ op: "cancel_keys", keys: list.map((f) => f.key) });
  }

  /**
   * Change what a worker offers: the named resources are replaced, the
   * others kept; amounts, or arrays of indices (`{GPU: [0, 1]}`).  Tasks
   * already running keep what they hold.
   * @param {string} worker  the worker's address
   * @param {Record<string, number | Array<number|string>>} resources
   * @returns {Promise<void>} rejects with a ResourceError for a malformed offer (before
   *   anything is sent), or with the scheduler's error (an unknown worker, say)
   */
  async setResources(worker, resources) {
    if (typeof worker !== "string" || !worker) throw new TypeError(`setResources: worker must be an address, got ${JSON.stringify(worker)}`);
    const offer = validateOffer(resources, "setResources: resources");
    await this.#ask({ op: "set_resources", worker, resources: offer });
  }

  /** The scheduler's description of itself and its workers. */
  schedulerInfo() {
    return this.request("scheduler_info");
  }

  /**
   * Why these futures' tasks are not running yet.
   * @param {Iterable<Future>} futures
   * @returns {Promise<Record<string, string>>} key -> reason
   */
  whyPending(futures) {
    return this.request("why_pending", { keys: [...futures].map((f) => f.key) });
  }

  /**
   * Resolve once at least `n` workers (of `runtime`, if given) are connected.
   * @param {number} [n]
   * @param {{timeout?: number, runtime?: string}} [options]  timeout in seconds (default 30)
   */
  async waitForWorkers(n = 1, { timeout = 30, runtime } = {}) {
    const deadline = Date.now() + timeout * 1000;
    for (;;) {
      const info = await this.schedulerInfo();
      const workers = Object.values(info.workers ?? {}).filter((w) => !runtime || w.runtime === runtime);
      if (workers.length >= n) return;
      if (Date.now() > deadline) throw new Error(`only ${workers.length} of ${n} workers after ${timeout}s`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}
