"""`dgport check`, `info` and `demo`: backends compared, an export summarized, a puzzle solved live."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .cli import (BACKEND_CHOICES, SAMPLER_KEYS, _load, _resolve, _size, _task_of, cli, debug_option,
                  sampler_options)
from .errors import DgportError
from .loop import fresh_seed


@cli.command()
@click.argument("export_dir", metavar="[EXPORT]", required=False, type=click.Path(path_type=Path))
@click.option("--backends", default="cpu,mlx", show_default=True,
              help="Comma-separated: cpu, cuda, mlx, torch=CHECKPOINT.")
@click.option("--prompt", "prompts", multiple=True,
              help="A prompt (repeatable). Default: the model's own check prompts, else three built-in ones.")
@click.option("--raw", is_flag=True, help="Send prompts without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@sampler_options
@debug_option
def check(export_dir, backends, prompts, raw, as_json, seed, max_new_tokens, **sampler):
    """Run the same prompts and seed through several backends and compare them."""
    from rich.console import Console

    from .crosscheck import check_packages, parse_backends, run_check
    from .progress import RichProgress

    chosen = parse_backends(backends)
    check_packages(chosen)
    target = {name: _resolve(export_dir, name)[0] for name, _ in chosen if name != "torch"}  # one export per format
    with RichProgress(Console(stderr=True)) as progress:
        report = run_check(target, chosen, list(prompts) or None, raw=raw,
                           seed=fresh_seed(seed), max_new_tokens=max_new_tokens,
                           overrides={**{k: sampler[k] for k in SAMPLER_KEYS}, "encode_chunk": sampler["encode_chunk"]},
                           progress=progress)
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        report.print()
    if not report.ok:
        raise DgportError(report.failure)


@cli.command()
@click.argument("export_dir", metavar="[EXPORT]", required=False, type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Recompute every file's sha256 against the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
@debug_option
def info(export_dir, verify, as_json):
    """Summarize an export (default: the shipped model's ONNX export): model dimensions, formats, dtypes,
    quantization, sizes."""
    from .manifest import MANIFEST, read_manifest

    # only an export: read_manifest names the export command for a checkpoint folder
    path = Path(export_dir) if export_dir is not None else _resolve(None, "cpu")[0]
    if (path / "config.json").is_file() and not (path / MANIFEST).exists():
        raise DgportError(f"{path}: a Hugging Face checkpoint, not a dgport export; `dgport info` reads an "
                          f"export's manifest: export it first (`dgport export {path} OUT`), then `dgport info OUT`")
    export = read_manifest(path)
    export.verify(checksums=verify, use_cache=False)
    m = export.manifest
    cfg = export.config
    sizes = {rel: meta["size"] for rel, meta in m["artifacts"].items()}
    summary = {
        "path": str(export.path), "format_version": m["format_version"], "dgport_version": m["dgport_version"],
        "source": m["source"],
        "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "heads": cfg.num_heads,
                  "vocab": cfg.vocab_size, "experts": f"{cfg.num_experts} (top {cfg.top_k_experts})",
                  "canvas": cfg.canvas_length, "sliding_window": cfg.sliding_window,
                  "full_layers": cfg.full_layers},
        "formats": {name: {k: v for k, v in entry.items() if k in ("dtype", "quantization", "with_logits", "attention")}
                    | ({"experts": entry["moe"]} if isinstance(entry.get("moe"), dict) else {})
                    | {"bytes": sum(sizes.get(f, 0) for f in entry["files"])}
                    for name, entry in m["formats"].items()},
        "total_bytes": sum(sizes.values()),
        "verified": "sha256 of every file" if verify else "sizes only (pass --verify for checksums)",
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.text import Text

    from .display import terminal_text, titled_table

    def cell(value: str, style: str = "") -> Text:  # manifest strings are text, never markup or controls
        return Text(terminal_text(value), style=style)

    console = Console()
    table = titled_table(console, f"dgport export {export.path}", show_header=False)
    table.add_row("model", cell(", ".join(f"{k} {_flat(v)}" for k, v in summary["model"].items())))
    for name, entry in summary["formats"].items():
        shown = [f"{k} {_flat(v)}" for k, v in entry.items() if k != "bytes" and _shown(k, v)]
        table.add_row(cell(f"format {name}"), cell(", ".join(shown + [_size(entry["bytes"])])))
    table.add_row("total", _size(summary["total_bytes"]))
    table.add_row("source", cell(f"{m['source'].get('path')} ({m['source'].get('fingerprint', '')[:12]})"))
    table.add_row("dgport", cell(f"{m['dgport_version']} (format {m['format_version']})"))
    table.add_row("verified", cell(summary["verified"], "green"))
    console.print(table)



def _shown(key, value) -> bool:
    """info leaves out what is not there: no quantization, no fallbacks, logits off."""
    if key == "quantization" and not value:
        return False
    if key == "with_logits" and not value:
        return False
    return value is not None


def _flat(value) -> str:
    """{"cpu": {"encoder": "sparse"}} -> "cpu: encoder sparse"; empty entries are left out."""
    if isinstance(value, (list, tuple)):
        return " ".join(_flat(v) for v in value) if value else "none"
    if not isinstance(value, dict):
        return str(value)
    parts = []
    for k, v in value.items():
        if v in (None, [], {}, ""):
            continue
        parts.append(f"{k}: {_flat(v)}" if isinstance(v, dict) else f"{k} {_flat(v)}")
    return "; ".join(parts)


@cli.command()
@click.argument("export_dir", metavar="[EXPORT]", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="cpu", show_default=True)
@click.option("--givens", type=click.IntRange(23, 80), default=40, show_default=True,
              help="How many cells the puzzle gives (23-80: the generator cannot reliably make fewer).")
@click.option("--seed", type=click.IntRange(0, 9_999_999), default=None,
              help="Seed of the run: it picks the puzzle (held out from training) and seeds the sampler. "
                   "Default: a fresh one, printed.")
@click.option("--task-template", "use_task_template", is_flag=True,
              help="Solve through the answer template: the givens fixed in the canvas, the model fills only the "
                   "blanks (off by default: measured, it solves no more puzzles; docs/sudoku.md).")
@debug_option
def demo(export_dir, backend, givens, seed, use_task_template):
    """Solve a fresh Sudoku with the shipped model (or EXPORT of it) and watch the canvas fill in."""
    import random

    from rich.console import Console
    from rich.live import Live

    from .display import SudokuView, sudoku_grid
    from .models.sudoku.puzzles import is_valid_solution, puzzle_from_seed
    from .task import answer_template

    seed = random.randrange(10_000_000) if seed is None else seed
    try:
        puzzle = puzzle_from_seed(seed, givens)
    except RuntimeError as e:  # the generator's retries ran out (rare at the low end)
        raise DgportError(f"--givens {givens}: {e}; try another --seed or more givens") from e
    path, _ = _resolve(export_dir, backend)
    if _task_of(path) != "sudoku":
        raise DgportError(f"{path}: `dgport demo` solves Sudoku puzzles and this model declares no Sudoku task "
                          "(\"dgport\": {\"task\": \"sudoku\"} in its tokenizer_config.json); use `dgport run` "
                          "for other models")
    gen = _load(path, backend)
    console = Console()
    console.print(f"puzzle (seed {seed}, {givens} givens):")
    console.print(sudoku_grid(puzzle.puzzle.replace(".", "·"), puzzle.puzzle))
    view = SudokuView(gen.tokenizer, puzzle.puzzle)
    started = time.perf_counter()
    with Live(view, console=console, refresh_per_second=8, transient=True) as live:
        def on_step(event):
            view.update(event)
            live.refresh()
            if console.is_terminal:
                time.sleep(0.15)  # slow enough for a person to watch the cells settle
        template = answer_template("sudoku", puzzle.puzzle) if use_task_template else None
        result = gen.generate(puzzle.puzzle, seed=seed, on_step=on_step, template=template)
    answer = "".join(result.text.split())
    ok = is_valid_solution(puzzle.puzzle, answer)
    console.print(("[green]solved" if ok else "[red]not solved") +
                  f" in {sum(result.steps_per_canvas)} denoising steps, {time.perf_counter() - started:.1f} s "
                  f"(with viewing delays), {result.tokens_per_forward:.1f} tokens per forward, "
                  + ("givens fixed by the answer template" if template is not None else "no template"))
    console.print(sudoku_grid(answer[:81].ljust(81, "·"), puzzle.puzzle))
