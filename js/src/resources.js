// Abstract resources: parsing the CLI form and the pool a worker holds.
//
// Amounts only: an offer of indices ("GPU=[0,1]") counts as its length; JS
// workers do not hand out indices to tasks.

const EPS = 1e-9;

/**
 * Parse "GPU=2,MEMORY=100e9" (or "GPU=[0,1]") into {name: amount | [index]}.
 * @param {string} text
 */
export function parseResources(text, what = "--resources") {
  const out = {};
  if (!text) return out;
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
  for (let part of parts) {
    part = part.trim();
    if (!part) continue;
    const eq = part.indexOf("=");
    const name = eq > 0 ? part.slice(0, eq).trim() : "";
    const value = eq > 0 ? part.slice(eq + 1).trim() : "";
    if (!name) throw new Error(`${what}: ${JSON.stringify(part)} is not of the form NAME=AMOUNT or NAME=[i,j,...]`);
    if (value.startsWith("[")) {
      if (!value.endsWith("]")) throw new Error(`${what}: ${name}: ${JSON.stringify(value)} has no closing bracket`);
      const inner = value.slice(1, -1).trim();
      out[name] = inner ? inner.split(",").map((i) => (/^\s*\d+\s*$/.test(i) ? Number(i) : i.trim().replace(/^['"]|['"]$/g, ""))) : [];
      continue;
    }
    const amount = Number(value);
    if (value === "" || !Number.isFinite(amount) || amount < 0) {
      throw new Error(`${what}: ${name}: ${JSON.stringify(value)} is not a finite non-negative number`);
    }
    out[name] = amount;
  }
  return out;
}

/** The amounts of an offer: a list of indices counts as its length. */
export function resourceAmounts(offer) {
  const out = {};
  for (const [k, v] of Object.entries(offer)) out[k] = Array.isArray(v) ? v.length : v;
  return out;
}

/** A worker's resources: totals, what is used and what is free (pure bookkeeping). */
export class ResourcePool {
  constructor(offer = {}) {
    this.total = {};
    this.available = {};
    this.used = {};
    this.update(offer);
  }

  /** Set the named resources (others unchanged); running tasks keep what they hold. */
  update(offer) {
    for (const [name, value] of Object.entries(offer)) {
      const total = Array.isArray(value) ? value.length : Number(value);
      this.total[name] = total;
      this.used[name] ??= 0;
      this.available[name] = total - this.used[name];
    }
  }

  fits(demand) {
    if (!demand) return true;
    for (const [name, amount] of Object.entries(demand)) {
      if (amount <= EPS) continue;
      if ((this.available[name] ?? 0) < amount - EPS) return false;
    }
    return true;
  }

  acquire(demand) {
    for (const [name, amount] of Object.entries(demand)) {
      this.used[name] = (this.used[name] ?? 0) + amount;
      this.available[name] = (this.total[name] ?? 0) - this.used[name];
    }
  }

  release(demand) {
    for (const [name, amount] of Object.entries(demand)) {
      this.used[name] = (this.used[name] ?? 0) - amount;
      if (Math.abs(this.used[name]) < EPS) this.used[name] = 0;
      this.available[name] = (this.total[name] ?? 0) - this.used[name];
    }
  }
}

