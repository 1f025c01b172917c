// TLS end to end over real sockets: a Python scheduler and Python worker and
// two JavaScript workers, all started with a CA, certificate and key (mutual
// TLS), and the JavaScript client connecting with TLS settings.  Values cross
// between the JavaScript workers, from the Python worker to a JavaScript one,
// and from the workers to the client, every hop over TLS; connectors without
// a certificate the CA signed are refused.

import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";

import { Client, HandshakeError, TlsSettings } from "../src/index.js";
import { connect } from "../src/comm.js";
import { makeCertificates, startCluster } from "./cluster.js";

let dir;
let pki;
let tls;
let cluster;
let client;
let workers; // name -> scheduler_info entry

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "corral-js-tls-"));
  pki = makeCertificates(dir);
  tls = { caFile: pki.ca, certFile: pki.node.cert, keyFile: pki.node.key };
  cluster = await startCluster({ js: [{ name: "js-a" }, { name: "js-b" }], python: 1, tls });
  client = await Client.connect(cluster.address, { tls });
  await client.waitForWorkers(3, { timeout: 60 });
  const info = await client.schedulerInfo();
  workers = Object.fromEntries(Object.values(info.workers).map((w) => [w.runtime === "python" ? "python" : w.name, w]));
});

after(async () => {
  await client?.close();
  await cluster?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** The node's certificate and key in one file. */
function combinedPem() {
  const both = path.join(dir, "both.pem");
  fs.writeFileSync(both, Buffer.concat([fs.readFileSync(pki.node.cert), fs.readFileSync(pki.node.key)]));
  return both;
}

test("the cluster speaks TLS: the scheduler and every worker's peer port are tls://", () => {
  assert.match(cluster.address, /^tls:\/\//);
  for (const w of Object.values(workers)) assert.match(w.address, /^tls:\/\/127\.0\.0\.1:\d+$/, JSON.stringify(w));
});

test("values travel between JavaScript workers, from a Python worker, and to the client, over TLS", { timeout: 60_000 }, async () => {
  const a = workers["js-a"].address;
  const b = workers["js-b"].address;
  // Large enough (> 64 KiB) to be fetched from the peer port rather than inlined anywhere.
  const big = client.submit("mathlib:bytes", [200_000], { workers: a });
  const size = client.submit("mathlib:describe", [big], { workers: b });
  const described = await size.result();
  assert.equal(described.type, "object");
  assert.equal(Object.keys(described.value).length, 200_000); // a Uint8Array arrived on js-b
  const who = await client.request("who_has", { keys: [big.key] });
  assert.ok(who[big.key].includes(b), `js-b fetched a copy from js-a: ${JSON.stringify(who)}`);
  // The client fetches the large value from a worker's TLS peer port.
  const value = await big.result();
  assert.equal(value.byteLength, 200_000);
  // Data held by the Python worker reaches a JavaScript task (JS -> Python peer fetch over TLS).
  const [xs] = await client.scatter([[1, 2, 3, 4]], { workers: workers.python.address });
  assert.equal(await client.submit("mathlib:sum", [xs], { workers: a }).result(), 10);
});

test("a connector without TLS settings, or with a certificate from another CA, is refused", { timeout: 60_000 }, async () => {
  await assert.rejects(Client.connect(cluster.address, { timeout: 5 }), (err) => err instanceof HandshakeError && /is a TLS address: give TLS settings/.test(err.message));
  const stranger = { caFile: pki.ca, certFile: pki.stranger.cert, keyFile: pki.stranger.key };
  await assert.rejects(Client.connect(cluster.address, { tls: stranger, timeout: 5 }), HandshakeError);
  // Mutual TLS: trusting the CA is not enough, a connector must present a certificate it signed.
  await assert.rejects(Client.connect(cluster.address, { tls: { caFile: pki.ca }, timeout: 5 }), (err) => err instanceof HandshakeError && /certificate/.test(err.message));
  // A connector that trusts another CA does not accept the cluster's certificates either.
  await assert.rejects(Client.connect(cluster.address, { tls: { caFile: pki.otherCa, certFile: pki.node.cert, keyFile: pki.node.key }, timeout: 5 }), HandshakeError);
});

test("a JavaScript worker's TLS peer port refuses strangers and says nothing in clear text", { timeout: 60_000 }, async () => {
  const address = workers["js-a"].address;
  const stranger = new TlsSettings({ caFile: pki.ca, certFile: pki.stranger.cert, keyFile: pki.stranger.key });
  await assert.rejects(connect(address, { role: "peer", id: "stranger", tls: stranger, timeout: 5 }), HandshakeError);
  await assert.rejects(connect(address, { role: "peer", id: "no-cert", tls: new TlsSettings({ caFile: pki.ca }), timeout: 5 }), HandshakeError);
  // Plain TCP to the TLS port: no hello ever comes.
  await assert.rejects(connect(address.replace("tls://", "tcp://"), { role: "peer", id: "plain", timeout: 1 }), (err) => err.name === "TimeoutError" || err.name === "CommClosedError");
  // The node certificate opens it.
  const { conn } = await connect(address, { role: "peer", id: "friend", tls: new TlsSettings(tls), timeout: 5 });
  conn.send({ op: "get_data", keys: ["nothing-here"], serializers: ["msgpack"] });
  assert.deepEqual((await conn.recv(5)).missing, ["nothing-here"]);
  conn.close();
});

test("TLS settings are checked before anything connects", () => {
  assert.throws(() => new TlsSettings({ certFile: path.join(dir, "nope.pem") }), /TLS certFile: no such file/);
  assert.throws(() => new TlsSettings({ keyFile: pki.node.key }), /keyFile given without certFile/);
  assert.throws(() => new TlsSettings({ caFile: pki.ca, cafile: pki.ca }), /unknown TLS setting "cafile"/);
  assert.throws(() => new TlsSettings({}), /need at least caFile or certFile/);
  // A key inside the certificate file is found there.
  const both = combinedPem();
  const combined = new TlsSettings({ caFile: pki.ca, certFile: both });
  assert.ok(combined.canServe && combined.mutual && !combined.checkHostname);
  assert.equal(new TlsSettings({ certFile: both }).checkHostname, true); // the system's CAs: names are checked
});

test("a client holding its key inside its certificate file works against the cluster", { timeout: 60_000 }, async () => {
  const c2 = await Client.connect(cluster.address, { tls: { caFile: pki.ca, certFile: combinedPem() } });
  try {
    assert.equal(await c2.submit("mathlib:add", [20, 22]).result(), 42);
  } finally {
    await c2.close();
  }
});
