// A Corral client in JavaScript: submit tasks naming functions of a runtime's
// workers (JavaScript workers by default), pass futures as dependencies,
// gather results.  Speaks docs/protocol.md; tasks follow its convention for
// non-Python runtimes (section 10): msgpack payloads, the function named by a
// string, arguments `[args, kwargs]`, dependencies as {"__corral_ref__": key}.
//
//   import { Client } from "corral-js/client";
//   const client = await Client.connect("tcp://127.0.0.1:8786");
//   const a = client.submit("mathlib:add", [1, 2]);
//   const b = client.submit("mathlib:add", [a, 10]);
//   console.log(await b.result());               // 13
//   await client.close();

import crypto from "node:crypto";

import { REF_KEY, SerializationError, decodePayload, msgpackPayload, packValue } from "./codec.js";
import { CommClosedError, connect } from "./comm.js";

/** A task failed on a worker: the remote error, rebuilt. */
export class RemoteError extends Error {
  /** @param {{typename: string, message: string, traceback_text?: string}} info */
  constructor(info) {
    super(info.message);
    this.name = info.typename || "RemoteError";
    /** The remote exception's type name, e.g. "RangeError" or "ZeroDivisionError". */
    this.typename = info.typename;
    /** The remote traceback (a JavaScript stack, or a Python traceback). */
    this.tracebackText = info.traceback_text ?? "";
    if (this.tracebackText) this.stack = `${this.name}: ${this.message}\n[remote]\n${this.tracebackText}`;
  }
}

/** A key was cancelled, is unknown, or was lost. */
export class CancelledError extends Error {
  constructor(key, reason, lost = false) {
    super(`${key}: ${reason}`);
    this.name = "CancelledError";
    this.key = key;
    this.reason = reason;
    this.lost = lost;
  }
}

class FutureState {
  constructor(key) {
    this.key = key;
    this.status = "pending"; // pending | finished | error | cancelled
    this.refs = 0;
    this.whoHas = [];
    this.typename = null;
    this.payload = null;
    this.hasValue = false;
    this.value = undefined;
    this.error = null;
    this.waiters = [];
    this.fetching = null;
  }

  settle() {
    for (const w of this.waiters.splice(0)) w();
  }

  done() {
    if (this.status !== "pending") return Promise.resolve();
    return new Promise((r) => this.waiters.push(r));
  }
}

/** A remote value: the result of a task, once it finished. */
export class Future {
  constructor(client, key) {
    this.client = client;
    this.key = key;
    this.released = false;
    this.state = client._acquire(key);
  }

  /** pending, finished, error or cancelled */
  get status() {
    return this.state.status;
  }

  /** Resolves to the task's value; rejects with a RemoteError (or CancelledError). */
  async result() {
    return this.client._value(this);
  }

  /** Resolves to the task's error (a RemoteError), or null if it succeeded. */
  async exception() {
    await this.state.done();
    return this.state.status === "finished" ? null : this.state.error;
  }

  /** Wait until the task finished, failed or was cancelled (never rejects). */
  async wait() {
    await this.state.done();
    return this;
  }

  /** This future no longer needs the value (the last one for a key frees it). */
  release() {
    if (this.released) return;
    this.released = true;
    this.client._release(this.state);
  }

  toString() {
    return `<Future ${this.key} ${this.status}>`;
  }
}

function randomId() {
  return crypto.randomBytes(8).toString("hex");
}

export class Client {
  /**
   * @param {string} address  tcp://host:port of the scheduler
   * @param {object} [options]
   * @param {string} [options.token]  auth token (default $CORRAL_AUTH_TOKEN)
   * @param {string} [options.name]
   * @param {number} [options.timeout]  seconds to connect (default 30)
   * @param {boolean} [options.directResults]  receive small results straight from the
   *   workers that computed them (watch_results; default true)
   * @param {number} [options.directResultsMaxWorkers]  most workers watched (default 64)
   */
  constructor(address, options = {}) {
    this.address = address;
    this.token = options.token ?? (process.env.CORRAL_AUTH_TOKEN || null);
    this.name = options.name;
    this.timeout = options.timeout ?? 30;
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

  /** Connect to the scheduler at `address`; resolves to the open client. */
  static async connect(address, options = {}) {
    return new Client(address, options).start();
  }

  async start() {
    const deadline = Date.now() + this.timeout * 1000;
    let delay = 50;
    for (;;) {
      try {
        ({ conn: this.conn } = await connect(this.address, { role: "client", id: this.id, name: this.name, token: this.token }));
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
    for (const fs of this.futures.values()) {
      if (fs.status === "pending") {
        fs.status = "cancelled";
        fs.error = err;
        fs.settle();
      }
    }
    this.status = "closed";
  }

  // -- futures bookkeeping ---------------------------------------------------------
  _acquire(key) {
    let fs = this.futures.get(key);
    if (!fs) {
      fs = new FutureState(key);
      this.futures.set(key, fs);
    }
    fs.refs++;
    return fs;
  }

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
          const fs = this.futures.get(msg.key);
          if (fs) this.#finish(fs, msg);
          if (msg.result && this.watching.size < this.watchMax) {
            for (const address of msg.who_has ?? []) if (!this.watching.has(address)) this.#watch(address);
          }
          break;
        }
        case "key_erred": {
          const fs = this.futures.get(msg.key);
          if (!fs) break;
          fs.status = "error";
          fs.error = new RemoteError(msg.error);
          fs.settle();
          break;
        }
        case "key_cancelled": {
          const fs = this.futures.get(msg.key);
          if (!fs) break;
          fs.status = "cancelled";
          fs.error = new CancelledError(msg.key, msg.reason ?? "cancelled", Boolean(msg.lost));
          fs.settle();
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

  #finish(fs, msg) {
    fs.status = "finished";
    fs.whoHas = msg.who_has ?? [];
    fs.typename = msg.typename ?? null;
    if (msg.result) fs.payload = msg.result;
    fs.settle();
  }

  /** Ask the worker at `address` to push this client's small results (docs/protocol.md, watch_results). */
  #watch(address) {
    this.watching.set(address, null);
    connect(address, { role: "client", id: this.id, token: this.token }).then(
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
            if (fs && fs.status === "pending") this.#finish(fs, msg); // the scheduler does not relay it
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

  /** Ask the scheduler a question (docs/protocol.md, "Request methods"). */
  request(method, args = {}) {
    if (this.status !== "running") return Promise.reject(new CommClosedError("client is closed"));
    const id = this.nextRequest++;
    return new Promise((resolve, reject) => {
      this.requests.set(id, { resolve, reject });
      this.conn.send({ op: "request", id, method, args });
    });
  }

  // -- submitting --------------------------------------------------------------------
  #packArgs(args, kwargs) {
    const deps = new Set();
    const walk = (v) => {
      if (v instanceof Future) {
        if (v.client !== this) throw new Error(`${v} belongs to another client`);
        deps.add(v.key);
        return { [REF_KEY]: v.key };
      }
      if (v === null || typeof v !== "object" || ArrayBuffer.isView(v) || v instanceof Date) return v;
      if (Array.isArray(v)) return v.map(walk);
      const out = {};
      for (const [k, x] of Object.entries(v)) out[k] = walk(x);
      return out;
    };
    return { payload: msgpackPayload([walk(args), walk(kwargs ?? {})]), deps: [...deps] };
  }

  #taskSpec(fnName, fid, args, options, index) {
    const { payload, deps } = this.#packArgs(args, options.kwargs);
    let key = options.key;
    if (key === undefined) {
      const short = fnName.split(":").pop().split(".").pop() || "task";
      let digest;
      if (options.pure === false) digest = randomId() + randomId();
      else {
        const h = crypto.createHash("sha256").update(fid);
        for (const f of payload.frames) h.update(f);
        digest = h.digest("hex").slice(0, 32);
      }
      key = `${short}-${digest}`;
    }
    const priority = [-(options.priority ?? 0), this.order++];
    if (index !== undefined) priority.push(index);
    return {
      key,
      args: payload,
      fn: fid,
      deps,
      priority,
      resources: options.resources,
      workers: typeof options.workers === "string" ? [options.workers] : options.workers,
      allow_other_workers: options.allowOtherWorkers || undefined,
      retries: options.retries || undefined,
      runtime: options.runtime ?? "js",
    };
  }

  #functionPayload(fnName) {
    if (typeof fnName !== "string" || !fnName) throw new TypeError("a task's function is named by a string, e.g. 'mathlib:add'");
    const payload = { serializer: "msgpack", frames: [packValue(fnName)] };
    const fid = crypto.createHash("sha256").update("msgpack").update(payload.frames[0]).digest("hex").slice(0, 24);
    return { fid, payload };
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
   */
  submit(fn, args = [], options = {}) {
    if (!Array.isArray(args)) throw new TypeError("submit(fn, args, options): args must be an array");
    this.#checkOpen();
    const { fid, payload } = this.#functionPayload(fn);
    const spec = this.#taskSpec(fn, fid, args, options);
    const future = new Future(this, spec.key);
    this.conn.send({ op: "update_graph", tasks: [spec], wanted: [spec.key], functions: { [fid]: payload } });
    return future;
  }

  /**
   * One task per item: `fn(item)` (or `fn(...item)` with `{spread: true}`).
   * The function name travels once.
   * @returns {Future[]}
   */
  map(fn, items, options = {}) {
    this.#checkOpen();
    const { fid, payload } = this.#functionPayload(fn);
    const specs = [...items].map((item, i) =>
      this.#taskSpec(fn, fid, options.spread ? item : [item], { ...options, key: options.keys?.[i] }, i),
    );
    const futures = specs.map((s) => new Future(this, s.key));
    this.conn.send({ op: "update_graph", tasks: specs, wanted: specs.map((s) => s.key), functions: { [fid]: payload } });
    return futures;
  }

  #checkOpen() {
    if (this.status !== "running") throw new CommClosedError("client is not connected");
  }

  // -- results -------------------------------------------------------------------------
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
      const conn = connect(address, { role: "client", id: this.id, token: this.token }).then((r) => r.conn);
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

  /** The values of futures (an array, or a single future), in the same shape. */
  async gather(futures) {
    if (futures instanceof Future) return futures.result();
    return Promise.all([...futures].map((f) => (f instanceof Future ? f.result() : f)));
  }

  /** Cancel these futures' tasks (and the tasks depending on them). */
  cancel(futures) {
    const list = futures instanceof Future ? [futures] : [...futures];
    this.conn.send({ op: "cancel_keys", keys: list.map((f) => f.key) });
  }

  /** The scheduler's description of itself and its workers. */
  schedulerInfo() {
    return this.request("scheduler_info");
  }

  /** Why these futures' tasks are not running yet ({key: reason}). */
  whyPending(futures) {
    return this.request("why_pending", { keys: [...futures].map((f) => f.key) });
  }

  /** Resolve once at least `n` workers (of `runtime`, if given) are connected. */
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
