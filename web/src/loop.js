// The step loop: block diffusion over any backend. dgport/loop.py in JavaScript, operation for
// operation (the randomness contract, the sampler, the stopping rule, the KV handoff), so that a
// seed gives the same tokens here as in Python. One row (B = 1).

import { PCG64 } from "./pcg64.js";
import { StableAndConfident, acceptMask, padAfterEos, temperature } from "./sampler.js";

export const ENCODE_CHUNK = 1024;

export class DgportError extends Error {}

/** Refuse a run whose positions would pass max_position_embeddings (loop.py's check_context). */
export function checkContext(config, cached, promptLen, maxNewTokens) {
  const C = config.canvas_length;
  const limit = config.max_position_embeddings;
  const canvases = Math.ceil(maxNewTokens / C);
  const need = cached + promptLen + canvases * C;
  if (need > limit) {
    const room = limit - cached - canvases * C;
    const hint = room > 0 ? `shorten the prompt to at most ${room} tokens or lower max_new_tokens` : "lower max_new_tokens";
    throw new DgportError(`the prompt (${promptLen} tokens) and max_new_tokens ${maxNewTokens} (${canvases} canvases of ${C}) need ${need} positions, more than this model's context of ${limit} (max_position_embeddings); ${hint}`);
  }
}

/** backend.encode over ids and positions, `chunk` tokens at a time. */
export async function encodeChunked(backend, ids, positions, chunk = ENCODE_CHUNK) {
  for (let s = 0; s < ids.length; s += chunk) {
    await backend.encode(ids.subarray(s, s + chunk), positions.subarray(s, s + chunk));
  }
}

const arange = (start, n) => Float64Array.from({ length: n }, (_, i) => start + i);

/** One generation's state (loop.py's Row): encode `toEncode` at `encPos`, then beginCanvas, then
 * stepInputs / the backend's denoise / afterStep while `denoising`, until `done`. */
export class Row {
  constructor(promptIds, settings, rng, config, start = 0, template = null, onStep = null, onCanvas = null) {
    const prompt = Int32Array.from(promptIds);
    if (prompt.length === 0) throw new DgportError("the prompt is empty; give at least one token");
    const C = config.canvas_length;
    const V = config.vocab_size;
    if (prompt.some((t) => t < 0 || t >= V)) throw new DgportError(`prompt token ids must lie in [0, ${V})`);
    Object.assign(this, { settings, rng, C, V, template, onStep, onCanvas });
    this.stopper = new StableAndConfident(settings.stability_threshold, settings.confidence_threshold);
    this.result = { tokenIds: [], stepsPerCanvas: [], finished: false, fixedTokens: 0, holes: null };
    this.toEncode = prompt;
    this.encPos = arange(start, prompt.length);
    this.canvases = template === null ? Math.ceil(settings.max_new_tokens / C) : template.canvases(C);
    this.k = -1;
    this.curStep = 0;
    this.done = false;
  }

  get denoising() {
    return this.curStep > 0;
  }

  beginCanvas() {
    const s = this.settings;
    const C = this.C;
    this.k += 1;
    const last = this.encPos[this.encPos.length - 1];
    this.decPos = arange(last + 1, C);
    this.canvas = Int32Array.from(this.rng.integers(this.V, C));
    this.fixed = this.free = null;
    if (this.template !== null) {
      [this.fixedIds, this.fixed] = this.template.canvas(this.k, C, s.eos_token_ids[0], s.pad_token_id);
      this.free = this.fixed.map((f) => 1 - f);
      this.canvas = this.canvas.map((t, i) => (this.fixed[i] ? this.fixedIds[i] : t));
    }
    this.argmax = this.canvas;
    this.stopper.reset();
    this.steps = 0;
    this.curStep = this.free === null || this.free.some((f) => f) ? s.max_denoising_steps : 0;
    if (!this.denoising) this.commit();
  }

  /** [canvas, positions, temperature, uniforms] of the next step. */
  stepInputs() {
    const s = this.settings;
    this.t = temperature(this.curStep, s.max_denoising_steps, s.t_min, s.t_max);
    const uniforms = this.rng.random(this.C);
    return [this.canvas, this.decPos, this.t, uniforms];
  }

  /** The backend's outputs (argmax, sampled: Int32Array [C]; entropy: Float32Array [C]). */
  afterStep(argmax, entropy, sampled) {
    const s = this.settings;
    const fixed = this.fixed;
    const renoise = this.rng.integers(this.V, this.C);
    const modelEntropy = entropy;
    if (fixed !== null) {
      entropy = entropy.map((e, i) => (fixed[i] ? 0 : e));
      argmax = argmax.map((t, i) => (fixed[i] ? this.fixedIds[i] : t));
    }
    const accepted = acceptMask(entropy, s.entropy_bound);
    let canvas = Int32Array.from(accepted, (a, i) => (a ? sampled[i] : renoise[i]));
    if (fixed !== null) canvas = canvas.map((t, i) => (fixed[i] ? this.fixedIds[i] : t));
    this.canvas = canvas;
    this.argmax = argmax;
    const stop = this.stopper.call(argmax, modelEntropy, this.free);
    this.steps += 1;
    this.curStep -= 1;
    if (this.onStep !== null) {
      this.onStep({ canvasIndex: this.k, step: this.steps - 1, temperature: this.t, argmax, entropy: modelEntropy,
                    accepted, canvas, fixed });
    }
    if (stop || this.curStep === 0) {
      this.curStep = 0;
      this.commit();
    }
  }

  commit() {
    const s = this.settings;
    const res = this.result;
    const eos = s.eos_token_ids;
    const pad = s.pad_token_id;
    let committed;
    let finished;
    if (this.template === null) {
      [committed, finished] = padAfterEos(this.argmax, eos, pad);
    } else {
      committed = this.template.commit(this.argmax, this.fixedIds, this.fixed, eos, pad);
      finished = this.k === this.canvases - 1;
      res.fixedTokens += committed.filter((t, i) => this.fixed[i] && t !== pad).length;
    }
    res.tokenIds.push(...committed);
    res.stepsPerCanvas.push(this.steps);
    res.finished = finished;
    if (this.onCanvas !== null) {
      this.onCanvas({ canvasIndex: this.k, tokens: committed, steps: this.steps, finished, fixed: this.fixed });
    }
    if (finished || this.k === this.canvases - 1) {
      this.done = true;
      if (this.template !== null) res.holes = this.template.holeIds(res.tokenIds, pad);
      return;
    }
    this.toEncode = this.template === null ? this.argmax : committed;
    this.encPos = this.decPos;
  }
}

/** Generate after `promptIds` (loop.py's generate_ids): positions continue from backend.cacheLen.
 * `shouldStop()` (optional) is asked between steps; when it returns true the run ends with
 * result.stopped = true and what was committed so far. */
export async function generateIds(backend, promptIds, settings, rng, { onStep = null, onCanvas = null,
  encodeChunk = ENCODE_CHUNK, template = null, shouldStop = null } = {}) {
  const row = new Row(promptIds, settings, rng, backend.config, backend.cacheLen, template, onStep, onCanvas);
  while (!row.done) {
    await encodeChunked(backend, row.toEncode, row.encPos, encodeChunk);
    backend.newCanvas();
    row.beginCanvas();
    while (row.denoising) {
      if (shouldStop !== null && (await shouldStop())) {
        row.result.stopped = true;
        return row.result;
      }
      const out = await backend.denoise(...row.stepInputs());
      row.afterStep(out.argmax, out.entropy, out.sampled);
    }
  }
  return row.result;
}

export { PCG64 };
