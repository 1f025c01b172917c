// The worker's IO (src/worker.js) against a fake scheduler and a fake peer, in
// one process: value versions as the scheduler names them, as peers say them
// (data.versions), and as the worker echoes and serves them.

import assert from "node:assert/strict";
import net from "node:net";
import { test } from "node:test";

import { REF_KEY, decodePayload, msgpackPayload } from "../src/codec.js";
import { Connection, accept, connect, formatAddress } from "../src/comm.js";
import { FunctionRegistry } from "../src/registry.js";
import { Worker } from "../src/worker.js";

Worker.quiet = true;

/** A server speaking the handshake as `role`; `onConn(conn)` gets each accepted connection. */
async function listen(role, allowedRoles, onConn) {
  const server = net.createServer(async (socket) => {
    const conn = new Connection(socket, { server: true });
    try {
      await accept(conn, { role, serverId: `fake-${role}`, token: null, allowedRoles });
    } catch {
      return;
    }
    onConn(conn);
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, address: formatAddress("127.0.0.1", server.address().port) };
}

/** The next op of `conn` that is not a heartbeat. */
async function expect(conn, op) {
  for (;;) {
    const msg = await conn.recv(10);
    if (msg.op === "heartbeat") continue;
    assert.equal(msg.op, op, JSON.stringify(msg));
    return msg;
  }
}

/** Ask `address` for `keys` as a peer would. */
async function getData(address, keys) {
  const { conn } = await connect(address, { role: "peer", id: "test-peer" });
  try {
    conn.send({ op: "get_data", keys, serializers: ["msgpack"] });
    return await conn.recv(10);
  } finally {
    conn.close();
  }
}

/** Ask `address` for `key` until `pred(reply)` holds (at most 10 s); the last reply. */
async function pollData(address, key, pred) {
  const deadline = Date.now() + 10000;
  for (;;) {
    const got = await getData(address, [key]);
    if (pred(got)) return got;
    assert.ok(Date.now() < deadline, `timed out; last reply ${JSON.stringify(got)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test("versions: named by the scheduler, checked against the peer's word, echoed and served", async () => {
  // The peer holds the value of "s" that it says is `held.version`.
  const held = { value: "old", version: 1 };
  const peer = await listen("worker", ["peer"], (conn) => {
    conn.setHandler((ops) => {
      for (const msg of ops) {
        conn.send({ op: "data", data: { s: msgpackPayload(held.value) }, missing: [], versions: { s: held.version } });
      }
    });
  });
  let schedulerConn;
  const connected = new Promise((resolve) => {
    schedulerConn = resolve;
  });
  const scheduler = await listen("scheduler", ["worker"], (conn) => schedulerConn(conn));
  const registry = new FunctionRegistry();
  registry.add("t", { echo: (x) => x });
  const worker = new Worker(scheduler.address, { registry, reconnect: false, heartbeatInterval: 60 });
  await worker.start();
  const sched = await connected;
  try {
    await expect(sched, "register_worker");
    const task = (key, runId, versions) => ({
      key,
      run_id: runId,
      fn: "f",
      args: msgpackPayload([[{ [REF_KEY]: "s" }], {}]),
      who_has: { s: [peer.address] },
      nbytes: { s: 5 },
      versions,
      priority: [0],
      send_result: true,
    });

    // The task wants version 2; the peer still serves version 1 (it has not
    // read the store of the new value yet): dropped, and the scheduler asked
    // where the value is, blaming no holder.
    sched.send({ op: "compute", tasks: [task("t1", 1, { s: 2 })], functions: { f: msgpackPayload("t:echo") } });
    assert.deepEqual(await expect(sched, "missing_data"), { op: "missing_data", key: "s", holder: "" });
    held.value = "new";
    held.version = 2;
    sched.send({ op: "update_who_has", who_has: { s: [peer.address] }, versions: { s: 2 } });
    const added = await expect(sched, "add_keys");
    assert.deepEqual(added.versions, { s: 2 });
    const done = await expect(sched, "task_finished");
    assert.equal(done.key, "t1");
    assert.equal(decodePayload(done.result), "new");
    // Served with the version of each value: "t1" is a computed value (0).
    let got = await getData(worker.address, ["s", "t1", "nope"]);
    assert.deepEqual(got.versions, { s: 2, t1: 0 });
    assert.deepEqual(got.missing, ["nope"]);

    // A scatter over "s" onto this worker (free_keys, then store, in one
    // batch) keeps the new value, at its version.
    sched.send({ op: "free_keys", keys: ["s"] }, { op: "store", data: { s: msgpackPayload("newer") }, versions: { s: 9 } });
    got = await pollData(worker.address, "s", (reply) => reply.versions?.s === 9);
    assert.equal(decodePayload(got.data.s), "newer");

    // A task naming another version than the copy held here: the copy is not
    // used; the named one is fetched and reported with its version.
    sched.send({ op: "compute", tasks: [task("t2", 2, { s: 2 })] });
    assert.deepEqual((await expect(sched, "add_keys")).versions, { s: 2 });
    const done2 = await expect(sched, "task_finished");
    assert.equal(decodePayload(done2.result), "new");

    // The scheduler says the key's value is another one now (its answer to an
    // add_keys of a replaced value): the copy is dropped.
    sched.send({ op: "update_who_has", who_has: { s: [] }, versions: { s: 10 } });
    got = await pollData(worker.address, "s", (reply) => reply.missing.includes("s"));
    assert.equal(got.versions, undefined);
  } finally {
    await worker.close({ report: false });
    scheduler.server.close();
    peer.server.close();
  }
});
