"""How fast can an int4 step be, at best, against transformers' bf16 one? Only the matrix products of
one denoise step over the 26B-A4B's layer geometry, side by side in one run, same threads:

- onnxruntime: each weight a constant blocked-uint4 (or uint8) DequantizeLinear -> MatMul, the pattern
  it fuses into MatMulNBits (what a dgport int4 export runs), at MatMulNBits accuracy levels 4 and 0;
- onnxruntime w8a8: its u8 x s8 integer GEMM (DynamicQuantizeLinear, MatMulInteger; int8 weights with
  one scale per output column), a scheme dgport does not export, to show what that kernel would give;
- torch bf16: what transformers runs, F.linear for the dense weights and grouped_mm for the experts.

The quantization follows the int4 export's policy (exporters/quantize.py: attention 8-bit, MLPs and
experts 4-bit, group 64); routing is uniform (canvas x top-k / experts tokens per expert, 16 at the
real model's 256 x 8 / 128). Everything else in a step (routing, norms, attention scores, the head) is
left out, so `torch / onnxruntime` bounds what any int4 graph on these kernels can gain over
transformers' bf16 forward at this geometry.

    python -m bench.gemm_ceiling [--threads 2] [--runs 5] [--canvas 256]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.bench_quant import median_seconds

CONFIG = Path(__file__).resolve().parent.parent / "tests" / "data" / "diffusiongemma-26B-A4B-it.config.json"
GROUP = 64


def gemms(cfg, canvas: int, layer: int) -> dict[str, list[tuple[int, int, int, int]]]:
    """Layer `layer`'s products as {part: [(rows, in, out, bits), ...]}, merged as the export merges them
    (q/k/v in one weight, gate/up in one)."""
    H, d, nkv, nh = cfg.hidden_size, cfg.head_dims[layer], cfg.kv_heads[layer], cfg.num_heads
    qkv = nh * d + nkv * d * (2 if cfg.is_sliding(layer) else 1)
    n = canvas * cfg.top_k_experts // cfg.num_experts
    M = cfg.moe_intermediate_size
    return {
        "attention": [(canvas, H, qkv, 8), (canvas, nh * d, H, 8)],
        "dense MLP": [(canvas, H, 2 * cfg.intermediate_size, 4), (canvas, cfg.intermediate_size, H, 4)],
        "experts": [(n, H, 2 * M, 4), (n, M, H, 4)] * cfg.num_experts,
    }


INTEGER_KERNELS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def _onnx_session(shapes, threads: int, level: int, w8a8: bool = False):
    """A session running every product of `shapes` ([rows, in, out, bits]) once, and how many of them
    run in the kernel meant: MatMulNBits (each weight a constant blocked DequantizeLinear -> MatMul,
    as dgport's quantized exports write them), or with `w8a8` onnxruntime's u8 x s8 integer GEMM
    (DynamicQuantizeLinear on the activations, per-tensor; int8 weights with one scale per output
    column: the scheme it needs, which group-wise weights are not)."""
    import onnxruntime as ort
    from onnx import TensorProto as T, helper

    rng = np.random.default_rng(0)
    nodes, inits, inputs = [], [], {}
    sums = []
    for j, (m, k, n, bits) in enumerate(shapes):
        x = f"x_{m}_{k}"
        inputs.setdefault(x, helper.make_tensor_value_info(x, T.FLOAT, [m, k]))
        # random integers: the kernels' speed does not depend on the values
        if w8a8:
            q = rng.integers(-127, 128, (k * n,), dtype=np.int8).tobytes()
            s = (rng.random(n, dtype=np.float32) * 1e-2).astype(np.float32)
            inits += [helper.make_tensor(f"q{j}", T.INT8, [k, n], q, raw=True),
                      helper.make_tensor(f"s{j}", T.FLOAT, [n], s.tobytes(), raw=True)]
            nodes += [helper.make_node("DynamicQuantizeLinear", [x], [f"xq{j}", f"xs{j}", f"xz{j}"]),
                      helper.make_node("MatMulInteger", [f"xq{j}", f"q{j}", f"xz{j}"], [f"i{j}"]),
                      helper.make_node("Cast", [f"i{j}"], [f"f{j}"], to=T.FLOAT),
                      helper.make_node("Mul", [f"f{j}", f"xs{j}"], [f"g{j}"]),
                      helper.make_node("Mul", [f"g{j}", f"s{j}"], [f"y{j}"])]
        else:
            qt = T.UINT4 if bits == 4 else T.UINT8
            q = rng.integers(0, 256, (k * n * bits // 8,), dtype=np.uint8).tobytes()
            z = rng.integers(0, 256, ((k // GROUP) * n * bits // 8,), dtype=np.uint8).tobytes()
            s = (rng.random((k // GROUP, n), dtype=np.float32) * 1e-2).astype(np.float32)
            inits += [helper.make_tensor(f"q{j}", qt, [k, n], q, raw=True),
                      helper.make_tensor(f"z{j}", qt, [k // GROUP, n], z, raw=True),
                      helper.make_tensor(f"s{j}", T.FLOAT, [k // GROUP, n], s.tobytes(), raw=True)]
            nodes += [helper.make_node("DequantizeLinear", [f"q{j}", f"s{j}", f"z{j}"], [f"w{j}"], axis=0,
                                       block_size=GROUP),
                      helper.make_node("MatMul", [x, f"w{j}"], [f"y{j}"])]
        nodes.append(helper.make_node("ReduceSum", [f"y{j}"], [f"r{j}"], keepdims=0))
        sums.append(f"r{j}")
    nodes.append(helper.make_node("Sum", sums, ["out"]))
    g = helper.make_graph(nodes, "gemms", list(inputs.values()), [helper.make_tensor_value_info("out", T.FLOAT, [])],
                          initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(level))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {name: rng.standard_normal(tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)).astype(np.float32)
             for name, vi in inputs.items()}
    kernels = INTEGER_KERNELS if w8a8 else {"MatMulNBits"}
    fused = sum(n.op_type in kernels for n in _optimized_nodes(model, so))
    return (lambda: sess.run(None, feeds)), fused


def _optimized_nodes(model, so):
    """The node list onnxruntime runs (its optimized graph), to check that every product was fused."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "opt.onnx")
        so2 = ort.SessionOptions()
        so2.intra_op_num_threads = so.intra_op_num_threads
        so2.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        # the MatMulNBits fusion is an extended-level one; the level above adds layout changes that
        # onnxruntime warns about when serialized
        so2.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so2.optimized_model_filepath = path
        ort.InferenceSession(model.SerializeToString(), so2, providers=["CPUExecutionProvider"])
        return list(onnx.load(path, load_external_data=False).graph.node)


def _torch_fn(shapes, threads: int, experts: bool):
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    if not experts:
        ws = [(torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16() * 0.02)
              for m, k, n, _ in shapes]
        return lambda: [torch.nn.functional.linear(x, w) for x, w in ws]
    # experts as transformers' grouped_mm_experts_forward runs them: one grouped product per projection
    grouped = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    calls = []
    for proj in (shapes[0::2], shapes[1::2]):
        m, k, n, _ = proj[0]
        e = len(proj)
        x = torch.randn(e * m, k, generator=g).bfloat16()
        w = (torch.randn(e, n, k, generator=g) * 0.02).bfloat16()
        offs = torch.arange(1, e + 1, dtype=torch.int32) * m
        calls.append((x, w.transpose(-2, -1), offs))
    return lambda: [grouped(x, w, offs=o) for x, w, o in calls]


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    return 1e3 * median_seconds(fn, runs)


def main(argv=None):
    from dgport.config import TextConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    cfg = TextConfig.from_hf(json.loads(CONFIG.read_text()), where=str(CONFIG))
    layers = {"sliding": next(i for i in range(cfg.num_layers) if cfg.is_sliding(i)),
              "full": next(i for i in range(cfg.num_layers) if not cfg.is_sliding(i))}
    rows, res = [], {}
    for kind, i in layers.items():
        for part, shapes in gemms(cfg, a.canvas, i).items():
            gflop = sum(2 * m * k * n for m, k, n, _ in shapes) / 1e9
            r = {"gflop": gflop}
            for level in (4, 0):
                fn, fused = _onnx_session(shapes, a.threads, level)
                if fused != len(shapes):
                    raise SystemExit(f"{kind} {part}: onnxruntime fused {fused} of {len(shapes)} products into "
                                     "MatMulNBits; the comparison would not measure its kernel")
                r[f"ort_acc{level}_ms"] = _median_ms(fn, a.runs)
                del fn
            fn, n_int = _onnx_session(shapes, a.threads, 0, w8a8=True)
            if n_int != len(shapes):
                raise SystemExit(f"{kind} {part}: {n_int} of {len(shapes)} products run onnxruntime's integer GEMM")
            r["ort_w8a8_ms"] = _median_ms(fn, a.runs)
            del fn
            r["torch_bf16_ms"] = _median_ms(_torch_fn(shapes, a.threads, part == "experts"), a.runs)
            res[f"{kind} {part}"] = r
            rows.append((kind, part, r))
    n_sliding = sum(cfg.is_sliding(i) for i in range(cfg.num_layers))
    weight = {"sliding": n_sliding, "full": cfg.num_layers - n_sliding}
    print(f"the 26B-A4B's layer products, canvas {a.canvas}, {a.threads} threads, medians of {a.runs}; "
          f"int4 export policy, group {GROUP}")
    print("| layer | part | GFLOP | ORT int4 acc4 ms | ORT acc0 ms | ORT w8a8 ms | torch bf16 ms | "
          "torch / ORT acc4 | torch / ORT w8a8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, part, r in rows:
        print(f"| {kind} | {part} | {r['gflop']:.1f} | {r['ort_acc4_ms']:.1f} | {r['ort_acc0_ms']:.1f} | "
              f"{r['ort_w8a8_ms']:.1f} | {r['torch_bf16_ms']:.1f} | {r['torch_bf16_ms'] / r['ort_acc4_ms']:.2f}x | "
              f"{r['torch_bf16_ms'] / r['ort_w8a8_ms']:.2f}x |")
    for label, w in (("one sliding + one full layer (the real-slice fixture)", {"sliding": 1, "full": 1}),
                     (f"the whole model ({weight['sliding']} sliding + {weight['full']} full layers)", weight)):
        tot = {k: sum(w[kind] * r[k] for kind, _, r in rows)
               for k in ("ort_acc4_ms", "ort_w8a8_ms", "torch_bf16_ms", "gflop")}
        print(f"{label}: {tot['gflop']:.0f} GFLOP, torch bf16 {tot['torch_bf16_ms']:.0f} ms; ORT int4 acc4 "
              f"{tot['ort_acc4_ms']:.0f} ms: ceiling {tot['torch_bf16_ms'] / tot['ort_acc4_ms']:.2f}x; ORT w8a8 "
              f"{tot['ort_w8a8_ms']:.0f} ms: ceiling {tot['torch_bf16_ms'] / tot['ort_w8a8_ms']:.2f}x")
        res[label] = tot
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
