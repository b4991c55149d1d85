"""`dgport chat`: a conversation on a terminal or from piped lines, its cache kept between turns."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli import (BACKEND_CHOICES, MAX_PROMPT_BYTES, SAMPLER_KEYS, _check_prompt_options, _for_stdout, _load,
                  _prompt_tokenizer, _resolve, _task_of, cli, debug_option, sampler_options)
from .cli_images import image_options
from .errors import DgportError
from .loop import fresh_seed


@cli.command()
@click.argument("export_dir", metavar="[EXPORT]", required=False, type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="cpu", show_default=True)
@click.option("--system", default=None, help="A system prompt for the conversation.")
@click.option("--think", is_flag=True, help="Thinking mode.")
@click.option("--show-thinking", is_flag=True, help="Print the thought channel too (with --think).")
@image_options
@sampler_options
@debug_option
def chat(export_dir, backend, system, think, show_thinking, image_paths, max_soft_tokens, seed, max_new_tokens,
         **sampler):
    """A multi-turn conversation. The KV cache is kept between turns: only each new turn is encoded.
    Ctrl-C stops the answer being generated and keeps the conversation; Ctrl-D (or /exit) quits.
    `/image PATH` attaches an image to the next message (--image: to the first)."""
    from . import cli_images
    from .chat import ChatSession, ContextFull
    from .display import AnswerText, terminal_text
    from .task import SINGLE_TURN

    pending = cli_images.read_images(image_paths)  # the images the next message carries (/image adds more)
    tokenizer = _prompt_tokenizer(export_dir)
    if tokenizer is not None:
        _check_prompt_options(tokenizer, None, False, system, think, show_thinking)
    path, _ = _resolve(export_dir, backend)
    cli_images.check_model(path, backend, pending, max_soft_tokens)
    gen = _load(path, backend)
    vision = getattr(gen.backend, "vision", None)
    if pending:
        cli_images.check_vision(vision, path, pending, max_soft_tokens)
    seed = fresh_seed(seed)
    session = ChatSession(gen, system=system, think=think, seed=seed,
                          max_new_tokens=max_new_tokens or 4 * gen.config.canvas_length,
                          encode_chunk=sampler["encode_chunk"], max_soft_tokens=max_soft_tokens,
                          **{k: sampler[k] for k in SAMPLER_KEYS})
    err = _Stderr()
    err.write(f"dgport chat (seed {seed}): type a message; Ctrl-C stops an answer, /reset starts over, "
              + ("/image PATH attaches an image to the next message, " if vision is not None else "")
              + "Ctrl-D or /exit quits.\n")
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
            err.write("[a new conversation]\n" if not pending else
                      f"[a new conversation; {_images(len(pending))} dropped]\n")
            pending = []
            continue
        if text == "/image" or text.startswith(("/image ", "/image\t")):
            try:
                pending.append(_attach(text[len("/image"):], vision, path, max_soft_tokens))
            except (click.UsageError, DgportError) as e:
                message = e.format_message() if isinstance(e, click.UsageError) else str(e)
                err.write(f"dgport: error: {terminal_text(message)}\n")
                continue
            img, where = pending[-1]
            err.write(f"[{terminal_text(where[len('/image '):])}: {img.width}x{img.height}; "
                      f"{_images(len(pending))} for the next message]\n")
            continue
        if single_turn and session.messages:
            session.reset()  # a second turn of a single-turn task model would be garbage
        answer = AnswerText(gen.tokenizer, show_thinking=show_thinking, pad_id=gen.defaults.pad_token_id)
        out = _for_stdout()
        images, pending = pending or None, []  # a message takes its images, whatever becomes of it
        try:
            session.say(text, on_canvas=lambda e: _stream(answer, e, out), images=images)
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


def _images(n: int) -> str:
    return f"{n} image{'s' if n != 1 else ''}"


def _attach(arg: str, vision, path, max_soft_tokens):
    """`/image PATH`: (the decoded image, its label), checked against the model; a usage error otherwise."""
    from . import cli_images

    name = arg.strip()
    if len(name) > 1 and name[0] == name[-1] and name[0] in "'\"":
        name = name[1:-1]  # a quoted path (one with spaces may also go unquoted)
    if not name:
        raise click.UsageError("/image needs a file: /image PATH")
    image = cli_images.read_image(name, f"/image {name}")
    cli_images.check_vision(vision, path, [image], max_soft_tokens, "/image")
    return image


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
                line = _terminal_line("> ")
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


def _terminal_line(prompt: str) -> str:
    """input() for a terminal in its line mode, without input()'s lost Ctrl-C: a SIGINT that lands
    after the prompt is shown but before input() blocks in read() is only acted on after the next
    Enter. Here the wait is a select() on the terminal and on a signal wake-up pipe, so a Ctrl-C at
    any moment raises KeyboardInterrupt at once. Raises EOFError at Ctrl-D on an empty line and
    UnicodeDecodeError for a line that is not UTF-8."""
    import os
    import select
    import signal

    sys.stderr.write(prompt)
    sys.stderr.flush()
    fd = sys.stdin.fileno()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    old = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    try:
        data = b""
        while not data.endswith(b"\n"):
            ready, _, _ = select.select([fd, wake_r], [], [])  # a signal's handler raises here or just after
            if wake_r in ready:
                while True:
                    try:
                        if not os.read(wake_r, 64):
                            break
                    except BlockingIOError:
                        break
            if fd in ready:
                chunk = os.read(fd, MAX_PROMPT_BYTES)
                if not chunk:  # Ctrl-D: the end of input, or of a partly typed line
                    if data:
                        break
                    raise EOFError
                data += chunk
    finally:
        signal.set_wakeup_fd(old)
        os.close(wake_r)
        os.close(wake_w)
    return data.removesuffix(b"\n").decode("utf-8")


class _Stderr:
    @staticmethod
    def write(text: str) -> None:
        click.echo(text, err=True, nl=False)


def _stream(answer, event, out):
    answer.add(event.tokens)
    sys.stdout.write(out(answer.delta()))
    sys.stdout.flush()
