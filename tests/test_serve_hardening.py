"""`dgport serve`, second hardening pass: the event loop never stalls, only this machine's pages can
drive a loopback server, shutdown and disconnects are clean, and the OpenAI contract holds as clients
read it (max_tokens is a hard cap). Real servers run in their own process (bench.serve_process);
every wait is on the server's state (/health's `busy`, `waiting`, a stream's first draft), never on
a fixed sleep."""
from __future__ import annotations

import sys

import pytest

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def export():
    from dgport.default_model import ensure_default_export

    return ensure_default_export("cpu")


@pytest.fixture(scope="module")
def gen(export):
    import dgport

    return dgport.load(export, backend="cpu")


# ---------------------------------------------------------------------------------------------
# 1. The server never stalls


def test_stop_string_search_is_linear(gen):
    """The characters str.find scans over a whole answer grow linearly with its length: each delta
    searches its new text plus the longest stop's length - 1 of overlap (counted with a profiler,
    which sees every str.find call and the string it scans)."""
    from dgport.serve import TextStream

    tok = gen.tokenizer
    piece = tok.encode("1 2 3 4 5 6 7 8 9 ")
    stops = ["@@@", "9 1 2 3 4 5 6 7 8 9 9"]  # never in the text

    def scanned(n: int) -> tuple[int, int]:
        stream = TextStream(tok, gen.defaults.pad_token_id, chat=False, stop=stops)
        chars = [0]

        def prof(frame, event, arg):
            if event == "c_call" and getattr(arg, "__name__", "") in ("find", "index", "rfind", "rindex") \
                    and isinstance(getattr(arg, "__self__", None), str):
                chars[0] += len(arg.__self__)

        sys.setprofile(prof)
        try:
            for _ in range(n):
                stream.add(piece)
                stream.deltas()
        finally:
            sys.setprofile(None)
        return chars[0], len(stream.text()[0])

    work, length = scanned(400)
    assert work > 0, "no str.find call seen: the stop strings were not searched"
    longest = max(len(s) for s in stops)
    assert work <= len(stops) * (length + 400 * longest), (work, length)
    # and a stop string split across two deltas is still found
    stream = TextStream(tok, gen.defaults.pad_token_id, chat=False, stop=["3 4 5"])
    stream.add(tok.encode("1 2 3 "))
    assert stream.deltas() == ("1 2 ", "")  # "3 " may start the stop string: held back
    stream.add(tok.encode("4 5 6"))
    assert stream.deltas() == ("", "") and stream.stopped
