// The reference sampler's pieces, as dgport/sampler.py computes them (float32 where it does).

const f32 = Math.fround;

/** T = t_min + (t_max - t_min) * cur_step / N in float32, in the reference's order of operations. */
export function temperature(curStep, maxSteps, tMin, tMax) {
  const frac = f32(curStep / maxSteps);
  return f32(f32(tMin) + f32(f32(tMax - tMin) * frac));
}

/** Position indices sorted by value, ties by index (numpy's stable argsort). */
export function stableArgsort(values) {
  const order = Array.from(values, (_, i) => i);
  order.sort((i, j) => (values[i] < values[j] ? -1 : values[i] > values[j] ? 1 : i - j));
  return order;
}

/** Entropy-bound acceptance: the k-th lowest-entropy position is accepted iff the float32 sum of
 * the k-1 lower entropies is <= bound. entropy: Float32Array [C] -> Uint8Array [C] of 0/1. */
export function acceptMask(entropy, bound) {
  const order = stableArgsort(entropy);
  const mask = new Uint8Array(entropy.length);
  const b = f32(bound);
  let cumsum = 0;
  for (const i of order) {
    const e = entropy[i];
    cumsum = f32(cumsum + e);
    mask[i] = f32(cumsum - e) <= b ? 1 : 0;
  }
  return mask;
}

/** numpy's float32 sum of a Float32Array: pairwise, 8 accumulators per block of up to 128. */
export function pairwiseSum(a, start = 0, n = a.length) {
  if (n < 8) {
    let r = 0;
    for (let i = 0; i < n; i++) r = f32(r + a[start + i]);
    return r;
  }
  if (n <= 128) {
    const r = Array.from(a.subarray(start, start + 8));
    let i = 8;
    for (; i < n - (n % 8); i += 8) for (let j = 0; j < 8; j++) r[j] = f32(r[j] + a[start + i + j]);
    let res = f32(f32(f32(r[0] + r[1]) + f32(r[2] + r[3])) + f32(f32(r[4] + r[5]) + f32(r[6] + r[7])));
    for (; i < n; i++) res = f32(res + a[start + i]);
    return res;
  }
  let n2 = Math.floor(n / 2);
  n2 -= n2 % 8;
  return f32(pairwiseSum(a, start, n2) + pairwiseSum(a, start + n2, n - n2));
}

/** numpy's mean(dtype=float32): the pairwise sum divided by the count, in float32. */
export function meanF32(a) {
  return f32(pairwiseSum(a) / a.length);
}

/** Stop a canvas when the argmax canvas equals each of the previous `stabilityThreshold` argmax
 * canvases and the mean entropy (over `free` positions when given) is below `confidenceThreshold`. */
export class StableAndConfident {
  constructor(stabilityThreshold, confidenceThreshold) {
    this.stabilityThreshold = stabilityThreshold;
    this.confidenceThreshold = f32(confidenceThreshold);
    this.history = null;
  }

  reset() {
    this.history = null;
  }

  /** argmax: Int32Array [C]; entropy: Float32Array [C]; free: Uint8Array [C] or null. */
  call(argmax, entropy, free = null) {
    let stable = true;
    if (this.stabilityThreshold > 0) {
      if (this.history === null) {
        this.history = Array.from({ length: this.stabilityThreshold }, () => new Int32Array(argmax.length).fill(-1));
      }
      stable = this.history.every((h) => h.every((t, i) => t === argmax[i]));
      this.history.push(this.history.shift());
      this.history[this.history.length - 1] = Int32Array.from(argmax);
    }
    const values = free === null ? entropy : entropy.filter((_, i) => free[i]);
    const confident = meanF32(values) < this.confidenceThreshold;
    return stable && confident;
  }
}

/** Every token after the first EOS id becomes PAD (the EOS stays): [tokens, finished]. */
export function padAfterEos(tokens, eosIds, padId) {
  const first = tokens.findIndex((t) => eosIds.includes(t));
  if (first < 0) return [tokens, false];
  const out = Int32Array.from(tokens);
  out.fill(padId, first + 1);
  return [out, true];
}
