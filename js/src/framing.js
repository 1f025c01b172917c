// Length-prefixed frames (docs/protocol.md section 2):
//
//   u64 n_frames | u64 length[0] ... length[n-1] | frame[0] ... frame[n-1]
//
// all integers little-endian.  FrameDecoder is pure (no IO): feed it chunks
// and it returns whole messages (arrays of frames).

import { ProtocolError } from "./codec.js";

/** Most frames in one message (docs/protocol.md section 2). */
export const DEFAULT_MAX_FRAMES = 65536;
/** Largest frame accepted by default: 4 GiB. */
export const DEFAULT_MAX_FRAME_BYTES = 4 * 1024 ** 3;
/** Limits before the handshake completed (server side): frames per message ... */
export const HANDSHAKE_MAX_FRAMES = 16;
/** ... and bytes per frame. */
export const HANDSHAKE_MAX_FRAME_BYTES = 1024 * 1024;

/**
 * The buffers to write for one message made of `frames`.
 * @param {Uint8Array[]} frames
 * @returns {Uint8Array[]}
 */
export function encodeFrames(frames) {
  const prefix = Buffer.alloc(8 * (frames.length + 1));
  prefix.writeBigUInt64LE(BigInt(frames.length), 0);
  frames.forEach((f, i) => prefix.writeBigUInt64LE(BigInt(f.byteLength), 8 * (i + 1)));
  return [prefix, ...frames];
}

/** Cuts a byte stream into messages (arrays of frames), checking the limits before a frame's bytes arrive. */
export class FrameDecoder {
  constructor({ maxFrames = DEFAULT_MAX_FRAMES, maxFrameBytes = DEFAULT_MAX_FRAME_BYTES } = {}) {
    this.maxFrames = maxFrames;
    this.maxFrameBytes = maxFrameBytes;
    this.chunks = [];
    this.buffered = 0;
    this.nFrames = null;
    this.lengths = null;
    this.frames = [];
  }

  /** Take `n` bytes from the buffered chunks (n <= buffered). */
  take(n) {
    if (n === 0) return new Uint8Array(0);
    const first = this.chunks[0];
    if (first.byteLength >= n) {
      // Copy small frames out of the (possibly large) socket chunk.
      const out = Buffer.from(first.subarray(0, n));
      if (first.byteLength === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      this.buffered -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0];
      const k = Math.min(c.byteLength, n - filled);
      out.set(c.subarray(0, k), filled);
      filled += k;
      if (k === c.byteLength) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    this.buffered -= n;
    return out;
  }

  /**
   * Add received bytes; return the messages they completed.
   * @param {Uint8Array} chunk
   * @returns {Uint8Array[][]}
   */
  feed(chunk) {
    if (chunk.byteLength) {
      this.chunks.push(chunk);
      this.buffered += chunk.byteLength;
    }
    const out = [];
    for (;;) {
      if (this.nFrames === null) {
        if (this.buffered < 8) break;
        const n = Buffer.from(this.take(8)).readBigUInt64LE(0);
        if (n < 1n || n > BigInt(this.maxFrames)) {
          throw new ProtocolError(`message announces ${n} frames (limit ${this.maxFrames})`);
        }
        this.nFrames = Number(n);
        continue;
      }
      if (this.lengths === null) {
        if (this.buffered < 8 * this.nFrames) break;
        const raw = Buffer.from(this.take(8 * this.nFrames));
        const lengths = [];
        for (let i = 0; i < this.nFrames; i++) {
          const len = raw.readBigUInt64LE(8 * i);
          if (len > BigInt(this.maxFrameBytes)) {
            throw new ProtocolError(`frame of ${len} bytes exceeds the limit of ${this.maxFrameBytes} bytes`);
          }
          lengths.push(Number(len));
        }
        this.lengths = lengths;
        continue;
      }
      if (this.frames.length === this.lengths.length) {
        out.push(this.frames);
        this.frames = [];
        this.nFrames = null;
        this.lengths = null;
        continue;
      }
      const need = this.lengths[this.frames.length];
      if (this.buffered < need) break;
      this.frames.push(this.take(need));
    }
    return out;
  }
}
