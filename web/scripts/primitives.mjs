// node scripts/primitives.mjs CASES.json: the loop's building blocks on given inputs, one JSON line per
// case, for dgport's tests to compare with numpy. A case is one of
//   {"rng": {"seed": "N", "draws": [["integers", high, n] | ["random", n], ...]}}
//   {"mean": [floats]}   {"accept": {"entropy": [floats], "bound": x}}   {"temperature": [cur, N, t_min, t_max]}

import { readFileSync } from "node:fs";

import { PCG64, acceptMask, meanF32, temperature } from "../src/index.js";

for (const c of JSON.parse(readFileSync(process.argv[2], "utf-8"))) {
  let out;
  if (c.rng) {
    const rng = new PCG64(BigInt(c.rng.seed));
    out = c.rng.draws.map(([kind, a, b]) => (kind === "integers" ? rng.integers(a, b) : Array.from(rng.random(a))));
  } else if (c.mean) {
    out = meanF32(Float32Array.from(c.mean));
  } else if (c.accept) {
    out = Array.from(acceptMask(Float32Array.from(c.accept.entropy), c.accept.bound));
  } else if (c.temperature) {
    out = temperature(...c.temperature);
  }
  console.log(JSON.stringify(out));
}
