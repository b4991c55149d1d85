"""`dgport serve` under load, on loopback only: N concurrent streaming clients for a fixed number of
requests (bounded in count and in time), against the same requests through the Python API.

    python -m bench.bench_serve                          # shipped Sudoku model, CPU, 8 clients, 64 requests
    python -m bench.bench_serve EXPORT --clients 4 --requests 32 --max-seconds 120 --json

Reported: requests/s; time to first canvas (first content delta) and end-to-end latency, p50/p99;
the server's overhead per request (one client, requests one after another, against
`Generator.generate` on the same prompts and seeds in this process; goal under 5 %); and a burst
against a server with a small --max-queue (how many got 503 with Retry-After, and that every
accepted request was answered). The server runs in its own process on a free 127.0.0.1 port.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

from .serve_process import ServerProcess


class Server(ServerProcess):
    def __init__(self, export, backend: str, *args: str, timeout: float = 120):
        super().__init__(export, "--backend", backend, "--served-model-name", "bench", *args, timeout=timeout)


def workload(n: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, seed) pairs: held-out Sudoku puzzles of the shipped model's generator."""
    from dgport.models.sudoku.puzzles import generate

    return [(p.puzzle, seed + i) for i, p in enumerate(generate(seed % 9, n, 36, 45))]


def stream_request(client, url: str, prompt: str, seed: int, settings: dict) -> dict:
    """One streaming chat request: {status, ttfc, e2e, text, retry_after}."""
    body = {"model": "bench", "messages": [{"role": "user", "content": prompt}], "seed": seed, "stream": True,
            **settings}
    started = time.perf_counter()
    first, text, figures = None, [], {}
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                    "e2e": time.perf_counter() - started}
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return {"status": 500, "e2e": time.perf_counter() - started, "error": data["error"]["message"]}
            if data.get("dgport"):
                figures = data["dgport"]
            if data.get("usage"):
                figures["completion_tokens"] = data["usage"]["completion_tokens"]
            for choice in data.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
    end = time.perf_counter()
    return {"status": 200, "ttfc": (first or end) - started, "e2e": end - started, "text": "".join(text),
            "generate_ms": figures.get("generate_ms", float("nan")), "tokens": figures.get("completion_tokens", 0)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads (Linux /proc; None elsewhere)."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overhead(export, backend: str, srv: "Server", jobs, settings: dict) -> dict:
    """Each request through the Python API and then through the server (one client), alternating so
    that the machine's other load falls on both sides alike; one warm-up of each first. Wall time
    suffers from whatever else the machine runs (each hand-off between the server's threads waits for
    a core), so CPU time per request is measured too: this process's around the API call, the
    server process's (all threads) around its request."""
    import httpx

    import dgport

    gen = dgport.load(export, backend=backend)
    max_new = 4 * gen.config.canvas_length
    url = srv.url
    api, served, inside, differ = [], [], [], 0
    api_cpu, srv_cpu = [], []
    with httpx.Client(timeout=300) as client:
        gen.generate(jobs[0][0], seed=jobs[0][1], max_new_tokens=max_new, **settings)
        stream_request(client, url, *jobs[0], settings)
        for prompt, seed in jobs:
            t, c = time.perf_counter(), time.process_time()
            text = gen.generate(prompt, seed=seed, max_new_tokens=max_new, **settings).text
            api.append(time.perf_counter() - t)
            time.sleep(0.05)  # as on the server side: ORT's workers spin a little after a run
            api_cpu.append(time.process_time() - c)
            c = cpu_seconds(srv.proc.pid)
            out = stream_request(client, url, prompt, seed, settings)
            if c is not None:
                time.sleep(0.05)  # the server's threads settle (ORT's spinning workers) before reading
                srv_cpu.append(cpu_seconds(srv.proc.pid) - c)
            if out["status"] != 200:
                raise RuntimeError(f"the server answered {out['status']}: {out.get('error', '')}")
            served.append(out["e2e"])
            inside.append(out["generate_ms"] / 1000)
            differ += out["text"] != text
    a, s, g = statistics.median(api), statistics.median(served), statistics.median(inside)
    return {"requests": len(jobs), "api_ms_median": 1000 * a, "server_ms_median": 1000 * s,
            "overhead_ms": 1000 * (s - a), "overhead_pct": 100 * (s / a - 1),
            "outside_generate_ms": 1000 * (s - g), "outside_generate_pct": 100 * (s / g - 1), "texts_differ": differ,
            "api_cpu_ms_mean": 1000 * statistics.fmean(api_cpu),
            "server_cpu_ms_mean": 1000 * statistics.fmean(srv_cpu) if srv_cpu else None,
            "cpu_overhead_pct": 100 * (statistics.fmean(srv_cpu) / statistics.fmean(api_cpu) - 1) if srv_cpu else None}


def concurrent(url: str, jobs, clients: int, max_seconds: float, settings: dict) -> tuple[list[dict], float]:
    """`clients` threads take the jobs in order until none are left or `max_seconds` have passed."""
    import httpx

    results: list[dict] = []
    lock = threading.Lock()
    queue = list(reversed(jobs))
    deadline = time.monotonic() + max_seconds

    def client_loop():
        with httpx.Client(timeout=max_seconds + 60) as client:
            while time.monotonic() < deadline:
                with lock:
                    if not queue:
                        return
                    prompt, seed = queue.pop()
                out = stream_request(client, url, prompt, seed, settings)
                out["job"] = (prompt, seed)
                with lock:
                    results.append(out)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - started


def burst(export, backend: str, jobs, max_queue: int, settings: dict) -> dict:
    """len(jobs) requests at once against a server that lets `max_queue` wait."""
    import httpx

    srv = Server(export, backend, "--max-queue", str(max_queue))
    try:
        results: list[dict] = []

        def one(prompt, seed):
            with httpx.Client(timeout=300) as client:
                results.append(stream_request(client, srv.url, prompt, seed, settings))

        threads = [threading.Thread(target=one, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        srv.stop()
    rejected = [r for r in results if r["status"] == 503]
    return {"sent": len(jobs), "answered": sum(r["status"] == 200 for r in results), "rejected_503": len(rejected),
            "other": sum(r["status"] not in (200, 503) for r in results),
            "retry_after_on_every_503": all(r.get("retry_after") for r in rejected),
            "max_queue": max_queue}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", nargs="?", help="export folder (default: the shipped Sudoku model)")
    ap.add_argument("--backend", default="cpu", choices=["cpu", "cuda", "mlx"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=64, help="requests in the concurrent run (at most)")
    ap.add_argument("--overhead-requests", type=int, default=16, help="requests in the one-client comparison")
    ap.add_argument("--max-seconds", type=float, default=180, help="time bound of the concurrent run")
    ap.add_argument("--burst-queue", type=int, default=2, help="--max-queue of the burst server (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 100_000 and args.overhead_requests >= 1):
        ap.error("--clients 1..256, --requests 1..100000, --overhead-requests >= 1")
    if args.export is None:
        from dgport.default_model import ensure_default_export

        args.export = str(ensure_default_export(args.backend))
    settings: dict = {}
    jobs = workload(max(args.requests, args.overhead_requests), args.seed)
    seq_jobs = jobs[:args.overhead_requests]

    srv = Server(args.export, args.backend, "--max-queue", str(max(args.clients, 1) * 2))
    try:
        over = overhead(args.export, args.backend, srv, seq_jobs, settings)
        conc, wall = concurrent(srv.url, jobs[:args.requests], args.clients, args.max_seconds, settings)
    finally:
        srv.stop()
    bad = [r for r in conc if r["status"] != 200]
    ok = [r for r in conc if r["status"] == 200]
    report = {
        "export": args.export, "backend": args.backend, "clients": args.clients,
        "overhead": over,
        "concurrent": {"requests_done": len(ok), "requests_asked": args.requests, "seconds": wall,
                       "requests_per_s": len(ok) / wall,
                       "ttfc_ms_p50": 1000 * pct([r["ttfc"] for r in ok], 50),
                       "ttfc_ms_p99": 1000 * pct([r["ttfc"] for r in ok], 99),
                       "e2e_ms_p50": 1000 * pct([r["e2e"] for r in ok], 50),
                       "e2e_ms_p99": 1000 * pct([r["e2e"] for r in ok], 99)},
        "errors": len(bad),
    }
    if args.burst_queue > 0:
        report["burst"] = burst(args.export, args.backend, jobs[:args.clients + args.burst_queue + 4],
                                args.burst_queue, settings)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        o, c = report["overhead"], report["concurrent"]
        print(f"overhead, 1 client, {o['requests']} requests: API {o['api_ms_median']:.1f} ms, server "
              f"{o['server_ms_median']:.1f} ms per request (medians): {o['overhead_ms']:+.1f} ms "
              f"({o['overhead_pct']:+.1f} %); "
              f"outside the server's generate call {o['outside_generate_ms']:.1f} ms "
              f"({o['outside_generate_pct']:+.1f} %); answers that differ from the API's: {o['texts_differ']}")
        if o["server_cpu_ms_mean"] is not None:
            print(f"CPU time per request: API {o['api_cpu_ms_mean']:.1f} ms, server process "
                  f"{o['server_cpu_ms_mean']:.1f} ms ({o['cpu_overhead_pct']:+.1f} %)")
        print(f"{args.clients} clients: {c['requests_done']}/{c['requests_asked']} requests in {c['seconds']:.1f} s = "
              f"{c['requests_per_s']:.2f} req/s; first canvas p50 {c['ttfc_ms_p50']:.0f} ms p99 "
              f"{c['ttfc_ms_p99']:.0f} ms; end to end p50 {c['e2e_ms_p50']:.0f} ms p99 {c['e2e_ms_p99']:.0f} ms")
        if "burst" in report:
            b = report["burst"]
            print(f"burst of {b['sent']} at --max-queue {b['max_queue']}: {b['answered']} answered, "
                  f"{b['rejected_503']} got 503 (Retry-After on each: {b['retry_after_on_every_503']}), "
                  f"{b['other']} other")
        print(f"errors: {report['errors']}")
    return 0 if not bad and not over["texts_differ"] else 1


if __name__ == "__main__":
    sys.exit(main())
