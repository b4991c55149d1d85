"""Continuous batching in `dgport serve` (`--max-batch`): concurrent requests are denoised together,
and each answer is still its own run's: the tokens of Generator.generate(prompt_ids, seed=S); a
cancelled request leaves the batch without touching the others; prefix reuse and templates work;
`--max-batch 1` is the one-at-a-time engine."""
from __future__ import annotations

import asyncio

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

import dgport  # noqa: E402
from bench.serve_process import wait_for  # noqa: E402
from dgport.serve import ServeConfig, create_app  # noqa: E402

PROMPTS = ["Hello there, how are you?", "Why?", "A much longer prompt, with many more tokens in it than the others.",
           "Two words"]


@pytest.fixture(scope="module")
def export(checkpoints, tmp_path_factory):
    from dgport.exporters.export import ExportOptions, export

    folder = tmp_path_factory.mktemp("serve-batch") / "long"
    export(checkpoints["long-context"], folder, ExportOptions(formats=("onnx",), validate=False))
    return folder


# the stability rule cannot end it before step 1001: it is still running when its client hangs up
LONG = {"max_denoising_steps": 3000, "stability_threshold": 1000}


def app_for(export, max_batch: int, max_queue: int = 16):
    return create_app(lambda: dgport.load(export, backend="cpu", threads=2),
                      ServeConfig(model_id="m", backend="cpu", fingerprint="f"), max_queue=max_queue,
                      max_batch=max_batch)


async def _requests(app, bodies: list[dict], route: str = "/v1/completions") -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=300) as c:
        return list(await asyncio.gather(*(c.post(route, json=b) for b in bodies)))


def body(prompt: str, seed: int, **extra) -> dict:
    return {"model": "m", "prompt": prompt, "seed": seed, "max_tokens": 64, "return_token_ids": True, **extra}


def test_concurrent_requests_are_batched_and_each_is_its_own_run(export):
    app = app_for(export, max_batch=4)
    try:
        replies = asyncio.run(_requests(app, [body(p, 10 + i) for i, p in enumerate(PROMPTS)]))
        timings = app.state.engine.gen.backend.timings
    finally:
        app.state.engine.close()
    ref = dgport.load(export, backend="cpu", threads=2)
    for i, (p, r) in enumerate(zip(PROMPTS, replies)):
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        want = ref.generate(p, seed=10 + i, raw=True, max_new_tokens=64)
        assert choice["token_ids"] == [t for t in want.token_ids[0] if t != 0][:64]
    assert timings.denoise_rows > len(timings.denoise_s)  # some steps denoised several requests at once


def test_max_batch_one_runs_one_at_a_time(export):
    app = app_for(export, max_batch=1)
    try:
        replies = asyncio.run(_requests(app, [body(p, 3) for p in PROMPTS[:2]]))
        timings = app.state.engine.gen.backend.timings
    finally:
        app.state.engine.close()
    assert all(r.status_code == 200 for r in replies)
    assert timings.denoise_rows == 0  # the single-row path


def test_templates_and_prefix_reuse_in_a_batch(export):
    template = ['{"k": "', {"hole": 6}, '"}']
    app = app_for(export, max_batch=3)
    try:
        first = asyncio.run(_requests(app, [body(PROMPTS[0], 1), body(PROMPTS[1], 2, template=template)]))
        again = asyncio.run(_requests(app, [body(PROMPTS[0] + " And more.", 5)]))[0]
    finally:
        app.state.engine.close()
    ref = dgport.load(export, backend="cpu", threads=2)
    want = ref.generate(PROMPTS[1], seed=2, raw=True, template=[template[0], dgport.Hole(6), template[2]])
    got = first[1].json()["choices"][0]
    assert got["dgport_holes"] == want.holes and got["text"] == want.text
    assert again.status_code == 200
    want = ref.generate(PROMPTS[0] + " And more.", seed=5, raw=True, max_new_tokens=64)
    assert again.json()["choices"][0]["token_ids"] == [t for t in want.token_ids[0] if t != 0][:64]


def test_a_cancelled_stream_leaves_the_others_untouched(export):
    """A real server process (an in-process transport runs a stream to its end): one streaming client
    leaves after its first chunk while two others run in the same batch."""
    import threading

    from bench.serve_process import ServerProcess

    srv = ServerProcess(export, "--max-batch", "4", "--served-model-name", "m")
    try:
        replies = {}

        def other(i, p):
            replies[i] = httpx.post(srv.url + "/v1/completions", json=body(p, 20 + i, max_tokens=160), timeout=300)

        threads = [threading.Thread(target=other, args=(i, p)) for i, p in enumerate(PROMPTS[:2])]
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=300,
                          json={**body(PROMPTS[2], 7, max_tokens=160), "stream": True, **LONG}) as r:
            for t in threads:
                t.start()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # the first chunk: leave mid-generation (it cannot have ended: LONG)
        for t in threads:
            t.join()
        wait_for(lambda: srv.health()["cancelled"] >= 1 and not srv.health()["busy"],
                 "the cancelled stream to leave the batch", 300)
        assert srv.health()["cancelled"] == 1
    finally:
        srv.stop()
    ref = dgport.load(export, backend="cpu", threads=2)
    for i, p in enumerate(PROMPTS[:2]):
        want = ref.generate(p, seed=20 + i, raw=True, max_new_tokens=160)
        assert replies[i].json()["choices"][0]["token_ids"] == [t for t in want.token_ids[0] if t != 0][:160]
