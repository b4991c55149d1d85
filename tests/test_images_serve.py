"""Images in `dgport serve` (the 'vision' fixture's ONNX export, CPU, in-process apps): chat completions take
OpenAI's image_url parts with data: URLs and give the tokens of generate(messages, seed=) on both engines,
streaming or not; the prefix cache never shares a cached conversation with a request whose images differ;
every bad image or part is a 400 naming it, after which the server still answers; images for a text-only
export are a 400; the body cap leaves room for an image; decoding runs off the event loop."""
from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import dgport  # noqa: E402
from dgport.serve import ServeConfig, create_app  # noqa: E402
from image_support import export, gen  # noqa: E402,F401  (fixtures)
from onnx_support import THREADS, onnx_exports  # noqa: E402,F401  (session fixture)

rng = np.random.default_rng(21)
A = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
A2 = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))  # A's size: the same token ids
B = Image.fromarray(rng.integers(0, 256, (90, 41, 3), dtype=np.uint8))
IMAGE_TOKEN = 61


def encoded(img, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def image_part(img, fmt: str = "PNG", **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(encoded(img, fmt), fmt.lower()), **extra}}


def user(*images, text: str = "what is this?") -> dict:
    return {"role": "user", "content": [*(image_part(i) for i in images), {"type": "text", "text": text}]}


def body(messages, seed: int = 3, **extra) -> dict:
    return {"model": "m", "messages": messages, "seed": seed, "max_tokens": 16, "return_token_ids": True, **extra}


def _app(folder, max_batch: int):
    return create_app(lambda: dgport.load(folder, backend="cpu", threads=THREADS),
                      ServeConfig(model_id="m", backend="cpu", fingerprint="f"), max_batch=max_batch)


@pytest.fixture(scope="module")
def apps(export):
    """One server per engine: the single-row one (--max-batch 1) and the batch engine."""
    made = {1: _app(export, 1), 4: _app(export, 4)}
    yield made
    for app in made.values():
        app.state.engine.close()


@pytest.fixture(scope="module")
def text_only(checkpoints, tmp_path_factory):
    from dgport.exporters.export import ExportOptions, export

    out = tmp_path_factory.mktemp("images-serve") / "text-only"
    export(checkpoints["vision"], out, ExportOptions(text_only=True, validate=False))
    app = _app(out, 1)
    yield app
    app.state.engine.close()


def post(app, *bodies, route: str = "/v1/chat/completions", raw: bytes | None = None) -> list:
    """The bodies posted one after another (in order: the cache state matters) to the in-process app."""
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as c:
            if raw is not None:
                return [await c.post(route, content=raw, headers={"Content-Type": "application/json"})]
            return [await c.post(route, json=b) for b in bodies]

    return asyncio.run(go())


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def answer(res) -> list[int]:
    return [t for t in res.token_ids[0] if t != 0]


@pytest.mark.parametrize("max_batch", [1, 4])
def test_image_requests_give_generates_tokens(apps, gen, max_batch):
    """The official client, two images (PNG and JPEG bytes: the server decodes the same bytes generate
    does), streaming and not; max_soft_tokens reaches the image processor."""
    async def go():
        transport = httpx.ASGITransport(app=apps[max_batch])
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120) as h:
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="unused", http_client=h, max_retries=0)
            messages = [{"role": "user", "content": [image_part(A), image_part(B, "JPEG", detail="low"),
                                                     {"type": "text", "text": "compare them"}]}]
            whole = await client.chat.completions.create(model="m", messages=messages, seed=4, max_tokens=16,
                                                         extra_body={"return_token_ids": True})
            chunks = [c async for c in await client.chat.completions.create(
                model="m", messages=messages, seed=4, max_tokens=16, stream=True)]
            finer = await client.chat.completions.create(model="m", messages=messages[:1], seed=4, max_tokens=16,
                                                         extra_body={"return_token_ids": True, "max_soft_tokens": 140})
            return whole, chunks, finer

    whole, chunks, finer = asyncio.run(go())
    parts = [{"type": "image", "image": encoded(A)}, {"type": "image", "image": encoded(B, "JPEG")},
             {"type": "text", "text": "compare them"}]
    want = gen.generate([{"role": "user", "content": parts}], seed=4, max_new_tokens=16)
    assert whole.choices[0].token_ids == answer(want) and whole.prompt_token_ids == want.prompt_ids
    assert whole.usage.prompt_tokens == len(want.prompt_ids) and want.prompt_ids.count(IMAGE_TOKEN) > 70
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    want = gen.generate([{"role": "user", "content": parts}], seed=4, max_new_tokens=16, max_soft_tokens=140)
    assert finer.choices[0].token_ids == answer(want) and finer.prompt_token_ids == want.prompt_ids


def _collapsed(ids: list[int]) -> list[int]:
    """A token stream with each image block (boi, image tokens, eoi) back to its one marker."""
    out, i = [], 0
    while i < len(ids):
        if ids[i] == 60 and i + 1 < len(ids) and ids[i + 1] == IMAGE_TOKEN:
            i += 1
            while ids[i] == IMAGE_TOKEN:
                i += 1
            out.append(IMAGE_TOKEN)
        else:
            out.append(ids[i])
        i += 1
    return out


@pytest.mark.parametrize("max_batch", [1, 4])
def test_the_prefix_cache_keys_on_image_content(apps, gen, max_batch):
    """A request continues the cached conversation (image A, then its answer). With image A the cache is
    reused (the tokens of a fresh run over that token stream); with A2, the same size and so the same
    token ids, nothing is reused and the tokens are a fresh server's, never those the cache would give."""
    app = apps[max_batch]
    first = ok(post(app, body([user(A)]))[0])
    said = first["choices"][0]["message"]["content"]
    follow = [{"role": "assistant", "content": said}, {"role": "user", "content": "and then?"}]
    replies = post(app, body([user(A), *follow], seed=5), body([user(A)]), body([user(A2), *follow], seed=5))
    same, again, other = (ok(r) for r in replies)
    assert again["choices"][0]["message"]["content"] == said  # the cache holds A's conversation again
    assert same["usage"]["prompt_tokens_details"]["cached_tokens"] == len(first["prompt_token_ids"])
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    history = [{"role": "user", "content": [{"type": "image", "image": np.array(A2)},
                                            {"type": "text", "text": "what is this?"}]}, *follow]
    fresh = gen.generate(history, seed=5, max_new_tokens=16)
    assert other["choices"][0]["token_ids"] == answer(fresh) and other["prompt_token_ids"] == fresh.prompt_ids
    for reply, img in ((same, A), (other, A2)):  # each: a fresh run over its stream, its own image
        run = gen.generate(_collapsed(reply["prompt_token_ids"]), images=[img], seed=5, max_new_tokens=16)
        assert run.prompt_ids == reply["prompt_token_ids"] and answer(run) == reply["choices"][0]["token_ids"]
    # sharing A's cache would have run A2's request on `same`'s stream and images: `same`'s tokens
    assert other["choices"][0]["token_ids"] != same["choices"][0]["token_ids"]
    with_a = gen.generate([{**history[0], "content": [{"type": "image", "image": np.array(A)},
                                                      history[0]["content"][1]]}, *follow], seed=5, max_new_tokens=16)
    assert with_a.prompt_ids == fresh.prompt_ids  # the same token ids whatever the image


@pytest.mark.parametrize("max_batch", [1, 4])
def test_an_image_in_a_later_turn_reuses_the_cache(apps, gen, max_batch):
    """The conversation in the cache (image A) goes on with a turn that brings image B: only B goes through
    the vision tower and the new turn is encoded after the cached one; the tokens are those of a fresh run
    over the same token stream with both images."""
    app = apps[max_batch]
    first = ok(post(app, body([user(A)]))[0])
    said = first["choices"][0]["message"]["content"]
    later = ok(post(app, body([user(A), {"role": "assistant", "content": said}, user(B, text="and this?")],
                              seed=6))[0])
    assert later["usage"]["prompt_tokens_details"]["cached_tokens"] == len(first["prompt_token_ids"])
    run = gen.generate(_collapsed(later["prompt_token_ids"]), images=[A, B], seed=6, max_new_tokens=16)
    assert run.prompt_ids == later["prompt_token_ids"] and answer(run) == later["choices"][0]["token_ids"]


def test_a_cached_prefix_is_reused_only_with_its_images():
    from dgport.image_prompt import PromptImages
    from dgport.images import Patches
    from dgport.serve.image_plan import reusable_images
    from dgport.serve.plan import Plan

    def patches(n):
        return Patches(np.zeros((1, 1), np.float32), np.zeros((1, 2), np.int64), n, (1, 1))

    ids = [2, 60, *[61] * 3, 62, 7, 60, *[61] * 2, 62, 8]  # two blocks: at 1 (3 tokens) and at 7 (2 tokens)
    plan = Plan(ids=ids, max_new_tokens=16, max_tokens=None, seed=0, overrides={}, stop=[], chat=True, stream=False,
                include_usage=False, drafts=False, return_token_ids=False,
                images=PromptImages([patches(3), patches(2)], ""), image_keys=["a", "b"], image_starts=[1, 7])
    assert reusable_images(plan, 1, []) == 0
    assert reusable_images(plan, 7, ["a"]) == 1 and reusable_images(plan, 7, ["x"]) is None
    assert reusable_images(plan, 12, ["a", "b"]) == 2 and reusable_images(plan, 12, ["a", "x"]) is None
    assert reusable_images(plan, 7, []) is None  # the cache holds no image where this prompt has one
    assert reusable_images(plan, 9, ["a", "b"]) is None  # a prefix that cuts a block


LARGE = 9000  # a side: 81 million pixels, over the 64 million an image may have, in a small PNG


def bad(part) -> dict:
    return body([{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}])


def with_url(url: str) -> dict:
    return bad({"type": "image_url", "image_url": {"url": url}})


@pytest.mark.parametrize("request_body, param, says", [
    (with_url("https://example.com/cat.png"), "messages[0].content[0]", "dgport never fetches from the network"),
    (with_url("http://127.0.0.1:1/x.png"), "messages[0].content[0]", "never fetches"),
    (with_url("file:///etc/passwd"), "messages[0].content[0]", "never fetches"),
    (with_url("data:text/plain;base64,aGk="), "messages[0].content[0]", "PNG, JPEG, WebP or GIF"),
    (with_url("data:image/png;base64,@@@@"), "messages[0].content[0]", "not valid base64"),
    (with_url(data_url(b"not an image")), "messages[0].content[0]", "not a readable PNG, JPEG, WebP or GIF"),
    (with_url(data_url(encoded(A)[:200])), "messages[0].content[0]", "damaged or truncated"),
    (with_url(data_url(encoded(Image.new("1", (LARGE, LARGE))))), "messages[0].content[0]", "over the limit"),
    (bad({"type": "image_url", "image_url": {"url": data_url(encoded(A)), "detail": "ultra"}}),
     "messages[0].content[0]", "detail"),
    (bad({"type": "image_url", "image_url": {}}), "messages[0].content[0]", "an image part is"),
    (bad({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}), "messages[0].content[0]", "an image part"),
    (bad({"type": "image", "image": "/etc/passwd"}), "messages[0].content[0]", "a content part is"),  # no server paths
    (bad({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}), "messages[0].content[0]",
     "input_audio parts are not supported"),
    (bad({"type": "text"}), "messages[0].content[0]", "a text part is"),
    (bad("just a string"), "messages[0].content[0]", "a content part is"),
    (body([{"role": "system", "content": [image_part(A)]}, user(text="hi")]), "messages[0].content[0]",
     "images go in user messages"),
    (body([user(A)], max_soft_tokens=100), "max_soft_tokens", "max_soft_tokens must be one of"),
    (body([user(A)], max_soft_tokens="280"), "max_soft_tokens", "integer"),
    (body([{"role": "user", "content": "a typed <|image|> marker"}]), "messages", "1 image marker for 0 images"),
    (body([user(A, text="and a typed <|image|>")]), "messages", "2 image markers for 1 image"),
    ({"model": "m", "prompt": "raw <|image|>", "max_tokens": 16}, "prompt", "holds the image token"),
    ({"model": "m", "prompt": "x", "max_soft_tokens": 140}, "max_soft_tokens", "not supported"),
])
def test_bad_image_requests_get_a_400_naming_the_part(apps, request_body, param, says):
    route = "/v1/completions" if "prompt" in request_body else "/v1/chat/completions"
    r = post(apps[1], request_body, route=route)[0]
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert len(error["message"].splitlines()) == 1 and (param == "messages" or param in error["message"]
                                                        or param == "prompt" or param == "max_soft_tokens")


def test_the_server_keeps_serving_after_bad_images(apps):
    for max_batch, app in apps.items():
        replies = post(app, with_url(data_url(b"junk")), with_url("https://example.com/a.png"), body([user(B)]))
        assert [r.status_code for r in replies] == [400, 400, 200], [r.text for r in replies]


def test_a_text_only_export_refuses_images_and_serves_text(text_only):
    refused, served = post(text_only, body([user(A)]), body([{"role": "user", "content": "hi"}]))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "images_not_supported" and "takes no images" in error["message"]
    assert error["param"] == "messages[0].content[0]" and "--text-only" in error["message"]
    assert ok(served)["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_body_cap_leaves_room_for_an_image(apps, text_only):
    """A model that takes images accepts a body of 32 MiB (a photo's base64); a text model keeps 4 MiB."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1100, 1300, 3), dtype=np.uint8))
    big = body([{"role": "user", "content": [image_part(noise), {"type": "text", "text": "hi"}]}])
    raw = __import__("json").dumps(big).encode()
    assert 4 << 20 < len(raw) < 32 << 20
    assert ok(post(apps[1], raw=raw)[0])["usage"]["prompt_tokens"] > 70
    r = post(text_only, raw=raw)[0]
    assert r.status_code == 413 and "the limit is 4194304" in r.json()["error"]["message"]
    r = post(apps[1], raw=b'{"model": "m", "messages": [], "x": "' + b"a" * (33 << 20) + b'"}')[0]
    assert r.status_code == 413


def test_images_are_decoded_off_the_event_loop(apps, monkeypatch):
    import threading

    from dgport.serve import image_plan

    seen = []
    real = image_plan.prepare_images

    def spy(*args, **kwargs):
        seen.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(image_plan, "prepare_images", spy)
    ok(post(apps[1], body([user(A, B)]))[0])
    assert len(seen) == 2 and all(name.startswith("dgport-serve-plan") for name in seen), seen


def test_data_urls_decode_a_slice_at_a_time():
    from dgport.images import ImageError
    from dgport.serve.image_plan import B64_SLICE, data_url as decode

    payload = np.random.default_rng(1).integers(0, 256, 3 * B64_SLICE // 2, dtype=np.uint8).tobytes()
    url = data_url(payload)
    assert decode(url, "x") == payload
    broken = url[:len(url) - 10] + "!" + url[len(url) - 9:]  # a bad character in the last slice
    with pytest.raises(ImageError, match="x: the data: URL is not valid base64"):
        decode(broken, "x")
