// What `--resources auto` offers, as the Python worker detects it
// (corral.resources.detect_resources): GPU as an indexed resource, the NVIDIA
// GPUs this process may use, and MEMORY, the machine's memory in bytes.

import { execFileSync } from "node:child_process";
import os from "node:os";

function parseIndex(text) {
  const t = text.trim().replace(/^['"]|['"]$/g, "");
  return /^\d+$/.test(t) ? Number(t) : t;
}

/**
 * NVIDIA GPU indices: from CUDA_VISIBLE_DEVICES if it is set, else `nvidia-smi -L`.
 * The indices are what a task puts in its CUDA_VISIBLE_DEVICES (numbers, or
 * `GPU-...` UUIDs as listed there).  No NVIDIA tooling: no GPUs.
 * @param {Record<string, string | undefined>} [env]
 * @returns {Array<number | string>}
 */
export function detectGpus(env = process.env) {
  const visible = env.CUDA_VISIBLE_DEVICES;
  if (visible !== undefined) {
    const out = [];
    for (const item of visible.split(",").filter((v) => v.trim()).map(parseIndex)) {
      if (typeof item === "string" && item.startsWith("-")) break; // CUDA stops at the first invalid entry ("-1" hides all)
      out.push(item);
    }
    return out;
  }
  let listing;
  try {
    listing = execFileSync("nvidia-smi", ["-L"], { encoding: "utf8", timeout: 10000, stdio: ["ignore", "pipe", "ignore"], env });
  } catch {
    return [];
  }
  return [...listing.matchAll(/^GPU (\d+):/gm)].map((m) => Number(m[1]));
}

/**
 * What `--resources auto` stands for: {GPU: [indices] (if any), MEMORY: bytes}.
 * @param {Record<string, string | undefined>} [env]
 * @returns {Record<string, number | Array<number | string>>}
 */
export function detectResources(env = process.env) {
  const out = {};
  const gpus = detectGpus(env);
  if (gpus.length) out.GPU = gpus;
  out.MEMORY = os.totalmem();
  return out;
}
