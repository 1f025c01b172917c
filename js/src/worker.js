// The worker's IO: scheduler stream, peer server, task execution, data store.
//
// `Worker` feeds events to the pure `WorkerState` (state.js) and carries out
// the instructions it returns.  Tasks run asynchronously on the event loop
// (no thread pool): `nthreads` is how many may be in progress at once.

import dgram from "node:dgram";
import crypto from "node:crypto";

import { ProtocolError, REF_KEY, SerializationError, decodePayload, msgpackPayload, payloadBytes, typeName } from "./codec.js";
import { CommClosedError, Connection, HandshakeError, accept, connect, createServer, formatAddress, parseAddress } from "./comm.js";
import { FunctionRegistry } from "./registry.js";
import { resourceAmounts, validateOffer } from "./resources.js";
import { WorkerState } from "./state.js";
import { runAsTask } from "./task-context.js";
import { TlsSettings } from "./tls.js";

export { typeName };

/** The runtime this worker registers: it runs tasks submitted with runtime "js". */
export const RUNTIME = "js";
/** Seconds between heartbeats. */
export const HEARTBEAT_INTERVAL = 1.0;
/** Results at most this large travel inline with task_finished when a client wants them. */
export const INLINE_RESULT_BYTES = 64 * 1024;

/** @typedef {{payload: {serializer: string, frames: Uint8Array[]}, value?: any, decoded: boolean}} Stored */

/** An ErrorInfo record (docs/protocol.md) for anything thrown. */
export function errorInfo(err) {
  if (err instanceof Error) {
    const typename = err.name && err.name !== "Error" ? err.name : err.constructor?.name || "Error";
    return { typename, message: String(err.message ?? ""), traceback_text: String(err.stack ?? "") };
  }
  return { typename: "Error", message: typeof err === "string" ? err : safeString(err), traceback_text: "" };
}

function safeString(v) {
  try {
    return JSON.stringify(v) ?? String(v);
  } catch {
    return String(v);
  }
}

/** Replace every {"__corral_ref__": key} in `value` by `lookup(key)`. */
export function substituteRefs(value, lookup) {
  if (value === null || typeof value !== "object" || ArrayBuffer.isView(value)) return value;
  if (Array.isArray(value)) return value.map((v) => substituteRefs(v, lookup));
  const keys = Object.keys(value);
  if (keys.length === 1 && keys[0] === REF_KEY && typeof value[REF_KEY] === "string") return lookup(value[REF_KEY]);
  const out = {};
  for (const k of keys) out[k] = substituteRefs(value[k], lookup);
  return out;
}

/** The value of a stored entry (decoded on first use, then kept). */
function decodedValue(key, entry) {
  if (entry === undefined) throw new Error(`dependency ${JSON.stringify(key)} is not in memory on this worker`);
  if (!entry.decoded) {
    try {
      entry.value = decodePayload(entry.payload);
    } catch (err) {
      throw new SerializationError(`cannot read the value of dependency ${JSON.stringify(key)}: ${err.message}`);
    }
    entry.decoded = true;
  }
  return entry.value;
}

function log(level, ...args) {
  if (Worker.quiet && level !== "ERROR") return;
  process.stderr.write(`${new Date().toISOString()} corral.js.worker ${level} ${args.join(" ")}\n`);
}

function isLoopback(host) {
  return host === "localhost" || host === "::1" || host.startsWith("127.");
}

/** The local IP used to reach `host` (no packet is sent). */
function outboundIp(host) {
  return new Promise((resolve) => {
    const sock = dgram.createSocket(host.includes(":") ? "udp6" : "udp4");
    sock.on("error", () => {
      sock.close();
      resolve("127.0.0.1");
    });
    sock.connect(9, host, () => {
      const addr = sock.address().address;
      sock.close();
      resolve(addr);
    });
  });
}

// Minimal shape checks of the scheduler's ops this worker acts on: a
// malformed op is a protocol error and closes the connection.
function need(cond, what) {
  if (!cond) throw new ProtocolError(what);
}
const isStr = (v) => typeof v === "string";
const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v) && !ArrayBuffer.isView(v);
const isPayload = (v) => isObj(v) && isStr(v.serializer) && Array.isArray(v.frames) && v.frames.every((f) => f instanceof Uint8Array);
// key -> value version (docs/protocol.md, "Value versions"); nil: every key at 0
const isVersions = (v) => v == null || (isObj(v) && Object.values(v).every(Number.isInteger));

function checkCompute(msg) {
  need(Array.isArray(msg.tasks), "compute.tasks must be an array");
  for (const t of msg.tasks) {
    need(isObj(t) && isStr(t.key) && Number.isInteger(t.run_id) && isPayload(t.args), "compute: malformed task");
    need(t.who_has == null || (isObj(t.who_has) && Object.values(t.who_has).every(Array.isArray)), "compute: malformed who_has");
    need(isVersions(t.versions), "compute: malformed versions");
  }
  need(msg.functions == null || (isObj(msg.functions) && Object.values(msg.functions).every(isPayload)), "compute: malformed functions");
}

/** A JavaScript worker: connects to a scheduler, runs tasks, serves results (docs/javascript.md). */
export class Worker {
  static quiet = false;

  /**
   * @param {string} schedulerAddress  tcp://host:port, or tls://host:port (needs options.tls)
   * @param {object} [options]
   * @param {number} [options.nthreads]   tasks in progress at once (default 1)
   * @param {string} [options.name]
   * @param {object} [options.resources]  {GPU: 1}, or indexed: {GPU: [0, 1]} (each task is told its indices)
   * @param {TlsSettings | {caFile?: string, certFile?: string, keyFile?: string}} [options.tls]
   *   TLS settings: with a certificate the peer port listens tls:// only (and
   *   with a CA requires client certificates); used for tls:// connections too
   * @param {string} [options.host]       interface of the peer port
   * @param {number} [options.port]       peer port (0: any)
   * @param {string} [options.token]      auth token (default $CORRAL_AUTH_TOKEN)
   * @param {FunctionRegistry} [options.registry]
   * @param {boolean} [options.reconnect] reconnect (afresh) if the scheduler goes away
   * @param {number} [options.heartbeatInterval] seconds
   */
  constructor(schedulerAddress, options = {}) {
    this.schedulerAddress = schedulerAddress;
    this.nthreads = options.nthreads ?? 1;
    this.name = options.name ?? null;
    this.resources = validateOffer(options.resources ?? {}, "resources");
    this.tls = TlsSettings.from(options.tls);
    this.host = options.host ?? null;
    this.port = options.port ?? 0;
    this.token = options.token ?? (process.env.CORRAL_AUTH_TOKEN || null);
    this.registry = options.registry ?? new FunctionRegistry();
    this.reconnect = options.reconnect ?? true;
    this.heartbeatInterval = options.heartbeatInterval ?? HEARTBEAT_INTERVAL;
    this.id = `worker-${crypto.randomBytes(6).toString("hex")}`;
    this.address = "";
    /** @type {Map<string, Stored>} */
    this.data = new Map();
    this.state = new WorkerState(this.nthreads, this.resources);
    /** fid -> {name} | {error} */
    this.functions = new Map();
    this.status = "created";
    this.scheduler = null;
    this.server = null;
    /** @type {Map<string, Connection>} */
    this.peers = new Map();
    this.generation = 0;
    this.heartbeatTimer = null;
    this.lastCpu = process.cpuUsage();
    this.lastCpuTime = Date.now();
    this.finished = new Promise((resolve) => {
      this._resolveFinished = resolve;
    });
  }

  // -- lifecycle ------------------------------------------------------------------
  /** Open the peer port, connect to the scheduler and register. */
  async start() {
    const { host: schedHost } = parseAddress(this.schedulerAddress);
    const listenHost = this.host ?? (isLoopback(schedHost) ? "127.0.0.1" : "0.0.0.0");
    this.server = createServer(
      this.tls,
      (socket) => this.#servePeer(socket),
      (err, socket) => log("INFO", `a connector failed the TLS handshake (${socket?.remoteAddress ?? "?"}): ${err.message}`),
    );
    await new Promise((resolve, reject) => {
      this.server.once("error", reject);
      this.server.listen(this.port, listenHost, resolve);
    });
    const port = this.server.address().port;
    const advertised = listenHost === "0.0.0.0" || listenHost === "::" ? await outboundIp(schedHost) : listenHost;
    // A TLS peer port is advertised as tls://: peers and clients then connect with TLS.
    this.address = formatAddress(advertised, port, this.tls?.canServe ? "tls" : "tcp");
    this.name ??= this.address;
    this.status = "connecting";
    try {
      await this.#connect();
    } catch (err) {
      await this.close({ report: false });
      throw err;
    }
    this.status = "running";
    this.heartbeatTimer = setInterval(() => this.#heartbeat(), this.heartbeatInterval * 1000);
    log("INFO", `worker ${this.name} (${this.address}) connected to ${this.schedulerAddress}`);
    return this;
  }

  async #connect() {
    let delay = 50;
    let conn;
    for (;;) {
      try {
        ({ conn } = await connect(this.schedulerAddress, { role: "worker", id: this.id, name: this.name, token: this.token, tls: this.tls }));
        break;
      } catch (err) {
        if (err instanceof HandshakeError || err instanceof ProtocolError || this.status !== "connecting") throw err;
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 1.5, 2000);
      }
    }
    this.generation++;
    this.scheduler = conn;
    conn.send({
      op: "register_worker",
      address: this.address,
      nthreads: this.nthreads,
      name: this.name,
      memory_limit: 0,
      resources: resourceAmounts(this.resources),
      pid: process.pid,
      runtime: RUNTIME,
    });
    conn.setHandler((ops) => this.#onSchedulerMessages(ops));
    conn.onClose((c) => this.#onSchedulerClosed(c));
  }

  #onSchedulerClosed(conn) {
    if (conn !== this.scheduler || !["running", "connecting"].includes(this.status)) return;
    log("WARNING", `lost the scheduler (${conn.closeReason})`);
    // A restarted scheduler knows nothing of our tasks or data: start afresh.
    this.data.clear();
    this.state = new WorkerState(this.nthreads, this.resources);
    this.functions.clear();
    if (!this.reconnect) {
      this.close({ report: false });
      return;
    }
    this.status = "connecting";
    this.#connect().then(
      () => {
        if (this.status === "connecting") this.status = "running";
        log("INFO", `reconnected to ${this.schedulerAddress}`);
      },
      (err) => {
        log("ERROR", `reconnecting failed (${err.message}); closing`);
        this.close({ report: false });
      },
    );
  }

  /** Tell the scheduler we leave (`unregister`), stop serving, drop the data. */
  async close({ report = true, reason = "closing" } = {}) {
    if (this.status === "closing" || this.status === "closed") return this.finished;
    this.status = "closing";
    clearInterval(this.heartbeatTimer);
    const sched = this.scheduler;
    if (sched && !sched.closed) {
      if (report) sched.send({ op: "unregister", reason });
      const gone = new Promise((r) => sched.socket.once("close", r));
      sched.close(reason);
      await Promise.race([gone, new Promise((r) => setTimeout(r, 2000).unref())]);
    }
    // A server closes once its connections have: end the ones it serves
    // (watching clients, peers) first, or a watching client keeps us alive.
    const stopped = this.server ? new Promise((r) => this.server.close(() => r())) : null;
    for (const conn of this.peerServed ?? []) conn.abort("worker closing");
    for (const conn of this.peers.values()) conn.close();
    this.peers.clear();
    await stopped;
    this.data.clear();
    this.status = "closed";
    log("INFO", `worker ${this.name} closed (${reason})`);
    this._resolveFinished();
    return this.finished;
  }

  // -- scheduler stream -------------------------------------------------------------
  #onSchedulerMessages(ops) {
    if (this.status !== "running" && this.status !== "connecting") return;
    const events = [];
    const replies = [];
    for (const msg of ops) {
      switch (msg.op) {
        case "compute":
          checkCompute(msg);
          for (const [fid, payload] of Object.entries(msg.functions ?? {})) {
            if (!this.functions.has(fid)) this.functions.set(fid, this.#decodeFunction(payload));
          }
          events.push({ type: "compute", tasks: msg.tasks });
          break;
        case "free_keys":
          need(Array.isArray(msg.keys) && msg.keys.every(isStr), "free_keys.keys must be an array of strings");
          events.push({ type: "free", keys: msg.keys });
          break;
        case "store": {
          need(isObj(msg.data) && Object.values(msg.data).every(isPayload), "store.data must map keys to payloads");
          need(isVersions(msg.versions), "store.versions must map keys to integers");
          const nbytes = {};
          for (const [key, payload] of Object.entries(msg.data)) {
            // Kept as it came (served back unchanged); decoded when a task needs it.
            this.data.set(key, { payload, decoded: false });
            nbytes[key] = payloadBytes(payload);
          }
          events.push({ type: "stored", nbytes, versions: msg.versions ?? undefined });
          break;
        }
        case "update_who_has":
          need(isObj(msg.who_has), "update_who_has.who_has must be a map");
          need(isVersions(msg.versions), "update_who_has.versions must map keys to integers");
          events.push({ type: "update-who-has", whoHas: msg.who_has, versions: msg.versions ?? undefined });
          break;
        case "set_resources":
          need(isObj(msg.resources), "set_resources.resources must be a map");
          Object.assign(this.resources, msg.resources); // kept for a re-registration
          events.push({ type: "set-resources", resources: msg.resources });
          break;
        case "close_worker":
        case "restart_worker": // no supervisor restarts us: leaving is all we can do
          this.#handle(events);
          this.close({ reason: msg.reason || `asked by the scheduler (${msg.op})` });
          return;
        case "setup_plugin":
        case "teardown_plugin":
        case "worker_run":
          // These carry pickled Python: a JavaScript worker cannot run them.
          replies.push({
            op: "worker_result",
            id: msg.id,
            outcome: {
              error: {
                typename: "NotImplementedError",
                message: `a JavaScript worker cannot run Python code (${msg.op}${msg.name ? ` ${msg.name}` : ""})`,
                traceback_text: "",
              },
            },
          });
          break;
        case "check_environment":
        case "teardown_environment":
          // Worker environments are Python objects: never a member.
          replies.push({
            op: "environment_status",
            id: msg.id,
            name: msg.name,
            registration: msg.registration ?? "",
            member: false,
            stage: msg.op === "check_environment" ? "load" : undefined,
            error:
              msg.op === "check_environment"
                ? { typename: "NotImplementedError", message: "a JavaScript worker cannot load Python environments", traceback_text: "" }
                : undefined,
          });
          break;
        default:
          log("WARNING", `ignoring unexpected op ${JSON.stringify(msg.op)} from the scheduler`);
      }
    }
    if (replies.length) this.scheduler.send(...replies);
    this.#handle(events);
  }

  #decodeFunction(payload) {
    try {
      const spec = decodePayload(payload);
      if (typeof spec !== "string" && !(isObj(spec) && isStr(spec.name))) {
        return { error: new SerializationError(`a function payload must decode to a name, got ${safeString(spec)}`) };
      }
      return { spec };
    } catch (err) {
      return { error: err };
    }
  }

  #handle(events) {
    if (!events.length) return;
    const instructions = this.state.handle(events);
    const sends = [];
    const pushes = [];
    for (const inst of instructions) {
      switch (inst.type) {
        case "execute":
          this.#execute(inst.spec, inst.resources, this.generation);
          break;
        case "send":
          if (inst.msg.op === "task_finished" && this.watchers?.size) pushes.push(...this.#pushesFor(inst.msg));
          sends.push(inst.msg);
          break;
        case "gather":
          this.#gather(inst.peer, inst.keys, this.generation);
          break;
        case "release-data":
          for (const key of inst.keys) this.data.delete(key);
          break;
        default:
          throw new Error(`unknown instruction ${inst.type}`);
      }
    }
    if (sends.length && this.scheduler && !this.scheduler.closed) this.scheduler.send(...sends);
    // The clients' copies after: the scheduler hears of a result before they do.
    for (const [conn, push] of pushes) conn.send(push);
    if (!this.state.tasks.size) this.functions.clear();
  }

  /** The key_in_memory copies of a small result for the waiting clients watching here; lists them in msg.notified. */
  #pushesFor(msg) {
    if (msg.result === undefined) return [];
    const notify = this.state.tasks.get(msg.key)?.spec?.notify;
    if (!Array.isArray(notify)) return [];
    const pushes = [];
    const told = [];
    for (const clientId of notify) {
      const conn = this.watchers.get(clientId);
      if (!conn || conn.closed) continue;
      pushes.push([conn, { op: "key_in_memory", key: msg.key, who_has: [this.address], typename: msg.typename, result: msg.result }]);
      told.push(clientId);
    }
    if (told.length) msg.notified = told;
    return pushes;
  }

  // -- running tasks ------------------------------------------------------------------
  /** The value of a key in memory here (decoded on first use). */
  value(key) {
    return decodedValue(key, this.data.get(key));
  }

  /**
   * The entries of a task's inputs as they are now, when it is handed over:
   * one dropped before it starts (its key was scattered over since, and no
   * task waiting here needs that copy) must not vanish from under it.
   */
  #inputs(spec) {
    const inputs = new Map();
    for (const key of Object.keys(spec.who_has ?? {})) {
      const entry = this.data.get(key);
      if (entry !== undefined) inputs.set(key, entry);
    }
    return inputs;
  }

  /** Whether a run's value may go into the store: not over data stored since. */
  #storesResult(key) {
    const state = this.state.tasks.get(key)?.state;
    return state === "executing" || state === "cancelled";
  }

  /**
   * Whether a fetched value may go into the store: only while the key is
   * wanted, never over a value stored or computed here since the fetch left
   * (the copy that lands may be of an older value of the key).
   */
  #fetches(key) {
    const state = this.state.tasks.get(key)?.state;
    return state === "flight" || state === "fetch" || state === "missing";
  }

  /** Run one task; `resources` is what it holds (indices of indexed ones), shown to it by getTaskResources(). */
  async #execute(spec, resources, generation) {
    const inputs = this.#inputs(spec);
    // Start after the current batch of instructions is carried out, and let IO in between tasks.
    await new Promise((r) => setImmediate(r));
    const start = Date.now() / 1000;
    let event;
    try {
      const entry = spec.fn != null ? this.functions.get(spec.fn) : undefined;
      if (entry === undefined) throw new SerializationError(`task ${spec.key} names function ${spec.fn} but it was not sent`);
      if (entry.error) throw entry.error;
      const fn = this.registry.resolve(entry.spec);
      const decoded = decodePayload(spec.args);
      if (!Array.isArray(decoded) || decoded.length < 1 || decoded.length > 2 || !Array.isArray(decoded[0]) || (decoded.length === 2 && decoded[1] !== null && !isObj(decoded[1]))) {
        throw new SerializationError("task arguments must decode to [args, kwargs] (an array and a map)");
      }
      const lookup = (key) => decodedValue(key, inputs.get(key));
      const args = substituteRefs(decoded[0], lookup);
      const kwargs = decoded.length === 2 && decoded[1] ? substituteRefs(decoded[1], lookup) : {};
      let result = runAsTask({ key: spec.key, resources }, () => (Object.keys(kwargs).length ? fn(...args, kwargs) : fn(...args)));
      if (result !== null && typeof result === "object" && typeof result.then === "function") result = await result;
      const payload = msgpackPayload(result === undefined ? null : result);
      const stop = Date.now() / 1000;
      const nbytes = payloadBytes(payload);
      if (generation !== this.generation || this.status === "closed") return;
      if (this.#storesResult(spec.key)) this.data.set(spec.key, { payload, value: result, decoded: true });
      event = {
        type: "execute-success",
        key: spec.key,
        runId: spec.run_id,
        nbytes,
        typename: typeName(result),
        start,
        stop,
        result: spec.send_result && nbytes <= INLINE_RESULT_BYTES ? payload : undefined,
      };
    } catch (err) {
      if (generation !== this.generation || this.status === "closed") return;
      event = { type: "execute-failure", key: spec.key, runId: spec.run_id, error: errorInfo(err), start, stop: Date.now() / 1000 };
    }
    this.#handle([event]);
  }

  // -- fetching from peers ---------------------------------------------------------------
  async #peer(address) {
    let conn = this.peers.get(address);
    if (!conn || conn.closed) {
      ({ conn } = await connect(address, { role: "peer", id: this.id, token: this.token, tls: this.tls }));
      this.peers.set(address, conn);
    }
    return conn;
  }

  async #gather(peer, keys, generation) {
    const received = {};
    let versions;
    let failed = false;
    try {
      const conn = await this.#peer(peer);
      conn.send({ op: "get_data", keys, serializers: ["msgpack"] });
      const reply = await conn.recv(300);
      if (reply.op !== "data" || !isObj(reply.data) || !isVersions(reply.versions)) {
        conn.abort("unexpected reply");
        throw new CommClosedError(`unexpected reply ${JSON.stringify(reply.op)} from ${peer}`);
      }
      const asked = new Set(keys);
      for (const [key, payload] of Object.entries(reply.data)) {
        if (!asked.has(key) || !isPayload(payload)) continue;
        if (generation === this.generation && this.#fetches(key)) this.data.set(key, { payload, decoded: false });
        received[key] = payloadBytes(payload);
      }
      // Which value each is (a peer not tracking versions says nothing: taken for the one asked for).
      versions = reply.versions ?? undefined;
    } catch (err) {
      log("INFO", `could not fetch ${keys.length} keys from ${peer}: ${err.message}`);
      failed = true;
      this.peers.get(peer)?.abort("fetch failed");
      this.peers.delete(peer);
    }
    if (generation !== this.generation || this.status !== "running") return;
    const missing = keys.filter((k) => !Object.hasOwn(received, k));
    this.#handle([{ type: "gather-done", peer, received, missing, failed, versions }]);
  }

  // -- serving peers and clients -----------------------------------------------------------
  async #servePeer(socket) {
    const conn = new Connection(socket, { server: true });
    this.peerServed ??= new Set();
    this.peerServed.add(conn);
    conn.onClose(() => this.peerServed.delete(conn));
    if (this.status === "closing" || this.status === "closed") {
      conn.abort("worker closing");
      return;
    }
    let hello;
    try {
      hello = await accept(conn, { role: "worker", serverId: this.id, token: this.token, allowedRoles: ["peer", "client", "worker"] });
    } catch {
      return;
    }
    conn.setHandler((ops) => {
      for (const msg of ops) {
        if (msg.op === "watch_results" && hello.role === "client") {
          this.#watch(hello.id, conn);
          continue;
        }
        if (msg.op !== "get_data") throw new ProtocolError(`op '${msg.op}' is not served on a worker's peer port`);
        need(Array.isArray(msg.keys) && msg.keys.every(isStr), "get_data.keys must be an array of strings");
        const data = {};
        const missing = [];
        const versions = {}; // of each value sent: the asker learns which it got
        for (const key of msg.keys) {
          const entry = this.data.get(key);
          if (entry) {
            data[key] = entry.payload;
            versions[key] = this.state.tasks.get(key)?.version ?? 0;
          } else {
            missing.push(key);
          }
        }
        conn.send({ op: "data", data, missing, versions: Object.keys(versions).length ? versions : undefined });
      }
    });
  }

  /** Push clientId's small results on conn until it closes (a newer watch replaces it). */
  #watch(clientId, conn) {
    this.watchers ??= new Map();
    const old = this.watchers.get(clientId);
    if (old && old !== conn) old.close("replaced by a newer watch_results connection");
    this.watchers.set(clientId, conn);
    conn.onClose(() => {
      if (this.watchers.get(clientId) === conn) this.watchers.delete(clientId);
    });
  }

  // -- heartbeats --------------------------------------------------------------------------
  #heartbeat() {
    const conn = this.scheduler;
    if (!conn || conn.closed || this.status !== "running") return;
    const now = Date.now();
    const cpu = process.cpuUsage(this.lastCpu);
    const elapsed = Math.max(1, now - this.lastCpuTime);
    this.lastCpu = process.cpuUsage();
    this.lastCpuTime = now;
    conn.send({
      op: "heartbeat",
      metrics: {
        memory: process.memoryUsage().rss,
        cpu: ((cpu.user + cpu.system) / 1000 / elapsed) * 100,
        executing: this.state.executing.size,
        in_memory: this.data.size,
        resources_available: { ...this.state.availableResources },
      },
    });
  }
}
