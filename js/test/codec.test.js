// Framing, headers and the handshake HMAC, checked against the worked
// examples of docs/protocol.md (byte for byte).

import assert from "node:assert/strict";
import { test } from "node:test";

import { ProtocolError, decodeMessage, decodePayload, encodeMessage, msgpackPayload, packValue, unpackValue } from "../src/codec.js";
import { answerChallenge, parseAddress, formatAddress } from "../src/comm.js";
import { FrameDecoder, encodeFrames } from "../src/framing.js";

const hex = (s) => Buffer.from(s.replace(/\s+/g, ""), "hex");
const join = (bufs) => Buffer.concat(bufs.map((b) => Buffer.from(b)));

test("worked example: one small message", () => {
  const frames = encodeMessage([{ op: "get_data", keys: ["x"] }]);
  assert.equal(frames.length, 1);
  assert.deepEqual(Buffer.from(frames[0]), hex("91 82 a2 6f 70 a8 67 65 74 5f 64 61 74 61 a4 6b 65 79 73 91 a1 78"));
  const wire = join(encodeFrames(frames));
  assert.equal(wire.length, 38);
  assert.deepEqual(wire.subarray(0, 16), hex("01 00 00 00 00 00 00 00 16 00 00 00 00 00 00 00"));
});

test("worked example: an out-of-band frame is resolved", () => {
  const wire = hex(`02 00 00 00 00 00 00 00  35 00 00 00 00 00 00 00  01 00 00 00 00 00 00 00
    91 82 a2 6f 70 a5 73 74 6f 72 65 a4 64 61 74 61 81 a1 6b 82 aa 73 65 72
    69 61 6c 69 7a 65 72 a7 6d 73 67 70 61 63 6b a6 66 72 61 6d 65 73 91 d6
    01 01 00 00 00  2a`);
  assert.equal(wire.length, 78);
  const dec = new FrameDecoder();
  // Byte by byte: the decoder is incremental.
  let messages = [];
  for (const b of wire) messages = messages.concat(dec.feed(Uint8Array.of(b)));
  assert.equal(messages.length, 1);
  const [op] = decodeMessage(messages[0]);
  assert.equal(op.op, "store");
  assert.equal(op.data.k.serializer, "msgpack");
  assert.deepEqual(Buffer.from(op.data.k.frames[0]), hex("2a"));
  assert.equal(decodePayload(op.data.k), 42);
});

test("large binary values travel out of band and come back", () => {
  const big = new Uint8Array(100_000).fill(3);
  const frames = encodeMessage([{ op: "data", data: { k: { serializer: "msgpack", frames: [big] } }, missing: [] }]);
  assert.equal(frames.length, 2);
  assert.equal(frames[1].byteLength, 100_000);
  const dec = new FrameDecoder();
  const [msg] = dec.feed(join(encodeFrames(frames)));
  const [op] = decodeMessage(msg);
  assert.deepEqual(Buffer.from(op.data.k.frames[0]), Buffer.from(big));
});

test("a single op map is a batch of one; nil fields are left out", () => {
  const single = packValue({ op: "heartbeat", metrics: {} });
  assert.deepEqual(decodeMessage([single]), [{ op: "heartbeat", metrics: {} }]);
  const [header] = encodeMessage([{ op: "unregister", reason: undefined, x: null }]);
  assert.deepEqual(unpackValue(header), [{ op: "unregister" }]);
});

test("protocol errors: bad frame counts, lengths, headers and references", () => {
  assert.throws(() => new FrameDecoder().feed(hex("00 00 00 00 00 00 00 00")), ProtocolError);
  assert.throws(() => new FrameDecoder({ maxFrames: 16 }).feed(hex("11 00 00 00 00 00 00 00")), ProtocolError);
  assert.throws(
    () => new FrameDecoder({ maxFrameBytes: 1024 }).feed(hex("01 00 00 00 00 00 00 00 01 04 00 00 00 00 00 00")),
    ProtocolError,
  );
  assert.throws(() => decodeMessage([packValue(3)]), ProtocolError);
  assert.throws(() => decodeMessage([hex("c1")]), ProtocolError);
  // frame reference 5 in a message of one frame
  assert.throws(() => decodeMessage([hex("81 a2 6f 70 d6 01 05 00 00 00")]), ProtocolError);
});

test("integers: 64-bit values decode exactly; big safe integers encode as ints", () => {
  assert.equal(unpackValue(packValue(2 ** 40)), 2 ** 40);
  assert.equal(packValue(2 ** 40)[0], 0xcf); // uint 64, not a float
  assert.equal(unpackValue(hex("cf 00 20 00 00 00 00 00 01")), 2n ** 53n + 1n);
  assert.equal(unpackValue(packValue(1.5)), 1.5);
});

test("payloads: plain data only", () => {
  assert.deepEqual(decodePayload(msgpackPayload({ a: [1, "x", null, true] })), { a: [1, "x", null, true] });
  assert.throws(() => msgpackPayload(() => 1), /not plain data/);
  assert.throws(() => msgpackPayload(new Map()), /not plain data/);
  assert.throws(() => decodePayload({ serializer: "pickle", frames: [Uint8Array.of(0x80)] }), /cannot decode a "pickle" payload/);
});

test("HMAC example of the handshake section", () => {
  const challenge = Uint8Array.from({ length: 32 }, (_, i) => i);
  assert.equal(answerChallenge("secret", challenge).toString("hex"), "47860bcbb991426bea828dbf6097dff33339b093e3b9f61d9aef8a052f93e402");
});

test("addresses", () => {
  assert.deepEqual(parseAddress("tcp://127.0.0.1:8786"), { scheme: "tcp", host: "127.0.0.1", port: 8786 });
  assert.deepEqual(parseAddress("tcp://[::1]:8786"), { scheme: "tcp", host: "::1", port: 8786 });
  assert.deepEqual(parseAddress("tls://node-1:40123"), { scheme: "tls", host: "node-1", port: 40123 });
  assert.equal(formatAddress("::1", 1), "tcp://[::1]:1");
  assert.equal(formatAddress("10.0.0.5", 2, "tls"), "tls://10.0.0.5:2");
  assert.throws(() => parseAddress("127.0.0.1:8786"), /not a tcp:\/\/HOST:PORT or tls:\/\/HOST:PORT address/);
  assert.throws(() => parseAddress("udp://127.0.0.1:8786"));
});
