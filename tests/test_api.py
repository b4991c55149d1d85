"""dgport.load / Generator.generate: prompts, chat template, settings validation, and the run path's imports."""
from __future__ import annotations

import subprocess
import sys

import pytest

import dgport
from dgport.errors import DgportError
from dgport.tokenizer import ChatTokenizer


@pytest.fixture(scope="module")
def tiny(checkpoints, hf_models):
    return dgport.load(checkpoints["tiny"], backend="torch", model=hf_models["tiny"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=-3), "max_new_tokens must be a positive integer"),
    (dict(entropy_bound=0.0), "entropy_bound must be > 0"),
    (dict(entropy_bound=-1.0), "entropy_bound must be > 0"),
    (dict(t_min=0.9, t_max=0.5), r"t_min \(0.9\) must not be above t_max \(0.5\)"),
    (dict(max_denoising_steps=0), "max_denoising_steps must be >= 1"),
    (dict(confidence_threshold=0.0), "confidence_threshold must be > 0"),
    (dict(stability_threshold=-1), "stability_threshold must be >= 0"),
    (dict(top_p=0.9), "unknown sampler setting"),
])
def test_bad_settings_are_refused(tiny, kwargs, message):
    with pytest.raises(DgportError, match=message):
        tiny.generate([2, 3, 4], seed=0, **kwargs)


@pytest.mark.parametrize("prompt", ["", "   \n", []])
def test_empty_prompt_is_refused(tiny, prompt):
    with pytest.raises(DgportError, match="prompt is empty"):
        tiny.generate(prompt, seed=0)


def test_out_of_vocabulary_ids_are_refused(tiny):
    with pytest.raises(DgportError, match=r"token ids must lie in \[0, 512\)"):
        tiny.generate([2, 512], seed=0)


def test_unknown_backend():
    with pytest.raises(DgportError, match="unknown backend 'tpu'"):
        dgport.load(".", backend="tpu")


def test_string_prompt_uses_chat_template(tiny):
    res = tiny.generate("Why is the sky blue?", seed=2, max_new_tokens=16)
    text = tiny.tokenizer.decode(res.prompt_ids, skip_special_tokens=False)
    assert text == ("<bos><|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")
    assert isinstance(res.text, str) and len(res.token_ids[0]) == 16
    raw = tiny.generate("Why", seed=2, max_new_tokens=16, raw=True)
    assert raw.prompt_ids[0] == 2 and tiny.tokenizer.decode(raw.prompt_ids) == "Why"


def test_seed_and_rng_are_reproducible(tiny):
    import numpy as np

    a = tiny.generate([2, 9, 9], seed=5, max_new_tokens=16).token_ids
    b = tiny.generate([2, 9, 9], rng=np.random.Generator(np.random.PCG64(5)), max_new_tokens=16).token_ids
    c = tiny.generate([2, 9, 9], seed=6, max_new_tokens=16).token_ids
    assert a == b and a != c


def test_thinking_and_system_prompts(checkpoints):
    tok = ChatTokenizer(checkpoints["tiny"])
    msgs = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}]
    assert tok.render(msgs) == ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi<turn|>\n"
                                "<|turn>model\n<|channel>thought\n<channel|>")
    assert tok.render(msgs[1:], enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n")


def test_run_path_imports_no_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import dgport, dgport.api, dgport.loop, dgport.manifest, dgport.tokenizer, dgport.cli\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
