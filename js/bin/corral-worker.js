#!/usr/bin/env node
// corral-worker: a Corral worker in JavaScript (runtime "js").
//
//   node js/bin/corral-worker.js tcp://HOST:PORT [--nthreads N] [--resources "GPU=1"]
//        [--name NAME] [--module path.js ...] [--host IFACE] [--scheduler-file F]
//        [--tls-ca-file ca.pem --tls-cert node.pem --tls-key node.key]
//
// The auth token is read from $CORRAL_AUTH_TOKEN.  SIGTERM / SIGINT: the
// worker tells the scheduler it leaves (unregister) and exits 0.

import fs from "node:fs";
import { parseArgs } from "node:util";

import { detectResources } from "../src/detect.js";
import { FunctionRegistry } from "../src/registry.js";
import { parseResources } from "../src/resources.js";
import { TlsSettings } from "../src/tls.js";
import { Worker } from "../src/worker.js";

const USAGE = `usage: corral-worker ADDRESS [options]

  ADDRESS                 the scheduler, tcp://HOST:PORT or tls://HOST:PORT (or --scheduler-file F)
  --scheduler-file F      read the scheduler address from this JSON file
  --nthreads N            tasks in progress at once on the event loop (default 1)
  --resources "GPU=1"     abstract resources offered (default $CORRAL_WORKER_RESOURCES):
                          amounts (GPU=2,MEM=8e9), indices (GPU=[0,1]: each task is told
                          which it holds), or auto (GPUs and memory found here)
  --tls-cert FILE         TLS certificate (PEM; default $CORRAL_TLS__CERT): the peer port
                          listens tls:// only
  --tls-key FILE          its private key (PEM; default $CORRAL_TLS__KEY, or inside --tls-cert)
  --tls-ca-file FILE      CA to trust (PEM; default $CORRAL_TLS__CA_FILE): the scheduler's
                          and peers' certificates must be signed by it, and connectors to
                          this worker must present one it signed (mutual TLS)
  --name NAME             a readable name (default: the worker's address)
  --module [NAME=]PATH    a JavaScript module whose exported functions tasks may name
                          as "NAME:function" (NAME defaults to the file's base name);
                          repeatable
  --host IFACE            interface of the peer port
  --port P                peer port (default: any free one)
  --no-reconnect          exit when the scheduler goes away instead of reconnecting
  --quiet                 log errors only
  -h, --help              this text
`;

function fail(message) {
  process.stderr.write(`corral-worker: ${message}\n`);
  process.exit(2);
}

function readSchedulerFile(file) {
  const deadline = Date.now() + 60000;
  while (!fs.existsSync(file)) {
    if (Date.now() > deadline) fail(`scheduler file ${file} did not appear in 60s`);
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 100);
  }
  return JSON.parse(fs.readFileSync(file, "utf8")).address;
}

async function main() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        "scheduler-file": { type: "string" },
        nthreads: { type: "string" },
        resources: { type: "string" },
        "tls-cert": { type: "string" },
        "tls-key": { type: "string" },
        "tls-ca-file": { type: "string" },
        name: { type: "string" },
        module: { type: "string", multiple: true },
        host: { type: "string" },
        port: { type: "string" },
        "no-reconnect": { type: "boolean" },
        quiet: { type: "boolean" },
        help: { type: "boolean", short: "h" },
      },
    });
  } catch (err) {
    fail(`${err.message}\n${USAGE}`);
  }
  const { values, positionals } = parsed;
  if (values.help) {
    process.stdout.write(USAGE);
    return;
  }
  if (positionals.length > 1) fail(`one ADDRESS expected, got ${positionals.join(" ")}`);
  let address = positionals[0];
  if (!address) {
    if (!values["scheduler-file"]) fail(`give the scheduler ADDRESS or --scheduler-file\n${USAGE}`);
    address = readSchedulerFile(values["scheduler-file"]);
  }
  const nthreads = values.nthreads === undefined ? 1 : Number(values.nthreads);
  if (!Number.isInteger(nthreads) || nthreads < 1) fail(`--nthreads must be a positive integer, got ${values.nthreads}`);
  let resources;
  try {
    const [text, what] = values.resources !== undefined ? [values.resources, "--resources"] : [process.env.CORRAL_WORKER_RESOURCES ?? "", "CORRAL_WORKER_RESOURCES"];
    resources = parseResources(text, what, { detect: detectResources });
  } catch (err) {
    fail(err.message);
  }
  let tls = null;
  // Options win over the variables as a set: mixing one's certificate with the other's key helps nobody.
  const fromOptions = values["tls-cert"] || values["tls-key"] || values["tls-ca-file"];
  const certFile = fromOptions ? values["tls-cert"] : process.env.CORRAL_TLS__CERT || undefined;
  const keyFile = fromOptions ? values["tls-key"] : process.env.CORRAL_TLS__KEY || undefined;
  const caFile = fromOptions ? values["tls-ca-file"] : process.env.CORRAL_TLS__CA_FILE || undefined;
  if (certFile || keyFile || caFile) {
    if (!certFile) fail("TLS needs --tls-cert (and --tls-key) on this side too");
    try {
      tls = new TlsSettings({ caFile, certFile, keyFile });
    } catch (err) {
      fail(err.message.replace(/^TLS (\w+)/, (_, k) => ({ caFile: "--tls-ca-file", certFile: "--tls-cert", keyFile: "--tls-key" })[k] ?? k));
    }
  }
  const registry = new FunctionRegistry();
  for (const spec of values.module ?? []) {
    try {
      await registry.load(spec);
    } catch (err) {
      fail(`cannot load module ${spec}: ${err.stack}`);
    }
  }
  Worker.quiet = Boolean(values.quiet);
  const worker = new Worker(address, {
    nthreads,
    name: values.name,
    resources,
    registry,
    host: values.host,
    port: values.port === undefined ? 0 : Number(values.port),
    reconnect: !values["no-reconnect"],
    tls,
  });
  let stopping = false;
  const stop = (signal) => {
    if (stopping) process.exit(1); // a second signal: leave at once
    stopping = true;
    worker.close({ reason: `worker received ${signal}` });
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));
  try {
    await worker.start();
  } catch (err) {
    process.stderr.write(`corral-worker: ${err.message}\n`);
    process.exit(1);
  }
  process.stderr.write(`Worker ${worker.name} at ${worker.address} -> ${address}\n`);
  await worker.finished;
  // Tasks still awaiting timers or IO must not keep the process alive.
  process.exit(0);
}

main();
