"""The `dgport` command line: the group, shared options and helpers, `run`, and `main` (one-line errors).
The other commands live in cli_export.py, cli_chat.py and cli_inspect.py."""
from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

import click

from .cli_images import image_options
from .cli_template import TASK_TEMPLATE_HELP
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
@click.option("--template", "template_file", default=None, metavar="FILE",
              help="A canvas template: fixed text with {{hole:N}} holes the model fills (a .json file: the JSON "
                   "form). See docs/templates.md.")
@click.option("--suffix", default=None, help="In-filling: the prompt is the prefix, TEXT is fixed after one hole of "
                                              "--max-new-tokens positions (default: one canvas).")
@click.option("--task-template", "use_task_template", is_flag=True, help=TASK_TEMPLATE_HELP)
@click.option("--json-schema", "json_schema_file", default=None, metavar="FILE",
              help="Answer with JSON valid against this JSON schema (the subset in docs/structured-output.md).")
@image_options
@sampler_options
@debug_option
def run(export_dir, backend, checkpoint, prompt, prompt_file, raw, system, think, show_thinking, show_canvas,
        as_json, template_file, suffix, use_task_template, json_schema_file, image_paths, max_soft_tokens, seed,
        max_new_tokens, **sampler):
    """Generate from a prompt with an export (default: the shipped Sudoku model)."""
    from rich.console import Console
    from rich.markup import escape

    from . import cli_images, cli_template
    from .chat import timed_backend
    from .canvas_template import Template
    from .display import AnswerText, CanvasView, terminal_text
    from .task import check_answer

    text = _read_prompt(prompt, prompt_file)
    images = cli_images.read_images(image_paths)
    cli_images.warn_unused(images, max_soft_tokens, _warn)
    cli_template.check_flags(template_file, suffix, use_task_template, think, json_schema_file)
    template = cli_template.read_template(template_file) if template_file is not None else None
    if json_schema_file is not None:
        template = cli_template.read_json_schema(json_schema_file)
    if checkpoint is not None and backend != "torch":
        raise DgportError("--checkpoint is for --backend torch; an ONNX or MLX backend runs an EXPORT folder")
    given = checkpoint or export_dir
    tokenizer = _prompt_tokenizer(given)
    if tokenizer is not None:
        _check_prompt_options(tokenizer, text, raw, system, think, show_thinking)
    path, is_default = _resolve(export_dir, backend, checkpoint)
    task = None if raw else _task_of(path)
    default_template = use_task_template
    if use_task_template:
        if raw:
            raise DgportError("--task-template and --raw contradict each other: the task's template follows its "
                              "chat template's prompt; drop one of them")
        template = cli_template.task_template(task, text, think)
    cli_images.check_model(path, backend, images, max_soft_tokens)
    gen = _load(path, backend)
    if images:
        cli_images.check_vision(getattr(gen.backend, "vision", None), path, images, max_soft_tokens)
    gen.backend = timed_backend(gen.backend)
    C = gen.config.canvas_length
    if suffix is not None:  # the hole is --max-new-tokens; the run spans the canvases hole and suffix need
        template, max_new_tokens = Template.infill(suffix, max_new_tokens or C), None
    elif template is not None:
        cli_template.check_budget(template, gen.tokenizer, C, max_new_tokens,
                                  f"--template {template_file}" if template_file is not None else
                                  f"--json-schema {json_schema_file}" if json_schema_file is not None else
                                  f"this model's {task} answer template (--task-template)")
    elif max_new_tokens is None:
        max_new_tokens = 4 * C
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
        with cli_images.usage_errors():  # (e.g. --raw with more image markers than --image files)
            result = gen.generate(text, max_new_tokens=max_new_tokens, seed=seed, raw=raw, system=system,
                                  think=think, on_canvas=on_canvas, on_step=on_step if show_canvas else None,
                                  encode_chunk=sampler["encode_chunk"], template=template, images=images or None,
                                  max_soft_tokens=max_soft_tokens, **overrides)
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
            "template": template is not None, "holes": result.holes,
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
              + escape(cli_template.summary(template, result.holes, default_template))
              + ("shipped Sudoku model, " if is_default else "") + escape(terminal_text(str(path))) + "[/dim]",
              highlight=False, soft_wrap=True, markup=True)



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


from . import cli_chat, cli_export, cli_inspect, cli_web  # noqa: E402,F401  (their commands join `cli`)
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


if __name__ == "__main__":  # `python -m dgport.cli`: the commands joined the imported module's group
    from dgport.cli import main as registered_main

    sys.exit(registered_main())
