"""The `dgport` command line: export, run, chat, check, info, demo."""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

import click

from .errors import DgportError
from .loop import ENCODE_CHUNK, fresh_seed

BACKEND_CHOICES = ("cpu", "cuda", "mlx", "torch")
_STATE = {"debug": False}


def _set_debug(ctx, param, value):
    if value:
        _STATE["debug"] = True
    return value


def _debug() -> bool:
    """--debug given (to any command; `serve` sets DGPORT_DEBUG for its own) or DGPORT_DEBUG set."""
    return _STATE["debug"] or bool(os.environ.get("DGPORT_DEBUG"))


def debug_option(f):
    """--debug, accepted before and after the subcommand."""
    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="Show the traceback on errors.")(f)


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
        click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=None,
                     help="Seed of the sampler's random stream (default: a fresh one, printed so the run can be "
                          "repeated)."),
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


def _warn(message: str) -> None:
    from .display import terminal_text

    click.echo(f"dgport: warning: {terminal_text(message)}", err=True)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _resolve(export_dir: Path | None, backend: str, checkpoint: Path | None = None) -> tuple[Path, bool]:
    """(the folder `backend` opens, whether it is the shipped default model). MODEL may be an export,
    a Hugging Face checkpoint folder or a Hub id: checkpoints are exported once into dgport's cache
    (dgport.resolve)."""
    from .default_model import ensure_default_export
    from .resolve import resolve_checkpoint, resolve_model

    if backend == "torch":
        if checkpoint is not None or export_dir is not None:
            return resolve_checkpoint(checkpoint or export_dir), False
        return ensure_default_export("torch"), True
    if export_dir is None:
        return ensure_default_export(backend), True
    return resolve_model(export_dir, backend), False


def _load(path: Path, backend: str):
    import importlib.util

    from . import load

    if backend == "torch" and not (importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")):
        raise DgportError("--backend torch runs the Hugging Face modules and needs torch and transformers: "
                          "pip install 'dgport[export]' (or use --backend cpu)")
    return load(path, backend=backend)


MAX_PROMPT_BYTES = 64 << 20  # far past any model's context: a bigger prompt is a mistake, not a prompt


def _read_bytes(stream, what: str) -> bytes:
    data = stream.read(MAX_PROMPT_BYTES + 1)
    if len(data) > MAX_PROMPT_BYTES:
        raise DgportError(f"{what} is over {MAX_PROMPT_BYTES >> 20} MiB; give a shorter prompt")
    return data


def _read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    from .schema import decode_utf8, utf8_text

    if prompt is not None and prompt_file is not None:
        raise DgportError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        what = f"--prompt-file {prompt_file}"
        try:
            with open(prompt_file, "rb") as f:  # a FIFO (`<(...)`) is fine: it is the user's own
                text = decode_utf8(_read_bytes(f, what), what)
        except OSError as e:
            raise DgportError(f"{what}: cannot read it ({e.__class__.__name__}: "
                              f"{getattr(e, 'strerror', None) or e})") from e
    elif prompt is not None:
        text = utf8_text(prompt, "--prompt")
    elif sys.stdin is not None and not sys.stdin.isatty():
        buffer = getattr(sys.stdin, "buffer", None)
        text = (decode_utf8(_read_bytes(buffer, "standard input"), "standard input") if buffer is not None
                else sys.stdin.read())
    else:
        raise DgportError("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe it on standard input")
    if not text.strip():
        raise DgportError("the prompt is empty; give some text")
    return text


def _for_stdout():
    """What model text goes through on its way to stdout: on a terminal, control characters become
    visible escapes (generated text must not drive the terminal); piped, the text is kept as it is."""
    from .display import terminal_text

    isatty = getattr(sys.stdout, "isatty", None)
    return terminal_text if isatty is not None and isatty() else str


def _check_prompt_options(tokenizer, text: str | None, raw: bool, system, think: bool, show_thinking: bool) -> None:
    """Refuse a prompt the model's template rejects, before any model loads; warn about options that
    would change nothing."""
    from .schema import utf8_text

    if system is not None:
        utf8_text(system, "--system")
    if show_thinking and not think:
        _warn("--show-thinking has no effect without --think")
    if raw:
        ignored = [name for name, given in (("--system", system is not None), ("--think", think)) if given]
        if ignored:
            _warn(f"{' and '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with --raw "
                  "(the prompt is sent as it is)")
        return
    probe = text if text is not None else "x"
    user = [{"role": "user", "content": probe}]
    try:
        plain = tokenizer.render(user)
    except DgportError:
        if text is not None:
            raise
        return  # chat: no prompt yet; the template judges each turn
    if system is not None and tokenizer.render([{"role": "system", "content": system}] + user) == plain:
        _warn("--system has no effect: this model's chat template ignores system prompts")
    if think and tokenizer.render(user, enable_thinking=True) == plain:
        _warn("--think has no effect: this model's chat template has no thinking mode")


def _task_of(folder: Path) -> str | None:
    from .task import declared

    return declared(folder).task


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@debug_option
@click.version_option(package_name="dgport")
def cli():
    """dgport: run DiffusionGemma (block diffusion) on ONNX Runtime (CPU, CUDA) and MLX.

    Without an EXPORT folder, run, chat, check, info and demo use the shipped Sudoku model, exported
    on first use into dgport's cache ($DGPORT_CACHE_DIR, else $XDG_CACHE_HOME/dgport, else
    ~/.cache/dgport)."""


@cli.command()
@click.argument("src", metavar="CHECKPOINT", type=click.Path(path_type=Path))
@click.argument("out", metavar="OUT", required=False, type=click.Path(path_type=Path))
@click.option("--format", "formats", default="onnx", show_default=True, help="onnx, mlx or onnx,mlx.")
@click.option("--dtype", default="fp32", show_default=True, help="fp32, fp16 or bf16.")
@click.option("--quantize", default=None, callback=lambda ctx, param, v: _bits(v),
              help="Block-wise weight quantization, ONNX and MLX: int4 or int8 (or 4, 8).")
@click.option("--group-size", type=int, default=None,
              help="Quantization group size, 32, 64 or 128 (with --quantize; default 64, or 32 where 64 does not "
                   "divide the model's widths).")
@click.option("--with-logits", is_flag=True, help="ONNX: also output the fp32 logits (parity/debug exports).")
@click.option("--encoder-moe", default="sparse", show_default=True,
              help="ONNX encoder experts: sparse (each expert on its routed tokens; long prompts) or dense.")
@click.option("--denoise-moe", default="auto", show_default=True,
              help="ONNX denoise-step experts: auto (both forms: sparse on CPUs, dense on GPUs), dense or sparse.")
@click.option("--attention", default="explicit", show_default=True,
              help="ONNX attention: explicit (MatMul/Softmax/MatMul) or fused (one ONNX Attention node, opset 23).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--no-validate", is_flag=True,
              help="Skip the comparison against the source model (which needs torch and transformers).")
@click.option("--plan", is_flag=True, help="Print the export's size and a CPU run's peak memory (from config.json "
              "alone; OUT not needed) and exit.")
@debug_option
@click.pass_context
def export(ctx, src, out, formats, dtype, quantize, group_size, with_logits, encoder_moe, denoise_moe, attention,
           force, no_validate, plan=False):
    """Export the Hugging Face DiffusionGemma checkpoint folder CHECKPOINT to the folder OUT."""
    import importlib.util

    if plan:  # nothing is read but config.json, nothing written; OUT is not needed
        from .exporters.export import ExportOptions as Opts, check_options, parse_formats
        from .exporters.plan import format_plan, format_plan_mlx, plan as make_plan, plan_mlx

        popts = Opts(formats=parse_formats(formats), dtype=dtype, quantize=quantize, group_size=group_size)
        check_options(popts)
        config = _plan_config(src)
        blocks = []
        if "onnx" in popts.formats:
            blocks.append(format_plan(make_plan(config, popts), popts))
        if "mlx" in popts.formats:
            blocks.append(format_plan_mlx(plan_mlx(config, popts), popts))
        click.echo("\n".join(blocks))
        return
    if out is None:
        raise click.UsageError("Missing argument 'OUT' (the folder to export to; only --plan goes without it).")
    from rich.console import Console

    from .display import titled_table
    from .exporters.export import ExportOptions, export as run_export, parse_formats
    from .progress import RichProgress

    if quantize is None and group_size is not None:
        raise DgportError("--group-size applies only to quantized exports; add --quantize int4|int8 or drop it")
    opts = ExportOptions(formats=parse_formats(formats), dtype=dtype, quantize=quantize, group_size=group_size,
                         with_logits=with_logits, encoder_moe=encoder_moe, denoise_moe=denoise_moe,
                         attention=attention, force=force, validate=not no_validate)
    console = Console(stderr=True)
    can_validate = bool(importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"))
    skipped = "validation: skipped (needs torch and transformers: pip install 'dgport[export]'; --no-validate skips it)"
    if not no_validate and not can_validate:
        console.print("dgport: " + skipped, markup=False, highlight=False, soft_wrap=True)
    from .resolve import resolve_checkpoint

    src = resolve_checkpoint(src)  # a folder, or a Hub id fetched into the Hugging Face cache
    try:
        with RichProgress(console) as progress:
            summary = run_export(src, out, opts, progress)
    except ImportError as e:
        extra = {"torch": "export", "transformers": "export", "mlx": "mlx"}.get((e.name or "").split(".")[0], "cpu")
        raise DgportError(f"exporting needs the {e.name} package, which is not installed: "
                          f"pip install 'dgport[{extra}]'") from e
    table = titled_table(console, f"exported to {summary.out} in {summary.seconds:.1f} s")
    table.add_column("file")
    table.add_column("size", justify="right")
    for rel, size in sorted(summary.files.items()):
        table.add_row(rel, _size(size))
    table.add_row("[bold]total", f"[bold]{_size(sum(summary.files.values()))}")
    console.print(table)
    if summary.validation:
        # the graph's own check (same dequantized weights) before what the quantization costs
        for name, errs in sorted(summary.validation.items(), key=lambda kv: "dequantized" not in kv[0]):
            console.print(_validation_line(name, errs, dtype, quantize), markup=False, highlight=False,
                          soft_wrap=True)
    elif no_validate:
        console.print("validation: skipped (--no-validate)")
    else:
        console.print(skipped, markup=False, highlight=False, soft_wrap=True)


def _plan_config(src: Path) -> Path:
    """The config.json `--plan` reads: CHECKPOINT/config.json, a config.json given itself, or a Hub id's
    config.json (fetched alone into the Hugging Face cache; HF_HUB_OFFLINE=1 reads only the cache)."""
    from .resolve import hub_config, is_hub_id

    if src.exists() or not is_hub_id(str(src)):
        return src
    return hub_config(str(src))


def _validation_line(name: str, errs: dict, dtype: str, quantize) -> str:
    """What validation measured and by which rule it passed."""
    from .exporters.validation import BASELINE_FACTOR, ILL_CONDITIONED, QUANT_LIMIT, tolerance

    own = {k: v for k, v in errs.items() if "_vs_" not in k}
    line = f"validation {name}: " + ", ".join(f"{k} max rel err {v:.2e}" for k, v in own.items())
    dequantized = "dequantized" in name  # the graph against the same dequantized weights: gated like fp32
    limit = tolerance(name.split()[0], "fp32" if dequantized else dtype, None if dequantized else quantize)
    if limit is None:
        bf16 = max((v for k, v in errs.items() if k.startswith("reference_bf16_")), default=0.0)
        what = (f" (int{quantize} against the unquantized fp32 model: what {quantize}-bit weights cost, not a graph "
                "error; the graph itself is checked on the dequantized weights above")
        if bf16 > ILL_CONDITIONED:
            return line + what + (f"; reported, not gated: this checkpoint has no margins, transformers' own bf16 run is "
                           f"{bf16:.2g} away from fp32, as random weights are)")
        return line + what + f"; within the {QUANT_LIMIT:g} limit)"
    refs = {k.removeprefix("reference_"): v for k, v in errs.items() if k.startswith("reference_")}
    if not refs:
        return line + f" (within the {limit:g} target)"
    exact = next(iter(refs)).rsplit("_vs_", 1)[1]
    ours = ", ".join(f"{k.rsplit('_vs_', 1)[0]} {errs[k]:.2e} vs {v:.2e}" for k, v in refs.items() if k in errs)
    return (line + f"; above the {limit:g} target, which two implementations that round differently cannot both "
            f"meet, so it passed by the relative rule instead: against a more precise transformers run ({exact}) "
            f"the export's error is at most {BASELINE_FACTOR:g}x transformers' own {dtype} error, metric by metric "
            f"({ours}): as accurate as transformers itself")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _prompt_tokenizer(folder: Path | None):
    """The tokenizer that renders prompts for `folder` (the shipped checkpoint for the default
    model), read before any model loads; None when the folder has none (loading will say why)."""
    from .default_model import default_checkpoint
    from .tokenizer import ChatTokenizer

    folder = default_checkpoint() if folder is None else Path(folder)
    return ChatTokenizer(folder) if (folder / "tokenizer.json").is_file() else None


@cli.command()
@click.argument("export_dir", metavar="[EXPORT]", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="cpu", show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Hugging Face checkpoint folder for --backend torch (default: EXPORT itself).")
@click.option("--prompt", default=None, help="The prompt text.")
@click.option("--prompt-file", default=None, help="Read the prompt from this file.")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--system", default=None, help="A system prompt.")
@click.option("--think", is_flag=True, help="Thinking mode: the model reasons in a thought channel first.")
@click.option("--show-thinking", is_flag=True, help="Print the thought channel too (with --think).")
@click.option("--show-canvas", is_flag=True, help="Watch each canvas denoise live (on stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print tokens, text, timings and stats as JSON.")
@sampler_options
@debug_option
def run(export_dir, backend, checkpoint, prompt, prompt_file, raw, system, think, show_thinking, show_canvas,
        as_json, seed, max_new_tokens, **sampler):
    """Generate from a prompt with an export (default: the shipped Sudoku model)."""
    from rich.console import Console
    from rich.markup import escape

    from .display import AnswerText, CanvasView, terminal_text
    from .task import check_answer
    from .timing import TimedBackend

    text = _read_prompt(prompt, prompt_file)
    if checkpoint is not None and backend != "torch":
        raise DgportError("--checkpoint is for --backend torch; an ONNX or MLX backend runs an EXPORT folder")
    given = checkpoint or export_dir
    tokenizer = _prompt_tokenizer(given)
    if tokenizer is not None:
        _check_prompt_options(tokenizer, text, raw, system, think, show_thinking)
    path, is_default = _resolve(export_dir, backend, checkpoint)
    task = None if raw else _task_of(path)
    gen = _load(path, backend)
    gen.backend = TimedBackend(gen.backend)
    C = gen.config.canvas_length
    seed = fresh_seed(seed)
    answer = AnswerText(gen.tokenizer, show_thinking=show_thinking, pad_id=gen.defaults.pad_token_id)
    err = Console(stderr=True)
    view = CanvasView(gen.tokenizer)
    live = None
    if show_canvas and err.is_terminal:
        from rich.live import Live

        live = Live(view, console=err, refresh_per_second=12, transient=True, redirect_stdout=False)
    out = _for_stdout()
    screen = live is not None and out is not str  # the live view and the answer share one terminal

    def on_canvas(event):
        answer.add(event.tokens)
        if show_canvas and live is None:  # not a terminal: each canvas' last draft, once, as plain text
            err.print(view, soft_wrap=True)
        if screen:
            view.answer = out(answer.text())  # the answer so far, under the live canvas
        elif not as_json:
            sys.stdout.write(out(answer.delta()))
            sys.stdout.flush()

    def on_step(event):
        view.update(event)
        if live is not None:
            live.refresh()

    started = time.perf_counter()
    overrides = {k: sampler[k] for k in SAMPLER_KEYS}
    if live is not None:
        live.start()
    try:
        result = gen.generate(text, max_new_tokens=max_new_tokens or 4 * C, seed=seed, raw=raw, system=system,
                              think=think, on_canvas=on_canvas, on_step=on_step if show_canvas else None,
                              encode_chunk=sampler["encode_chunk"], **overrides)
    finally:
        if live is not None:
            live.stop()
    elapsed = time.perf_counter() - started
    timings = gen.backend.timings.as_dict()
    n_tokens = sum(1 for t in result.token_ids[0] if t != gen.defaults.pad_token_id)
    verdict = check_answer(task, text, answer.text()) if task else None
    if as_json:
        click.echo(json.dumps({
            "prompt_ids": result.prompt_ids, "token_ids": result.token_ids[0], "text": answer.text(),
            "finished": result.finished, "steps_per_canvas": result.steps_per_canvas,
            "tokens_per_forward": result.tokens_per_forward, "generated_tokens": n_tokens,
            "seconds": elapsed, "tokens_per_second": n_tokens / elapsed if elapsed else None,
            "backend": backend, "seed": seed, "export": str(path), "default_model": is_default,
            "timings": timings, "answer_check": verdict.as_dict() if verdict else None,
        }))
        return
    if screen:
        sys.stdout.write(out(answer.text()))
    sys.stdout.write("\n")
    sys.stdout.flush()
    if verdict is not None:
        err.print(("[green]" if verdict.ok else "[red]") + escape(terminal_text(f"{verdict.task}: {verdict.summary}")),
                  highlight=False, soft_wrap=True)
    n_canvas = len(result.steps_per_canvas)
    err.print(f"[dim]{n_tokens} tokens in {elapsed:.2f} s ({n_tokens / elapsed:.1f} tok/s) | "
              f"{_plural(n_canvas, 'canvas', 'canvases')}, steps {result.steps_per_canvas} | "
              f"{timings['ms_per_step']:.1f} ms/step, {timings['ms_per_encode']:.1f} ms/encode | "
              f"{result.tokens_per_forward:.2f} tokens/forward | {backend} | seed {seed} | "
              + ("shipped Sudoku model, " if is_default else "") + escape(terminal_text(str(path))) + "[/dim]",
              highlight=False, soft_wrap=True, markup=True)


@cli.command()
@click.argument("export_dir", metavar="[EXPORT]", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="cpu", show_default=True)
@click.option("--system", default=None, help="A system prompt for the conversation.")
@click.option("--think", is_flag=True, help="Thinking mode.")
@click.option("--show-thinking", is_flag=True, help="Print the thought channel too (with --think).")
@sampler_options
@debug_option
def chat(export_dir, backend, system, think, show_thinking, seed, max_new_tokens, **sampler):
    """A multi-turn conversation. The KV cache is kept between turns: only each new turn is encoded.
    Ctrl-C stops the answer being generated and keeps the conversation; Ctrl-D (or /exit) quits."""
    from .chat import ChatSession, ContextFull
    from .display import AnswerText, terminal_text
    from .task import SINGLE_TURN

    tokenizer = _prompt_tokenizer(export_dir)
    if tokenizer is not None:
        _check_prompt_options(tokenizer, None, False, system, think, show_thinking)
    path, _ = _resolve(export_dir, backend)
    gen = _load(path, backend)
    seed = fresh_seed(seed)
    session = ChatSession(gen, system=system, think=think, seed=seed,
                          max_new_tokens=max_new_tokens or 4 * gen.config.canvas_length,
                          encode_chunk=sampler["encode_chunk"], **{k: sampler[k] for k in SAMPLER_KEYS})
    err = _Stderr()
    err.write(f"dgport chat (seed {seed}): type a message; Ctrl-C stops an answer, /reset starts over, "
              "Ctrl-D or /exit quits.\n")
    task = _task_of(path)
    single_turn = task in SINGLE_TURN
    if single_turn:
        err.write(f"this model answers one {task} prompt at a time: each message starts a new conversation\n")
    for line in _chat_lines(err):
        text = line.strip()
        if not text:
            continue  # an empty line is not a turn
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            err.write("[a new conversation]\n")
            continue
        if single_turn and session.messages:
            session.reset()  # a second turn of a single-turn task model would be garbage
        answer = AnswerText(gen.tokenizer, show_thinking=show_thinking, pad_id=gen.defaults.pad_token_id)
        out = _for_stdout()
        try:
            session.say(text, on_canvas=lambda e: _stream(answer, e, out))
        except KeyboardInterrupt:  # the session re-encodes the conversation on the next turn
            sys.stdout.write("\n")
            err.write("[stopped; the conversation goes on without this answer]\n")
            continue
        except ContextFull as e:
            err.write(f"dgport: error: {terminal_text(str(e))} (type /reset to start one)\n")
            continue
        except DgportError as e:  # e.g. a turn the model's template refuses: the session goes on
            err.write(f"dgport: error: {terminal_text(str(e))}\n")
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        err.write(f"[{session.last_stats}]\n")


def _chat_lines(err):
    """The lines of a chat, decoded, until Ctrl-D or the end of input. On a terminal an empty line is
    no turn and Ctrl-C clears the line being typed; a line that is not UTF-8 is refused in one line and
    the chat goes on."""
    from .schema import decode_utf8

    if sys.stdin is None:
        return
    if sys.stdin.isatty():
        while True:
            try:
                line = input("> ")
            except KeyboardInterrupt:
                err.write("^C\n")  # the typed line is dropped; Ctrl-D or /exit quits
                continue
            except EOFError:
                err.write("\n")
                return
            except UnicodeDecodeError as e:
                err.write(f"dgport: error: that line is not valid UTF-8 ({e.reason}); type it again\n")
                continue
            yield line
    buffer = getattr(sys.stdin, "buffer", None)
    number = 0
    while True:
        raw = buffer.readline(MAX_PROMPT_BYTES + 1) if buffer is not None else sys.stdin.readline()
        if not raw:
            return
        number += 1
        what = f"line {number} of standard input"
        if len(raw) > MAX_PROMPT_BYTES:
            while raw and not raw.endswith(b"\n"):  # drop the rest of the line
                raw = buffer.readline(MAX_PROMPT_BYTES)
            err.write(f"dgport: error: {what} is over {MAX_PROMPT_BYTES >> 20} MiB; skipped\n")
            continue
        if isinstance(raw, bytes):
            try:
                raw = decode_utf8(raw, what)
            except DgportError as e:
                err.write(f"dgport: error: {e}\n")
                continue
        yield raw


class _Stderr:
    @staticmethod
    def write(text: str) -> None:
        click.echo(text, err=True, nl=False)


def _stream(answer, event, out):
    answer.add(event.tokens)
    sys.stdout.write(out(answer.delta()))
    sys.stdout.flush()


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


def _bits(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.lower().removeprefix("int")
    if not text.isdigit():
        raise click.BadParameter(f"{value!r}: choose int4 or int8", param_hint="--quantize")
    return int(text)  # export checks the width


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
@debug_option
def demo(export_dir, backend, givens, seed):
    """Solve a fresh Sudoku with the shipped model (or EXPORT of it) and watch the canvas fill in."""
    import random

    from rich.console import Console
    from rich.live import Live

    from .display import SudokuView, sudoku_grid
    from .models.sudoku.puzzles import is_valid_solution, puzzle_from_seed

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
        result = gen.generate(puzzle.puzzle, seed=seed, on_step=on_step)
    answer = "".join(result.text.split())
    ok = is_valid_solution(puzzle.puzzle, answer)
    console.print(("[green]solved" if ok else "[red]not solved") +
                  f" in {sum(result.steps_per_canvas)} denoising steps, {time.perf_counter() - started:.1f} s "
                  f"(with viewing delays), {result.tokens_per_forward:.1f} tokens per forward")
    console.print(sudoku_grid(answer[:81].ljust(81, "·"), puzzle.puzzle))


class _ClosedStream:
    """Stands in for a closed standard stream: writing to it is an error, not silence."""

    def __init__(self, name: str):
        self.name = name

    def write(self, text):
        raise OSError(errno.EBADF, f"standard {self.name} is closed")

    def flush(self):
        pass

    def isatty(self):
        return False


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quiet_stdout() -> None:
    """After a failed write to stdout: point it at /dev/null so the interpreter's last flush of the
    buffered text does not print a second error at exit."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, AttributeError, ValueError):
        pass


def _error(message: str) -> None:
    try:
        from .display import terminal_text

        click.echo(f"dgport: error: {terminal_text(_one_line(message))}", err=True)
    except OSError:
        pass  # stderr itself is unusable: the exit code still says it failed


from .serve import serve as _serve  # noqa: E402  (the module imports only click at load)

cli.add_command(_serve)


def main(argv=None) -> int:
    """Entry point: every error becomes one line on stderr and a non-zero exit code (--debug, or
    DGPORT_DEBUG=1, re-raises it with its traceback)."""
    _STATE["debug"] = bool(os.environ.get("DGPORT_DEBUG"))
    if sys.stdout is None:
        sys.stdout = _ClosedStream("output")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    try:
        cli.main(args=argv, prog_name="dgport", standalone_mode=False)
        sys.stdout.flush()  # here, so a full disk or a closed pipe is reported like any error
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.UsageError as e:
        if _debug():
            raise
        _error(e.format_message())
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        _error("interrupted")
        return 130
    except DgportError as e:
        if _debug():
            raise
        _error(str(e))
        return 1
    except BrokenPipeError:  # the reader went away (`dgport run ... | head -c 10`)
        _quiet_stdout()
        return 1
    except OSError as e:
        if _debug():
            raise
        if e.filename is None:
            _quiet_stdout()
        where = f"{e.filename}: " if e.filename else ("cannot write the output: " if e.errno in
                                                      (errno.ENOSPC, errno.EBADF, errno.EIO) else "")
        _error(f"{where}{e.strerror or e} ({e.__class__.__name__})")
        return 1
    except Exception as e:  # a runtime's load error (ONNX Runtime, MLX) or a bug: one line, --debug for more
        if _debug():
            raise
        _error(f"{e.__class__.__name__}: {e} (run with --debug for the traceback)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
