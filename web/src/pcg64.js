// numpy's Generator(PCG64(seed)), the draws dgport's step loop makes, bit for bit:
// SeedSequence seeding, PCG64 (XSL-RR 128/64), the 32-bit buffer numpy keeps between draws,
// `integers(0, n)` (Lemire's bounded method on 32-bit draws, as numpy does for int64 ranges below 2**32)
// and `random(dtype=float32)` ((u32 >> 8) * 2**-24). See dgport/loop.py, the randomness contract.

const M32 = 0xffffffff;
const MASK64 = (1n << 64n) - 1n;
const MASK128 = (1n << 128n) - 1n;
const MULTIPLIER = 0x2360ed051fc65da44385df649fccf645n;
// numpy/random/bit_generator.pyx: SeedSequence's hash constants
const INIT_A = 0x43b0d7e5;
const MULT_A = 0x931e8875;
const INIT_B = 0x8b51f9dd;
const MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd;
const MIX_MULT_R = 0x4973f715;
const POOL_SIZE = 4;
export const MAX_SEED = (1n << 63n) - 1n;

const mul32 = (a, b) => Math.imul(a, b) >>> 0;

/** The entropy pool numpy's SeedSequence(seed) mixes (seed: a non-negative integer or BigInt). */
function seedPool(seed) {
  let big = BigInt(seed);
  const words = [];
  do {
    words.push(Number(big & 0xffffffffn));
    big >>= 32n;
  } while (big > 0n);
  let hashConst = INIT_A;
  const hashmix = (value) => {
    value = (value ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_A);
    value = mul32(value, hashConst);
    return (value ^ (value >>> 16)) >>> 0;
  };
  const mix = (x, y) => {
    const r = (mul32(MIX_MULT_L, x) - mul32(MIX_MULT_R, y)) >>> 0;
    return (r ^ (r >>> 16)) >>> 0;
  };
  const pool = new Array(POOL_SIZE);
  for (let i = 0; i < POOL_SIZE; i++) pool[i] = hashmix(i < words.length ? words[i] : 0);
  for (let src = 0; src < POOL_SIZE; src++)
    for (let dst = 0; dst < POOL_SIZE; dst++)
      if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
  for (let src = POOL_SIZE; src < words.length; src++)
    for (let dst = 0; dst < POOL_SIZE; dst++) pool[dst] = mix(pool[dst], hashmix(words[src]));
  return pool;
}

/** SeedSequence.generate_state(n64, np.uint64): n64 64-bit words as BigInts. */
function generateState(pool, n64) {
  let hashConst = INIT_B;
  const out32 = [];
  for (let i = 0; i < 2 * n64; i++) {
    let v = (pool[i % pool.length] ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_B);
    v = mul32(v, hashConst);
    out32.push((v ^ (v >>> 16)) >>> 0);
  }
  const out = [];
  for (let i = 0; i < n64; i++) out.push((BigInt(out32[2 * i + 1]) << 32n) | BigInt(out32[2 * i]));
  return out;
}

export class PCG64 {
  /** seed: an integer in [0, 2**63 - 1] (a Number up to 2**53 - 1, or a BigInt), as dgport's make_rng takes. */
  constructor(seed) {
    if (!(typeof seed === "bigint" || (Number.isSafeInteger(seed)))) {
      throw new Error(`seed must be an integer in [0, 2**63 - 1] (got ${seed})`);
    }
    const big = BigInt(seed);
    if (big < 0n || big > MAX_SEED) throw new Error(`seed must be an integer in [0, 2**63 - 1] (got ${seed})`);
    const [s0, s1, s2, s3] = generateState(seedPool(big), 4);
    const initstate = (s0 << 64n) | s1;
    const initseq = (s2 << 64n) | s3;
    this.inc = ((initseq << 1n) | 1n) & MASK128;
    this.state = 0n;
    this.step();
    this.state = (this.state + initstate) & MASK128;
    this.step();
    this.hasUint32 = false;
    this.uinteger = 0;
  }

  step() {
    this.state = (this.state * MULTIPLIER + this.inc) & MASK128;
  }

  /** The next 64-bit output (BigInt): advance, then XSL-RR of the new state. */
  next64() {
    this.step();
    const hi = this.state >> 64n;
    const xored = (hi ^ this.state) & MASK64;
    const rot = hi >> 58n;
    return ((xored >> rot) | (xored << ((64n - rot) & 63n))) & MASK64;
  }

  /** numpy's next_uint32: the low half of a fresh 64-bit draw, its high half kept for the next call. */
  next32() {
    if (this.hasUint32) {
      this.hasUint32 = false;
      return this.uinteger;
    }
    const v = this.next64();
    this.hasUint32 = true;
    this.uinteger = Number(v >> 32n);
    return Number(v & 0xffffffffn);
  }

  /** rng.integers(0, high, size=n) for 1 < high <= 2**32: an Array of Numbers (Lemire's bounded method). */
  integers(high, n) {
    if (!Number.isSafeInteger(high) || high < 1 || high > 2 ** 32) throw new Error(`integers: high must be in [1, 2**32] (got ${high})`);
    const out = new Array(n);
    const rng = high - 1; // numpy's inclusive range
    if (rng === 0) return out.fill(0);
    if (rng === M32) {
      for (let i = 0; i < n; i++) out[i] = this.next32();
      return out;
    }
    const excl = rng + 1;
    const threshold = ((M32 - rng) >>> 0) % excl;
    for (let i = 0; i < n; i++) {
      let [hi, lo] = mulWide(this.next32(), excl);
      if (lo < excl) {
        while (lo < threshold) [hi, lo] = mulWide(this.next32(), excl);
      }
      out[i] = hi;
    }
    return out;
  }

  /** rng.random(n, dtype=np.float32): a Float32Array of uniforms in [0, 1). */
  random(n) {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = (this.next32() >>> 8) * 5.9604644775390625e-8; // 2**-24
    return out;
  }
}

/** The 64-bit product of two 32-bit numbers, as [high 32 bits, low 32 bits]. */
function mulWide(a, b) {
  const p = BigInt(a) * BigInt(b);
  return [Number(p >> 32n), Number(p & 0xffffffffn)];
}
