// Opening an export folder from Node.js (onnxruntime-node): the tests' and scripts' entry point.

import { readFileSync } from "node:fs";
import { join } from "node:path";

import { OrtBackend, sessionOptions } from "./backend.js";
import { Generator } from "./generator.js";
import { int8Level } from "./int8_check.js";
import { readManifest, verifyFile } from "./manifest.js";
import { ChatTokenizer } from "./tokenizer.js";

/** A Generator over the export folder `dir`, every file it reads checked against dgport.json.
 * `ort`: the onnxruntime-node module; `threads`: intra-op threads (0: onnxruntime's default). */
export async function loadExport(dir, ort, { threads = 0 } = {}) {
  const manifest = readManifest(readFileSync(join(dir, "dgport.json")));
  const read = async (name) => verifyFile(manifest, name, new Uint8Array(readFileSync(join(dir, name))));
  await read(manifest.weights);
  // quantized exports: int8 activations only where this CPU sums them exactly (as dgport's Python backend)
  const accuracyLevel = manifest.quantization === null ? 4 : await int8Level(ort, manifest.quantization);
  const sessions = {};
  for (const [key, g] of Object.entries(manifest.graphs)) {
    await read(g.file);
    sessions[key] = await ort.InferenceSession.create(join(dir, g.file), sessionOptions(manifest, { threads, accuracyLevel }));
  }
  const json = async (name) => JSON.parse(new TextDecoder().decode(await read(name)));
  const tokenizer = new ChatTokenizer(await json("tokenizer.json"), await json("tokenizer_config.json"));
  return new Generator(new OrtBackend(ort, manifest, sessions), tokenizer, manifest);
}
