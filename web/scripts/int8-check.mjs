// node scripts/int8-check.mjs EXPORT [TOLERANCE]: the accuracy level loadExport would use for EXPORT on this
// CPU, as one JSON line {"level": N} (src/int8_check.js). Used by dgport's tests.

import { readFileSync } from "node:fs";
import { join } from "node:path";
import * as ort from "onnxruntime-node";

import { int8Level, TOLERANCE } from "../src/int8_check.js";
import { readManifest } from "../src/manifest.js";

const [dir, tolerance] = process.argv.slice(2);
if (!dir) {
  console.error("usage: node scripts/int8-check.mjs EXPORT [TOLERANCE]");
  process.exit(2);
}
try {
  const manifest = readManifest(readFileSync(join(dir, "dgport.json")));
  if (manifest.quantization === null) throw new Error(`${dir}: not a quantized export`);
  const level = await int8Level(ort, manifest.quantization, { tolerance: tolerance === undefined ? TOLERANCE : Number(tolerance) });
  console.log(JSON.stringify({ level }));
} catch (e) {
  console.error(`int8-check.mjs: ${e.message}`);
  process.exit(1);
}
