// Abstract resources (docs/resources.md): validating offers and demands, the
// CLI syntax, and the pure pool a worker's state machine keeps its books in.
//
// A port of src/corral/resources.py.  An offer of indices ("GPU=[0,1]") is an
// amount of 2 to the scheduler; on the worker each running task is given
// which indices it holds:
//
// * the whole part of a demand takes that many free indices, held by the task
//   alone ({GPU: 2} holds two);
// * a fractional part shares one index with other fractional holders while
//   the shares on it add up to at most 1 (best fit: the fullest index that
//   still has room, so whole indices stay free);
// * so {GPU: 1.5} holds one index alone and half of another.

const EPS = 1e-9;

/** A bad offer or demand; the message names the resource and the value. */
export class ResourceError extends Error {
  constructor(message) {
    super(message);
    this.name = "ResourceError";
  }
}

function show(value) {
  if (typeof value === "number") return Number.isNaN(value) ? "NaN" : String(value);
  try {
    return JSON.stringify(value) ?? String(value);
  } catch {
    return String(value);
  }
}

const isPlainObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v) && !ArrayBuffer.isView(v);

function checkName(name, what) {
  if (typeof name !== "string" || !name) throw new ResourceError(`${what}: resource names must be non-empty strings, got ${show(name)}`);
}

function checkAmount(name, amount, what) {
  if (typeof amount !== "number") throw new ResourceError(`${what}: ${name} must be a number, got ${show(amount)}`);
  if (!Number.isFinite(amount) || amount < 0) {
    throw new ResourceError(`${what}: ${name} must be a finite non-negative number, got ${show(amount)}`);
  }
  return amount;
}

/**
 * Check a task's demand `{name: amount}`; return it (`{}` for null/undefined).
 * @param {Record<string, number> | null | undefined} demand
 * @param {string} [what]  names the demand in errors
 * @returns {Record<string, number>}
 * @throws {ResourceError} naming the bad entry, e.g. "resources: GPU must be a finite non-negative number, got -1"
 */
export function validateDemand(demand, what = "resources") {
  if (demand == null) return {};
  if (!isPlainObject(demand)) throw new ResourceError(`${what} must be an object of name to amount, not ${show(demand)}`);
  const out = {};
  for (const [name, amount] of Object.entries(demand)) {
    checkName(name, what);
    if (Array.isArray(amount)) {
      throw new ResourceError(
        `${what}: ${name} must be a number, got ${show(amount)} (lists of indices are for what workers offer, not what tasks demand)`,
      );
    }
    out[name] = checkAmount(name, amount, what);
  }
  return out;
}

/**
 * Check a worker's offer: amounts, or arrays of distinct indices (non-negative
 * integers or non-empty strings).
 * @param {Record<string, number | Array<number|string>> | null | undefined} offer
 * @param {string} [what]
 * @returns {Record<string, number | Array<number|string>>}
 * @throws {ResourceError}
 */
export function validateOffer(offer, what = "worker resources") {
  if (offer == null) return {};
  if (!isPlainObject(offer)) throw new ResourceError(`${what} must be an object of name to amount, not ${show(offer)}`);
  const out = {};
  for (const [name, value] of Object.entries(offer)) {
    checkName(name, what);
    if (!Array.isArray(value)) {
      out[name] = checkAmount(name, value, what);
      continue;
    }
    const seen = new Set();
    for (const index of value) {
      if (typeof index === "number") {
        if (!Number.isInteger(index)) throw new ResourceError(`${what}: ${name} index ${show(index)} is not an integer or a string`);
        if (index < 0) throw new ResourceError(`${what}: ${name} index ${index} is negative`);
      } else if (typeof index === "string") {
        if (!index) throw new ResourceError(`${what}: ${name} has an empty index`);
      } else {
        throw new ResourceError(`${what}: ${name} index ${show(index)} is not an integer or a string`);
      }
      if (seen.has(index)) throw new ResourceError(`${what}: ${name} lists index ${show(index)} twice`);
      seen.add(index);
    }
    out[name] = [...value];
  }
  return out;
}

/** Split on commas outside brackets: "GPU=[0,1],MEM=2" -> two parts. */
function splitTopLevel(text) {
  const parts = [];
  let cur = "";
  let depth = 0;
  for (const ch of text) {
    if (ch === "[") depth++;
    if (ch === "]") depth--;
    if (ch === "," && depth === 0) {
      parts.push(cur);
      cur = "";
    } else cur += ch;
  }
  parts.push(cur);
  return parts;
}

function parseIndex(text) {
  const t = text.trim().replace(/^['"]|['"]$/g, "");
  return /^\d+$/.test(t) ? Number(t) : t;
}

/**
 * Parse the CLI form: "GPU=2,MEMORY=100e9", "GPU=[0,1]" (indexed), and, when
 * `options.detect` is given, "auto" (alone or as one item: "auto,LICENSE=1";
 * items after it override what it found).
 * @param {string} text
 * @param {string} [what]  names the source in errors (the option or variable)
 * @param {{detect?: () => Record<string, any>}} [options]
 * @returns {Record<string, number | Array<number|string>>}
 * @throws {ResourceError}
 */
export function parseResources(text, what = "--resources", { detect } = {}) {
  if (typeof text !== "string") throw new ResourceError(`${what} must be a string like 'GPU=2,MEMORY=100e9', got ${show(text)}`);
  const out = {};
  for (let part of splitTopLevel(text)) {
    part = part.trim();
    if (!part) continue;
    if (part.toLowerCase() === "auto") {
      if (!detect) throw new ResourceError(`${what}: 'auto' is understood only where resources can be detected (the worker's command line)`);
      Object.assign(out, detect());
      continue;
    }
    const eq = part.indexOf("=");
    const name = eq > 0 ? part.slice(0, eq).trim() : "";
    const value = eq > 0 ? part.slice(eq + 1).trim() : "";
    if (!name) throw new ResourceError(`${what}: ${show(part)} is not of the form NAME=AMOUNT or NAME=[i,j,...]`);
    if (value.startsWith("[")) {
      if (!value.endsWith("]")) throw new ResourceError(`${what}: ${name}: ${show(value)} has no closing bracket`);
      const inner = value.slice(1, -1).trim();
      out[name] = inner ? inner.split(",").map(parseIndex) : [];
      continue;
    }
    // "inf" and "nan" are numbers (as in Python), refused below as not finite.
    const infinite = /^[+-]?inf(inity)?$/i.exec(value);
    const amount = infinite ? (value.startsWith("-") ? -Infinity : Infinity) : value === "" ? NaN : Number(value);
    if (Number.isNaN(amount) && !/^[+-]?nan$/i.test(value)) throw new ResourceError(`${what}: ${name}: ${show(value)} is not a number`);
    out[name] = amount;
  }
  return validateOffer(out, what);
}

/**
 * The amounts of an offer (what the scheduler is told): a list of indices counts as its length.
 * @param {Record<string, number | any[]>} offer
 * @returns {Record<string, number>}
 */
export function resourceAmounts(offer) {
  const out = {};
  for (const [k, v] of Object.entries(offer)) out[k] = Array.isArray(v) ? v.length : v;
  return out;
}

/**
 * What a running task sees: the indices it holds of indexed resources, the
 * amount it demanded of the others ({GPU: [1], MEM: 5}).
 * @param {Record<string, number> | null} demand
 * @param {Record<string, Array<[number|string, number]>> | null} held  as ResourcePool.acquire returned it
 * @returns {Record<string, number | Array<number|string>>}
 */
export function taskResources(demand, held) {
  const out = { ...(demand ?? {}) };
  for (const [name, taken] of Object.entries(held ?? {})) out[name] = taken.map(([index]) => index);
  return out;
}

/**
 * A worker's resources: totals, what is free, and which running task holds
 * which index.  Pure bookkeeping: the state machine asks `fits`, calls
 * `acquire` when a task starts and `release` when it ends.
 */
export class ResourcePool {
  /** @param {Record<string, number | any[]>} [offer] */
  constructor(offer = {}) {
    /** @type {Record<string, number>} */
    this.total = {};
    /** @type {Record<string, number>} */
    this.available = {};
    /** @type {Record<string, number>} */
    this.used = {};
    /** @type {Record<string, any[]>} the indices offered, per indexed resource */
    this.indices = {};
    /** @type {Record<string, Map<any, number>>} share in use per index (dropped indices stay until free) */
    this.usage = {};
    /** @type {Record<string, number>} what running tasks hold beyond a total lowered while they ran */
    this.allowance = {};
    this.update(offer);
  }

  /** The current offer, indices as arrays. */
  offer() {
    const out = {};
    for (const [k, v] of Object.entries(this.total)) out[k] = this.indices[k] ? [...this.indices[k]] : v;
    return out;
  }

  /** Set the named resources (others unchanged); running tasks keep what they hold. */
  update(offer) {
    for (const [name, value] of Object.entries(offer)) {
      let total;
      if (Array.isArray(value)) {
        this.indices[name] = [...value];
        this.usage[name] ??= new Map();
        for (const index of value) if (!this.usage[name].has(index)) this.usage[name].set(index, 0);
        total = value.length;
      } else {
        delete this.indices[name];
        total = Number(value);
      }
      this.total[name] = total;
      this.used[name] ??= 0;
      this.allowance[name] = Math.max(0, this.used[name] - total);
      this.available[name] = total - this.used[name];
      this.#prune(name);
    }
  }

  /** Forget indices no longer offered once nobody holds them. */
  #prune(name) {
    const usage = this.usage[name];
    if (!usage) return;
    const current = new Set(this.indices[name] ?? []);
    for (const [index, share] of [...usage]) if (!current.has(index) && share <= EPS) usage.delete(index);
    if (!usage.size && !this.indices[name]) delete this.usage[name];
  }

  /**
   * Which indices `demand` would take now, or null if it does not fit.
   * @returns {Record<string, Array<[any, number]>> | null}
   */
  plan(demand) {
    const plan = {};
    for (const [name, amount] of Object.entries(demand ?? {})) {
      if (amount <= EPS) continue;
      if ((this.available[name] ?? 0) < amount - EPS) return null;
      const indices = this.indices[name];
      if (!indices) continue;
      const usage = this.usage[name];
      const whole = Math.floor(amount + EPS);
      let frac = amount - whole;
      if (frac <= EPS) frac = 0;
      const free = indices.filter((i) => (usage.get(i) ?? 0) <= EPS);
      if (free.length < whole) return null;
      const taken = free.slice(0, whole).map((i) => [i, 1]);
      if (frac) {
        const shared = indices.filter((i) => (usage.get(i) ?? 0) > EPS && usage.get(i) + frac <= 1 + EPS);
        let best;
        if (shared.length) {
          best = shared.reduce((a, b) => (usage.get(b) > usage.get(a) ? b : a));
        } else if (free.length > whole) {
          best = free[whole];
        } else {
          return null;
        }
        taken.push([best, frac]);
      }
      plan[name] = taken;
    }
    return plan;
  }

  /** Whether a task demanding `demand` could start now. */
  fits(demand) {
    return !demand || this.plan(demand) !== null;
  }

  /**
   * Take `demand` for a task that starts now.
   * @returns {Record<string, Array<[any, number]>>} the indices it holds (with its share of each)
   * @throws {ResourceError} if it does not fit (callers ask `fits` first)
   */
  acquire(demand) {
    const plan = this.plan(demand);
    if (plan === null) {
      throw new ResourceError(`${JSON.stringify(demand)} does not fit in what is available: ${JSON.stringify(this.available)}`);
    }
    for (const [name, amount] of Object.entries(demand)) {
      this.used[name] = (this.used[name] ?? 0) + amount;
      this.available[name] = (this.available[name] ?? 0) - amount;
    }
    for (const [name, taken] of Object.entries(plan)) {
      const usage = this.usage[name];
      for (const [index, share] of taken) usage.set(index, (usage.get(index) ?? 0) + share);
    }
    return plan;
  }

  /** Give back what a task took when it started (`held`: what `acquire` returned). */
  release(demand, held) {
    for (const [name, amount] of Object.entries(demand)) {
      const used = Math.max(0, (this.used[name] ?? 0) - amount);
      this.used[name] = used < EPS ? 0 : used;
      const total = this.total[name] ?? 0;
      this.available[name] = total - this.used[name];
      this.allowance[name] = Math.max(0, Math.min(this.allowance[name] ?? 0, this.used[name] - total));
    }
    for (const [name, taken] of Object.entries(held ?? {})) {
      const usage = this.usage[name];
      if (!usage) continue;
      for (const [index, share] of taken) if (usage.has(index)) usage.set(index, Math.max(0, usage.get(index) - share));
      this.#prune(name);
    }
  }

  /**
   * Check the books against what the executing tasks hold; throw naming what is off.
   * @param {Array<[Record<string, number>, Record<string, Array<[any, number]>> | null]>} held  [demand, allocation] per running task
   */
  validate(held) {
    const used = {};
    const perIndex = {};
    for (const [demand, allocation] of held) {
      for (const [name, amount] of Object.entries(demand)) used[name] = (used[name] ?? 0) + amount;
      for (const [name, taken] of Object.entries(allocation ?? {})) {
        const seen = new Set();
        for (const [index, share] of taken) {
          if (seen.has(index)) throw new Error(`${name} index ${show(index)} taken twice by one task`);
          seen.add(index);
          perIndex[name] ??= new Map();
          perIndex[name].set(index, (perIndex[name].get(index) ?? 0) + share);
        }
      }
    }
    for (const name of new Set([...Object.keys(this.total), ...Object.keys(used)])) {
      const u = used[name] ?? 0;
      const total = this.total[name] ?? 0;
      if (Math.abs((this.used[name] ?? 0) - u) > 1e-6) throw new Error(`resource ${name}: books say ${this.used[name]} used, tasks hold ${u}`);
      if (Math.abs((this.available[name] ?? 0) - (total - u)) > 1e-6) throw new Error(`resource ${name}: available is off`);
      if (u > total + (this.allowance[name] ?? 0) + 1e-6) throw new Error(`resource ${name} oversubscribed: ${u} > ${total}`);
    }
    for (const [name, shares] of Object.entries(perIndex)) {
      for (const [index, share] of shares) {
        if (share > 1 + 1e-6) throw new Error(`resource ${name} index ${show(index)} held ${share} times over`);
        if (Math.abs((this.usage[name]?.get(index) ?? 0) - share) > 1e-6) throw new Error(`resource ${name} index ${show(index)}: books are off`);
      }
    }
  }
}
