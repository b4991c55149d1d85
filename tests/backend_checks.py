"""The end-to-end checks every exported backend must pass against the torch reference: the same
prompts and seeds, the same tokens, steps and stops; and a kept cache continuing alike."""
from __future__ import annotations

import numpy as np

from models.fixtures import PROMPTS, SEEDS  # noqa: F401 (re-exported to the e2e tests)


def assert_generates_like_torch(gen, torch_gen, preset: str) -> None:
    finished = []
    for prompt in PROMPTS[preset]:
        for seed in SEEDS:
            a = gen.generate(prompt, seed=seed)
            b = torch_gen.generate(prompt, seed=seed)
            assert a.token_ids == b.token_ids, (prompt, seed)
            assert a.steps_per_canvas == b.steps_per_canvas
            assert a.finished == b.finished
            finished.append(a.finished)
            if preset in ("tiny", "long-context"):
                assert len(a.steps_per_canvas) >= 3  # several canvases
    if preset == "eos":  # EOS inside a canvas: stopped early, PAD after it
        assert any(finished)
    if preset == "confident":  # adaptive stopping fired
        assert min(a.steps_per_canvas) < gen.defaults.max_denoising_steps


def assert_keep_cache_like_torch(gen, torch_gen) -> None:
    for g in (gen, torch_gen):
        g.generate([2, 130, 131], seed=5, max_new_tokens=16)
    a = gen.generate([140, 141], seed=6, keep_cache=True)
    b = torch_gen.generate([140, 141], seed=6, keep_cache=True)
    assert gen.backend.cache_len == torch_gen.backend.cache_len
    assert a.token_ids == b.token_ids


def argmax_agreement(f, q, seed):
    """Teacher-forced argmax agreement of two backends (e.g. fp32 and quantized) on the same random
    prompts, canvases and temperatures: three prompts of 13 tokens, three steps each."""
    cfg = f.config
    rng = np.random.default_rng(seed)
    C, V = cfg.canvas_length, cfg.vocab_size
    agree = []
    for _ in range(3):
        f.reset(), q.reset()
        ids = np.concatenate([[2], rng.integers(0, V, 12)])[None]
        for b in (f, q):
            b.encode(ids, np.arange(13)[None])
            b.new_canvas()
        cpos = np.arange(13, 13 + C)[None]
        for t in (0.8, 0.7, 0.6):
            canvas = rng.integers(0, V, (1, C))
            u = rng.random((1, C), dtype=np.float32)
            agree.append(float(np.mean(f.denoise(canvas, cpos, np.float32(t), u).argmax
                                       == q.denoise(canvas, cpos, np.float32(t), u).argmax)))
    return float(np.mean(agree))
