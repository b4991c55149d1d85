"""The browser against native: the same puzzles and seeds through dgport's Python loop on ONNX Runtime
(native CPU), the JavaScript loop on onnxruntime-node, and the page in headless Chromium
(onnxruntime-web, WebAssembly), side by side.

    python -m bench.bench_web                       # the shipped Sudoku model, 1 and 2 threads
    python -m bench.bench_web EXPORT --prompt "Why is the sky blue?" --max-new-tokens 64 --threads 1

Each engine is its own process and times each generate call inside it (loading excluded); the engines
take turns over --rounds rounds so the machine's other load falls on each alike. Reported per engine and
thread count: ms per denoising step (all calls' time over all their steps, so encodes are included) and
seconds per answer (medians over rounds), the ratio to native at the same thread count, and whether every
engine wrote the same tokens. Prints the CPU's VNNI/BF16 flags. Needs web/node_modules and Chromium
(tests/install-tools.sh)."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .bench_batch import cpu_flags

WEB = Path(__file__).resolve().parent.parent / "web"


def python_engine(export: str, requests_file: str) -> None:
    """Child process: dgport's Python loop over the requests, one JSON line each (as generate.mjs)."""
    import dgport

    requests = json.loads(Path(requests_file).read_text())
    gen = dgport.load(export, backend="cpu", threads=requests[0]["threads"])
    for r in requests:
        t = time.perf_counter()
        res = gen.generate(r["prompt"], seed=r["seed"], max_new_tokens=r.get("max_new_tokens"))
        print(json.dumps({"token_ids": res.token_ids[0], "steps_per_canvas": res.steps_per_canvas,
                          "seconds": time.perf_counter() - t}), flush=True)


def lines(cmd: list[str], cwd: Path = WEB) -> list[dict]:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed: {proc.stderr[-2000:]}")
    out = [json.loads(x) for x in proc.stdout.splitlines() if x.strip()]
    bad = [o for o in out if "error" in o]
    if bad:
        raise RuntimeError(f"{cmd[1]}: {bad[0]}")
    return out


def run_engine(engine: str, export: str, requests: list[dict], threads: int, tmp: Path) -> list[dict]:
    reqs = [{**r, "threads": threads} for r in requests]
    path = tmp / "requests.json"
    path.write_text(json.dumps(reqs))
    if engine == "native":
        return lines([sys.executable, "-m", "bench.bench_web", "--engine-python", export, str(path)], WEB.parent)
    return lines(["node", "scripts/generate.mjs", export, str(path)])


def run_browser(port: int, requests: list[dict], threads: int, tmp: Path) -> list[dict]:
    """The page loaded once with `threads` WebAssembly threads, each request through window.dgport."""
    path = tmp / "requests.json"
    path.write_text(json.dumps(requests))
    return lines(["node", "scripts/browser-run.mjs", "--api", f"http://127.0.0.1:{port}/?threads={threads}", str(path)])


class PageServer:
    """`dgport web EXPORT` on a free port, in its own process."""

    def __init__(self, export: str):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "dgport.cli", "web", export, "--port", str(self.port)],
                                     stderr=subprocess.PIPE, text=True)
        banner = self.proc.stderr.readline()
        if f":{self.port}/" not in banner:
            self.proc.kill()
            raise RuntimeError(f"dgport web did not start: {banner}{self.proc.stderr.read()[-2000:]}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def summarize(runs: list[dict]) -> tuple[float, float]:
    steps = sum(sum(r["steps_per_canvas"]) for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return 1000 * seconds / steps, seconds / len(runs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", nargs="?", help="an fp32 or fp16 ONNX export (default: the shipped Sudoku model)")
    ap.add_argument("--prompt", action="append", help="prompts (default for the Sudoku model: --puzzles held-out "
                                                      "puzzles with 30-35 givens)")
    ap.add_argument("--puzzles", type=int, default=6)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--engine-python", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.engine_python:
        python_engine(*args.engine_python)
        return 0
    from dgport.default_model import ensure_default_export
    from dgport.task import declared

    export = str(args.export or ensure_default_export("cpu"))
    if args.prompt:
        prompts = args.prompt
    elif declared(export).task == "sudoku":  # held-out puzzles as hard as the model is tested on
        from dgport.models.sudoku.puzzles import generate

        prompts = [p.puzzle for p in generate(7, args.puzzles, 30, 35)]
    else:
        raise SystemExit("give --prompt for a model that is not the Sudoku model")
    requests = [{"prompt": p, "seed": int(s), "max_new_tokens": args.max_new_tokens}
                for p in prompts for s in args.seeds.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    print(f"{export}: {len(requests)} answers per engine and round, {args.rounds} rounds; CPU flags: {cpu_flags()}",
          flush=True)
    engines = ["native", "node", "browser"]
    figures: dict = {}
    tokens: dict = {}
    server = PageServer(export)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for rnd in range(args.rounds):
                for t in threads:
                    for engine in (engines if rnd % 2 == 0 else engines[::-1]):
                        if engine == "browser":
                            runs = run_browser(server.port, requests, t, Path(tmp))
                        else:
                            runs = run_engine(engine, export, requests, t, Path(tmp))
                        figures.setdefault((engine, t), []).append(summarize(runs))
                        tokens.setdefault((engine, t), [r["token_ids"] for r in runs])
    finally:
        server.stop()
    same = len({json.dumps(v) for v in tokens.values()}) == 1
    report = {"export": export, "cpu_flags": cpu_flags(), "answers": len(requests), "rounds": args.rounds,
              "same_tokens": same, "rows": []}
    print(f"{'engine':<9}{'threads':>8}{'ms/step':>10}{'s/answer':>10}{'x native':>10}")
    for (engine, t), vals in figures.items():
        ms = statistics.median(v[0] for v in vals)
        sec = statistics.median(v[1] for v in vals)
        base = statistics.median(v[0] for v in figures[("native", t)])
        report["rows"].append({"engine": engine, "threads": t, "ms_per_step": ms, "s_per_answer": sec,
                               "step_time_vs_native": ms / base})
        print(f"{engine:<9}{t:>8}{ms:>10.2f}{sec:>10.3f}{ms / base:>10.2f}")
    print(f"same tokens on every engine and thread count: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
