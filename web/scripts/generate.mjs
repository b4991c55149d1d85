// node scripts/generate.mjs EXPORT REQUESTS.json: generate with onnxruntime-node, one JSON line per request.
// A request: {"prompt": "..." or [ids], "seed": N, "max_new_tokens": N, "raw": bool, "template": [...],
// "threads": N, "sampler": {...}}. Used by dgport's tests to compare with Python token for token.

import { readFileSync } from "node:fs";
import * as ort from "onnxruntime-node";

import { loadExport } from "../src/node.js";

const [dir, requestsFile] = process.argv.slice(2);
if (!dir || !requestsFile) {
  console.error("usage: node scripts/generate.mjs EXPORT REQUESTS.json");
  process.exit(2);
}
try {
  const requests = JSON.parse(readFileSync(requestsFile, "utf-8"));
  const threads = requests.length ? requests[0].threads ?? 1 : 1;
  const gen = await loadExport(dir, ort, { threads });
  for (const r of requests) {
    const started = performance.now();
    const res = await gen.generate(r.prompt, { seed: r.seed, maxNewTokens: r.max_new_tokens ?? null, raw: r.raw ?? false,
      template: r.template ?? null, sampler: r.sampler ?? {} });
    console.log(JSON.stringify({ token_ids: res.tokenIds, text: res.text, seed: res.seed,
                                 steps_per_canvas: res.stepsPerCanvas, finished: res.finished, holes: res.holes,
                                 seconds: (performance.now() - started) / 1000 }));
  }
} catch (e) {
  console.error(`generate.mjs: ${e.message}`);
  process.exit(1);
}
