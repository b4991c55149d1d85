"""Quantized ONNX exports on ONNX Runtime's CPU EP, side by side in one run: int4 and int8 (standard
DequantizeLinear graphs; onnxruntime fuses the constant weights into MatMulNBits, accuracy level 0 =
fp32 activations and 4 = int8 activations), the bf16 and fp32 exports, and transformers' own bf16
forward, with this machine's GEMM peak (fp32 MatMul and uint8 x int8 MatMulInteger, same threads)
measured in the same run so each step can be read as a share of it.

    python -m bench.bench_quant                        # real-slice geometry, canvas 256 (builds it: 3 GB)
    python -m bench.bench_quant --checkpoint PATH --runs 3 --threads 2
    python -m bench.bench_quant --vocab-size 262144    # the same two layers under the real model's head
    python -m bench.bench_quant --experts-only         # one expert: standard DQ form vs contrib MatMulNBits
    python -m bench.bench_quant --sudoku               # the shipped Sudoku model: fp32 vs int8 vs int4 quality

Every variant runs in its own subprocess (its peak RSS is its own): a 16-token prompt is encoded, then
one denoise step over a fresh canvas is timed (median of --runs after a warm-up).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.bench_onnx import _peak_rss_mb

PROMPT = 16
VARIANTS = {  # name -> (export options, accuracy level)
    "int4": (dict(quantize=4, group_size=64), 0),
    "int4 acc4": (dict(quantize=4, group_size=64), 4),
    "int8": (dict(quantize=8, group_size=64), 0),
    "int8 acc4": (dict(quantize=8, group_size=64), 4),
    "bf16": (dict(dtype="bf16"), None),
    "fp32": (dict(dtype="fp32"), None),
}


def step_flops(cfg, C: int, past: int) -> float:
    """Multiply-adds x 2 of one denoise step over a C-token canvas after `past` cached tokens: every
    projection, the dense MLP, top-k experts, attention scores and values, the self-conditioning MLP,
    the tied lm_head and the self-conditioning expectation (p @ E)."""
    H, I, M, K, V = cfg.hidden_size, cfg.intermediate_size, cfg.moe_intermediate_size, cfg.top_k_experts, \
        cfg.vocab_size
    mac = 3 * H * I + 2 * H * V  # self-conditioning MLP, lm_head + expectation (per token)
    for i in range(cfg.num_layers):
        d, kv, nh = cfg.head_dims[i], cfg.kv_heads[i], cfg.num_heads
        v = kv * d if cfg.is_sliding(i) else 0
        mac += H * (nh * d + kv * d + v) + nh * d * H  # q/k/v, o
        mac += 3 * H * I + K * 3 * H * M  # dense MLP, experts
        mac += 2 * nh * d * (past + C)  # scores and values
    return 2.0 * mac * C


def median_seconds(fn, runs: int) -> float:
    """Median wall time of `runs` calls of fn (warm it up first)."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def gemm_peak(threads: int, runs: int = 5) -> dict:
    """FLOP/s of a [512, 4096] x [4096, 4096] fp32 MatMul and uint8 x int8 MatMulInteger on ORT's CPU EP."""
    import onnxruntime as ort
    from onnx import TensorProto as T, helper, numpy_helper

    m, k, n = 512, 4096, 4096
    rng = np.random.default_rng(0)
    out = {}
    for name, xt, node, w in (
            ("fp32", T.FLOAT, "MatMul", rng.standard_normal((k, n)).astype(np.float32)),
            ("int8", T.UINT8, "MatMulInteger", rng.integers(-128, 127, (k, n)).astype(np.int8))):
        g = helper.make_graph([helper.make_node(node, ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", xt, [m, k])],
                              [helper.make_tensor_value_info("y", T.FLOAT if name == "fp32" else T.INT32, None)],
                              initializer=[numpy_helper.from_array(w, "w")])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        x = rng.standard_normal((m, k)).astype(np.float32) if name == "fp32" else \
            rng.integers(0, 255, (m, k)).astype(np.uint8)
        s.run(None, {"x": x})
        out[name] = 2.0 * m * k * n / median_seconds(lambda: s.run(None, {"x": x}), runs)
    return out


def side_onnx(export_dir: str, runs: int, threads: int, accuracy_level) -> dict:
    from dgport.manifest import open_export
    from dgport.runtimes.onnx import OnnxBackend

    kw = {} if accuracy_level is None else {"accuracy_level": accuracy_level}
    backend = OnnxBackend(open_export(export_dir, "cpu"), device="cpu", threads=threads, **kw)
    return _time(backend, runs)


def side_torch(ckpt: str, runs: int, threads: int) -> dict:
    import torch

    from dgport.runtimes.torch_ref import TorchRefBackend

    torch.set_num_threads(threads)
    return _time(TorchRefBackend(ckpt, dtype="bf16"), runs)


def _time(backend, runs: int) -> dict:
    cfg = backend.config
    V, C = cfg.vocab_size, cfg.canvas_length
    rng = np.random.default_rng(0)
    ids = np.concatenate([[cfg.bos_token_id], rng.integers(0, V, PROMPT - 1)])[None]
    backend.reset()
    backend.encode(ids, np.arange(PROMPT)[None])
    canvas, cpos = rng.integers(0, V, (1, C)), np.arange(PROMPT, PROMPT + C)[None]
    u = rng.random((1, C), dtype=np.float32)
    times, cpu, argmax = [], [], None
    for r in range(runs + 1):
        backend.new_canvas()
        t, c = time.perf_counter(), time.process_time()
        out = backend.denoise(canvas, cpos, np.float32(0.8), u)
        if r:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        argmax = np.asarray(out.argmax).tolist()
    # CPU seconds (all threads) per step: robust to other processes on a shared machine, unlike wall time
    return {"step_ms": 1e3 * statistics.median(times), "step_cpu_ms": 1e3 * statistics.median(cpu),
            "peak_rss_mb": _peak_rss_mb(), "argmax": argmax}


def experts_micro(threads: int, runs: int, H=2816, M=704, n=16, group=64) -> dict:
    """One expert's gate/up projection [n, H] x [H, 2M] on the tokens routed to it (n = canvas x top-k /
    experts = 16 at the real model's 256 x 8 / 128), its 4-bit weights gathered from all experts inside
    the graph as the sparse Loop does: the standard form (Gather bytes, unpack nibbles, DequantizeLinear,
    MatMul) against the contrib form (Gather the packed blocks, com.microsoft.MatMulNBits on a
    non-constant B), both at accuracy level 0 and 4."""
    import onnxruntime as ort
    from onnx import TensorProto as T, helper, numpy_helper

    from dgport.exporters.quantize import pack4, quantize

    E, N = 8, 2 * M
    rng = np.random.default_rng(0)
    w = rng.standard_normal((E, N, H)).astype(np.float32) * 0.02  # [E, out, in]
    q, s, z = quantize(w, 4, group)
    x = rng.standard_normal((n, H)).astype(np.float32)
    ax = numpy_helper.from_array(np.array([-1], np.int64), "ax")

    def build(nodes, inits, domain_ops=False):
        opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("com.microsoft", 1)] if domain_ops else [])
        # the expert index is an input, as the Loop's iteration number is: nothing folds into a constant
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [n, H]),
                                           helper.make_tensor_value_info("e", T.INT64, [])],
                              [helper.make_tensor_value_info("y", T.FLOAT, None)], initializer=inits + [ax])
        return helper.make_model(g, opset_imports=opsets, ir_version=10).SerializeToString()

    # standard: bytes [E, in, out/2], scale [E, in/g, out] fp32, zp uint8
    qs = pack4(np.swapaxes(q, 1, 2))
    std = build([
        helper.make_node("Gather", ["qb", "e"], ["g"], axis=0),
        helper.make_node("BitwiseAnd", ["g", "c15"], ["lo"]),
        helper.make_node("BitShift", ["g", "c4"], ["hi"], direction="RIGHT"),
        helper.make_node("Unsqueeze", ["lo", "ax"], ["lo1"]), helper.make_node("Unsqueeze", ["hi", "ax"], ["hi1"]),
        helper.make_node("Concat", ["lo1", "hi1"], ["pr"], axis=-1),
        helper.make_node("Reshape", ["pr", "shp"], ["qv"]),
        helper.make_node("Gather", ["sc", "e"], ["sg"], axis=0),
        helper.make_node("Gather", ["zp", "e"], ["zg"], axis=0),
        helper.make_node("DequantizeLinear", ["qv", "sg", "zg"], ["wd"], axis=0, block_size=group),
        helper.make_node("MatMul", ["x", "wd"], ["y"])],
        [numpy_helper.from_array(qs, "qb"), numpy_helper.from_array(np.swapaxes(s, 1, 2).copy(), "sc"),
         numpy_helper.from_array(np.swapaxes(z, 1, 2).copy(), "zp"),
         numpy_helper.from_array(np.uint8(15), "c15"), numpy_helper.from_array(np.uint8(4), "c4"),
         numpy_helper.from_array(np.array([H, N], np.int64), "shp")])
    # contrib: MatMulNBits' B layout [N, K/g, g/2] (packed along in), scales [N, K/g], zero points packed
    # [N, ceil(K/g / 2)]
    qb = pack4(q).reshape(E, N, H // group, group // 2)
    contrib = lambda lvl: build([  # noqa: E731
        helper.make_node("Gather", ["qb", "e"], ["g"], axis=0),
        helper.make_node("Gather", ["sc", "e"], ["sg"], axis=0),
        helper.make_node("Gather", ["zp", "e"], ["zg"], axis=0),
        helper.make_node("MatMulNBits", ["x", "g", "sg", "zg"], ["y"], domain="com.microsoft", K=H, N=N, bits=4,
                         block_size=group, accuracy_level=lvl)],
        [numpy_helper.from_array(qb, "qb"), numpy_helper.from_array(s.reshape(E, N, H // group), "sc"),
         numpy_helper.from_array(pack4(z.reshape(E, N, H // group)), "zp")], domain_ops=True)
    ref = x @ ((q[3].reshape(N, H // group, group).astype(np.float32) - z[3][..., None]) * s[3][..., None]
               ).reshape(N, H).T
    res = {}
    for name, make in (("standard", lambda lvl: std), ("contrib", contrib)):
        for lvl in (0, 4):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            try:
                sess = ort.InferenceSession(make(lvl), so, providers=["CPUExecutionProvider"])
                feeds = {"x": x, "e": np.array(3, np.int64)}
                y = sess.run(None, feeds)[0]
            except Exception as err:  # onnxruntime raises its own types
                res[f"{name} acc{lvl}"] = {"error": str(err).splitlines()[0][:200]}
                continue
            res[f"{name} acc{lvl}"] = {"us": 1e6 * median_seconds(lambda: sess.run(None, feeds), runs),
                                       "rel_err": float(np.linalg.norm(y - ref) / np.linalg.norm(ref))}
            if name == "standard":
                break  # accuracy level applies to fused MatMulNBits only; the gathered DQ+MatMul never fuses
    return res


def needs_export(out: Path) -> bool:
    """Whether `out` holds no export, or one older than the exporter's code: a cached export made by
    an earlier graph builder would measure that builder, not this one."""
    manifest = out / "dgport.json"
    if not manifest.exists():
        return True
    import dgport.exporters

    code = Path(dgport.exporters.__file__).parent
    return manifest.stat().st_mtime < max(f.stat().st_mtime for f in code.glob("*.py"))


def sudoku(work: Path, puzzles: int, threads: int, bands, template: bool = False, seed: int = 0) -> dict:
    """Blank-cell accuracy, solve rate and token agreement with fp32 of the shipped Sudoku model's ONNX
    exports (fp32, int8, int4; group 64; both MatMulNBits accuracy levels) on held-out puzzles, per
    givens band (min, max). Agreement with fp32 at accuracy level 0 is the weights' error alone; level 4's
    agreement with level 0 (same weights) is the int8 activations' error apart from it."""
    import dgport
    from bench.sudoku import run
    from dgport.exporters.export import ExportOptions, export

    src = Path(__file__).resolve().parent.parent / "models" / "sudoku"
    variants = (("fp32", {}, None), ("int8", dict(quantize=8), 0), ("int8 acc4", dict(quantize=8), 4),
                ("int4", dict(quantize=4), 0), ("int4 acc4", dict(quantize=4), 4))
    gens = {}
    for name, opts, acc in variants:
        out = work / f"sudoku-{opts.get('quantize', 32)}"
        if needs_export(out):
            export(src, out, ExportOptions(validate=False, force=True, group_size=64, **opts))
        kw = {} if acc is None else {"accuracy_level": acc}
        gens[name] = (out, dgport.load(out, backend="cpu", threads=threads, **kw))
    results = {}
    for lo, hi in bands:
        res = {}
        for name, (out, gen) in gens.items():
            r = run(out, "cpu", puzzles=puzzles, seed=seed, min_givens=lo, max_givens=hi, generator=gen,
                    template=template)
            res[name] = {k: r[k] for k in ("solve_rate", "blank_cell_accuracy", "passes_per_puzzle", "seconds")}
            res[name]["tokens"] = [row["token_ids"] for row in r["rows"]]
        print(f"Sudoku model, {puzzles} held-out puzzles (seed {seed}), {lo}-{hi} givens, CPU EP"
              + (", answer template" if template else ""))
        print("| export | solve rate | blank cells right | token agreement with fp32 | with its level 0 | passes/puzzle |")
        print("|---|---|---|---|---|---|")
        for name, r in res.items():
            r["token_agreement"] = _agreement(res["fp32"]["tokens"], r["tokens"])
            level0 = res.get(name.replace(" acc4", "")) if name.endswith(" acc4") else None
            r["agreement_with_level_0"] = _agreement(level0["tokens"], r["tokens"]) if level0 else None
            with0 = "-" if level0 is None else f"{100 * r['agreement_with_level_0']:.2f} %"
            print(f"| {name} | {100 * r['solve_rate']:.1f} % | {100 * r['blank_cell_accuracy']:.2f} % | "
                  f"{100 * r['token_agreement']:.2f} % | {with0} | {r['passes_per_puzzle']:.2f} |", flush=True)
        results[f"{lo}-{hi}"] = {k: {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in res.items()}
    return results


def _agreement(base, tokens) -> float:
    """Position-by-position share of equal token ids (a longer answer's extra positions count as different)."""
    same = total = 0
    for a, b in zip(base, tokens):
        n = min(len(a), len(b))
        same += int(np.sum(np.array(a[:n]) == np.array(b[:n])))
        total += max(len(a), len(b))
    return same / total


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="HF DiffusionGemma folder (default: build the real-slice fixture, canvas 256)")
    ap.add_argument("--workdir", default="/tmp/dgport-bench-quant", help="where exports (and the fixture) go")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="the built fixture's vocabulary (262144: the 26B-A4B's head; default: real-slice's 512)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(list(VARIANTS) + ["transformers bf16"]))
    ap.add_argument("--experts-only", action="store_true")
    ap.add_argument("--sudoku", action="store_true")
    ap.add_argument("--puzzles", type=int, default=100)
    ap.add_argument("--givens", default="50,60",
                    help="Sudoku: givens bands, MIN,MAX[;MIN,MAX...] (e.g. '23,29;30,35;36,45;50,60')")
    ap.add_argument("--template", action="store_true", help="Sudoku: through the answer template (givens fixed)")
    ap.add_argument("--seed", type=int, default=0, help="Sudoku: the evaluation seed (0..8)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--acc", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:
        r = side_torch(a.side, a.runs, a.threads) if a.acc == -1 else side_onnx(a.side, a.runs, a.threads, a.acc)
        print(json.dumps(r))
        return
    if a.sudoku:
        bands = [tuple(int(v) for v in band.split(",")) for band in a.givens.split(";")]
        if any(len(b) != 2 or not 17 <= b[0] <= b[1] <= 80 for b in bands):
            ap.error(f"--givens {a.givens!r}: want MIN,MAX[;MIN,MAX...] with 17 <= MIN <= MAX <= 80")
        Path(a.workdir).mkdir(parents=True, exist_ok=True)
        r = sudoku(Path(a.workdir), a.puzzles, a.threads, bands, a.template, a.seed)
        if a.json:
            Path(a.json).write_text(json.dumps(r, indent=1))
        return
    if a.experts_only:
        print(json.dumps(experts_micro(a.threads, max(a.runs, 20)), indent=1))
        return
    from dgport.exporters.checkpoint import read_checkpoint
    from dgport.exporters.export import ExportOptions, export

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = a.checkpoint
    if ckpt is None:
        from models.fixtures import build_fixture

        extra = {} if a.vocab_size is None else {"vocab_size": a.vocab_size}
        ckpt = work / ("real-slice" if a.vocab_size is None else f"real-slice-v{a.vocab_size}")
        if not (ckpt / "config.json").exists():
            build_fixture("real-slice", ckpt, canvas_length=256, **extra)
    cfg = read_checkpoint(ckpt).config
    flops = step_flops(cfg, cfg.canvas_length, PROMPT)
    peak = gemm_peak(a.threads)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    res = {}
    for name in names:
        if name == "transformers bf16":
            cmd, size = [str(ckpt), "--acc", "-1"], None
        else:
            opts, acc = VARIANTS[name]
            kind = "q4" if opts.get("quantize") == 4 else "q8" if opts.get("quantize") == 8 else opts["dtype"]
            out = work / (kind if a.vocab_size is None else f"v{a.vocab_size}-{kind}")
            if needs_export(out):
                export(ckpt, out, ExportOptions(validate=False, force=True, **opts))
            cmd, size = [str(out)] + ([] if acc is None else ["--acc", str(acc)]), (out / "weights.bin").stat().st_size
        p = subprocess.run([sys.executable, "-m", "bench.bench_quant", "--side", *cmd, "--runs", str(a.runs),
                            "--threads", str(a.threads)], capture_output=True, text=True, env=os.environ)
        if p.returncode:
            res[name] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
            continue
        res[name] = json.loads(p.stdout.strip().splitlines()[-1])
        res[name]["weights_mb"] = None if size is None else size / 2**20
    base = res.get("fp32", {}).get("argmax")
    print(f"checkpoint {ckpt}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_experts} experts top-"
          f"{cfg.top_k_experts}, canvas {cfg.canvas_length}; CPU EP, {a.threads} threads; step {flops / 1e9:.1f} GFLOP")
    print(f"GEMM peak (ORT, {a.threads} threads): fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, "
          f"int8 {peak['int8'] / 1e9:.1f} GOP/s")
    print("| variant | weights MB | peak RSS MB | step ms (wall) | step CPU ms | vs bf16 export (CPU time) | "
          "vs transformers bf16 (CPU time) | % of fp32 peak | % of int8 peak | argmax = fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        r = res[name]
        if "error" in r:
            print(f"| {name} | error: {r['error']} |")
            continue
        ms, cms = r["step_ms"], r["step_cpu_ms"]
        rel = {k: (res[k]["step_cpu_ms"] / cms if "step_cpu_ms" in res.get(k, {}) else None)
               for k in ("bf16", "transformers bf16")}
        fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        agree = "-" if base is None else f"{np.mean(np.array(r['argmax']) == np.array(base)):.3f}"
        w = "-" if r.get("weights_mb") is None else f"{r['weights_mb']:.0f}"
        # shares of the GEMM peak from wall time, as the peak is measured (a step keeps fewer than
        # `threads` cores busy on average, so CPU time / threads would overstate them)
        print(f"| {name} | {w} | {r['peak_rss_mb']:.0f} | {ms:.0f} | {cms:.0f} | {fmt(rel['bf16'])} | "
              f"{fmt(rel['transformers bf16'])} | {100 * flops / (ms / 1e3) / peak['fp32']:.1f} | "
              f"{100 * flops / (ms / 1e3) / peak['int8']:.1f} | {agree} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"results": res, "gemm_peak": peak, "step_flops": flops}, indent=1))


if __name__ == "__main__":
    main()
