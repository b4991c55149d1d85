"""Images on the command line (the 'vision' fixture's ONNX export, CPU): `dgport run --image` gives the
tokens of generate(prompt, images=) and keeps --json's shape; `dgport chat --image` and `/image PATH`
attach images to a turn, and a later turn's image gives the tokens of a fresh run over the whole
conversation; every bad input is one line naming the file or option, exit status 2, nothing on stdout."""
from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image

import dgport
from cli_support import dg
from dgport.chat import ChatSession, continuation_parts
from dgport.errors import DgportError
from dgport.images import ImageError
from dgport.loop import make_rng
from image_support import answer, export, gen  # noqa: F401  (fixtures)
from onnx_support import THREADS, onnx_exports  # noqa: F401  (session fixture)

rng = np.random.default_rng(11)
A = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
B = Image.fromarray(rng.integers(0, 256, (90, 41, 3), dtype=np.uint8))
IMAGE_TOKEN = 61
RUN_JSON_KEYS = {"prompt_ids", "token_ids", "text", "finished", "steps_per_canvas", "tokens_per_forward",
                 "generated_tokens", "seconds", "tokens_per_second", "backend", "seed", "export", "default_model",
                 "timings", "answer_check", "template", "holes"}


@pytest.fixture(scope="module")
def text_only(checkpoints, tmp_path_factory):
    from dgport.exporters.export import ExportOptions, export

    out = tmp_path_factory.mktemp("images-cli") / "text-only"
    export(checkpoints["vision"], out, ExportOptions(text_only=True, validate=False))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("image-files")
    A.save(d / "a.png")
    B.save(d / "b.jpg", quality=90)
    (d / "not-an-image.png").write_bytes(b"hello, not pixels")
    png = (d / "a.png").read_bytes()
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.new("1", (9000, 9000)).save(d / "bomb.png")  # 81 million pixels in a few kilobytes
    (d / "empty.png").write_bytes(b"")
    return d


def test_run_with_images_gives_generates_tokens(capsys, export, gen, files):
    code, out, err = dg(capsys, "run", export, "--image", files / "a.png", "--image", files / "b.jpg",
                        "--prompt", "what is in these?", "--seed", "3", "--max-new-tokens", "16", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert set(r) == RUN_JSON_KEYS  # the shape --json always had
    want = gen.generate("what is in these?", images=[files / "a.png", files / "b.jpg"], seed=3, max_new_tokens=16)
    assert r["token_ids"] == answer(want) and r["prompt_ids"] == want.prompt_ids
    assert 70 < r["prompt_ids"].count(IMAGE_TOKEN) < 140  # two images' soft tokens, in the prompt's order
    code, out, err = dg(capsys, "run", export, "--image", files / "b.jpg", "--image", files / "a.png",
                        "--prompt", "what is in these?", "--seed", "3", "--max-new-tokens", "16", "--json")
    assert code == 0 and json.loads(out)["prompt_ids"] != r["prompt_ids"]  # order matters
    # --max-soft-tokens reaches the image processor
    code, out, err = dg(capsys, "run", export, "--image", files / "a.png", "--max-soft-tokens", "140",
                        "--prompt", "describe", "--seed", "5", "--max-new-tokens", "16", "--json")
    assert code == 0, err
    want = gen.generate("describe", images=[files / "a.png"], seed=5, max_new_tokens=16, max_soft_tokens=140)
    assert json.loads(out)["token_ids"] == answer(want) and want.prompt_ids.count(IMAGE_TOKEN) > 70
    # streamed text and the summary line, as for text
    code, out, err = dg(capsys, "run", export, "--image", files / "a.png", "--prompt", "describe", "--seed", "5",
                        "--max-new-tokens", "16")
    assert code == 0 and out.endswith("\n") and "tokens in" in err, err
    # --raw: the prompt's own markers say where each image goes
    code, out, err = dg(capsys, "run", export, "--raw", "--image", files / "a.png", "--prompt", "look: <|image|> ok",
                        "--seed", "1", "--max-new-tokens", "16", "--json")
    assert code == 0, err
    assert json.loads(out)["token_ids"] == answer(gen.generate("look: <|image|> ok", raw=True, images=[A], seed=1,
                                                               max_new_tokens=16))


@pytest.mark.parametrize("args, says", [
    (["--image", "{d}/missing.png"], r"--image \S*missing.png: no such file"),
    (["--image", "{d}/not-an-image.png"], r"--image \S*not-an-image.png: not a readable PNG, JPEG, WebP or GIF"),
    (["--image", "{d}/truncated.png"], r"--image \S*truncated.png: a damaged or truncated image"),
    (["--image", "{d}/bomb.png"], r"--image \S*bomb.png: 9000x9000 pixels, over the limit"),
    (["--image", "{d}/empty.png"], r"--image \S*empty.png: not a readable"),
    (["--image", "{d}"], r"--image: \S*image-files\d*: not a regular file"),  # a folder
    (["--image", "{d}/a.png", "--raw", "--prompt", "<|image|> and <|image|>"], "2 image markers for 1 image"),
    (["--prompt", "a marker typed as text: <|image|>"], "1 image marker for 0 images"),
    (["--image", "{d}/a.png", "--max-soft-tokens", "100"], "'--max-soft-tokens': must be one of 70, 140, 280, 560, 1120"),
    (["--image", "{d}/a.png", "--max-soft-tokens", "many"], "'--max-soft-tokens'"),
])
def test_bad_image_input_is_one_line_and_exit_2(capsys, export, files, args, says):
    import re

    args = [a.format(d=files) for a in args]
    prompt = [] if "--prompt" in args else ["--prompt", "hi"]
    code, out, err = dg(capsys, "run", export, *args, *prompt, "--max-new-tokens", "16")
    lines = err.strip().splitlines()
    assert code == 2 and out == "", (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("dgport: error: ") and re.search(says, lines[0]), err


def test_images_for_a_text_only_export_are_refused(capsys, text_only, files):
    for command in (["run", text_only, "--prompt", "hi"], ["chat", text_only]):
        code, out, err = dg(capsys, *command, "--image", files / "a.png")
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and "takes no images" in err and "--text-only" in err, err
    code, out, err = dg(capsys, "run", text_only, "--prompt", "hi", "--max-soft-tokens", "140", "--max-new-tokens", "16")
    assert code == 0 and "--max-soft-tokens has no effect without --image" in err  # text runs as before


def _stdin(monkeypatch, text: str):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))


def test_chat_attaches_images_to_turns(capsys, monkeypatch, export, text_only, files):
    _stdin(monkeypatch, f"hello\n/image {files}/a.png\n/image {files}/missing.png\n/image\nwhat is this?\n"
                        f"/image '{files}/b.jpg'\n/reset\nbye\n")
    code, out, err = dg(capsys, "chat", export, "--seed", "0", "--max-new-tokens", "16", "--image", files / "b.jpg")
    assert code == 0, err
    assert err.count("tokens in") == 3 and "(cache kept)" in err
    assert "a.png: 70x50; 1 image for the next message" in err
    assert f"dgport: error: /image {files}/missing.png: no such file" in err and "/image needs a file" in err
    assert "[a new conversation; 1 image dropped]" in err
    # the first turn carried --image: its prompt held the image block
    first = [line for line in err.splitlines() if "tokens in" in line][0]
    assert int(first.split("encoded ")[1].split()[0]) > 50
    _stdin(monkeypatch, f"/image {files}/a.png\nhi\n")
    code, out, err = dg(capsys, "chat", text_only, "--seed", "0", "--max-new-tokens", "16")
    assert code == 0 and "dgport: error: /image: " in err and "takes no images" in err and err.count("tokens in") == 1


def test_a_later_turn_with_an_image_is_a_fresh_run_of_the_conversation(gen):
    """Turn 2 carries an image: its block is encoded with its soft tokens after the cached turn 1, and the
    tokens are those of one fresh generate over the whole conversation's token stream (the image given
    by its marker) with the same random draws. Encoded afresh (after an interrupted turn), a turn gives
    the tokens of generate(messages) of the whole conversation."""
    C = gen.config.canvas_length
    for seed in (0, 1):
        session = ChatSession(gen, seed=seed, max_new_tokens=16)
        first = session.say("hello there")
        turn2 = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]}
        head, new = continuation_parts(gen.tokenizer, session._render, session.messages[:-1],
                                       session.messages[-1]["content"], session.messages + [turn2], session._tail)
        second = session.say("and this?", images=[A])
        assert "(cache kept)" in session.last_stats
        n = second.prompt_ids.count(IMAGE_TOKEN)  # (its ids: this turn's alone)
        assert 0 < n <= 70 and session.encoded_last_turn == len(head) + len(new) + n + 1  # the marker: its block
        draws = make_rng(seed)
        assert answer(gen.generate("hello there", rng=draws, max_new_tokens=16)) == answer(first)
        stream = first.prompt_ids + answer(first)[:C * (len(first.steps_per_canvas) - 1)] + head + new
        whole = gen.generate(stream, images=[A], rng=draws, max_new_tokens=16)
        assert answer(whole) == answer(second)
        session._stale = True  # as after Ctrl-C: the next turn renders the conversation afresh
        third = session.say("and these?", images=[B, A])
        assert "(cache kept)" not in session.last_stats
        messages = [{"role": "user", "content": "hello there"}, session.messages[1],
                    {"role": "user", "content": [{"type": "image", "image": A}, {"type": "text", "text": "and this?"}]},
                    session.messages[3],
                    {"role": "user", "content": [{"type": "image", "image": B}, {"type": "image", "image": A},
                                                 {"type": "text", "text": "and these?"}]}]
        assert answer(gen.generate(messages, rng=draws, max_new_tokens=16)) == answer(third)


def test_chat_refusals_leave_the_conversation_as_it_was(gen, text_only):
    session = ChatSession(gen, seed=0, max_new_tokens=16)
    session.say("hello")
    before = (list(session.messages), gen.backend.cache_len)
    for images, says in (([b"not an image"], "not a readable"), (["/nonexistent.png"], "no such file"),
                         ("a.png", "must be a list")):
        with pytest.raises(DgportError, match=says):
            session.say("look", images=images)
    with pytest.raises(ImageError, match="1 image marker for 0 images"):
        session.say("a typed <|image|>")
    assert (session.messages, gen.backend.cache_len) == before
    assert "(cache kept)" in (session.say("go on", images=[A]) and session.last_stats)
    with pytest.raises(ImageError, match="max_soft_tokens must be one of"):
        ChatSession(gen, max_soft_tokens=100)
    plain = ChatSession(dgport.load(text_only, backend="cpu", threads=THREADS), seed=0, max_new_tokens=16)
    with pytest.raises(DgportError, match="takes no images"):
        plain.say("look", images=[A])
    assert plain.say("hi").token_ids
