// Resolving the function a task names against the modules a worker loaded.
//
// A task's function payload decodes to a string, "module:function" or a bare
// "function" (or to a map {name: string}).  `module` is the name a module
// was loaded under: the file's base name without extension (`--module
// lib/mathlib.js` -> "mathlib"), or NAME in `--module NAME=lib/mathlib.js`.
// After the colon a dotted path walks nested exports ("mathlib:stats.mean").
// A bare name is looked up in every loaded module, in load order.  Only
// functions exported by loaded modules can run: a task cannot name anything
// else.

import { createRequire } from "node:module";
import fs from "node:fs";
import path from "node:path";
import { pathToFileURL } from "node:url";

/** A task names a function no loaded module exports. */
export class FunctionNotFound extends Error {
  constructor(message) {
    super(message);
    this.name = "FunctionNotFound";
  }
}

/** Resolve a module specifier given on the command line, relative to `cwd`. */
function moduleUrl(spec, cwd) {
  const file = path.resolve(cwd, spec);
  if (fs.existsSync(file)) return pathToFileURL(file).href;
  // A package name: resolve it as if imported from cwd.
  const require = createRequire(path.join(cwd, "noop.js"));
  return pathToFileURL(require.resolve(spec)).href;
}

/** The modules a worker loaded, and the functions tasks may name in them. */
export class FunctionRegistry {
  constructor() {
    /** @type {Map<string, object>} name -> module namespace (or plain object) */
    this.modules = new Map();
  }

  /** Register an object's functions under `name` (also usable from code and tests). */
  add(name, namespace) {
    this.modules.set(name, namespace);
  }

  /**
   * Import a module: `path.js`, `NAME=path.js` or a package name.
   * @returns {Promise<string>} the name it is registered under
   */
  async load(spec, cwd = process.cwd()) {
    let name = null;
    let target = spec;
    const eq = spec.indexOf("=");
    if (eq > 0 && !spec.slice(0, eq).includes("/")) {
      name = spec.slice(0, eq);
      target = spec.slice(eq + 1);
    }
    if (name === null) {
      const base = path.basename(target).replace(/\.(m|c)?js$/, "");
      name = base === "index" ? path.basename(path.dirname(path.resolve(cwd, target))) : base;
    }
    const ns = await import(moduleUrl(target, cwd));
    this.modules.set(name, ns);
    return name;
  }

  /** The function a task names (a string, or a map {name}). */
  resolve(fnSpec) {
    const name = typeof fnSpec === "string" ? fnSpec : fnSpec?.name;
    if (typeof name !== "string" || !name) {
      throw new FunctionNotFound(`a task's function must be a name string, got ${JSON.stringify(fnSpec)}`);
    }
    const colon = name.indexOf(":");
    if (colon >= 0) {
      const mod = this.modules.get(name.slice(0, colon));
      if (mod === undefined) {
        throw new FunctionNotFound(
          `no module ${JSON.stringify(name.slice(0, colon))} loaded on this worker ` +
            `(loaded: ${[...this.modules.keys()].join(", ") || "none"}; start it with --module)`,
        );
      }
      const fn = walk(mod, name.slice(colon + 1));
      if (typeof fn !== "function") throw new FunctionNotFound(`${name} is not a function exported by its module`);
      return fn;
    }
    for (const mod of this.modules.values()) {
      const fn = walk(mod, name);
      if (typeof fn === "function") return fn;
    }
    throw new FunctionNotFound(`no loaded module exports a function ${JSON.stringify(name)}`);
  }
}

function walk(obj, dotted) {
  let cur = obj;
  for (const part of dotted.split(".")) {
    if (cur === null || cur === undefined || (typeof cur !== "object" && typeof cur !== "function")) return undefined;
    // Own properties only: "mathlib:constructor" or "__proto__" must not resolve.
    if (!Object.hasOwn(cur, part)) return undefined;
    cur = cur[part];
  }
  return cur;
}
