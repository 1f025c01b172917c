// TLS settings for tls:// addresses (docs/security.md), as the Python side's
// `corral.comm.security.Security`: PEM files read once, turned into Node's
// options for a listening port and for outgoing connections.
//
// * certFile / keyFile: this side's certificate chain and private key (the key
//   may be inside the certificate file).  A server needs them; a connector
//   presents them for mutual TLS.
// * caFile: the authority to trust.  On a server it turns on mutual TLS: every
//   connector must present a certificate it signed.  On a connector it is what
//   the server's certificate must be signed by (without it, the system's CAs,
//   and the host name is checked).
// * checkHostname: default only when no caFile is given: a private CA's
//   signature is the identity, and cluster addresses are often bare IPs that
//   certificates do not list.

import fs from "node:fs";
import net from "node:net";
import tls from "node:tls";

/** Seconds a TLS handshake may take before the connection is dropped (the protocol's handshake timeout). */
export const TLS_HANDSHAKE_TIMEOUT = 10;
const MIN_VERSION = "TLSv1.2";

function readPem(what, file) {
  if (typeof file !== "string" || !file) throw new TypeError(`${what} must be a file path, got ${JSON.stringify(file)}`);
  let stat;
  try {
    stat = fs.statSync(file);
  } catch {
    throw new Error(`${what}: no such file ${JSON.stringify(file)}`);
  }
  if (!stat.isFile()) throw new Error(`${what}: ${JSON.stringify(file)} is not a file`);
  return fs.readFileSync(file);
}

const KNOWN = new Set(["caFile", "certFile", "keyFile", "checkHostname"]);

/** TLS settings: what a worker or client needs to listen on or connect to tls:// addresses. */
export class TlsSettings {
  /**
   * @param {object} settings
   * @param {string} [settings.caFile]    PEM file of the certificate authority to trust
   * @param {string} [settings.certFile]  PEM file of this side's certificate (chain)
   * @param {string} [settings.keyFile]   PEM file of its private key (default: inside certFile)
   * @param {boolean} [settings.checkHostname]  check the server's name (default: only without caFile)
   * @throws {Error} naming a missing file, an unknown setting, or a key without a certificate
   */
  constructor({ caFile, certFile, keyFile, checkHostname, ...unknown } = {}) {
    const extra = Object.keys(unknown).filter((k) => !KNOWN.has(k));
    if (extra.length) throw new TypeError(`unknown TLS setting ${extra.map((k) => JSON.stringify(k)).join(", ")} (known: ${[...KNOWN].join(", ")})`);
    if (!caFile && !certFile && !keyFile) throw new TypeError("TLS settings need at least caFile or certFile");
    if (keyFile && !certFile) throw new TypeError("TLS keyFile given without certFile");
    this.caFile = caFile ?? null;
    this.certFile = certFile ?? null;
    this.keyFile = keyFile ?? null;
    this.checkHostname = checkHostname ?? !caFile;
    this.ca = caFile ? readPem("TLS caFile", caFile) : undefined;
    this.cert = certFile ? readPem("TLS certFile", certFile) : undefined;
    // PEM readers skip blocks of other kinds: a key inside the certificate file is found there.
    this.key = keyFile ? readPem("TLS keyFile", keyFile) : this.cert;
  }

  /**
   * The settings of an options object: a TlsSettings, a plain object of
   * settings, or nothing (null: no TLS).
   * @param {TlsSettings | object | null | undefined} value
   * @returns {TlsSettings | null}
   */
  static from(value) {
    if (value == null) return null;
    if (value instanceof TlsSettings) return value;
    if (typeof value !== "object") throw new TypeError(`tls must be an object like {caFile, certFile, keyFile}, got ${JSON.stringify(value)}`);
    return new TlsSettings(value);
  }

  /** Whether a server with these settings can listen tls:// (it has a certificate). */
  get canServe() {
    return Boolean(this.cert);
  }

  /** Whether a server with these settings requires client certificates (mutual TLS). */
  get mutual() {
    return Boolean(this.ca && this.cert);
  }

  /** Options for `tls.createServer`. */
  serverOptions() {
    if (!this.cert) throw new Error("a TLS server needs a certificate: give certFile (and keyFile)");
    return {
      cert: this.cert,
      key: this.key,
      ca: this.ca,
      requestCert: this.mutual,
      rejectUnauthorized: this.mutual,
      minVersion: MIN_VERSION,
      handshakeTimeout: TLS_HANDSHAKE_TIMEOUT * 1000,
    };
  }

  /** Options for `tls.connect` to `host`. */
  clientOptions(host) {
    return {
      host,
      // SNI carries names only (Node warns about IPs there).
      servername: net.isIP(host) ? undefined : host,
      ca: this.ca,
      cert: this.cert,
      key: this.cert ? this.key : undefined,
      minVersion: MIN_VERSION,
      rejectUnauthorized: true,
      checkServerIdentity: this.checkHostname ? tls.checkServerIdentity : () => undefined,
    };
  }

  toString() {
    return `TlsSettings(caFile=${this.caFile}, certFile=${this.certFile}, keyFile=${this.keyFile ? "<set>" : null})`;
  }
}
