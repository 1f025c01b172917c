// A real cluster for the client tests: a Python scheduler and workers (Python
// and JavaScript), each a subprocess.  The Python interpreter is
// $CORRAL_PYTHON (set by .ci/run to the project's venv), else the
// repository's .venv/bin/python if there is one, else python3.

import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const WORKER_BIN = path.join(HERE, "..", "bin", "corral-worker.js");
export const MATHLIB = path.join(HERE, "fixtures", "mathlib.js");
const REPO = path.join(HERE, "..", "..");
const VENV_PYTHON = path.join(REPO, ".venv", "bin", "python");
export const PYTHON = process.env.CORRAL_PYTHON || (fs.existsSync(VENV_PYTHON) ? VENV_PYTHON : "python3");

async function waitFor(cond, timeoutMs, what, proc) {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (proc && proc.exitCode !== null) throw new Error(`${what}: the process exited with ${proc.exitCode}:\n${proc.output()}`);
    if (Date.now() > deadline) throw new Error(`${what}: timed out${proc ? `\n${proc.output()}` : ""}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function start(cmd, args, env) {
  const proc = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  proc.stdout.on("data", (d) => (out += d));
  proc.stderr.on("data", (d) => (out += d));
  proc.output = () => out;
  return proc;
}

/**
 * Test certificates in `dir`, made by tests/reliability/_certs.py (a CA, a
 * certificate it signed for 127.0.0.1 that every process shares, and a
 * stranger's certificate signed by another CA).
 * @returns {{ca: string, node: {cert: string, key: string}, stranger: {cert: string, key: string}, otherCa: string}}
 */
export function makeCertificates(dir) {
  const script = [
    "import json, sys",
    `sys.path.insert(0, ${JSON.stringify(path.join(REPO, "tests", "reliability"))})`,
    "from _certs import make_pki",
    `p = make_pki(${JSON.stringify(dir)})`,
    "print(json.dumps({'ca': p.ca.cert, 'otherCa': p.other_ca.cert, 'node': vars(p.node), 'stranger': vars(p.stranger)}))",
  ].join("\n");
  const out = execFileSync(PYTHON, ["-c", script], { encoding: "utf8" });
  return JSON.parse(out);
}

/** The --tls-* options of `tls` ({caFile, certFile, keyFile}), for any corral command. */
function tlsArgs(tls) {
  if (!tls) return [];
  return ["--tls-cert", tls.certFile, "--tls-key", tls.keyFile, ...(tls.caFile ? ["--tls-ca-file", tls.caFile] : [])];
}

/**
 * Start a scheduler, `js` JavaScript workers (each an options object:
 * {resources, nthreads, name, args}) and `python` Python workers; with `tls`
 * ({caFile, certFile, keyFile}) all of them use it.
 */
export async function startCluster({ js = [{}], python = 0, token = undefined, tls = undefined } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "corral-js-"));
  const file = path.join(dir, "scheduler.json");
  const env = token ? { CORRAL_AUTH_TOKEN: token } : {};
  const procs = [];
  const scheduler = start(PYTHON, ["-m", "corral", "scheduler", "--port", "0", "--scheduler-file", file, ...tlsArgs(tls)], env);
  procs.push(scheduler);
  const cluster = {
    procs,
    scheduler,
    address: null,
    async stop() {
      for (const p of procs) if (p.exitCode === null) p.kill("SIGTERM");
      const deadline = Date.now() + 10000;
      for (const p of procs) {
        while (p.exitCode === null && p.signalCode === null && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
        if (p.exitCode === null && p.signalCode === null) p.kill("SIGKILL");
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  try {
    await waitFor(() => fs.existsSync(file) && fs.statSync(file).size > 0, 60000, "scheduler start", scheduler);
    cluster.address = JSON.parse(fs.readFileSync(file, "utf8")).address;
    for (const opts of js) {
      const args = [WORKER_BIN, cluster.address, "--module", MATHLIB, "--nthreads", String(opts.nthreads ?? 2)];
      if (opts.resources) args.push("--resources", opts.resources);
      if (opts.name) args.push("--name", opts.name);
      args.push(...tlsArgs(tls), ...(opts.args ?? []));
      procs.push(start(process.execPath, args, env));
    }
    for (let i = 0; i < python; i++) {
      procs.push(start(PYTHON, ["-m", "corral", "worker", cluster.address, "--no-nanny", "--nthreads", "1", ...tlsArgs(tls)], env));
    }
  } catch (err) {
    await cluster.stop();
    throw err;
  }
  return cluster;
}
