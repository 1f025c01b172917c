// Message headers and payloads: msgpack, as docs/protocol.md sections 3 and 4 say.
//
// Frame 0 of every message is a msgpack array of op maps.  Any bin value of
// the header may travel out of band: it is replaced by the msgpack extension
// type 1 whose 4-byte body is the frame's index (u32 little-endian).
//
// Integers: msgpack ints that fit a JavaScript number exactly (|x| <= 2^53 - 1)
// decode to numbers; larger 64-bit ones to BigInt.  Integral numbers encode as
// msgpack ints (up to 64-bit), the others as float 64.

import { Decoder, Encoder, ExtData, ExtensionCodec } from "@msgpack/msgpack";

/** Extension type of an out-of-band frame reference. */
export const FRAME_REF = 1;

/** In task arguments, {REF_KEY: key} stands for the value of `key` (a dependency). */
export const REF_KEY = "__corral_ref__";

/** Payload frames at least this long are sent out of band (as Python does). */
export const OUT_OF_BAND_MIN = 64 * 1024;

const MAX_SAFE = BigInt(Number.MAX_SAFE_INTEGER);

class IntDecoder extends Decoder {
  readU64AsBigInt() {
    const v = super.readU64AsBigInt();
    return v <= MAX_SAFE ? Number(v) : v;
  }

  readI64AsBigInt() {
    const v = super.readI64AsBigInt();
    return v <= MAX_SAFE && v >= -MAX_SAFE ? Number(v) : v;
  }
}

class IntEncoder extends Encoder {
  encodeNumber(n) {
    // The base class writes safe integers beyond 32 bits as floats when
    // BigInt support is on; they are ints on the wire (nbytes, timestamps).
    if (Number.isSafeInteger(n) && (n >= 0x100000000 || n < -0x80000000)) {
      this.encodeBigInt64(BigInt(n));
    } else {
      super.encodeNumber(n);
    }
  }
}

/** Error for payloads that cannot be encoded or decoded here. */
export class SerializationError extends Error {
  constructor(message) {
    super(message);
    this.name = "SerializationError";
  }
}

/** Error for bytes or messages that break the protocol (the connection is closed). */
export class ProtocolError extends Error {
  constructor(message) {
    super(message);
    this.name = "ProtocolError";
  }
}

// -- plain values (payloads) -----------------------------------------------------
const valueEncoder = new IntEncoder({ useBigInt64: true });
const valueDecoder = new IntDecoder({ useBigInt64: true });

/** Encode a plain value (numbers, strings, booleans, null, arrays, objects, bytes). */
export function packValue(value) {
  return valueEncoder.encode(value);
}

/** Decode one msgpack object. */
export function unpackValue(bytes) {
  return valueDecoder.decode(bytes);
}

/**
 * A payload: `{serializer, frames}` (docs/protocol.md section 4).
 * @typedef {{serializer: string, frames: Uint8Array[]}} Payload
 */

/** The "msgpack" payload of `value`; throws SerializationError if it is not plain data. */
export function msgpackPayload(value) {
  checkPlain(value, 0);
  try {
    return { serializer: "msgpack", frames: [packValue(value)] };
  } catch (err) {
    throw new SerializationError(`cannot encode the value as msgpack: ${err.message}`);
  }
}

function checkPlain(value, depth) {
  if (depth > 100) throw new SerializationError("value nested more than 100 levels deep");
  const t = typeof value;
  if (value === null || value === undefined || t === "number" || t === "string" || t === "boolean" || t === "bigint") {
    return;
  }
  if (t === "function" || t === "symbol") {
    throw new SerializationError(`a ${t} is not plain data (msgpack)`);
  }
  if (ArrayBuffer.isView(value) || value instanceof Date) return;
  if (Array.isArray(value)) {
    for (const v of value) checkPlain(v, depth + 1);
    return;
  }
  if (value instanceof Map || value instanceof Set) {
    throw new SerializationError(`a ${value.constructor.name} is not plain data: use an object or an array`);
  }
  for (const v of Object.values(value)) checkPlain(v, depth + 1);
}

/** Decode a payload's value; only "msgpack" payloads can be read in JavaScript. */
export function decodePayload(payload) {
  if (!payload || typeof payload.serializer !== "string" || !Array.isArray(payload.frames)) {
    throw new SerializationError("malformed payload");
  }
  if (payload.serializer !== "msgpack") {
    throw new SerializationError(
      `cannot decode a ${JSON.stringify(payload.serializer)} payload in JavaScript ` +
        `(only "msgpack"; Python values must be plain data to reach JavaScript)`,
    );
  }
  if (payload.frames.length < 1) throw new SerializationError("msgpack payload has no frames");
  try {
    return unpackValue(payload.frames[0]);
  } catch (err) {
    throw new SerializationError(`undecodable msgpack payload: ${err.message}`);
  }
}

/** The type name of a value as the JavaScript side reports it (task_finished.typename, scatter keys). */
export function typeName(v) {
  if (v === null || v === undefined) return "null";
  if (Array.isArray(v)) return "Array";
  if (typeof v === "object") return v.constructor?.name ?? "Object";
  return typeof v;
}

/** Total size in bytes of a payload's frames. */
export function payloadBytes(payload) {
  let n = 0;
  for (const f of payload.frames) n += f.byteLength;
  return n;
}

// -- headers -----------------------------------------------------------------------
// The frames of the message being decoded: the extension decoder resolves
// references against them (decoding is synchronous, so a module variable is safe).
let decodingFrames = null;

const headerCodec = new ExtensionCodec();
headerCodec.register({
  type: FRAME_REF,
  encode: () => null, // references are built explicitly by encodeHeader
  decode: (data) => {
    if (data.byteLength !== 4) throw new ProtocolError("frame reference must be 4 bytes");
    const index = new DataView(data.buffer, data.byteOffset, 4).getUint32(0, true);
    if (index < 1 || index >= decodingFrames.length) {
      throw new ProtocolError(`frame reference ${index} out of range`);
    }
    return decodingFrames[index];
  },
});

const headerEncoder = new IntEncoder({ useBigInt64: true, ignoreUndefined: true });
const headerDecoder = new IntDecoder({ useBigInt64: true, extensionCodec: headerCodec });

/**
 * Encode a batch of op maps into the frames of one message: the header, then
 * the out-of-band frames (bin values of at least OUT_OF_BAND_MIN bytes).
 * @param {object[]} ops
 * @returns {Uint8Array[]}
 */
export function encodeMessage(ops) {
  const extra = [];
  const moved = moveLarge(ops, extra);
  const header = headerEncoder.encode(moved);
  return [header, ...extra];
}

function moveLarge(value, extra) {
  if (value === null || typeof value !== "object") return value;
  if (ArrayBuffer.isView(value)) {
    if (value.byteLength < OUT_OF_BAND_MIN) return value;
    extra.push(value);
    const body = new Uint8Array(4);
    new DataView(body.buffer).setUint32(0, extra.length, true);
    return new ExtData(FRAME_REF, body);
  }
  if (value instanceof ExtData) return value;
  if (Array.isArray(value)) return value.map((v) => moveLarge(v, extra));
  const out = {};
  for (const [k, v] of Object.entries(value)) {
    if (v !== undefined && v !== null) out[k] = moveLarge(v, extra); // nil fields left out
  }
  return out;
}

/**
 * Decode the frames of one message into its list of op maps (not validated further).
 * @param {Uint8Array[]} frames
 * @returns {object[]}
 */
export function decodeMessage(frames) {
  decodingFrames = frames;
  let obj;
  try {
    obj = headerDecoder.decode(frames[0]);
  } catch (err) {
    if (err instanceof ProtocolError) throw err;
    throw new ProtocolError(`undecodable message header: ${err.message}`);
  } finally {
    decodingFrames = null;
  }
  if (obj !== null && typeof obj === "object" && !Array.isArray(obj) && !ArrayBuffer.isView(obj)) obj = [obj];
  if (!Array.isArray(obj) || !obj.every((m) => m !== null && typeof m === "object" && !Array.isArray(m) && !ArrayBuffer.isView(m))) {
    throw new ProtocolError("message header must be a map or an array of maps");
  }
  for (const m of obj) {
    if (typeof m.op !== "string") throw new ProtocolError("an op map has no string 'op'");
  }
  return obj;
}
