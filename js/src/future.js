// Futures: a client's handle on a remote value, and the errors it rejects with.
//
// Every Future of one key in one client shares a FutureState (what the
// scheduler said about the key); the client counts the Futures holding each
// state and tells the scheduler when the last one is released.

/** A task failed on a worker: the remote error, rebuilt. */
export class RemoteError extends Error {
  /** @param {{typename: string, message: string, traceback_text?: string}} info  an ErrorInfo record */
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
  /**
   * @param {string} key
   * @param {string} reason  as the scheduler said it, e.g. "cancelled" or "lost: its worker left"
   * @param {boolean} [lost]  the data was lost, not cancelled on purpose
   */
  constructor(key, reason, lost = false) {
    super(`${key}: ${reason}`);
    this.name = "CancelledError";
    this.key = key;
    this.reason = reason;
    this.lost = lost;
  }
}

/** What the client knows of one key; shared by every Future of that key. */
export class FutureState {
  /** @param {string} key */
  constructor(key) {
    this.key = key;
    /** pending | finished | error | cancelled */
    this.status = "pending";
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

  /** Wake everything waiting for the key to be done. */
  settle() {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Resolves once the key is not pending. */
  done() {
    if (this.status !== "pending") return Promise.resolve();
    return new Promise((r) => this.waiters.push(r));
  }

  /**
   * The key's value is in memory on `whoHas` (a small one may come along as
   * `payload`).  `fresh`: it is a new value (scattered over the key), so a
   * value decoded before is not it.
   */
  finish(whoHas, typename, payload, { fresh = false } = {}) {
    if (fresh) {
      this.hasValue = false;
      this.value = undefined;
      this.payload = null;
    }
    this.status = "finished";
    this.error = null;
    this.whoHas = whoHas ?? [];
    this.typename = typename ?? null;
    if (payload) this.payload = payload;
    this.settle();
  }

  /** The key failed (status "error") or was cancelled (status "cancelled") with `error`. */
  fail(status, error) {
    this.status = status;
    this.error = error;
    this.settle();
  }
}

/** A remote value: the result of a task (or scattered data), once it is there. */
export class Future {
  /**
   * Futures are made by a Client (submit, map, compute, scatter), not directly.
   * @param {import("./client.js").Client} client
   * @param {string} key
   */
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
