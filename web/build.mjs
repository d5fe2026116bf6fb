// Bundle the viewer (src/viewer.js + three.js + Spark) into daemon/page/build/ with the licences of
// everything inside it and the exact versions, so the daemon serves the page offline.
// Runs on `npm ci` (postinstall); `npm run build` runs it again after an edit.
import { build } from "esbuild";
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "daemon", "page", "build");
const bundled = ["three", "@sparkjsdev/spark", "fflate"];

rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
await build({
  entryPoints: [join(here, "src", "viewer.js")],
  outfile: join(out, "viewer.js"),
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  legalComments: "none",
  logLevel: "warning",
});
const versions = {};
for (const name of bundled) {
  const root = join(here, "node_modules", name);
  versions[name] = JSON.parse(readFileSync(join(root, "package.json"), "utf8")).version;
  copyFileSync(join(root, "LICENSE"), join(out, `LICENSE.${name.replace("@", "").replace("/", "-")}.txt`));
}
writeFileSync(join(out, "versions.json"), JSON.stringify(versions, null, 2) + "\n");
console.log(`viewer built into ${out}:`, versions);
