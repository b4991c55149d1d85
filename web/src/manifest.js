// An export's dgport.json, read and checked before anything runs (dgport/manifest.py's rules for
// the parts the JavaScript loop uses). Everything in an export is untrusted.

export const FORMAT_VERSION = 3;
export const DTYPES = ["fp32", "fp16"]; // JavaScript has no bf16 tensors (docs/GRAPH_CONTRACT.md)
const MAX_MANIFEST = 64 << 20;

export class ExportError extends Error {}

const isInt = (v, lo, hi) => Number.isSafeInteger(v) && v >= lo && v <= hi;
const isNum = (v, lo, hi) => typeof v === "number" && Number.isFinite(v) && v >= lo && v <= hi;

function need(ok, where, what) {
  if (!ok) throw new ExportError(`dgport.json: ${where} ${what}; export again with dgport`);
}

/** Checks of the generation settings (dgport/config.py's GenerationDefaults.validate). */
export function checkSettings(g, V = 1 << 30) {
  const bad = (key, rule) => { throw new ExportError(`${key} must be ${rule} (got ${JSON.stringify(g[key])})`); };
  if (!isInt(g.max_new_tokens, 1, 1 << 20)) bad("max_new_tokens", "a positive integer up to 1048576");
  if (!isInt(g.max_denoising_steps, 1, 10000)) bad("max_denoising_steps", "a positive integer up to 10000");
  if (!isNum(g.entropy_bound, Number.MIN_VALUE, 1e9)) bad("entropy_bound", "a finite number > 0 and <= 1e9");
  if (!isNum(g.t_min, 0, 100)) bad("t_min", "a finite number in [0, 100]");
  if (!isNum(g.t_max, Number.MIN_VALUE, 100)) bad("t_max", "a finite number in (0, 100]");
  if (g.t_min > g.t_max) throw new ExportError(`t_min (${g.t_min}) must not be above t_max (${g.t_max})`);
  if (!isInt(g.stability_threshold, 0, 1000)) bad("stability_threshold", "an integer in [0, 1000]");
  if (!isNum(g.confidence_threshold, Number.MIN_VALUE, 1e9)) bad("confidence_threshold", "a finite number > 0 and <= 1e9");
  if (!Array.isArray(g.eos_token_ids) || g.eos_token_ids.length < 1 || g.eos_token_ids.length > 1024
      || !g.eos_token_ids.every((e) => isInt(e, 0, V - 1))) bad("eos_token_ids", "a non-empty list of token ids");
  if (!isInt(g.pad_token_id, 0, V - 1)) bad("pad_token_id", "a token id");
  return g;
}

/** The parsed, checked manifest of an export: {config, generation, dtype, graphs, weights, artifacts, joint}. */
export function readManifest(bytes) {
  if (bytes.length > MAX_MANIFEST) throw new ExportError("dgport.json: larger than 64 MiB; not a dgport export");
  let m;
  try {
    m = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch (e) {
    throw new ExportError(`dgport.json: not JSON (${e.message}); not a dgport export`);
  }
  need(m && typeof m === "object" && !Array.isArray(m), "the manifest", "is not an object");
  if (m.format_version !== FORMAT_VERSION) {
    throw new ExportError(`dgport.json: format version ${JSON.stringify(m.format_version)}; this page reads version ${FORMAT_VERSION}: export again with this dgport`);
  }
  const c = m.config;
  need(c && typeof c === "object", "config", "is missing");
  need(isInt(c.vocab_size, 2, 1 << 24), "config.vocab_size", "is not a vocabulary size");
  need(isInt(c.hidden_size, 1, 1 << 16), "config.hidden_size", "is not a width");
  need(isInt(c.num_layers, 1, 1024), "config.num_layers", "is not a layer count");
  need(isInt(c.canvas_length, 1, 1 << 16), "config.canvas_length", "is not a canvas length");
  need(isInt(c.max_position_embeddings, 1, 1 << 24), "config.max_position_embeddings", "is not a context length");
  for (const key of ["kv_heads", "head_dims"]) {
    need(Array.isArray(c[key]) && c[key].length === c.num_layers && c[key].every((v) => isInt(v, 1, 1 << 12)),
      `config.${key}`, "needs one positive entry per layer");
  }
  need(m.generation && typeof m.generation === "object", "generation", "is missing");
  const generation = checkSettings({ ...m.generation }, c.vocab_size);
  const onnx = m.formats && m.formats.onnx;
  if (!onnx) throw new ExportError("this export has no ONNX graphs (an MLX-only export); export with --format onnx");
  if (!DTYPES.includes(onnx.dtype)) {
    throw new ExportError(`this export is ${JSON.stringify(onnx.dtype)}; JavaScript runs fp32 and fp16 exports (onnxruntime-web has no bf16 tensors): export with --dtype fp32 or --dtype fp16`);
  }
  const graphs = onnx.cpu_graphs || onnx.graphs;
  need(graphs && typeof graphs === "object", "formats.onnx.graphs", "is missing");
  const joint = "step" in graphs;
  const names = joint ? ["step"] : ["encoder", "denoise_step"];
  for (const n of names) {
    need(graphs[n] && typeof graphs[n].file === "string", `formats.onnx graph ${n}`, "is missing");
  }
  const weights = onnx.weights && onnx.weights.file;
  need(typeof weights === "string", "formats.onnx.weights.file", "is missing");
  const artifacts = m.artifacts || {};
  const files = [...new Set([...names.map((n) => graphs[n].file), weights, "tokenizer.json", "tokenizer_config.json"])];
  for (const f of files) {
    need(/^[A-Za-z0-9_.-]+$/.test(f) && !f.startsWith("."), `file name ${JSON.stringify(f)}`, "is not a plain file name");
    const a = artifacts[f];
    need(a && isInt(a.size, 0, Number.MAX_SAFE_INTEGER) && /^[0-9a-f]{64}$/.test(a.sha256), `artifacts.${f}`, "lacks a size and sha256");
  }
  const q = onnx.quantization ?? null;
  if (q !== null) { // src/int8_check.js reads the bit widths and the group size (dgport writes groups of 32, 64, 128)
    need(typeof q === "object" && [4, 8].includes(q.bits), "formats.onnx.quantization.bits", "is not 4 or 8");
    need([32, 64, 128].includes(q.group_size), "formats.onnx.quantization.group_size", "is not 32, 64 or 128");
    for (const [role, r] of Object.entries(q.roles ?? {})) {
      need(r && [4, 8].includes(r.bits), `formats.onnx.quantization.roles.${role}.bits`, "is not 4 or 8");
    }
  }
  return { config: c, generation, dtype: onnx.dtype, joint, graphs: Object.fromEntries(names.map((n) => [n, graphs[n]])),
           weights, artifacts, files, quantization: q };
}

const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");

/** Refuse a file whose size or sha256 is not what the manifest lists (a partial or tampered export). */
export async function verifyFile(manifest, name, bytes) {
  const a = manifest.artifacts[name];
  if (bytes.length !== a.size) {
    throw new ExportError(`${name}: ${bytes.length} bytes, but dgport.json lists ${a.size}; the export is incomplete or was changed: export again`);
  }
  const subtle = globalThis.crypto && globalThis.crypto.subtle;
  if (!subtle) throw new ExportError("this page needs a secure context (https, or http on localhost) to verify the export's files");
  const digest = hex(await subtle.digest("SHA-256", bytes));
  if (digest !== a.sha256) {
    throw new ExportError(`${name}: its sha256 is not the one dgport.json lists; the export was changed or damaged: export again`);
  }
  return bytes;
}
