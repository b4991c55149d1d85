"""Images on the command line: `--image PATH` (repeatable) and `--max-soft-tokens N` for `dgport run` and
`dgport chat`, and `/image PATH` inside a chat. Every mistake (a missing file, not an image, a truncated or
oversized one, a model without a vision tower, a bad --max-soft-tokens) is a usage error: one line naming
the file or option, exit status 2, nothing on standard output."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import click

from .images import SOFT_TOKENS, ImageError

IMAGE_HELP = ("An image the prompt shows the model (PNG, JPEG, WebP, GIF: its first frame); repeatable, in order, "
              "before the prompt's text. Needs a model with a vision tower (docs/images.md).")
SOFT_HELP = (f"Soft tokens per image, its detail: one of {', '.join(map(str, SOFT_TOKENS))} (default: the model's "
             "processor config).")


def _soft_tokens(ctx, param, value):
    if value is not None and value not in SOFT_TOKENS:
        raise click.BadParameter(f"must be one of {', '.join(map(str, SOFT_TOKENS))} (got {value})")
    return value


def image_options(f):
    """--image PATH (repeatable) and --max-soft-tokens N."""
    f = click.option("--max-soft-tokens", type=int, default=None, callback=_soft_tokens, metavar="N",
                     help=SOFT_HELP)(f)
    return click.option("--image", "image_paths", multiple=True, metavar="PATH", help=IMAGE_HELP)(f)


@contextmanager
def usage_errors():
    """An ImageError inside becomes a usage error (exit status 2) with the same one line."""
    try:
        yield
    except ImageError as e:
        raise click.UsageError(str(e)) from None


def label(path) -> str:
    return f"--image {path}"


def read_image(path: str, where: str | None = None):
    """(the decoded image, its label) for an image file, checked as dgport.images.load_image checks it."""
    from .images import load_image

    where = where or label(path)
    try:
        return load_image(Path(path), where), where
    except ImageError as e:  # (a message about the file itself names it by its path: the option goes first)
        message = str(e) if str(e).startswith(where) else f"{where.split(' ')[0]}: {e}"
        raise click.UsageError(message) from None


def read_images(paths) -> list:
    """Every --image decoded, in order (before any model loads: a bad file fails at once)."""
    return [read_image(p) for p in paths]


def check_model(path: Path, backend: str, images: list, max_soft_tokens) -> None:
    """Before the model loads (an ONNX or MLX export's manifest says whether it takes images): images for a
    model without a vision tower, or an image too elongated for its patches, are refused in one line."""
    if not images or backend == "torch":
        return
    from .errors import DgportError
    from .manifest import open_export

    try:
        vision = open_export(path, backend, checksums=False).vision
    except DgportError:
        return  # loading says what is wrong with the export
    check_vision(vision, path, images, max_soft_tokens)


def check_vision(vision, path, images: list, max_soft_tokens, what: str = "--image") -> None:
    """`images` ((image, label) pairs) against the model's VisionInfo (None: refused)."""
    from .backend import no_vision_error
    from .images import target_size

    if vision is None:
        raise click.UsageError(f"{what}: {no_vision_error(path)}")
    settings = vision.image.with_soft_tokens(max_soft_tokens)
    for img, where in images:
        try:
            target_size(img.height, img.width, settings)
        except ImageError as e:
            raise click.UsageError(f"{where}: {e}") from None


def warn_unused(images, max_soft_tokens, warn) -> None:
    if max_soft_tokens is not None and not images:
        warn("--max-soft-tokens has no effect without --image")
