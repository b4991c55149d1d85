"""The `dgport` command line: export, run, chat, check, info."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

from .errors import DgportError
from .loop import ENCODE_CHUNK

BACKEND_CHOICES = ("cpu", "cuda", "mlx", "torch")


def _positive(ctx, param, value):
    if value is not None and value <= 0:
        raise click.BadParameter(f"must be a positive number (got {value})")
    return value


def _non_negative(ctx, param, value):
    if value is not None and value < 0:
        raise click.BadParameter(f"must be >= 0 (got {value})")
    return value


def sampler_options(f):
    """--seed, --max-new-tokens and every sampler setting (None keeps the checkpoint's default)."""
    options = [
        click.option("--seed", type=int, default=None, help="Seed of the numpy random stream (default: fresh)."),
        click.option("--max-new-tokens", type=int, default=None, callback=_positive,
                     help="Token budget; generation runs ceil(N / canvas) canvases. Default: 4 canvases."),
        click.option("--max-denoising-steps", type=int, default=None, callback=_positive,
                     help="Denoising steps per canvas at most (changes the temperature schedule)."),
        click.option("--t-min", type=float, default=None, callback=_non_negative, help="Final temperature."),
        click.option("--t-max", type=float, default=None, callback=_positive, help="Initial temperature."),
        click.option("--entropy-bound", type=float, default=None, callback=_positive,
                     help="Entropy budget for accepting tokens per step (higher: fewer steps)."),
        click.option("--stability-threshold", type=int, default=None, callback=_non_negative,
                     help="Previous argmax canvases that must equal the current one to stop early."),
        click.option("--confidence-threshold", type=float, default=None, callback=_positive,
                     help="Mean entropy under which a stable canvas stops early."),
        click.option("--encode-chunk", type=int, default=ENCODE_CHUNK, show_default=True, callback=_positive,
                     help="Prompt tokens per encode call (memory of the encoder's attention grows with it)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


SAMPLER_KEYS = ("max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold",
                "confidence_threshold")


def _load(export, backend: str, checkpoint=None):
    from . import load

    if backend == "torch":
        return load(checkpoint or export, backend="torch")
    return load(export, backend=backend)


def _default_export(backend: str) -> Path:
    from .default_model import ensure_default_export

    return ensure_default_export(backend)


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if prompt is not None and prompt_file is not None:
        raise DgportError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            text = Path(prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DgportError(f"--prompt-file {prompt_file}: cannot read it ({e.__class__.__name__}: "
                              f"{getattr(e, 'strerror', None) or e})") from e
    elif prompt is not None:
        text = prompt
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise DgportError("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe it on standard input")
    if not text.strip():
        raise DgportError("the prompt is empty; give some text")
    return text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="dgport")
@click.pass_context
def cli(ctx, debug):
    """dgport: run DiffusionGemma (block diffusion) on ONNX Runtime (CPU, CUDA) and MLX."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "formats", default="onnx", show_default=True, help="onnx, mlx or onnx,mlx.")
@click.option("--dtype", default="fp32", show_default=True, help="fp32, fp16 or bf16.")
@click.option("--quantize", default=None, callback=lambda ctx, param, v: _bits(v),
              help="MLX weight quantization: int4 or int8 (or 4, 8).")
@click.option("--group-size", type=int, default=64, show_default=True, help="Quantization group size.")
@click.option("--with-logits", is_flag=True, help="ONNX: also output the fp32 logits (parity/debug exports).")
@click.option("--encoder-moe", default="sparse", show_default=True,
              help="ONNX encoder experts: sparse (each expert on its routed tokens; long prompts) or dense.")
@click.option("--denoise-moe", default="auto", show_default=True,
              help="ONNX denoise-step experts: auto (both forms: sparse on CPUs, dense on GPUs), dense or sparse.")
@click.option("--attention", default="explicit", show_default=True,
              help="ONNX attention: explicit (MatMul/Softmax/MatMul) or fused (one ONNX Attention node, opset 23).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-validate", is_flag=True, help="Skip the comparison against the source model.")
def export(src, out, formats, dtype, quantize, group_size, with_logits, encoder_moe, denoise_moe, attention, force,
           no_validate):
    """Export a Hugging Face DiffusionGemma checkpoint SRC to the folder OUT."""
    from rich.console import Console
    from rich.table import Table

    from .exporters.export import ExportOptions, export as run_export, parse_formats
    from .progress import RichProgress

    opts = ExportOptions(formats=parse_formats(formats), dtype=dtype, quantize=quantize, group_size=group_size,
                         with_logits=with_logits, encoder_moe=encoder_moe, denoise_moe=denoise_moe,
                         attention=attention, force=force,
                         validate=not no_validate)
    console = Console(stderr=True)
    with RichProgress(console) as progress:
        summary = run_export(src, out, opts, progress)
    table = Table(title=f"exported to {summary.out} in {summary.seconds:.1f} s")
    table.add_column("file")
    table.add_column("size", justify="right")
    for rel, size in sorted(summary.files.items()):
        table.add_row(rel, _size(size))
    table.add_row("[bold]total", f"[bold]{_size(sum(summary.files.values()))}")
    console.print(table)
    if summary.validation:
        for fmt, errs in summary.validation.items():
            console.print(f"validation {fmt}: " + ", ".join(f"{k} max rel err {v:.2e}" for k, v in errs.items()))
    elif no_validate:
        console.print("validation: skipped (--no-validate)")
    else:
        console.print("validation: skipped (needs torch and transformers: pip install 'dgport\\[export]')")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@cli.command()
@click.argument("export_dir", metavar="[EXPORT]", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="cpu", show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="HF checkpoint folder for --backend torch (default: EXPORT itself).")
@click.option("--prompt", default=None, help="The prompt text.")
@click.option("--prompt-file", default=None, help="Read the prompt from this file.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--system", default=None, help="A system prompt.")
@click.option("--think", is_flag=True, help="Thinking mode: the model reasons in a thought channel first.")
@click.option("--show-thinking", is_flag=True, help="Print the thought channel too.")
@click.option("--show-canvas", is_flag=True, help="Watch each canvas denoise live (on stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print tokens, text, timings and stats as JSON.")
@sampler_options
def run(export_dir, backend, checkpoint, prompt, prompt_file, raw, system, think, show_thinking, show_canvas,
        as_json, seed, max_new_tokens, **sampler):
    """Generate from a prompt with an export (default: the shipped Sudoku model)."""
    from rich.console import Console
    from rich.live import Live

    from .display import AnswerText, CanvasView
    from .timing import TimedBackend

    text = _read_prompt(prompt, prompt_file)
    if export_dir is None and checkpoint is None:
        export_dir = _default_export(backend)
    gen = _load(export_dir, backend, checkpoint)
    gen.backend = TimedBackend(gen.backend)
    C = gen.config.canvas_length
    answer = AnswerText(gen.tokenizer, show_thinking=show_thinking, pad_id=gen.defaults.pad_token_id)
    err = Console(stderr=True)
    view = CanvasView(gen.tokenizer)
    live = Live(view, console=err, refresh_per_second=12, transient=True) if show_canvas else None

    def on_canvas(event):
        answer.add(event.tokens)
        if not as_json:
            if live is not None:
                live.console.print(answer.delta(), end="", soft_wrap=True, markup=False, highlight=False)
            else:
                sys.stdout.write(answer.delta())
                sys.stdout.flush()

    def on_step(event):
        view.update(event)
        live.refresh()

    started = time.perf_counter()
    overrides = {k: sampler[k] for k in SAMPLER_KEYS}
    if live is not None:
        live.start()
    try:
        result = gen.generate(text, max_new_tokens=max_new_tokens or 4 * C, seed=seed, raw=raw, system=system,
                              think=think, on_canvas=on_canvas, on_step=on_step if live else None,
                              encode_chunk=sampler["encode_chunk"], **overrides)
    finally:
        if live is not None:
            live.stop()
    elapsed = time.perf_counter() - started
    timings = gen.backend.timings.as_dict()
    n_tokens = sum(1 for t in result.token_ids[0] if t != gen.defaults.pad_token_id)
    if as_json:
        click.echo(json.dumps({
            "prompt_ids": result.prompt_ids, "token_ids": result.token_ids[0], "text": answer.text(),
            "finished": result.finished, "steps_per_canvas": result.steps_per_canvas,
            "tokens_per_forward": result.tokens_per_forward, "generated_tokens": n_tokens,
            "seconds": elapsed, "tokens_per_second": n_tokens / elapsed if elapsed else None,
            "backend": backend, "timings": timings,
        }))
        return
    if live is not None:
        sys.stdout.write(answer.text())
    sys.stdout.write("\n")
    err.print(f"[dim]{n_tokens} tokens in {elapsed:.2f} s ({n_tokens / elapsed:.1f} tok/s) | "
              f"{len(result.steps_per_canvas)} canvases, steps {result.steps_per_canvas} | "
              f"{timings['ms_per_step']:.1f} ms/step, {timings['ms_per_encode']:.1f} ms/encode | "
              f"{result.tokens_per_forward:.2f} tokens/forward | {backend}[/dim]", highlight=False, soft_wrap=True)


@cli.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="cpu", show_default=True)
@click.option("--system", default=None, help="A system prompt for the conversation.")
@click.option("--think", is_flag=True, help="Thinking mode.")
@click.option("--show-thinking", is_flag=True, help="Print the thought channel too.")
@sampler_options
def chat(export_dir, backend, system, think, show_thinking, seed, max_new_tokens, **sampler):
    """A multi-turn conversation. The KV cache is kept between turns: only each new turn is encoded."""
    from .chat import ChatSession
    from .display import AnswerText

    gen = _load(export_dir, backend)
    session = ChatSession(gen, system=system, think=think, seed=seed,
                          max_new_tokens=max_new_tokens or 4 * gen.config.canvas_length,
                          encode_chunk=sampler["encode_chunk"], **{k: sampler[k] for k in SAMPLER_KEYS})
    err = click.get_text_stream("stderr")
    err.write("dgport chat: type a message, an empty line or Ctrl-D to quit.\n")
    while True:
        try:
            line = input("> ") if sys.stdin.isatty() else sys.stdin.readline()
        except EOFError:
            break
        if not line or not line.strip():
            break
        answer = AnswerText(gen.tokenizer, show_thinking=show_thinking, pad_id=gen.defaults.pad_token_id)
        session.say(line.strip(), on_canvas=lambda e: _stream(answer, e))
        sys.stdout.write("\n")
        sys.stdout.flush()
        err.write(f"[{session.last_stats}]\n")


def _stream(answer, event):
    answer.add(event.tokens)
    sys.stdout.write(answer.delta())
    sys.stdout.flush()


@cli.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--backends", default="cpu,mlx", show_default=True,
              help="Comma-separated: cpu, cuda, mlx, torch=CHECKPOINT.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable). Default: three built-in prompts.")
@click.option("--raw", is_flag=True, help="Send prompts without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@sampler_options
def check(export_dir, backends, prompts, raw, as_json, seed, max_new_tokens, **sampler):
    """Run the same prompts and seed through several backends and compare them."""
    from .crosscheck import parse_backends, run_check

    report = run_check(export_dir, parse_backends(backends), list(prompts) or None, raw=raw,
                       seed=0 if seed is None else seed, max_new_tokens=max_new_tokens,
                       overrides={**{k: sampler[k] for k in SAMPLER_KEYS}, "encode_chunk": sampler["encode_chunk"]})
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        report.print()
    if not report.ok:
        raise DgportError(report.failure)


@cli.command()
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Recompute every file's sha256 against the manifest.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest summary as JSON.")
def info(export_dir, verify, as_json):
    """Summarize an export: model dimensions, formats, dtypes, quantization, sizes."""
    from .manifest import read_manifest

    export = read_manifest(export_dir)
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
    from rich.table import Table

    console = Console()
    table = Table(title=f"dgport export {export.path}", show_header=False)
    table.add_row("model", ", ".join(f"{k} {v}" for k, v in summary["model"].items()))
    for name, entry in summary["formats"].items():
        table.add_row(f"format {name}", ", ".join(f"{k} {_flat(v)}" for k, v in entry.items() if k != "bytes")
                      + f", {_size(entry['bytes'])}")
    table.add_row("total", _size(summary["total_bytes"]))
    table.add_row("source", f"{m['source'].get('path')} ({m['source'].get('fingerprint', '')[:12]})")
    table.add_row("dgport", f"{m['dgport_version']} (format {m['format_version']})")
    table.add_row("verified", "[green]" + summary["verified"])
    console.print(table)


def _bits(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.lower().removeprefix("int")
    if not text.isdigit():
        raise click.BadParameter(f"{value!r}: choose int4 or int8", param_hint="--quantize")
    return int(text)  # export checks the width


def _flat(value) -> str:
    """{"cpu": {"encoder": "sparse"}} -> "cpu: encoder sparse"."""
    if not isinstance(value, dict):
        return str(value)
    return "; ".join(f"{k}: {_flat(v)}" if isinstance(v, dict) else f"{k} {v}" for k, v in value.items())


@cli.command()
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="cpu", show_default=True)
@click.option("--givens", type=click.IntRange(17, 80), default=40, show_default=True,
              help="How many cells the puzzle gives.")
@click.option("--seed", type=click.IntRange(0, 8), default=None,
              help="Puzzle stream 0-8 (held out from training); default: random.")
@click.option("--export", "export_dir", type=click.Path(path_type=Path), default=None,
              help="An export of the Sudoku model (default: the shipped one, exported on first use).")
def demo(backend, givens, seed, export_dir):
    """Solve a fresh Sudoku with the shipped model and watch the canvas fill in."""
    import random

    from rich.console import Console
    from rich.live import Live

    from .display import SudokuView, sudoku_grid
    from .models.sudoku.puzzles import generate, is_valid_solution

    seed = random.randrange(9) if seed is None else seed
    puzzle = generate(seed, 1, givens, givens)[0]
    path = export_dir or _default_export(backend)
    gen = _load(path, backend)
    console = Console()
    console.print(f"puzzle (stream {seed}, {givens} givens):")
    console.print(sudoku_grid(puzzle.puzzle.replace(".", "·"), puzzle.puzzle))
    view = SudokuView(gen.tokenizer, puzzle.puzzle)
    started = time.perf_counter()
    with Live(view, console=console, refresh_per_second=8, transient=True) as live:
        def on_step(event):
            view.update(event)
            live.refresh()
            if console.is_terminal:
                time.sleep(0.15)  # slow enough for a person to watch the cells settle
        result = gen.generate(puzzle.puzzle, seed=puzzle.seed, on_step=on_step)
    answer = "".join(result.text.split())
    ok = is_valid_solution(puzzle.puzzle, answer)
    console.print(("[green]solved" if ok else "[red]not solved") +
                  f" in {sum(result.steps_per_canvas)} denoising steps, {time.perf_counter() - started:.1f} s "
                  f"(with viewing delays), {result.tokens_per_forward:.1f} tokens per forward")
    console.print(sudoku_grid(answer[:81].ljust(81, "·"), puzzle.puzzle))


def main(argv=None) -> int:
    """Entry point: user errors become one line on stderr and a non-zero exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or bool(os.environ.get("DGPORT_DEBUG"))
    try:
        cli.main(args=argv, prog_name="dgport", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.UsageError as e:
        if debug:
            raise
        click.echo(f"dgport: error: {e.format_message()}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("dgport: aborted", err=True)
        return 130
    except DgportError as e:
        if debug:
            raise
        click.echo(f"dgport: error: {e}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("dgport: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
