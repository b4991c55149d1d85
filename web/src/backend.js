// The ONNX backend: an export's graphs on onnxruntime-web (browser, wasm) or onnxruntime-node, behind
// the same four calls as dgport's Backend protocol (encode, denoise, newCanvas, reset). The KV cache
// and the self-conditioning signal stay in onnxruntime tensors; the loop sees O(canvas) numbers.

const ZEROS = { fp32: (n) => new Float32Array(n), fp16: (n) => new Uint16Array(n) };
const ORT_TYPE = { fp32: "float32", fp16: "float16" };

const int64 = (values) => BigInt64Array.from(values, (v) => BigInt(v));
const toInt32 = (data) => Int32Array.from(data, (v) => Number(v));

export class OrtBackend {
  /** `ort`: the onnxruntime module (onnxruntime-web or onnxruntime-node); `sessions`: {encoder, denoise_step}
   * or {step} InferenceSessions of the export `manifest` (see createSessions). */
  constructor(ort, manifest, sessions) {
    this.ort = ort;
    this.manifest = manifest;
    this.config = manifest.config;
    this.dtype = manifest.dtype;
    this.joint = manifest.joint;
    this.sessions = sessions;
    this.reset();
  }

  get cacheLen() {
    return this._cacheLen;
  }

  reset() {
    this.kv = null;
    this.sc = null;
    this._cacheLen = 0;
  }

  newCanvas() {
    this.sc = null;
  }

  zeros(dims) {
    const n = dims.reduce((a, b) => a * b, 1);
    return new this.ort.Tensor(ORT_TYPE[this.dtype], ZEROS[this.dtype](n), dims);
  }

  cacheFeeds(feeds) {
    if (this.kv === null) {
      const c = this.config;
      this.kv = Array.from({ length: c.num_layers }, (_, i) => [0, 1].map(() => this.zeros([1, c.kv_heads[i], 0, c.head_dims[i]])));
    }
    this.kv.forEach(([k, v], i) => {
      feeds[`past_key_${i}`] = k;
      feeds[`past_value_${i}`] = v;
    });
    return feeds;
  }

  /** Appends the K/V of `ids` (at `positions`) to the cache. */
  async encode(ids, positions) {
    const T = ids.length;
    const feeds = {
      input_ids: new this.ort.Tensor("int64", int64(ids), [1, T]),
      position_ids: new this.ort.Tensor("int64", int64(positions), [1, T]),
    };
    if (this.joint) { // the quantized step graph in encoder mode: the denoiser's inputs are read but unused
      feeds.sc_embeds = this.zeros([1, T, this.config.hidden_size]);
      feeds.temperature = new this.ort.Tensor("float32", Float32Array.of(1), []);
      feeds.uniforms = new this.ort.Tensor("float32", new Float32Array(T), [1, T]);
      feeds.denoise = new this.ort.Tensor("bool", Uint8Array.of(0), []);
    }
    const out = await (this.joint ? this.sessions.step : this.sessions.encoder).run(this.cacheFeeds(feeds));
    this.kv = this.kv.map((_, i) => [out[`present_key_${i}`], out[`present_value_${i}`]]);
    this._cacheLen += T;
  }

  /** One denoise step: {argmax, sampled} Int32Array [C], {entropy} Float32Array [C]. */
  async denoise(canvas, positions, temperature, uniforms) {
    if (this.kv === null) throw new Error("denoise before encode: encode the prompt first");
    const C = canvas.length;
    const feeds = {
      [this.joint ? "input_ids" : "canvas_ids"]: new this.ort.Tensor("int64", int64(canvas), [1, C]),
      position_ids: new this.ort.Tensor("int64", int64(positions), [1, C]),
      sc_embeds: this.sc ?? this.zeros([1, C, this.config.hidden_size]),
      temperature: new this.ort.Tensor("float32", Float32Array.of(temperature), []),
      uniforms: new this.ort.Tensor("float32", Float32Array.from(uniforms), [1, C]),
    };
    if (this.joint) feeds.denoise = new this.ort.Tensor("bool", Uint8Array.of(1), []);
    const out = await (this.joint ? this.sessions.step : this.sessions.denoise_step).run(this.cacheFeeds(feeds));
    this.sc = out.next_sc_embeds;
    return { argmax: toInt32(out.argmax_ids.data), entropy: Float32Array.from(out.entropy.data),
             sampled: toInt32(out.sampled_ids.data) };
  }
}

/** Session options as dgport's Python backend sets them (so outputs match it bit for bit where the
 * kernels are the same): `threads` intra-op threads, one inter-op thread, prepacking off for
 * unquantized exports (on for quantized ones, at MatMulNBits accuracy level `accuracyLevel`: 4 = int8
 * activations, 0 = fp32; node.js picks it with src/int8_check.js). */
export function sessionOptions(manifest, { threads = 0, executionProviders = ["cpu"], accuracyLevel = 4 } = {}) {
  const options = { executionProviders, interOpNumThreads: 1, graphOptimizationLevel: "all" };
  if (threads) options.intraOpNumThreads = threads;
  options.extra = manifest.quantization === null
    ? { session: { disable_prepacking: "1" } }
    : { session: { qdq_matmulnbits_accuracy_level: String(accuracyLevel) } };
  return options;
}
