// Generator: prompt in, tokens out, over one export (dgport/api.py's Generator for one row).

import { PCG64, MAX_SEED } from "./pcg64.js";
import { DgportError, ENCODE_CHUNK, checkContext, generateIds } from "./loop.js";
import { checkSettings } from "./manifest.js";
import { layout } from "./template.js";

const SAMPLER_KEYS = ["max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
  "confidence_threshold", "eos_token_ids", "pad_token_id"];

/** A fresh seed to report, so that any run can be repeated (dgport's fresh_seed: 32 random bits). */
export function freshSeed() {
  return globalThis.crypto.getRandomValues(new Uint32Array(1))[0];
}

export class Generator {
  constructor(backend, tokenizer, manifest) {
    this.backend = backend;
    this.tokenizer = tokenizer;
    this.manifest = manifest;
    this.defaults = manifest.generation;
  }

  get config() {
    return this.backend.config;
  }

  /** Token ids for a prompt: an array of ids as is; a string gets the chat template (raw: only <bos>). */
  promptIds(prompt, { raw = false, system = null } = {}) {
    if (typeof prompt === "string") {
      if (!prompt.trim()) throw new DgportError("the prompt is empty; give some text");
      if (raw) return this.tokenizer.encodeRaw(prompt);
      const messages = [...(system ? [{ role: "system", content: system }] : []), { role: "user", content: prompt }];
      return this.tokenizer.encode(this.tokenizer.render(messages));
    }
    const ids = Array.from(prompt ?? [], Number);
    if (!ids.length || !ids.every(Number.isSafeInteger)) throw new DgportError("the prompt is a string or a non-empty list of integer token ids");
    return ids;
  }

  /** The generation defaults with `overrides` (sampler settings by their Python names), checked. */
  settings(maxNewTokens = null, overrides = {}) {
    const unknown = Object.keys(overrides).filter((k) => !SAMPLER_KEYS.includes(k));
    if (unknown.length) throw new DgportError(`unknown sampler setting(s) ${unknown.join(", ")}; known: ${SAMPLER_KEYS.join(", ")}`);
    const merged = { ...this.defaults };
    for (const [k, v] of Object.entries(overrides)) if (v != null) merged[k] = v;
    if (maxNewTokens != null) merged.max_new_tokens = maxNewTokens;
    try {
      return checkSettings(merged, this.config.vocab_size);
    } catch (e) {
      throw new DgportError(e.message);
    }
  }

  /** Generate after `prompt`. Options: seed (an integer in [0, 2**63 - 1]; drawn when absent and returned),
   * maxNewTokens, raw, system, template (parts: strings and {hole: N}), onStep, onCanvas, shouldStop,
   * encodeChunk, and sampler overrides under `sampler` ({max_denoising_steps: 16, ...}). */
  async generate(prompt, { seed = null, maxNewTokens = null, raw = false, system = null, template = null, onStep = null,
    onCanvas = null, shouldStop = null, encodeChunk = ENCODE_CHUNK, sampler = {} } = {}) {
    let lay = null;
    if (template !== null) {
      lay = layout(template, this.tokenizer);
      maxNewTokens = lay.checkBudget(this.config.canvas_length, maxNewTokens);
    }
    const settings = this.settings(maxNewTokens, sampler);
    if (seed === null) seed = freshSeed();
    if (!(Number.isSafeInteger(seed) || typeof seed === "bigint") || BigInt(seed) < 0n || BigInt(seed) > MAX_SEED) {
      throw new DgportError(`seed must be an integer in [0, 2**63 - 1] (got ${seed})`);
    }
    const rng = new PCG64(seed);
    const ids = this.promptIds(prompt, { raw, system });
    checkContext(this.config, 0, ids.length, settings.max_new_tokens);
    this.backend.reset();
    const out = await generateIds(this.backend, ids, settings, rng, { onStep, onCanvas, encodeChunk, template: lay, shouldStop });
    const pad = settings.pad_token_id;
    return {
      tokenIds: out.tokenIds,
      text: this.tokenizer.decode(out.tokenIds.filter((t) => t !== pad)),
      seed: typeof seed === "bigint" ? seed.toString() : seed,
      stepsPerCanvas: out.stepsPerCanvas,
      finished: out.finished,
      stopped: Boolean(out.stopped),
      promptIds: ids,
      holes: out.holes === null ? null : out.holes.map((h) => this.tokenizer.decode(h)),
    };
  }
}
