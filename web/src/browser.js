// Opening an export served over HTTP, in the browser (onnxruntime-web, wasm): every file fetched from
// the same origin, checked against dgport.json, then held in memory (the page works offline once loaded).

import { OrtBackend, sessionOptions } from "./backend.js";
import { Generator } from "./generator.js";
import { ExportError, readManifest, verifyFile } from "./manifest.js";
import { ChatTokenizer } from "./tokenizer.js";

// onnxruntime-web runs in 32-bit WebAssembly: the weights are copied into its 4 GiB heap once per session.
export const MAX_WEB_WEIGHTS = 1 << 30;

async function fetchBytes(url, onProgress) {
  let response;
  try {
    response = await fetch(url);
  } catch (e) {
    throw new ExportError(`${url}: could not be fetched (${e.message}); is the server still running?`);
  }
  if (!response.ok) throw new ExportError(`${url}: the server answered ${response.status}; serve the export with dgport web`);
  const total = Number(response.headers.get("content-length")) || 0;
  if (!response.body || !onProgress) return new Uint8Array(await response.arrayBuffer());
  const chunks = [];
  let got = 0;
  const reader = response.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    got += value.length;
    onProgress(got, total);
  }
  const out = new Uint8Array(got);
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** The export `info` (dgport.json plus the tokenizer's `dgport` section) and a Generator over it.
 * `base`: the URL of the export folder (ending in /); `ort`: the onnxruntime-web module;
 * `onProgress(file, bytesSoFar, total)`. */
export async function loadExportFromUrl(base, ort, { threads = 0, onProgress = null } = {}) {
  const manifest = readManifest(await fetchBytes(new URL("dgport.json", base)));
  if (manifest.artifacts[manifest.weights].size > MAX_WEB_WEIGHTS) {
    throw new ExportError(`${manifest.weights}: ${manifest.artifacts[manifest.weights].size} bytes, more than a browser tab can hold twice in WebAssembly (1 GiB here); run this export with dgport run`);
  }
  const get = async (name) => verifyFile(manifest, name,
    await fetchBytes(new URL(name, base), onProgress && ((got, total) => onProgress(name, got, total))));
  const json = async (name) => JSON.parse(new TextDecoder().decode(await get(name)));
  const tokenizerConfig = await json("tokenizer_config.json");
  const tokenizer = new ChatTokenizer(await json("tokenizer.json"), tokenizerConfig);
  const weights = await get(manifest.weights);
  const sessions = {};
  for (const [key, g] of Object.entries(manifest.graphs)) {
    const options = { ...sessionOptions(manifest, { threads, executionProviders: ["wasm"] }),
                      externalData: [{ path: manifest.weights, data: weights }] };
    sessions[key] = await ort.InferenceSession.create(await get(g.file), options);
  }
  const task = tokenizerConfig.dgport && typeof tokenizerConfig.dgport === "object" ? tokenizerConfig.dgport : {};
  return { manifest, task, generator: new Generator(new OrtBackend(ort, manifest, sessions), tokenizer, manifest) };
}
