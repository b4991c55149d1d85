// Whether onnxruntime-node sums a quantized export's int8 products exactly on this CPU (Node.js only): the
// twin of dgport's runtimes/int8_check.py, running the same worst-case graphs (web/int8_check/, which that
// module writes). x86 CPUs without VNNI add u8 x s8 products in pairs into saturating 16-bit lanes; each
// graph puts the export's most extreme weight integers against activations at +-max and outputs its
// error relative to the exact int8 answer. WebAssembly has no int8-activation kernel: the page needs none.

import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

export const TOLERANCE = 1e-5; // exact int8 sums give ~1e-7 (fp32 rounding); a saturated pair ~1e-1
const FOLDER = fileURLToPath(new URL("../int8_check/", import.meta.url));

/** The MatMulNBits accuracy level for a quantized export (its manifest's `quantization`) on this CPU: 4 (int8
 * activations) where every bit width's worst case gives the exact answer, else 0 (fp32 activations) with a
 * warning: a slower step, never a silently wrong one. `tolerance` is the tests' way to see the fallback. */
export async function int8Level(ort, quantization, { tolerance = TOLERANCE } = {}) {
  const bits = [...new Set([quantization.bits, ...Object.values(quantization.roles ?? {}).map((r) => r.bits)])];
  for (const b of bits.sort()) {
    const model = readFileSync(`${FOLDER}q${b}_g${quantization.group_size}.onnx`);
    const session = await ort.InferenceSession.create(model, {
      intraOpNumThreads: 1, interOpNumThreads: 1, extra: { session: { qdq_matmulnbits_accuracy_level: "4" } } });
    const error = (await session.run({})).relative_error.data[0];
    await session.release();
    if (!(error < tolerance)) {
      console.warn(`dgport-web: this CPU's onnxruntime does not sum ${b}-bit int8 products exactly (relative error ` +
                   `${error} on the worst case of web/int8_check/); computing with fp32 activations (accuracy level 0)`);
      return 0;
    }
  }
  return 4;
}
