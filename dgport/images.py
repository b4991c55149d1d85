"""Images for DiffusionGemma's vision tower: decoded with Pillow under limits, then made into patches
exactly as transformers' `Gemma4ImageProcessorPil` makes them (same Pillow calls, same float32
rounding), so the soft tokens and therefore the tokens match transformers.

    settings = ImageSettings.from_folder(checkpoint_or_export)      # processor_config.json, else defaults
    patches = preprocess(load_image("cat.png"), settings)            # Patches: pixel_values, positions, ...

Untrusted input: an image is refused in one line (naming it) when it is not PNG, JPEG, WebP or GIF,
is truncated, has a zero or absurd side, or decodes to more than MAX_PIXELS pixels (checked from the
header, before decoding: no decompression bomb). Animated images give their first frame. Palette,
16-bit, grey, CMYK and alpha images are converted as transformers converts them (alpha composited on
white)."""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DgportError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MAX_IMAGE_BYTES = 64 << 20  # an encoded image file
MAX_PIXELS = 64_000_000  # decoded: ~192 MB as RGB
MAX_SIDE = 32_768
SOFT_TOKENS = (70, 140, 280, 560, 1120)  # transformers' _SUPPORTED_SOFT_TOKENS
RESAMPLE = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}


class ImageError(DgportError):
    """An image that cannot be used (the message names it and says what to do)."""


@dataclass(frozen=True)
class ImageSettings:
    """Gemma4ImageProcessorPil's settings (its class defaults unless the checkpoint's processor config says)."""
    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    resample: int = 3  # PIL's BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple = (0.0, 0.0, 0.0)
    image_std: tuple = (1.0, 1.0, 1.0)
    max_position: int = 0  # the tower's position table (patches a side); 0: unchecked. Not the processor's

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2

    def with_soft_tokens(self, n) -> "ImageSettings":
        from dataclasses import replace

        if n is None:
            return self
        if isinstance(n, bool) or n not in SOFT_TOKENS:
            raise ImageError(f"max_soft_tokens must be one of {', '.join(map(str, SOFT_TOKENS))} (got {n!r})")
        return replace(self, max_soft_tokens=int(n))

    def to_dict(self) -> dict:
        return {"patch_size": self.patch_size, "max_soft_tokens": self.max_soft_tokens,
                "pooling_kernel_size": self.pooling_kernel_size, "resample": self.resample,
                "do_rescale": self.do_rescale, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": list(self.image_mean), "image_std": list(self.image_std)}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "ImageSettings":
        """From a processor config's image-processor section (unknown keys ignored, as transformers does;
        every key dgport uses checked)."""
        if not isinstance(d, dict):
            raise ImageError(f"{where}: the image processor settings must be an object")
        base = cls()
        out = {}

        def integer(key, lo, hi):
            v = d.get(key, getattr(base, key))
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ImageError(f"{where}: {key} must be an integer in [{lo}, {hi}] (got {v!r})")
            out[key] = v

        def flag(key):
            v = d.get(key, getattr(base, key))
            if not isinstance(v, bool):
                raise ImageError(f"{where}: {key} must be true or false (got {v!r})")
            out[key] = v

        def triple(key, positive):
            v = d.get(key, getattr(base, key))
            v = [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    and (x > 0 or not positive) for x in v):
                raise ImageError(f"{where}: {key} must be three finite numbers{' above 0' if positive else ''}")
            out[key] = tuple(float(x) for x in v)

        integer("patch_size", 1, 64)
        integer("pooling_kernel_size", 1, 8)
        integer("resample", 0, 5)
        flag("do_rescale")
        flag("do_normalize")
        triple("image_mean", False)
        triple("image_std", True)
        factor = d.get("rescale_factor", base.rescale_factor)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise ImageError(f"{where}: rescale_factor must be a finite number above 0 (got {factor!r})")
        out["rescale_factor"] = float(factor)
        if d.get("do_convert_rgb", True) is not True:
            raise ImageError(f"{where}: do_convert_rgb false is not supported (the model reads RGB)")
        soft = d.get("max_soft_tokens", base.max_soft_tokens)
        if isinstance(soft, bool) or soft not in SOFT_TOKENS:
            raise ImageError(f"{where}: max_soft_tokens must be one of {', '.join(map(str, SOFT_TOKENS))} (got {soft!r})")
        out["max_soft_tokens"] = soft
        return cls(**out)

    @classmethod
    def from_folder(cls, folder) -> "ImageSettings":
        """processor_config.json's `image_processor` section, else preprocessor_config.json, else the defaults."""
        from . import safe_files

        folder = Path(folder)
        root = safe_files.model_root(folder)
        for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
            path = folder / name
            if os.path.lexists(path):
                data = safe_files.read_json(path, root, ImageError, "replace it with the checkpoint's own")
                section = data.get(key) if key and isinstance(data, dict) else data
                if section is not None:
                    return cls.from_dict(section, str(path))
        return cls()


@dataclass(frozen=True)
class Patches:
    """One image as the vision tower reads it: pixel_values [max_patches, 3 * patch**2] float32,
    positions [max_patches, 2] int64 ((x, y); (-1, -1) for padding), and its soft-token count."""
    pixel_values: np.ndarray
    positions: np.ndarray
    soft_tokens: int
    size: tuple[int, int]  # (height, width) after the resize


def load_image(source, where: str | None = None):
    """A Pillow image from a path, bytes, a PIL image or an HxWx3 / HxW uint8 array, checked and decoded
    (first frame of an animation)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        _check_size(source.size, where or "the image")
        return source
    if isinstance(source, np.ndarray):
        what = where or "the image array"
        if source.dtype != np.uint8 or source.ndim not in (2, 3) or (source.ndim == 3 and source.shape[2] not in (3, 4)):
            raise ImageError(f"{what}: an image array must be uint8, HxW, HxWx3 or HxWx4 (got {source.dtype} "
                             f"{list(source.shape)})")
        _check_size((source.shape[1], source.shape[0]), what)
        return Image.fromarray(np.ascontiguousarray(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, what = bytes(source), where or "the image bytes"
    elif isinstance(source, (str, os.PathLike)):
        what = where or str(source)
        data = _read_file(Path(source), what)
    else:
        raise ImageError(f"{where or 'an image'} must be a file path, bytes, a PIL image or a uint8 array "
                         f"(got {type(source).__name__})")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{what}: {len(data)} bytes, over the {MAX_IMAGE_BYTES >> 20} MiB an image file may have")
    return _decode(data, what)


def _read_file(path: Path, what: str) -> bytes:
    """The file's bytes, read as dgport reads model files (a regular file, opened without blocking, size
    checked before reading); a link is followed to wherever the user pointed it."""
    from . import safe_files

    if not os.path.lexists(path):
        raise ImageError(f"{what}: no such file; give an image file")
    return safe_files.read_bytes(path, Path(os.path.realpath(path)).parent, ImageError, "give an image file",
                                 cap=MAX_IMAGE_BYTES)


def _check_size(size, what: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{what}: {w}x{h} pixels; an image needs at least one pixel each way")
    if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
        raise ImageError(f"{what}: {w}x{h} pixels, over the limit ({MAX_SIDE} a side, {MAX_PIXELS // 1_000_000} "
                         "million in all); scale it down first")


def _decode(data: bytes, what: str):
    import warnings

    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            _check_size(img.size, what)  # from the header, before any pixel is decoded
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{what}: not a readable PNG, JPEG, WebP or GIF image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{what}: decodes to too many pixels; scale it down first") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # truncated or corrupt data
        raise ImageError(f"{what}: a damaged or truncated image ({str(e).splitlines()[0][:120]})") from None
    return img


def to_rgb(img) -> np.ndarray:
    """HxWx3 uint8, as transformers' convert_to_rgb makes it: transparency composited onto white."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.array(img.convert("RGB"))


def target_size(height: int, width: int, s: ImageSettings) -> tuple[int, int]:
    """transformers' get_aspect_ratio_preserving_size: the largest size with at most max_patches patches
    and sides divisible by pooling_kernel_size * patch_size."""
    target_px = s.max_patches * s.patch_size ** 2
    factor = math.sqrt(target_px / (height * width))
    side = s.pooling_kernel_size * s.patch_size
    th = int(math.floor(factor * height / side)) * side
    tw = int(math.floor(factor * width / side)) * side
    if th == 0 and tw == 0:
        raise ImageError(f"a {width}x{height} image resizes to nothing at patch {s.patch_size}")
    longest = (s.max_patches // s.pooling_kernel_size ** 2) * side
    if th == 0:
        th, tw = side, min(int(math.floor(width / height)) * side, longest)
    elif tw == 0:
        tw, th = side, min(int(math.floor(height / width)) * side, longest)
    if th * tw > target_px or (s.max_position and max(th, tw) > s.max_position * s.patch_size):
        raise ImageError(f"a {width}x{height} image is too elongated for {s.max_patches} patches "
                         f"(it would need {th}x{tw}); crop it")
    return th, tw


def preprocess(img, s: ImageSettings) -> Patches:
    """Pixels -> patches: convert, resize, rescale, (normalize), patchify, pad (Gemma4ImageProcessorPil)."""
    from PIL import Image

    rgb = to_rgb(img)
    h, w = rgb.shape[:2]
    th, tw = target_size(h, w, s)
    if (th, tw) != (h, w):
        rgb = np.array(Image.fromarray(rgb).resize((tw, th), resample=s.resample))
    x = rgb.transpose(2, 0, 1)  # CHW
    if s.do_rescale:
        x = (x.astype(np.float64) * s.rescale_factor).astype(np.float32)
    if s.do_normalize:
        x = x.astype(np.float32)
        mean = np.asarray(s.image_mean, dtype=x.dtype)[:, None, None]
        std = np.asarray(s.image_std, dtype=x.dtype)[:, None, None]
        x = (x - mean) / std
    p = s.patch_size
    ph, pw = th // p, tw // p
    patches = x.reshape(3, ph, p, pw, p).transpose(1, 3, 2, 4, 0).reshape(ph * pw, -1)
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    positions = np.stack([gx, gy], axis=-1).reshape(ph * pw, 2).astype(np.int64)
    pad = s.max_patches - patches.shape[0]
    values = np.zeros((s.max_patches, patches.shape[1]), dtype=np.float32)
    values[:patches.shape[0]] = patches
    pos = np.full((s.max_patches, 2), -1, dtype=np.int64)
    pos[:positions.shape[0]] = positions
    assert pad >= 0
    return Patches(values, pos, patches.shape[0] // s.pooling_kernel_size ** 2, (th, tw))
