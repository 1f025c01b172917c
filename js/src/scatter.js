// Packing local data for `scatter` (docs/protocol.md, "scatter" and
// "Sequences: Scatter"), as the Python client does: one msgpack payload per
// value, its key and its size; and the shape of the answer.
//
// * an array: one value per item, an array of futures back;
// * a plain object: one value per property, named by it (the property is the
//   key on the cluster), an object of futures back;
// * anything else: one value, one future back.
//
// Keys of unnamed values are `type-digest`, the digest of the payload (equal
// values share a key), or random with `hash: false`.

import crypto from "node:crypto";

import { msgpackPayload, payloadBytes, typeName } from "./codec.js";
import { Future } from "./future.js";
import { randomId } from "./taskspec.js";

const isPlainObject = (v) =>
  v !== null && typeof v === "object" && (Object.getPrototypeOf(v) === Object.prototype || Object.getPrototypeOf(v) === null);

function payloadDigest(payload) {
  const h = crypto.createHash("sha256").update(payload.serializer);
  for (const f of payload.frames) h.update(f);
  return h.digest("hex").slice(0, 32);
}

/** A Future somewhere inside `value` (whose own fields are not data), or null. */
function findFuture(value, depth) {
  if (value instanceof Future) return value;
  if (value === null || typeof value !== "object" || ArrayBuffer.isView(value) || depth > 100) return null;
  for (const v of Array.isArray(value) ? value : Object.values(value)) {
    const found = findFuture(v, depth + 1);
    if (found) return found;
  }
  return null;
}

/**
 * @typedef {{name: string | number | null, key: string, payload: {serializer: string, frames: Uint8Array[]}, nbytes: number, typename: string}} ScatterItem
 */

/**
 * The items to scatter and the shape the futures come back in.
 * @param {any} data
 * @param {{hash?: boolean}} [options]
 * @returns {{shape: "one" | "array" | "object", items: ScatterItem[]}}
 * @throws {TypeError} for a Future in the data or an empty key;
 *   SerializationError for a value that is not plain data
 */
export function packScatter(data, { hash = true } = {}) {
  let shape;
  let entries;
  if (Array.isArray(data)) {
    shape = "array";
    entries = data.map((v, i) => [i, v]);
  } else if (isPlainObject(data)) {
    shape = "object";
    entries = Object.entries(data);
  } else {
    shape = "one";
    entries = [[null, data]];
  }
  const items = entries.map(([name, value]) => {
    const future = findFuture(value, 0);
    if (future) throw new TypeError(`cannot scatter a Future (${future.key}): its value is on the cluster already; pass the Future itself to tasks`);
    let payload;
    try {
      payload = msgpackPayload(value === undefined ? null : value);
    } catch (err) {
      err.message = `scatter${name === null ? "" : ` ${JSON.stringify(name)}`}: ${err.message}`;
      throw err;
    }
    const typename = typeName(value);
    let key;
    if (shape === "object") {
      if (!name) throw new TypeError("scatter: a key must be a non-empty string");
      key = name;
    } else {
      key = `${typename}-${hash ? payloadDigest(payload) : randomId(16)}`;
    }
    return { name, key, payload, nbytes: payloadBytes(payload), typename };
  });
  return { shape, items };
}

/**
 * The futures, in the shape the data had.
 * @param {"one" | "array" | "object"} shape
 * @param {ScatterItem[]} items
 * @param {Future[]} futures  one per item, in order
 */
export function shapeScatterResult(shape, items, futures) {
  if (shape === "one") return futures[0];
  if (shape === "array") return futures;
  return Object.fromEntries(items.map((it, i) => [it.name, futures[i]]));
}
