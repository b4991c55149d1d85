"""The JavaScript step loop (web/src) under Node.js with onnxruntime-node, against dgport's Python loop:
the randomness contract and the sampler on given inputs, then whole generations, token for token."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dgport.exporters.export import ExportOptions, export
from dgport.sampler import accept_mask, temperature
from dgport.task import answer_template
from web_support import node_lines, python_tokens, write_json

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"
_EXPORTS: dict = {}


@pytest.fixture(scope="module")
def web_exports(checkpoints, tmp_path_factory):
    """(preset, dtype, quantize) -> an ONNX export of that fixture, made once."""
    def get(preset, dtype="fp32", quantize=None):
        key = (preset, dtype, quantize)
        if key not in _EXPORTS:
            out = tmp_path_factory.mktemp("web") / f"{preset}-{dtype}-{quantize}"
            export(checkpoints[preset], out, ExportOptions(dtype=dtype, quantize=quantize, validate=False))
            _EXPORTS[key] = out
        return _EXPORTS[key]
    return get


def sudoku_export():
    from dgport.default_model import ensure_default_export

    return ensure_default_export("cpu")


def test_rng_draws_are_numpys(tmp_path):
    """PCG64 seeding, the shared 32-bit buffer, bounded integers (small, odd, 2**31 + 1, 2**32) and float32
    uniforms, interleaved as the loop interleaves them."""
    draws = [["integers", 192, 7], ["random", 5], ["integers", 262144, 3], ["integers", 2, 4], ["random", 1],
             ["integers", 2**31 + 1, 5], ["integers", 2**32, 3], ["integers", 1, 2], ["integers", 7, 1], ["random", 3]]
    seeds = [0, 1, 42, 12345, 2**32, 2**53 + 1, 2**63 - 1]
    cases = [{"rng": {"seed": str(s), "draws": draws}} for s in seeds]
    got = node_lines("primitives.mjs", write_json(tmp_path / "cases.json", cases))
    for seed, out in zip(seeds, got):
        rng = np.random.Generator(np.random.PCG64(seed))
        want = [rng.integers(0, a, size=b).tolist() if kind == "integers" else rng.random(a, dtype=np.float32).tolist()
                for kind, a, *rest in draws for b in (rest or [None])]
        assert out == want, f"seed {seed}"


def test_sampler_pieces_are_numpys(tmp_path):
    """The stop rule's float32 mean (numpy's pairwise sum: vectors of 1 to 600, where a sequential sum
    differs), entropy-bound acceptance with ties, and the float32 temperature schedule."""
    rng = np.random.default_rng(0)
    vectors = [(rng.random(n) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32) for n in
               [1, 2, 7, 8, 9, 15, 16, 17, 81, 82, 127, 128, 129, 200, 255, 256, 257, 600]]
    ties = np.array([0.5, 0.1, 0.1, 0.0, 0.3, 0.1, 0.0, 0.2], dtype=np.float32)
    accepts = [(ties, 0.25), (ties, 0.0), *((rng.random(82).astype(np.float32) * 0.05, b) for b in (0.1, 0.5, 1e-9))]
    temps = [(s, n, lo, hi) for n in (1, 3, 48, 64) for s in range(n, 0, -1)[:5] for lo, hi in ((0.4, 0.8), (0.6, 1.0))]
    cases = ([{"mean": v.tolist()} for v in vectors] + [{"accept": {"entropy": e.tolist(), "bound": b}} for e, b in accepts]
             + [{"temperature": list(t)} for t in temps])
    got = node_lines("primitives.mjs", write_json(tmp_path / "cases.json", cases))
    means, masks, ts = got[:len(vectors)], got[len(vectors):len(vectors) + len(accepts)], got[len(vectors) + len(accepts):]
    sequential_differs = 0
    for v, m in zip(vectors, means):
        assert np.float32(m) == v.mean(dtype=np.float32), len(v)
        seq = np.float32(0)
        for x in v:
            seq = np.float32(seq + x)
        sequential_differs += np.float32(seq / np.float32(len(v))) != v.mean(dtype=np.float32)
    assert sequential_differs > 0  # the vectors tell numpy's pairwise sum from a plain loop
    for (e, b), m in zip(accepts, masks):
        assert m == accept_mask(e[None], b)[0].astype(int).tolist()
    for t, v in zip(temps, ts):
        assert np.float32(v) == temperature(*t)


def requests_for(prompts, seeds, **extra):
    return [{"prompt": p, "seed": s, "threads": 1, **extra} for p in prompts for s in seeds]


def check_same(export_dir, requests, tmp_path):
    got = node_lines("generate.mjs", export_dir, write_json(tmp_path / "requests.json", requests))
    want = python_tokens(export_dir, requests, threads=1)
    assert len(got) == len(want) == len(requests)
    for r, g, w in zip(requests, got, want):
        for key in ("token_ids", "steps_per_canvas", "finished", "text", "holes"):
            assert g[key] == w[key], f"{key} differs for {json.dumps(r)[:200]}"
    return got


def test_sudoku_model_token_identical(tmp_path):
    """The shipped model: several seeds free, and with its answer template (fixed givens)."""
    template = [{"hole": 1} if not isinstance(p, str) else p for p in answer_template("sudoku", PUZZLE).parts]
    got = check_same(sudoku_export(), requests_for([PUZZLE], [0, 1, 2, 3, 11]) +
                     requests_for([PUZZLE], [0, 5], template=template), tmp_path)
    assert len({tuple(g["steps_per_canvas"]) for g in got}) > 1  # the seeds really differ


@pytest.mark.parametrize("preset", ["tiny", "eos", "confident"])
def test_text_fixtures_token_identical(preset, web_exports, tmp_path):
    """Chat-templated and raw prompts over several canvases (KV handoff), an EOS inside a canvas (`eos`),
    the stop rule ending canvases early (`confident`), sampler overrides and a template with holes."""
    reqs = requests_for(["Why is the sky blue?", "héllo wörld 日本"], [0, 3, 9], max_new_tokens=40)
    reqs += requests_for(["raw text"], [4], raw=True, max_new_tokens=20, sampler={"max_denoising_steps": 5,
                                                                                    "entropy_bound": 0.5})
    reqs += requests_for(["Fill it"], [2], template=["Name: ", {"hole": 5}, ", age ", {"hole": 3}, "."])
    got = check_same(web_exports(preset), reqs, tmp_path)
    if preset == "eos":
        assert any(g["finished"] for g in got)


def test_fp16_export_token_identical(web_exports, tmp_path):
    check_same(web_exports("tiny", "fp16"), requests_for(["Why is the sky blue?"], [0, 7], max_new_tokens=33), tmp_path)


def test_quantized_export_token_identical_at_the_same_thread_count(web_exports, tmp_path):
    """int8 weights run the joint `step` graph; MatMulNBits with int8 activations rounds by thread
    count, so both sides run one thread."""
    check_same(web_exports("tiny", "fp32", 8), requests_for(["Why is the sky blue?"], [0, 5], max_new_tokens=33),
               tmp_path)


def _node_error(export_dir, tmp_path) -> str:
    import subprocess

    from web_support import WEB, need_node

    proc = subprocess.run([need_node(), str(WEB / "scripts" / "generate.mjs"), str(export_dir),
                           str(write_json(tmp_path / "r.json", requests_for(["hi"], [0])))],
                          cwd=WEB, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    return proc.stderr


def test_refuses_bf16_and_changed_exports(web_exports, tmp_path):
    assert "export with --dtype fp32 or --dtype fp16" in _node_error(web_exports("tiny", "bf16"), tmp_path)
    changed = tmp_path / "changed"
    shutil.copytree(web_exports("tiny"), changed)
    with open(changed / "weights.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert "weights.bin: its sha256 is not the one dgport.json lists" in _node_error(changed, tmp_path)


def test_vendored_page_files_are_the_locked_packages():
    """web/vendor/ (what `dgport web` serves from a pip install) is what `npm run vendor` copies from the
    versions package-lock.json pins: no stale or hand-edited copy."""
    import gzip

    from web_support import WEB, need_node

    need_node()
    lock = json.loads((WEB / "package-lock.json").read_text())["packages"]
    versions = json.loads((WEB / "vendor" / "versions.json").read_text())
    for pkg, meta in versions["packages"].items():
        assert lock[f"node_modules/{pkg}"]["version"] == meta["version"], pkg
    for name, src in versions["files"].items():
        data = (WEB / "vendor" / name).read_bytes()
        if name.endswith(".gz"):
            data = gzip.decompress(data)
        assert data == (WEB / "node_modules" / src).read_bytes(), name


def test_int8_check_graphs_are_the_python_ones():
    """web/int8_check/ holds exactly what runtimes/int8_check.py writes (`python -m dgport.runtimes.int8_check
    web/int8_check`): the JavaScript loop checks the CPU's int8 products on the same worst cases."""
    from dgport.runtimes.int8_check import CHECKS, check_file, check_model
    from web_support import WEB

    assert sorted(p.name for p in (WEB / "int8_check").iterdir()) == sorted(check_file(*c) for c in CHECKS)
    for bits, group in CHECKS:
        assert (WEB / "int8_check" / check_file(bits, group)).read_bytes() == check_model(bits, group), (bits, group)


def test_node_checks_the_cpus_int8_products_before_using_them(web_exports, tmp_path):
    """onnxruntime-node on this CPU passes the check (level 4, int8 activations, as the token-identity test
    above runs); where the check fails (a tolerance no answer meets) it falls back to level 0 with a
    warning; a hand-made group size the checks do not cover is refused."""
    import subprocess

    from dgport.manifest import MANIFEST, manifest_digest
    from hardening_support import edit_json
    from web_support import WEB, need_node

    q4 = web_exports("tiny", "fp32", 4)
    assert node_lines("int8-check.mjs", q4) == [{"level": 4}]
    proc = subprocess.run([need_node(), str(WEB / "scripts" / "int8-check.mjs"), str(q4), "-1"], cwd=WEB,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"level": 0}
    assert "does not sum 4-bit int8 products exactly" in proc.stderr and "accuracy level 0" in proc.stderr
    odd = tmp_path / "odd"
    shutil.copytree(q4, odd)

    def change(m):
        m["formats"]["onnx"]["quantization"]["group_size"] = 48
        m["manifest_sha256"] = manifest_digest(m)
    edit_json(odd / MANIFEST, change)
    proc = subprocess.run([need_node(), str(WEB / "scripts" / "int8-check.mjs"), str(odd)], cwd=WEB,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "formats.onnx.quantization.group_size" in proc.stderr
