// Connections: a TCP (or TLS) stream of messages, the opening handshake with
// HMAC auth (docs/protocol.md sections 1, 5 and 9).

import crypto from "node:crypto";
import net from "node:net";
import tls from "node:tls";

import { ProtocolError, decodeMessage, encodeMessage } from "./codec.js";
import {
  DEFAULT_MAX_FRAMES,
  DEFAULT_MAX_FRAME_BYTES,
  FrameDecoder,
  HANDSHAKE_MAX_FRAMES,
  HANDSHAKE_MAX_FRAME_BYTES,
  encodeFrames,
} from "./framing.js";

/** The protocol version this side speaks (hello, handshake). */
export const PROTOCOL_VERSION = 1;
/** Seconds a peer has to complete the handshake. */
export const HANDSHAKE_TIMEOUT = 10;

/** The connection is closed (or was closed while waiting). */
export class CommClosedError extends Error {
  constructor(message) {
    super(message);
    this.name = "CommClosedError";
  }
}

/** The handshake failed: refused, wrong version, missing token. */
export class HandshakeError extends Error {
  constructor(message) {
    super(message);
    this.name = "HandshakeError";
  }
}

/**
 * `tcp://host:port` or `tls://host:port` -> {scheme, host, port}; IPv6 hosts in brackets.
 * @param {string} address
 * @returns {{scheme: "tcp" | "tls", host: string, port: number}}
 */
export function parseAddress(address) {
  const m = /^(tcp|tls):\/\/(\[[^\]]+\]|[^:/]+):(\d+)\/?$/.exec(address);
  if (!m) throw new Error(`not a tcp://HOST:PORT or tls://HOST:PORT address: ${JSON.stringify(address)}`);
  let host = m[2];
  if (host.startsWith("[")) host = host.slice(1, -1);
  return { scheme: m[1], host, port: Number(m[3]) };
}

/**
 * The address of `host:port`: `tcp://host:port` (IPv6 hosts in brackets).
 * @param {string} host
 * @param {number} port
 * @param {"tcp" | "tls"} [scheme]
 */
export function formatAddress(host, port, scheme = "tcp") {
  return host.includes(":") ? `${scheme}://[${host}]:${port}` : `${scheme}://${host}:${port}`;
}

/** HMAC-SHA256(key = token's UTF-8 bytes, message = challenge). */
export function answerChallenge(token, challenge) {
  return crypto.createHmac("sha256", Buffer.from(token, "utf8")).update(challenge).digest();
}

/**
 * One TCP stream carrying messages both ways.  Received ops are either handed
 * to `onMessages(batch)` (once set) or queued for `recv()`.
 */
export class Connection {
  /** @param {net.Socket} socket */
  constructor(socket, { server = false } = {}) {
    this.socket = socket;
    this.peer = `${socket.remoteAddress}:${socket.remotePort}`;
    this.closed = false;
    this.closeReason = "";
    this.info = {};
    this.decoder = server
      ? new FrameDecoder({ maxFrames: HANDSHAKE_MAX_FRAMES, maxFrameBytes: HANDSHAKE_MAX_FRAME_BYTES })
      : new FrameDecoder();
    this.queue = [];
    this.waiters = [];
    this.onMessages = null;
    this.closeCallbacks = [];
    this.pending = [];
    this.flushScheduled = false;
    socket.setNoDelay(true);
    socket.on("data", (chunk) => this._received(chunk));
    socket.on("error", (err) => this.close(err.message));
    socket.on("close", () => this.close("closed by the peer"));
  }

  /** After the handshake: the normal frame limits. */
  liftLimits() {
    this.decoder.maxFrames = DEFAULT_MAX_FRAMES;
    this.decoder.maxFrameBytes = DEFAULT_MAX_FRAME_BYTES;
  }

  _received(chunk) {
    if (this.closed) return;
    let messages;
    try {
      messages = this.decoder.feed(chunk);
    } catch (err) {
      this.abort(`protocol error: ${err.message}`);
      return;
    }
    for (const frames of messages) {
      let ops;
      try {
        ops = decodeMessage(frames);
      } catch (err) {
        this.abort(`protocol error: ${err.message}`);
        return;
      }
      if (this.onMessages) {
        try {
          this.onMessages(ops);
        } catch (err) {
          this.abort(err instanceof ProtocolError ? `protocol error: ${err.message}` : `handler failed: ${err.stack}`);
          return;
        }
      } else {
        for (const op of ops) this._deliver(op);
      }
      if (this.closed) return;
    }
  }

  _deliver(op) {
    const w = this.waiters.shift();
    if (w) {
      clearTimeout(w.timer);
      w.resolve(op);
    } else this.queue.push(op);
  }

  /** Handle every later batch with `fn(ops)` (queued ops are handed over first). */
  setHandler(fn) {
    this.onMessages = fn;
    if (this.queue.length) {
      const q = this.queue;
      this.queue = [];
      fn(q);
    }
  }

  /** The next op, or a CommClosedError / timeout error. */
  recv(timeoutSeconds) {
    if (this.queue.length) return Promise.resolve(this.queue.shift());
    if (this.closed) return Promise.reject(new CommClosedError(`connection to ${this.peer} closed: ${this.closeReason}`));
    return new Promise((resolve, reject) => {
      const w = { resolve, reject, timer: null };
      if (timeoutSeconds != null) {
        w.timer = setTimeout(() => {
          const i = this.waiters.indexOf(w);
          if (i >= 0) this.waiters.splice(i, 1);
          const err = new Error(`no message from ${this.peer} within ${timeoutSeconds}s`);
          err.name = "TimeoutError";
          reject(err);
        }, timeoutSeconds * 1000);
      }
      this.waiters.push(w);
    });
  }

  /** Queue ops; everything queued in one tick leaves as one message (a batch). */
  send(...ops) {
    if (this.closed) throw new CommClosedError(`connection to ${this.peer} closed: ${this.closeReason}`);
    this.pending.push(...ops);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(() => this.flush());
    }
  }

  /** Write what is queued now. */
  flush() {
    this.flushScheduled = false;
    if (this.closed || !this.pending.length) return;
    const ops = this.pending;
    this.pending = [];
    for (const buf of encodeFrames(encodeMessage(ops))) this.socket.write(buf);
  }

  onClose(fn) {
    if (this.closed) fn(this);
    else this.closeCallbacks.push(fn);
  }

  /** Flush what is queued, then close. */
  close(reason = "closed") {
    if (this.closed) return;
    this.flush();
    this.closed = true;
    this.closeReason = reason;
    this.socket.end();
    this._closed();
  }

  /** Close at once, dropping what is queued. */
  abort(reason) {
    if (this.closed) return;
    this.pending = [];
    this.closed = true;
    this.closeReason = reason;
    this.socket.destroy();
    this._closed();
  }

  _closed() {
    const err = new CommClosedError(`connection to ${this.peer} closed: ${this.closeReason}`);
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    for (const fn of this.closeCallbacks.splice(0)) fn(this);
  }
}

/**
 * A TCP socket to `address`, or a TLS one for tls:// (the TLS handshake done):
 * network errors reject as they are (worth retrying), a failed TLS handshake
 * (certificates) with a HandshakeError (retrying will not help).
 */
function openSocket(address, timeoutSeconds, tlsSettings) {
  const { scheme, host, port } = parseAddress(address);
  if (scheme === "tls" && !tlsSettings) {
    throw new HandshakeError(`${address} is a TLS address: give TLS settings (tls: {caFile, certFile, keyFile}, or --tls-ca-file)`);
  }
  return new Promise((resolve, reject) => {
    const secure = scheme === "tls";
    const socket = secure ? tls.connect({ ...tlsSettings.clientOptions(host), port }) : net.connect({ host, port });
    let reachable = false; // the TCP connection is up: what fails now is TLS
    const timer = setTimeout(() => {
      socket.destroy();
      const err = new Error(`could not connect to ${address} within ${timeoutSeconds}s`);
      err.name = "TimeoutError";
      reject(err);
    }, timeoutSeconds * 1000);
    socket.once("connect", () => {
      reachable = true;
      if (secure) return;
      clearTimeout(timer);
      socket.removeAllListeners("error");
      resolve(socket);
    });
    socket.once("secureConnect", () => {
      clearTimeout(timer);
      socket.removeAllListeners("error");
      resolve(socket);
    });
    socket.once("error", (err) => {
      clearTimeout(timer);
      socket.destroy();
      if (secure && reachable) reject(new HandshakeError(`TLS handshake with ${address} failed: ${err.message}`));
      else reject(err);
    });
  });
}

/**
 * A listening server handing each connected socket to `onSocket`: TLS only when
 * `tlsSettings` has a certificate (a plain-TCP connector then gets nothing in
 * clear text and is dropped when the TLS handshake fails), plain TCP otherwise.
 * @param {import("./tls.js").TlsSettings | null} tlsSettings
 * @param {(socket: net.Socket) => void} onSocket
 * @param {(err: Error, socket: net.Socket) => void} [onTlsError]  a connector failed the TLS handshake
 * @returns {net.Server}
 */
export function createServer(tlsSettings, onSocket, onTlsError = () => {}) {
  if (!tlsSettings?.canServe) return net.createServer(onSocket);
  const server = tls.createServer(tlsSettings.serverOptions(), onSocket);
  server.on("tlsClientError", onTlsError);
  return server;
}

/**
 * Open a connection and run the connector side of the handshake.
 * @param {string} address  tcp://host:port, or tls://host:port (needs `tls`)
 * @param {object} options
 * @param {string} options.role  "client", "worker" or "peer"
 * @param {string} options.id
 * @param {string} [options.name]
 * @param {string | null} [options.token]  answers the server's challenge
 * @param {object} [options.versions]
 * @param {import("./tls.js").TlsSettings | null} [options.tls]  for tls:// addresses
 * @param {number} [options.timeout]  seconds for the connection and each handshake step
 * @returns {Promise<{conn: Connection, welcome: object}>}
 */
export async function connect(address, { role, id, name, token, versions, tls: tlsSettings = null, timeout = HANDSHAKE_TIMEOUT }) {
  const socket = await openSocket(address, timeout, tlsSettings);
  const conn = new Connection(socket);
  try {
    let hello;
    try {
      hello = await conn.recv(timeout);
    } catch (err) {
      if (err instanceof CommClosedError && address.startsWith("tls://")) {
        // TLS 1.3: the server checks our certificate after our side of the TLS
        // handshake finished; its refusal is the connection closing before it
        // says hello.  Retrying would not help.
        throw new HandshakeError(
          `${address} refused the TLS connection (${conn.closeReason}): does it accept this side's certificate ` +
            "(mutual TLS needs certFile/keyFile signed by its CA)?",
        );
      }
      throw err;
    }
    if (hello.op !== "hello") throw new ProtocolError(`expected hello from ${address}, got ${JSON.stringify(hello.op)}`);
    if (hello.protocol !== PROTOCOL_VERSION) {
      throw new HandshakeError(`${address} speaks protocol ${hello.protocol}, this side ${PROTOCOL_VERSION}`);
    }
    if (hello.challenge != null && !token) {
      throw new HandshakeError(`${address} requires an authentication token and none was given`);
    }
    conn.send({
      op: "handshake",
      protocol: PROTOCOL_VERSION,
      role,
      id,
      name,
      response: hello.challenge != null ? answerChallenge(token, hello.challenge) : undefined,
      versions,
    });
    const reply = await conn.recv(timeout);
    if (reply.op === "refused") throw new HandshakeError(`${address} refused the connection: ${reply.reason}`);
    if (reply.op !== "welcome") throw new ProtocolError(`expected welcome from ${address}, got ${JSON.stringify(reply.op)}`);
    conn.info = { role: hello.role, id: reply.id };
    return { conn, welcome: reply };
  } catch (err) {
    conn.abort("handshake failed");
    throw err;
  }
}

/**
 * Run the server side of the handshake on a fresh connection.  Resolves to the
 * peer's handshake, or rejects (after telling the peer why, and closing).
 */
export async function accept(conn, { role, serverId, token, allowedRoles, timeout = HANDSHAKE_TIMEOUT }) {
  const challenge = token ? crypto.randomBytes(32) : undefined;
  conn.send({ op: "hello", protocol: PROTOCOL_VERSION, role, challenge });
  const refuse = (reason) => {
    if (!conn.closed) {
      conn.send({ op: "refused", reason });
      conn.close(reason);
    }
    return new HandshakeError(reason);
  };
  let msg;
  try {
    msg = await conn.recv(timeout);
  } catch (err) {
    if (err.name === "TimeoutError") throw refuse(`no handshake within ${timeout}s`);
    throw err;
  }
  if (msg.op !== "handshake") throw refuse(`expected a handshake, got op '${msg.op}'`);
  if (typeof msg.protocol !== "number" || typeof msg.role !== "string" || typeof msg.id !== "string") {
    conn.abort("malformed handshake");
    throw new HandshakeError("malformed handshake");
  }
  if (msg.protocol !== PROTOCOL_VERSION) {
    throw refuse(`protocol version ${msg.protocol} is not supported (need ${PROTOCOL_VERSION})`);
  }
  if (!allowedRoles.includes(msg.role)) throw refuse(`role '${msg.role}' may not connect here`);
  if (challenge) {
    const expected = answerChallenge(token, challenge);
    const got = msg.response instanceof Uint8Array ? Buffer.from(msg.response) : Buffer.alloc(0);
    if (got.length !== expected.length || !crypto.timingSafeEqual(got, expected)) {
      throw refuse("authentication failed: wrong or missing token");
    }
  }
  conn.send({ op: "welcome", id: serverId });
  conn.liftLimits();
  conn.info = { role: msg.role, id: msg.id, name: msg.name };
  return msg;
}
