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
// fetched) and given back when it ends, however it ends.  Of an indexed
// resource ("GPU=[0,1]") a task is given indices (`WTask.held`), and the
// `execute` instruction says which: the IO layer shows them to the task.
//
// Every value has a version (`WTask.version`): 0 for a key's computed value,
// the scheduler's number for each scattered one (docs/protocol.md, "Value
// versions").  A copy of a value the scheduler replaced since (its key was
// scattered over) is never used for a task that names the new one: it is
// dropped and the current value fetched.
//
// Events (plain objects, `type` first):
//   {type: "compute", tasks: [ComputeTask]}   (ComputeTask.versions: of its inputs)
//   {type: "execute-success", key, runId, nbytes, typename, start, stop, result?}
//   {type: "execute-failure", key, runId, error: ErrorInfo, start, stop}
//   {type: "gather-done", peer, received: {key: nbytes}, missing: [key], failed, versions?}
//   {type: "free", keys}
//   {type: "stored", nbytes: {key: nbytes}, versions?}
//   {type: "update-who-has", whoHas: {key: [address]}, versions?}
//   {type: "set-resources", resources: {name: amount | [index]}}
// (`versions`: {key: version} as the message said, the peer's data.versions for
// a gather; a key not listed is at 0, or for a gather at the version asked for.)
// Instructions:
//   {type: "execute", key, spec, resources}  (resources: what the task holds,
//                                   {GPU: [1], MEM: 5}: indices of indexed ones)
//   {type: "gather", peer, keys}
//   {type: "send", msg}            (an op map for the scheduler)
//   {type: "release-data", keys}

import { ResourcePool, taskResources } from "./resources.js";

/** Most peers fetched from at once, and most bytes asked of one peer at once. */
export const MAX_GATHERS = 8;
/** (See MAX_GATHERS.) */
export const GATHER_BYTES = 64 * 1024 ** 2;

/** Legal transitions: start -> finishes. Anything else throws at once. */
const TRANSITIONS = {
  released: ["waiting", "ready", "fetch", "missing", "forgotten"],
  waiting: ["ready", "forgotten"],
  // -> waiting: an input held here turned out to be of another version (refetched)
  ready: ["executing", "constrained", "waiting", "forgotten"],
  constrained: ["executing", "waiting", "forgotten"],
  executing: ["memory", "error", "cancelled"],
  cancelled: ["executing", "memory", "fetch", "missing"],
  fetch: ["flight", "missing", "memory", "waiting", "ready", "forgotten"],
  missing: ["fetch", "memory", "waiting", "ready", "forgotten"],
  flight: ["memory", "fetch", "missing", "waiting", "ready", "cancelled-flight", "forgotten"],
  "cancelled-flight": [],
  // -> fetch | missing: a copy of another version than wanted, refetched;
  // -> waiting | ready | executing: scattered data held, then the key assigned here
  memory: ["forgotten", "fetch", "missing", "waiting", "ready", "executing"],
  error: ["forgotten"],
  forgotten: [],
};

/** A transition the worker's task life does not allow: a bug, raised at once. */
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
    // While it executes holding resources: the indices it was given (ResourcePool.acquire).
    this.held = null;
    this.holds = false;
    // The version of the value held (memory), or of the value local tasks want
    // (fetch, flight, missing, cancelled): 0 is the key's computed value, any
    // other number one scattered value (add_keys.versions).
    this.version = 0;
  }
}

/** The worker's state machine: events in, instructions out (see the top of this file). */
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
    /** @type {Map<string, Map<WTask, number>>} peer -> tasks being fetched from it, with the version asked for */
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
          this.#stored(ev.nbytes, ev.versions ?? {});
          break;
        case "update-who-has":
          this.#updateWhoHas(ev.whoHas, ev.versions ?? {});
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
      } else if (ts.state === "memory" && ts.version) {
        // A copy of scattered data the key held before: the task computes
        // another value.  Run it.
        this.#release(ts.key);
        ts.version = 0;
        if (this.executing.has(ts)) {
          // Its run from before the data was stored over goes on: it counts.
          ts.spec = spec;
          this.#move(ts, "executing");
          continue;
        }
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
      const versions = spec.versions ?? {};
      for (const [depKey, holders] of Object.entries(whoHas)) {
        let dep = this.tasks.get(depKey);
        if (dep === undefined) {
          dep = new WTask(depKey);
          this.tasks.set(depKey, dep);
        }
        dep.dependents.add(ts);
        ts.deps.add(dep);
        dep.nbytes = dep.nbytes || nbytes[depKey] || 0;
        const version = versions[depKey] ?? 0;
        if (dep.state === "memory") {
          if (dep.version === version) continue;
          // The copy here is of a value scattered over since: not this one.
          dep.nbytes = nbytes[depKey] ?? dep.nbytes;
          this.#replace(dep, holders, version);
        } else if (dep.version !== version) {
          // Another value than the one asked for so far: from its own holders.
          this.#retarget(dep, holders, version);
        } else {
          for (const h of holders) dep.whoHas.add(h);
        }
        ts.waitingFor.add(dep);
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

  /** Whether local tasks that have not started yet need `ts`'s value. */
  #wanted(ts) {
    for (const d of ts.dependents) if (["waiting", "ready", "constrained"].includes(d.state)) return true;
    return false;
  }

  /**
   * Drop the stale value `ts` holds and fetch the current one, for the local tasks.
   * Tasks that have not started wait for it; started ones took their inputs
   * when they were handed to the IO layer.
   */
  #replace(ts, holders, version) {
    this.#release(ts.key);
    ts.version = version;
    ts.whoHas = new Set(holders);
    for (const dts of ts.dependents) {
      if (dts.state === "ready" || dts.state === "constrained") {
        this.#move(dts, "waiting"); // their heap entries are skipped
        dts.waitingFor.add(ts);
      } else if (dts.state === "waiting") {
        dts.waitingFor.add(ts);
      }
    }
    this.#wantFetch(ts);
  }

  /**
   * Local tasks want another version of `ts` than fetched so far: from `holders`.
   * A fetch in flight goes on; what it brings is dropped (see #gatherDone).
   */
  #retarget(ts, holders, version) {
    ts.version = version;
    ts.whoHas = new Set(holders);
    if (ts.state === "fetch" && !ts.whoHas.size) {
      this.fetch.delete(ts);
      this.#move(ts, "missing");
    }
  }

  #release(...keys) {
    this.out.push({ type: "release-data", keys });
  }

  #makeReady(ts) {
    this.#move(ts, "ready");
    this.ready.push([ts.priority, this.order++, ts]);
  }

  #executeSuccess(ev) {
    const ts = this.#runEnded(ev.key, ev.runId);
    if (ts === null) {
      // The IO layer may have stored the value: drop it unless the key is in memory here.
      if (this.tasks.get(ev.key)?.state !== "memory") this.#release(ev.key);
      return;
    }
    if (ts.state === "cancelled") {
      if (ts.dependents.size && ts.version === 0) {
        // Local tasks wait for this key (computed elsewhere since): keep the
        // value and tell the scheduler about the copy.
        ts.nbytes = ev.nbytes;
        this.#move(ts, "memory");
        this.#send({ op: "add_keys", nbytes: { [ts.key]: ts.nbytes }, versions: {} });
        this.#arrived(ts);
        return;
      }
      if (ts.dependents.size) {
        // They wait for data scattered over the key, not its computed value.
        this.#release(ts.key);
        this.#wantFetch(ts);
        return;
      }
      this.#forget(ts);
      this.#release(ts.key);
      return;
    }
    ts.nbytes = ev.nbytes;
    ts.version = 0;
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
    const ts = this.#runEnded(ev.key, ev.runId);
    if (ts === null) return;
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

  /**
   * Give back the slot and resources of `key`'s run `runId`, however it ended.
   * Return its record if the result still matters: null for a run whose record
   * was stored over (scattered data) or dropped while it ran.
   */
  #runEnded(key, runId) {
    let ts = this.tasks.get(key);
    if (ts?.spec && ts.spec.run_id !== runId) {
      // Two runs of the key may be going: one of a record dropped mid-run
      // (stored over, then freed), and the current record's.  Each gives back
      // what it holds.
      for (const t of this.executing) {
        if (t !== ts && t.key === key && t.spec?.run_id === runId) {
          this.#finishExecuting(t);
          return null;
        }
      }
    }
    if (ts === undefined || !this.executing.has(ts)) {
      ts = [...this.executing].find((t) => t.key === key);
      if (ts !== undefined) this.#finishExecuting(ts);
      return null;
    }
    this.#finishExecuting(ts);
    return ts.state === "executing" || ts.state === "cancelled" ? ts : null;
  }

  #finishExecuting(ts) {
    this.executing.delete(ts);
    if (ts.resources && ts.holds) {
      this.resourcePool.release(ts.resources, ts.held);
      ts.holds = false;
      ts.held = null;
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
    /** @type {Map<WTask, number>} each with the version asked for */
    const flight = this.inFlight.get(ev.peer) ?? new Map();
    this.inFlight.delete(ev.peer);
    const received = ev.received ?? {};
    // As the peer said (data.versions); a value it does not say the version of
    // is taken for the version asked for (a peer that does not track versions).
    const said = ev.versions ?? {};
    const arrived = {};
    const versions = {};
    let any = false;
    const keep = (ts) => {
      ts.nbytes = received[ts.key];
      this.#move(ts, "memory");
      arrived[ts.key] = ts.nbytes;
      if (ts.version) versions[ts.key] = ts.version;
      any = true;
      this.#arrived(ts);
    };
    for (const [ts, fetched] of flight) {
      const has = Object.hasOwn(received, ts.key);
      const got = Object.hasOwn(said, ts.key) ? said[ts.key] : fetched;
      if (has && ts.state === "flight" && got !== ts.version) {
        // Not the value local tasks want: they named another since the fetch
        // left, or the peer holds another (its key was scattered over, and the
        // peer has not yet heard, or the scheduler named it before).
        this.#release(ts.key);
        if (got !== fetched || fetched === ts.version) ts.whoHas.delete(ev.peer); // it lacks the version wanted
        if (ts.dependents.size) this.#wantFetch(ts); // "" blames no holder: where is it now?
        else this.#forget(ts);
      } else if (has && ts.state === "flight") {
        keep(ts);
      } else if (ts.state === "flight") {
        ts.whoHas.delete(ev.peer);
        if (ts.dependents.size) this.#wantFetch(ts, ev.peer);
        else this.#forget(ts);
      } else {
        // Freed, stored or made a task here while in flight.
        if (ts.state === "cancelled-flight") this.#forgetCancelledFlight(ts);
        if (has) {
          // The IO layer stored it if a record wanted it: keep it only for one
          // that wants this version.
          const cur = this.tasks.get(ts.key);
          if (cur && ["fetch", "flight", "missing"].includes(cur.state) && cur.version === got) {
            // Wanted again from elsewhere: it is here now.
            this.fetch.delete(cur);
            keep(cur);
          } else if (cur?.state !== "memory") {
            this.#release(ts.key);
          }
        }
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
    // With the version of each (as the scheduler named it): the scheduler takes
    // a copy only of the value the key has now.
    if (any) this.#send({ op: "add_keys", nbytes: arrived, versions });
  }

  #stored(nbytes, versions) {
    for (const [key, n] of Object.entries(nbytes)) {
      let ts = this.tasks.get(key);
      if (ts === undefined) {
        ts = new WTask(key);
        this.tasks.set(key, ts);
      }
      this.fetch.delete(ts);
      ts.nbytes = n;
      ts.version = versions[key] ?? 0;
      if (ts.state !== "memory") {
        // From any state: a fetch in flight for it, or a queued run of it,
        // finds it in memory and is ignored.  A run in progress keeps its slot
        // (and resources) until it ends; its value is not stored (#runEnded).
        this.log.push([ts.key, ts.state, "memory", this.stimulus]);
        ts.state = "memory";
        this.#arrived(ts);
      }
    }
    // The IO layer stored the values before this batch ran: a free earlier in
    // the batch (a scatter over a key held here) must not drop them.
    this.out = this.out.flatMap((inst) => {
      if (inst.type !== "release-data" || !inst.keys.some((k) => Object.hasOwn(nbytes, k))) return [inst];
      const keys = inst.keys.filter((k) => !Object.hasOwn(nbytes, k));
      return keys.length ? [{ type: "release-data", keys }] : [];
    });
  }

  /** Where the current value of keys is, and its version (keys not listed: 0). */
  #updateWhoHas(whoHas, versions) {
    for (const [key, holders] of Object.entries(whoHas)) {
      const ts = this.tasks.get(key);
      if (!ts) continue;
      const version = versions[key] ?? 0;
      if (ts.state === "memory") {
        if (ts.version !== version) {
          // The copy here is of a value the key no longer has (scattered over).
          if (this.#wanted(ts)) {
            this.#replace(ts, holders, version);
          } else {
            this.#release(key);
            this.#forget(ts);
          }
        }
        continue;
      }
      if (ts.state === "flight") {
        if (ts.version !== version) this.#retarget(ts, holders, version);
        continue;
      }
      if (!["missing", "fetch"].includes(ts.state)) continue;
      ts.version = version;
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
    /** @type {Set<WTask>} insertion-ordered */
    const held = new Set();
    for (const key of keys) {
      const ts = this.tasks.get(key);
      if (!ts) continue;
      if (ts.state === "memory") {
        held.add(ts); // after the tasks freed with it, which may be what needs it
        continue;
      }
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
      this.fetch.delete(ts);
      this.#forget(ts);
    }
    for (const ts of held) {
      if (this.#wanted(ts)) {
        // Local tasks that have not started still need it: the scheduler
        // replaced the value (a scatter over the key).  Ask where it is now.
        this.#replace(ts, [], ts.version);
        continue;
      }
      dropped.push(ts.key);
      this.#forget(ts);
    }
    if (dropped.length) this.#release(...dropped);
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
        ts.held = this.resourcePool.acquire(ts.resources);
        ts.holds = true;
      }
      this.#move(ts, "executing");
      this.executing.add(ts);
      this.out.push({ type: "execute", key: ts.key, spec: ts.spec, resources: taskResources(ts.holds ? ts.resources : null, ts.held) });
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
      this.inFlight.set(peer, new Map(batch.map((ts) => [ts, ts.version]))); // what lands is of that version
      this.out.push({ type: "gather", peer, keys: batch.map((t) => t.key) });
    }
  }

  // -- invariants -----------------------------------------------------------------------
  /** Throw if an invariant is broken (tests call it after every event). */
  validate() {
    const held = [];
    for (const ts of this.executing) {
      // memory: data was stored for it while it ran; forgotten: then freed
      if (!["executing", "cancelled", "memory", "forgotten"].includes(ts.state)) throw new Error(`executing set holds ${ts.key} in ${ts.state}`);
      if (ts.holds) held.push([ts.resources, ts.held]);
    }
    if (this.executing.size > this.nthreads) throw new Error(`${this.executing.size} tasks executing, nthreads ${this.nthreads}`);
    // Amounts and indices: what the books say is used is what running tasks hold, never beyond the offer.
    this.resourcePool.validate(held);
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
