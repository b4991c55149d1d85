"""Expert forms on the CPU side by side in one run: grouped (exporters/onnx_grouped.py), the sparse
Loop, the unrolled loop (the CPU's default), quantized exports and transformers' own bf16 step.

    python -m bench.bench_grouped --waste                # padding waste of the capacity rule, real and random routing
    python -m bench.bench_grouped --micro --bits 8       # the experts alone at the real geometry: candidate products
    python -m bench.bench_grouped --step --variants "bf16 sparse,bf16 grouped" --rounds 2   # real-slice, canvas 256
    python -m bench.bench_grouped --step --variants "transformers bf16,fp32 unrolled,bf16 unrolled,int8 unrolled"
    python -m bench.bench_grouped --profile "int8 unrolled,fp32 grouped"    # where a step's time goes, by op

--waste: the capacity is the largest per-expert count of a call, so its padding waste is
experts * capacity / (tokens * top_k) - 1; measured on the shipped Sudoku model's own routing (every
router call of its denoise steps on held-out puzzles, through transformers) and on uniform random
routing at the Sudoku model's and the real model's geometry.

--micro: one layer's experts at the 26B-A4B geometry (128 experts of 2816 -> 2x704 -> 2816, a
256-token canvas, top-8: 16 rows an expert when balanced, `--cap` rows when padded), as candidate
ONNX Runtime products: 128 per-expert MatMulNBits (today's unrolled form), one batched fp32 MatMul,
one batched u8 x s8 MatMulInteger (W8A8, per-column weight scales), and com.microsoft.QMoE.

--step: whole denoise steps of the real-slice fixture, each side a fresh process
(`python -m bench.bench_quant --side`), the sides alternating round by round. Variants: "DTYPE FORM"
for DTYPE fp32/bf16 and FORM sparse/unrolled/grouped, "int8 unrolled", "int4 unrolled",
"transformers bf16"; a suffix " +thp" or " +ram" changes how memory is held (run_step).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.bench_batch import cpu_flags
from bench.bench_quant import median_seconds

H, M, E, K, N = 2816, 704, 128, 8, 256


def waste(counts, n_pairs) -> float:
    return len(counts) * max(counts) / n_pairs - 1


def sudoku_routing(puzzles: int, seed: int = 0) -> list:
    """[(tokens, experts, top_k, per-expert counts)] of every router call in the Sudoku model's denoise
    steps (decoder routers) over `puzzles` held-out puzzles, on the torch reference."""
    import dgport
    from dgport.default_model import default_checkpoint
    from bench.sudoku import run

    gen = dgport.load(default_checkpoint(), backend="torch")
    model = gen.backend.model
    calls = []
    _hook_routers(model, calls)
    run(None, puzzles=puzzles, seed=seed, min_givens=36, max_givens=45, generator=gen)
    C = gen.backend.config.canvas_length
    return [c for c in calls if c[0] == C and "encoder" not in c[4]]


def _hook_routers(model, calls):
    def hook(mod, args, out):
        idx = out[2].reshape(-1, out[2].shape[-1])
        counts = np.bincount(idx.numpy().reshape(-1), minlength=mod.config.num_experts)
        calls.append((idx.shape[0], mod.config.num_experts, idx.shape[1], counts.tolist(), mod._dg_name))

    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("TextRouter"):
            mod._dg_name = name
            mod.register_forward_hook(hook)


def checkpoint_routing(path: str, steps: int = 3, prompt: int = 16) -> list:
    """Router calls of `steps` denoise steps over one random canvas of a checkpoint (e.g. a random-weight
    fixture), on the torch reference in bf16."""
    from dgport.runtimes.torch_ref import TorchRefBackend

    be = TorchRefBackend(path, dtype="bf16")
    cfg, calls = be.config, []
    rng = np.random.default_rng(0)
    be.encode(rng.integers(0, cfg.vocab_size, (1, prompt)), np.arange(prompt)[None])
    _hook_routers(be.model, calls)
    C = cfg.canvas_length
    canvas = rng.integers(0, cfg.vocab_size, (1, C))
    be.new_canvas()
    for _ in range(steps):
        out = be.denoise(canvas, np.arange(prompt, prompt + C)[None], np.float32(0.8),
                         rng.random((1, C), dtype=np.float32))
        canvas = np.asarray(out.sampled)
    return [c for c in calls if c[0] == C and "encoder" not in c[4]]


def random_waste(n: int, e: int, k: int, draws: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(draws):
        idx = np.argsort(rng.random((n, e)), axis=1)[:, :k]
        out.append(waste(np.bincount(idx.reshape(-1), minlength=e), n * k))
    return out


def summary(ws) -> dict:
    ws = np.asarray(ws)
    return {"calls": len(ws), "mean": float(ws.mean()), "median": float(np.median(ws)),
            "p95": float(np.percentile(ws, 95)), "max": float(ws.max())}


def run_waste(puzzles: int, checkpoint: str | None = None) -> dict:
    res = {}
    if checkpoint:
        calls = checkpoint_routing(checkpoint)
        res[f"{checkpoint}, its routing (denoise steps)"] = summary([waste(c[3], c[0] * c[2]) for c in calls])
        res[f"{checkpoint}: capacity / mean count"] = summary([max(c[3]) / (c[0] * c[2] / c[1]) for c in calls])
    calls = sudoku_routing(puzzles)
    res["sudoku model (4 experts top-2, canvas 82), its routing"] = summary(
        [waste(c[3], c[0] * c[2]) for c in calls])
    per_layer = {}
    for c in calls:
        per_layer.setdefault(c[4], []).append(waste(c[3], c[0] * c[2]))
    for name, ws in sorted(per_layer.items()):
        res[f"  {name}"] = summary(ws)
    res["uniform random, 4 experts top-2, 82 tokens"] = summary(random_waste(82, 4, 2, 2000))
    res["uniform random, 128 experts top-8, 256 tokens (26B-A4B canvas)"] = summary(random_waste(256, 128, 8, 500))
    res["uniform random, 128 experts top-8, 1024 tokens (an encode chunk)"] = summary(random_waste(1024, 128, 8, 100))
    return res


# ----------------------------------------------------------------------------------- micro


def _session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _model(nodes, inits, inputs, ms=False):
    from onnx import helper

    ops = [helper.make_opsetid("", 21)] + ([helper.make_opsetid("com.microsoft", 1)] if ms else [])
    from onnx import TensorProto as T
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", T.FLOAT, None)], initializer=inits)
    return helper.make_model(g, opset_imports=ops, ir_version=10)


def read_bandwidth(gb: float = 1.0) -> float:
    """GB/s of one thread summing a 1 GB array (a floor for reading weights that are not in cache)."""
    a = np.ones(int(gb * 2**30) // 4, np.float32)
    a.sum()
    sec = median_seconds(lambda: a.sum(dtype=np.float64), 3)
    return gb * 2**30 / sec / 1e9


def run_micro(bits: int, cap: int, threads: int, runs: int, group: int = 64) -> dict:
    """The candidates on the same random experts and the same balanced routing (16 rows an expert)."""
    from onnx import TensorProto as T, helper, numpy_helper as nh

    from dgport.exporters.quantize import dequantize, pack4, quantize

    def zp4(z):  # 4-bit zero points, two a byte, an odd count padded (MatMulNBits' ceil(K / g / 2) bytes)
        return pack4(np.pad(z, [(0, 0)] * (z.ndim - 1) + [(0, z.shape[-1] % 2)]))

    rng = np.random.default_rng(0)
    wgu = [rng.standard_normal((2 * M, H), dtype=np.float32) * 0.02 for _ in range(E)]  # [out, in] per expert
    wd = [rng.standard_normal((H, M), dtype=np.float32) * 0.02 for _ in range(E)]
    rows = N * K // E  # 16 real rows an expert; the rest of `cap` is padding (zeros)
    xs = np.zeros((E, cap, H), np.float32)
    xs[:, :rows] = rng.standard_normal((E, rows, H), dtype=np.float32)
    flops = 2.0 * E * cap * 3 * H * M
    res = {"flops_per_call": flops, "rows_per_expert": rows, "capacity": cap,
           "weight_bytes_int8": E * 3 * H * M, "read_gb_s_1thread": read_bandwidth()}

    def gelu_up(b_nodes, x, tag):
        b_nodes += [helper.make_node("Split", [x, "split"], [f"g{tag}", f"u{tag}"], axis=-1),
                    helper.make_node("Gelu", [f"g{tag}"], [f"a{tag}"], approximate="tanh"),
                    helper.make_node("Mul", [f"a{tag}", f"u{tag}"], [f"h{tag}"])]
        return f"h{tag}"

    split = nh.from_array(np.array([M, M], np.int64), "split")
    xin = helper.make_tensor_value_info("xs", T.FLOAT, [E, cap, H])

    def ref_out():
        out = np.empty((E, cap, H), np.float32)
        for e in range(E):
            gu = xs[e] @ wgu[e].T
            g, u = gu[:, :M], gu[:, M:]
            a = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
            out[e] = (a * u) @ wd[e].T
        return out

    ref = ref_out()

    def timed(name, model, feeds=None, compare=None):
        t0 = time.perf_counter()
        try:
            s = _session(model, threads)
            feeds = feeds or {"xs": xs}
            y = s.run(None, feeds)[0]
        except Exception as err:  # onnxruntime raises its own types
            res[name] = {"error": str(err).splitlines()[0][:300]}
            return
        load = time.perf_counter() - t0
        sec = median_seconds(lambda: s.run(None, feeds), runs)
        y = compare(y) if compare else y
        res[name] = {"ms": 1e3 * sec, "gflops": flops / sec / 1e9, "load_s": load,
                     "rel_err_vs_fp32": float(np.linalg.norm(y[:, :rows] - ref[:, :rows]) /
                                              np.linalg.norm(ref[:, :rows]))}
        del s

    # 1. today's form: one MatMulNBits pair per expert (constant weights, prepacked), accuracy level 4
    def nbits(w, e, tag):
        q, s, z = quantize(w, bits, group)  # [out, in]: groups along in
        n_out, k = w.shape
        b = (pack4(q) if bits == 4 else q).reshape(n_out, k // group, group * bits // 8)
        zp = zp4(z) if bits == 4 else z
        inits = [nh.from_array(b, f"b{tag}{e}"), nh.from_array(s.astype(np.float32), f"s{tag}{e}"),
                 nh.from_array(zp, f"z{tag}{e}")]
        return inits, dequantize(q, s, z, group)

    for acc in (4,):
        nodes, inits = [helper.make_node("Split", ["xs"], [f"x{e}" for e in range(E)], axis=0, num_outputs=E)], [split]
        inits.append(nh.from_array(np.array([0], np.int64), "ax0"))
        outs = []
        for e in range(E):
            i1, _ = nbits(wgu[e], e, "gu")
            i2, _ = nbits(wd[e], e, "d")
            inits += i1 + i2
            nodes += [helper.make_node("Squeeze", [f"x{e}", "ax0"], [f"xe{e}"]),
                      helper.make_node("MatMulNBits", [f"xe{e}", f"bgu{e}", f"sgu{e}", f"zgu{e}"], [f"gu{e}"],
                                       domain="com.microsoft", K=H, N=2 * M, bits=bits, block_size=group,
                                       accuracy_level=acc)]
            h = gelu_up(nodes, f"gu{e}", e)
            nodes += [helper.make_node("MatMulNBits", [h, f"bd{e}", f"sd{e}", f"zd{e}"], [f"o{e}"],
                                       domain="com.microsoft", K=M, N=H, bits=bits, block_size=group,
                                       accuracy_level=acc),
                      helper.make_node("Unsqueeze", [f"o{e}", "ax0"], [f"ou{e}"])]
            outs.append(f"ou{e}")
        nodes.append(helper.make_node("Concat", outs, ["y"], axis=0))
        timed(f"per-expert MatMulNBits int{bits} acc{acc} (today)", _model(nodes, inits, [xin], ms=True))
    # 2. one batched fp32 MatMul per projection (the grouped form of fp32 exports)
    wgu_t = np.stack([w.T for w in wgu])  # [E, H, 2M]
    wd_t = np.stack([w.T for w in wd])  # [E, M, H]
    nodes = [helper.make_node("MatMul", ["xs", "wgu"], ["gu"])]
    h = gelu_up(nodes, "gu", "")
    nodes.append(helper.make_node("MatMul", [h, "wd"], ["y"]))
    # the fp32 weights (3 GB) are fed, not initializers: a protobuf holds 2 GB at most (and ORT's CPU
    # MatMul prepacks no batched B, so a constant would run the same kernel)
    timed("batched fp32 MatMul (grouped fp32)",
          _model(nodes, [split], [xin, helper.make_tensor_value_info("wgu", T.FLOAT, [E, H, 2 * M]),
                                  helper.make_tensor_value_info("wd", T.FLOAT, [E, M, H])]),
          {"xs": xs, "wgu": wgu_t, "wd": wd_t})
    # 3. batched u8 x s8 MatMulInteger, int8 weights with one scale per output column (W8A8)
    def per_col(w):  # [E, in, out] -> int8, scale [E, 1, out]
        s = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / 127
        return np.clip(np.round(w / s), -127, 127).astype(np.int8), s.astype(np.float32)

    (qgu, sgu), (qd, sd) = per_col(wgu_t), per_col(wd_t)
    del wgu_t, wd_t
    nodes = [helper.make_node("DynamicQuantizeLinear", ["xs"], ["xq", "xsc", "xzp"]),
             helper.make_node("MatMulInteger", ["xq", "qgu", "xzp"], ["gi"]),
             helper.make_node("Cast", ["gi"], ["gf"], to=T.FLOAT),
             helper.make_node("Mul", ["xsc", "sgu"], ["sg"]), helper.make_node("Mul", ["gf", "sg"], ["gu"])]
    h = gelu_up(nodes, "gu", "")
    nodes += [helper.make_node("DynamicQuantizeLinear", [h], ["hq", "hsc", "hzp"]),
              helper.make_node("MatMulInteger", ["hq", "qd", "hzp"], ["oi"]),
              helper.make_node("Cast", ["oi"], ["of"], to=T.FLOAT),
              helper.make_node("Mul", ["hsc", "sd"], ["so"]), helper.make_node("Mul", ["of", "so"], ["y"])]
    timed("batched u8xs8 MatMulInteger W8A8 per-column", _model(
        nodes, [split, nh.from_array(qgu, "qgu"), nh.from_array(sgu, "sgu"), nh.from_array(qd, "qd"),
                nh.from_array(sd, "sd")], [xin]))
    del qgu, qd
    # 4. com.microsoft.QMoE: routing inside; balanced routing (token n -> experts n*K .. n*K+K-1 mod E)
    x = xs[:, :rows].reshape(-1, H)[:N]  # any N tokens; compare shapes only through the error
    logits = np.full((N, E), -10.0, np.float32)
    for n in range(N):
        logits[n, [(n * K + j) % E for j in range(K)]] = 10.0
    fc1, s1, z1, fc2, s2, z2 = [], [], [], [], [], []
    for e in range(E):
        for w, (fq, fs, fz) in ((wgu[e], (fc1, s1, z1)), (wd[e], (fc2, s2, z2))):
            q, s, z = quantize(w, bits, group)
            fq.append(pack4(q) if bits == 4 else q)
            fs.append(s.astype(np.float32))
            fz.append(zp4(z) if bits == 4 else z)
    st = lambda a: np.stack(a)  # noqa: E731
    inits = [nh.from_array(st(fc1), "fc1"), nh.from_array(st(s1), "s1"), nh.from_array(st(fc2), "fc2"),
             nh.from_array(st(s2), "s2"), nh.from_array(st(z1), "z1"), nh.from_array(st(z2), "z2")]
    ins = [helper.make_tensor_value_info("x", T.FLOAT, [N, H]), helper.make_tensor_value_info("r", T.FLOAT, [N, E])]
    for act, fusion in (("geglu", 2), ("swiglu", 2), ("swiglu", 1)):
        node = helper.make_node("QMoE", ["x", "r", "fc1", "s1", "", "fc2", "s2", "", "", "", "", "z1", "z2"], ["y"],
                                domain="com.microsoft", k=K, activation_type=act, swiglu_fusion=fusion,
                                expert_weight_bits=bits, block_size=group, normalize_routing_weights=1,
                                accuracy_level=4, weights_prepacked=0)
        name = f"QMoE int{bits} {act} fusion {fusion}" + (" (not GELU-tanh: speed only)" if act != "geglu" else "")
        timed(name, _model([node], inits, ins, ms=True), {"x": x, "r": logits}, compare=lambda y: ref)
        if "error" not in res[name]:
            res[name].pop("rel_err_vs_fp32")  # a different function (and the balanced rows), speed only
            res[name]["flops"] = 2.0 * N * K * 3 * H * M
            res[name]["gflops"] = res[name]["flops"] / (res[name]["ms"] / 1e3) / 1e9
    return res


# ----------------------------------------------------------------------------------- whole steps

STEP_VARIANTS = {  # name -> export options
    "bf16 sparse": dict(dtype="bf16", encoder_moe="sparse", denoise_moe="sparse"),
    "bf16 grouped": dict(dtype="bf16", denoise_moe="grouped"),
    "fp32 sparse": dict(dtype="fp32", encoder_moe="sparse", denoise_moe="sparse"),
    "fp32 grouped": dict(dtype="fp32", denoise_moe="grouped"),
    "bf16 unrolled": dict(dtype="bf16", denoise_moe="unrolled"),
    "fp32 unrolled": dict(dtype="fp32", denoise_moe="unrolled"),
    "int8 unrolled": dict(quantize=8, group_size=64),
    "int4 unrolled": dict(quantize=4, group_size=64),
}


def run_step(work: Path, names, rounds: int, runs: int, threads: int) -> dict:
    from dgport.exporters.export import ExportOptions, export
    from models.fixtures import build_fixture

    ckpt = work / "real-slice"
    if not (ckpt / "config.json").exists():
        build_fixture("real-slice", ckpt, canvas_length=256)
    outs, envs = {}, {}
    for name in names:
        # "NAME +thp": glibc's malloc asks for transparent huge pages (THP "madvise" kernels give them only
        # on request; onnxruntime's buffers otherwise sit on 4 KB pages)
        # "NAME +ram": the weights read into anonymous memory (numpy asks for huge pages) instead of mapping
        # weights.bin from the page cache
        envs[name] = {**os.environ, **({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"} if name.endswith(" +thp") else {})}
        base = name.removesuffix(" +thp").removesuffix(" +ram")
        if base == "transformers bf16":
            outs[name] = [str(ckpt), "--acc", "-1"]
            continue
        out = work / base.replace(" ", "-")
        if not (out / "dgport.json").exists():
            export(ckpt, out, ExportOptions(validate=False, force=True, **STEP_VARIANTS[base]))
        outs[name] = [str(out)] + (["--acc", "4"] if "int" in name else [])
        if name.endswith(" +ram"):
            outs[name] = ["--ram", str(out)]
    res = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            mod = "bench.bench_grouped" if outs[name][0] == "--ram" else "bench.bench_quant"
            side = outs[name][1:] if mod == "bench.bench_grouped" else outs[name]
            p = subprocess.run([sys.executable, "-m", mod, "--side", *side, "--runs", str(runs),
                                "--threads", str(threads)], capture_output=True, text=True, env=envs[name])
            if p.returncode:
                res[name].append({"error": (p.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                res[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(name, {k: v for k, v in res[name][-1].items() if k != "argmax"}, flush=True)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waste", action="store_true")
    ap.add_argument("--puzzles", type=int, default=20)
    ap.add_argument("--checkpoint", help="--waste: also this checkpoint's routing (e.g. the real-slice fixture)")
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--cap", type=int, default=16, help="micro: rows an expert (16 = balanced, no padding)")
    ap.add_argument("--step", action="store_true")
    ap.add_argument("--profile", help="comma-separated --step variants: onnxruntime's profile of their steps, by op")
    ap.add_argument("--variants", default="bf16 sparse,bf16 grouped")
    ap.add_argument("--workdir", default="/tmp/dgport-bench-grouped")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # one export's steps, weights read into memory
    a = ap.parse_args(argv)
    if a.side:
        from bench.bench_quant import side_onnx

        np.memmap = lambda f, dtype, mode: np.fromfile(f, dtype=dtype)  # this process only: no page-cache mapping
        print(json.dumps(side_onnx(a.side, a.runs, a.threads, None)))
        return
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} cores; {a.threads} threads", flush=True)
    if a.waste:
        r = run_waste(a.puzzles, a.checkpoint)
    elif a.micro:
        r = run_micro(a.bits, a.cap, a.threads, a.runs)
    elif a.profile:
        from bench.bench_batch import profile_ops

        r = {}
        for name in a.profile.split(","):
            prof = profile_ops(Path(a.workdir) / name.strip().replace(" ", "-"), "cpu", a.threads,
                               [list(range(2, 2 + 16))], a.runs + 1, Path(a.workdir) / "profile")
            top = sorted(prof["ops_ms"].items(), key=lambda kv: -kv[1])
            r[name] = {"run_ms": prof["run_ms"], "ops_ms": {k: round(v, 1) for k, v in top[:12]}}
    elif a.step:
        r = run_step(Path(a.workdir), [v.strip() for v in a.variants.split(",")], a.rounds, a.runs, a.threads)
    else:
        ap.error("choose --waste, --micro, --step or --profile")
    print(json.dumps(r, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
