// Print the Khronos glTF validator's JSON report for one .glb/.gltf file.
// Exit status: 0 when the report has no errors, 1 when it has, 2 when the file cannot be validated.
// Usage: node validate.mjs path/to/model.glb
import { readFile } from "node:fs/promises";
import { basename } from "node:path";
import validator from "gltf-validator";

const path = process.argv[2];
if (!path) {
  console.error("usage: node validate.mjs <model.glb>");
  process.exit(2);
}

try {
  const bytes = new Uint8Array(await readFile(path));
  const report = await validator.validateBytes(bytes, { uri: basename(path), maxIssues: 100 });
  console.log(JSON.stringify(report, null, 2));
  process.exit(report.issues.numErrors > 0 ? 1 : 0);
} catch (error) {
  console.error(`cannot validate ${path}: ${error}`);
  process.exit(2);
}
