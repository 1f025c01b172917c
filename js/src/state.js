// The worker's state machine: pure, no IO, no clocks, no timers.
//
// A port of src/corral/worker/state.py.  `WorkerState.handle(events)` takes
// events (the scheduler's messages, and what the IO layer did) and returns
// instructions: run a task, fetch keys from a peer, send a message to the
// scheduler, drop data.
//
// Task life on a worker:
//
//     waiting -> ready -> executing -> memory | error
//        |         \-> constrained -/        (constrained: waiting for resources)
//     dependencies: fetch -> flight -> memory   (missing: no holder left)
//
// A task freed while it runs becomes `cancelled` and its result is dropped.
// Resources are taken when a task starts executing (not while its inputs are
// fetched) and given back when it ends, however it ends.
//
// Events (plain objects, `type` first):
//   {type: "compute", tasks: [ComputeTask]}
//   {type: "execute-success", key, runId, nbytes, typename, start, stop, result?}
//   {type: "execute-failure", key, runId, error: ErrorInfo, start, stop}
//   {type: "gather-done", peer, received: {key: nbytes}, missing: [key], failed}
//   {type: "free", keys}
//   {type: "stored", nbytes: {key: nbytes}}
//   {type: "update-who-has", whoHas: {key: [address]}}
//   {type: "set-resources", resources: {name: amount | [index]}}
// Instructions:
//   {type: "execute", key, spec}
//   {type: "gather", peer, keys}
//   {type: "send", msg}            (an op map for the scheduler)
//   {type: "release-data", keys}

import { ResourcePool } from "./resources.js";

/** Most peers fetched from at once, and most bytes asked of one peer at once. */
export const MAX_GATHERS = 8;
export const GATHER_BYTES = 64 * 1024 ** 2;

/** Legal transitions: start -> finishes. Anything else throws at once. */
const TRANSITIONS = {
  released: ["waiting", "ready", "fetch", "missing", "forgotten"],
  waiting: ["ready", "forgotten"],
  ready: ["executing", "constrained", "forgotten"],
  constrained: ["executing", "forgotten"],
  executing: ["memory", "error", "cancelled"],
  cancelled: ["executing", "memory", "fetch", "missing"],
  fetch: ["flight", "missing", "waiting", "ready", "forgotten"],
  missing: ["fetch", "waiting", "ready", "forgotten"],
  flight: ["memory", "fetch", "missing", "waiting", "ready", "cancelled-flight", "forgotten"],
  "cancelled-flight": [],
  memory: ["forgotten"],
  error: ["forgotten"],
  forgotten: [],
};

export class InvalidTransition extends Error {
  constructor(key, start, finish) {
    super(`invalid transition of ${JSON.stringify(key)}: ${start} -> ${finish}`);
    this.name = "InvalidTransition";
  }
}

/** Compare priorities (arrays of numbers) element by element, as Python compares tuples. */
export function comparePriority(pa, pb) {
  const n = Math.min(pa.length, pb.length);
  for (let i = 0; i < n; i++) {
    if (pa[i] < pb[i]) return -1;
    if (pa[i] > pb[i]) return 1;
  }
  return pa.length - pb.length;
}

/** Heap order: priority, then arrival order. */
function before(a, b) {
  const c = comparePriority(a[0], b[0]);
  return c < 0 || (c === 0 && a[1] < b[1]);
}

/** A binary min-heap of [priority, order, task] entries. */
class Heap {
  constructor() {
    this.items = [];
  }

  get length() {
    return this.items.length;
  }

  peek() {
    return this.items[0];
  }

  push(item) {
    const a = this.items;
    a.push(item);
    let i = a.length - 1;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!before(a[i], a[p])) break;
      [a[i], a[p]] = [a[p], a[i]];
      i = p;
    }
  }

  pop() {
    const a = this.items;
    const top = a[0];
    const last = a.pop();
    if (a.length) {
      a[0] = last;
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < a.length && before(a[l], a[m])) m = l;
        if (r < a.length && before(a[r], a[m])) m = r;
        if (m === i) break;
        [a[i], a[m]] = [a[m], a[i]];
        i = m;
      }
    }
    return top;
  }
}

/** The worker's record of one key: a task to run here, or data to fetch. */
export class WTask {
  constructor(key) {
    this.key = key;
    this.state = "released";
    this.spec = null;
    this.deps = new Set();
    this.dependents = new Set();
    this.waitingFor = new Set();
    this.whoHas = new Set();
    this.nbytes = 0;
    this.priority = [];
    this.resources = null;
  }
}

export class WorkerState {
  /**
   * @param {number} nthreads  how many tasks may execute at once
   * @param {object} resources  name -> amount (or list of indices)
   */
  constructor(nthreads, resources = {}) {
    this.nthreads = nthreads;
    /** @type {Map<string, WTask>} */
    this.tasks = new Map();
    this.resourcePool = new ResourcePool(resources);
    this.executing = new Set();
    /** @type {Map<string, Set<WTask>>} peer -> tasks being fetched from it */
    this.inFlight = new Map();
    this.ready = new Heap();
    this.constrained = new Heap();
    /** @type {Set<WTask>} insertion-ordered: fetch order */
    this.fetch = new Set();
    this.order = 0;
    this.out = [];
    /** Bounded transition log: [key, start, finish, stimulus]. */
    this.log = [];
    this.logLimit = 50000;
    this.stimulus = "";
  }

  get totalResources() {
    return this.resourcePool.total;
  }

  get availableResources() {
    return this.resourcePool.available;
  }

  /** Tasks ready to run but not started. */
  get queued() {
    return this.ready.length + this.constrained.length;
  }

  // -- entry point ------------------------------------------------------------------
  /** Apply events; return the instructions the IO layer must carry out. */
  handle(events) {
    for (const ev of events) {
      this.stimulus = ev.type;
      switch (ev.type) {
        case "compute":
          this.#compute(ev.tasks);
          break;
        case "execute-success":
          this.#executeSuccess(ev);
          break;
        case "execute-failure":
          this.#executeFailure(ev);
          break;
        case "gather-done":
          this.#gatherDone(ev);
          break;
        case "free":
          this.#free(ev.keys);
          break;
        case "stored":
          this.#stored(ev.nbytes);
          break;
        case "update-who-has":
          this.#updateWhoHas(ev.whoHas);
          break;
        case "set-resources":
          // Running tasks keep what they hold; nothing new starts until it fits.
          this.resourcePool.update(ev.resources);
          break;
        default:
          throw new TypeError(`the worker state has no handler for ${JSON.stringify(ev.type)}`);
      }
    }
    this.#ensureComputing();
    this.#ensureFetching();
    const out = this.out;
    this.out = [];
    return out;
  }

  #move(ts, finish) {
    if (!TRANSITIONS[ts.state]?.includes(finish)) throw new InvalidTransition(ts.key, ts.state, finish);
    this.log.push([ts.key, ts.state, finish, this.stimulus]);
    if (this.log.length > this.logLimit) this.log.splice(0, this.log.length - this.logLimit);
    ts.state = finish;
  }

  /** Every logged transition of `key`: [key, start, finish, stimulus]. */
  story(key) {
    return this.log.filter((e) => e[0] === key);
  }

  #send(msg) {
    this.out.push({ type: "send", msg });
  }

  // -- handlers -----------------------------------------------------------------------
  #compute(specs) {
    for (const spec of specs) {
      let ts = this.tasks.get(spec.key);
      if (ts === undefined) {
        ts = new WTask(spec.key);
        this.tasks.set(spec.key, ts);
      } else if (["executing", "memory", "waiting", "ready", "constrained"].includes(ts.state)) {
        if (ts.state === "memory") {
          // Already here (fetched earlier): report it as done at once.
          this.#send({ op: "task_finished", key: ts.key, run_id: spec.run_id, nbytes: ts.nbytes });
        } else if (ts.spec !== null) {
          ts.spec = spec; // newer run id
        }
        continue;
      } else if (ts.state === "cancelled") {
        // Freed while running and now assigned again: let the run count.
        ts.spec = spec;
        this.#move(ts, "executing");
        continue;
      } else if (["fetch", "flight", "missing"].includes(ts.state)) {
        // Data we were fetching becomes a task to run here; a fetch in flight
        // for it is ignored when it ends (its state is no longer "flight").
        this.fetch.delete(ts);
      }
      ts.spec = spec;
      ts.priority = spec.priority ?? [];
      ts.resources = spec.resources && Object.keys(spec.resources).length ? spec.resources : null;
      ts.waitingFor = new Set();
      const whoHas = spec.who_has ?? {};
      const nbytes = spec.nbytes ?? {};
      for (const [depKey, holders] of Object.entries(whoHas)) {
        let dep = this.tasks.get(depKey);
        if (dep === undefined) {
          dep = new WTask(depKey);
          this.tasks.set(depKey, dep);
        }
        dep.dependents.add(ts);
        ts.deps.add(dep);
        dep.nbytes = dep.nbytes || nbytes[depKey] || 0;
        if (dep.state === "memory") continue;
        ts.waitingFor.add(dep);
        for (const h of holders) dep.whoHas.add(h);
        if (dep.state === "released" || (dep.state === "missing" && dep.whoHas.size)) this.#wantFetch(dep);
      }
      if (ts.waitingFor.size) this.#move(ts, "waiting");
      else this.#makeReady(ts);
    }
  }

  #wantFetch(dep, failedHolder = "") {
    if (dep.whoHas.size) {
      this.#move(dep, "fetch");
      this.fetch.add(dep);
    } else {
      this.#move(dep, "missing");
      this.#send({ op: "missing_data", key: dep.key, holder: failedHolder });
    }
  }

  #makeReady(ts) {
    this.#move(ts, "ready");
    this.ready.push([ts.priority, this.order++, ts]);
  }

  #executeSuccess(ev) {
    const ts = this.tasks.get(ev.key);
    if (!ts || !ts.spec || !["executing", "cancelled"].includes(ts.state)) return;
    this.#finishExecuting(ts);
    if (ts.state === "cancelled") {
      if (ts.dependents.size) {
        // Local tasks wait for this key (computed elsewhere since): keep the
        // value and tell the scheduler about the copy.
        ts.nbytes = ev.nbytes;
        this.#move(ts, "memory");
        this.#send({ op: "add_keys", nbytes: { [ts.key]: ts.nbytes } });
        this.#arrived(ts);
        return;
      }
      this.#forget(ts);
      this.out.push({ type: "release-data", keys: [ts.key] });
      return;
    }
    ts.nbytes = ev.nbytes;
    this.#move(ts, "memory");
    this.#send({
      op: "task_finished",
      key: ts.key,
      run_id: ts.spec.run_id, // the latest assignment, if re-assigned mid-run
      nbytes: ev.nbytes,
      typename: ev.typename,
      start: ev.start,
      stop: ev.stop,
      result: ev.result ?? undefined,
    });
    this.#arrived(ts);
  }

  #executeFailure(ev) {
    const ts = this.tasks.get(ev.key);
    if (!ts || !ts.spec || !["executing", "cancelled"].includes(ts.state)) return;
    this.#finishExecuting(ts);
    if (ts.state === "cancelled") {
      if (ts.dependents.size) {
        this.#wantFetch(ts); // local tasks wait for it: fetch it instead
        return;
      }
      this.#forget(ts);
      return;
    }
    this.#move(ts, "error");
    this.#send({ op: "task_erred", key: ts.key, run_id: ts.spec.run_id, error: ev.error, start: ev.start, stop: ev.stop });
    // The scheduler frees errored keys; hold nothing for it meanwhile.
    this.#forget(ts);
  }

  #finishExecuting(ts) {
    this.executing.delete(ts);
    if (ts.resources && ts.holds) {
      this.resourcePool.release(ts.resources);
      ts.holds = false;
    }
  }

  /** `ts` is now in memory here: wake the local tasks that waited for it. */
  #arrived(ts) {
    for (const dts of ts.dependents) {
      if (dts.state === "waiting" && dts.waitingFor.has(ts)) {
        dts.waitingFor.delete(ts);
        if (!dts.waitingFor.size) this.#makeReady(dts);
      }
    }
  }

  #gatherDone(ev) {
    const flight = this.inFlight.get(ev.peer) ?? new Set();
    this.inFlight.delete(ev.peer);
    const received = ev.received ?? {};
    const arrived = {};
    let any = false;
    for (const ts of flight) {
      const got = Object.hasOwn(received, ts.key);
      if (got && ts.state === "flight") {
        ts.nbytes = received[ts.key];
        this.#move(ts, "memory");
        arrived[ts.key] = ts.nbytes;
        any = true;
        this.#arrived(ts);
      } else if (ts.state === "flight") {
        ts.whoHas.delete(ev.peer);
        if (ts.dependents.size) this.#wantFetch(ts, ev.peer);
        else this.#forget(ts);
      } else if (ts.state === "cancelled-flight") {
        this.#forgetCancelledFlight(ts);
        // The store's value belongs to a newer record of the key, if any.
        if (got && !this.tasks.has(ts.key)) this.out.push({ type: "release-data", keys: [ts.key] });
      }
    }
    if (ev.failed) {
      const stranded = [];
      for (const ts of this.fetch) {
        ts.whoHas.delete(ev.peer);
        if (!ts.whoHas.size) stranded.push(ts);
      }
      for (const ts of stranded) {
        // no holder left: ask the scheduler
        this.fetch.delete(ts);
        this.#move(ts, "missing");
        this.#send({ op: "missing_data", key: ts.key, holder: ev.peer });
      }
    }
    if (any) this.#send({ op: "add_keys", nbytes: arrived });
  }

  #stored(nbytes) {
    for (const [key, n] of Object.entries(nbytes)) {
      let ts = this.tasks.get(key);
      if (ts === undefined) {
        ts = new WTask(key);
        this.tasks.set(key, ts);
      }
      if (ts.state === "executing" || ts.state === "cancelled") continue; // its run decides
      this.fetch.delete(ts);
      ts.nbytes = n;
      if (ts.state !== "memory") {
        // From any state: a fetch in flight for it, or a queued run of it,
        // finds it in memory and is ignored.
        this.log.push([ts.key, ts.state, "memory", this.stimulus]);
        ts.state = "memory";
        this.#arrived(ts);
      }
    }
  }

  #updateWhoHas(whoHas) {
    for (const [key, holders] of Object.entries(whoHas)) {
      const ts = this.tasks.get(key);
      if (!ts || !["missing", "fetch"].includes(ts.state)) continue;
      ts.whoHas = new Set(holders);
      if (ts.state === "missing" && holders.length) {
        this.#move(ts, "fetch");
        this.fetch.add(ts);
      } else if (ts.state === "fetch" && !holders.length) {
        this.fetch.delete(ts);
        this.#move(ts, "missing");
      }
    }
  }

  #free(keys) {
    const dropped = [];
    for (const key of keys) {
      const ts = this.tasks.get(key);
      if (!ts) continue;
      if (ts.state === "executing") {
        this.#move(ts, "cancelled");
        continue;
      }
      if (ts.state === "cancelled") continue; // freed before: its run is still going
      if (ts.state === "flight") {
        this.#move(ts, "cancelled-flight");
        this.tasks.delete(key);
        continue;
      }
      if (ts.state === "memory") dropped.push(key);
      this.fetch.delete(ts);
      this.#forget(ts);
    }
    if (dropped.length) this.out.push({ type: "release-data", keys: dropped });
  }

  #forget(ts) {
    if (this.tasks.get(ts.key) === ts) this.tasks.delete(ts.key);
    if (ts.state !== "cancelled" && ts.state !== "cancelled-flight" && ts.state !== "forgotten") {
      this.#move(ts, "forgotten");
    }
    for (const dep of ts.deps) {
      dep.dependents.delete(ts);
      if (!dep.dependents.size && ["fetch", "missing"].includes(dep.state)) {
        this.fetch.delete(dep);
        this.#forget(dep);
      }
    }
    ts.deps = new Set();
  }

  #forgetCancelledFlight(ts) {
    for (const dep of ts.deps) dep.dependents.delete(ts);
    ts.deps = new Set();
  }

  // -- choosing what to do next ---------------------------------------------------------
  #ensureComputing() {
    while (this.executing.size < this.nthreads) {
      const ts = this.#nextRunnable();
      if (!ts) return;
      if (ts.resources) {
        this.resourcePool.acquire(ts.resources);
        ts.holds = true;
      }
      this.#move(ts, "executing");
      this.executing.add(ts);
      this.out.push({ type: "execute", key: ts.key, spec: ts.spec });
    }
  }

  #nextRunnable() {
    // Resource-constrained tasks first (they are older); never oversubscribe.
    while (this.constrained.length) {
      const ts = this.constrained.peek()[2];
      if (ts.state !== "constrained") {
        this.constrained.pop();
        continue;
      }
      if (!this.resourcePool.fits(ts.resources)) break;
      this.constrained.pop();
      return ts;
    }
    while (this.ready.length) {
      const entry = this.ready.pop();
      const ts = entry[2];
      if (ts.state !== "ready") continue;
      if (this.resourcePool.fits(ts.resources)) return ts;
      this.#move(ts, "constrained");
      this.constrained.push(entry);
    }
    return null;
  }

  #ensureFetching() {
    if (!this.fetch.size || this.inFlight.size >= MAX_GATHERS) return;
    /** @type {Map<string, WTask[]>} */
    const perPeer = new Map();
    for (const ts of this.fetch) {
      if (!ts.whoHas.size) continue;
      const holders = [...ts.whoHas];
      const free = holders.filter((p) => !this.inFlight.has(p)).sort();
      if (!free.length) continue; // every holder is busy: wait for a fetch to end
      const peer = free[0];
      if (!perPeer.has(peer)) perPeer.set(peer, []);
      perPeer.get(peer).push(ts);
    }
    for (const [peer, wanted] of perPeer) {
      if (this.inFlight.size >= MAX_GATHERS) break;
      const batch = [];
      let total = 0;
      wanted.sort((a, b) => comparePriority(a.priority, b.priority));
      for (const ts of wanted) {
        if (batch.length && total + ts.nbytes > GATHER_BYTES) break;
        batch.push(ts);
        total += ts.nbytes;
      }
      for (const ts of batch) {
        this.fetch.delete(ts);
        this.#move(ts, "flight");
      }
      this.inFlight.set(peer, new Set(batch));
      this.out.push({ type: "gather", peer, keys: batch.map((t) => t.key) });
    }
  }

  // -- invariants -----------------------------------------------------------------------
  /** Throw if an invariant is broken (tests call it after every event). */
  validate() {
    const used = {};
    for (const ts of this.executing) {
      if (!["executing", "cancelled"].includes(ts.state)) throw new Error(`executing set holds ${ts.key} in ${ts.state}`);
      if (ts.holds) for (const [n, a] of Object.entries(ts.resources)) used[n] = (used[n] ?? 0) + a;
    }
    if (this.executing.size > this.nthreads) throw new Error(`${this.executing.size} tasks executing, nthreads ${this.nthreads}`);
    for (const [name, u] of Object.entries(used)) {
      if (Math.abs((this.resourcePool.used[name] ?? 0) - u) > 1e-6) throw new Error(`resource ${name}: pool says ${this.resourcePool.used[name]}, tasks hold ${u}`);
    }
    for (const [name, u] of Object.entries(this.resourcePool.used)) {
      if (Math.abs((used[name] ?? 0) - u) > 1e-6) throw new Error(`resource ${name} used ${u} but no task holds it`);
    }
    for (const ts of this.tasks.values()) {
      if (ts.state === "waiting") {
        if (!ts.waitingFor.size) throw new Error(`${ts.key} waiting for nothing`);
        for (const dep of ts.waitingFor) {
          if (!["fetch", "flight", "missing", "cancelled", "executing"].includes(dep.state)) {
            throw new Error(`${ts.key} waits for ${dep.key} in ${dep.state}`);
          }
        }
      }
      if (ts.state === "fetch" && !this.fetch.has(ts)) throw new Error(`${ts.key} in fetch but not queued`);
    }
  }
}
