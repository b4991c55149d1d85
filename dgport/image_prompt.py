"""Images inside a prompt: the placeholder expanded into soft-token slots, the soft tokens computed
once, and the prompt's encode calls cut where no image block is split.

The chat template renders each image as the image token (`<|image|>`); as transformers' Gemma4Processor
does, each of them becomes `<|image>` + n x `<|image|>` + `<image|>`, n being that image's soft-token
count. The encoder then reads the soft tokens at those n positions (dgport.backend.image_embeds_input)
and, for use_bidirectional_attention "vision", lets each block attend to itself both ways: so one encode
call must hold a whole block, and encode_calls never cuts one."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DgportError
from .images import MAX_IMAGE_BYTES, ImageError, ImageSettings, Patches, load_image, preprocess


@dataclass
class PromptImages:
    """A prompt's images, patched (in prompt order), and once computed their soft tokens."""
    patches: list[Patches]
    digest: str  # sha256 over every image's pixel values and positions (the server's prefix cache keys on it)
    soft: list[np.ndarray] | None = None  # per image [n_i, H] float32, after encode(backend)

    @property
    def counts(self) -> list[int]:
        return [p.soft_tokens for p in self.patches]

    def encode(self, backend) -> list[np.ndarray]:
        """The soft tokens of every image, from one backend.encode_images call (computed once)."""
        if self.soft is None:
            pv = np.stack([p.pixel_values for p in self.patches])
            pos = np.stack([p.positions for p in self.patches])
            out = backend.encode_images(pv, pos)
            self.soft = [out[i, :n] for i, n in enumerate(self.counts)]
        return self.soft


def prepare_images(images, settings: ImageSettings, where: str = "images") -> PromptImages:
    """Decode (dgport.images.load_image: paths, bytes, PIL images, uint8 arrays) and patch every image;
    `images` may hold (source, label) pairs (image_parts' sources)."""
    import hashlib

    if not isinstance(images, (list, tuple)):
        raise ImageError(f"{where} must be a list of images (paths, bytes, PIL images or uint8 arrays)")
    if len(images) > MAX_IMAGES:
        raise ImageError(f"{where}: {len(images)} images; at most {MAX_IMAGES} a prompt")
    patches = []
    h = hashlib.sha256()
    for i, src in enumerate(images):
        label = f"{where}[{i}]" if not isinstance(src, str) else src
        if isinstance(src, tuple) and len(src) == 2:
            src, label = src
        p = preprocess(load_image(src, label), settings)
        patches.append(p)
        h.update(p.pixel_values.tobytes())
        h.update(p.positions.tobytes())
    return PromptImages(patches, h.hexdigest())


MAX_IMAGES = 64
DATA_URL_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif")


def data_url_bytes(url, where: str) -> bytes:
    """The bytes of a base64 `data:image/...;base64,...` URL. Any other URL is refused: dgport never
    fetches from the network."""
    import base64
    import binascii

    if not isinstance(url, str):
        raise ImageError(f"{where}: an image URL must be a string")
    head, sep, body = url.partition(",")
    scheme = head.split(":", 1)[0].lower() if ":" in head else ""
    if scheme in ("http", "https", "ftp", "file"):
        raise ImageError(f"{where}: a {scheme} URL; dgport never fetches from the network: send the image itself as a "
                         "base64 data: URL (data:image/png;base64,...)")
    if scheme != "data" or not sep:
        raise ImageError(f"{where}: not a data: URL; send the image as data:image/png;base64,...")
    meta = head[5:].split(";")
    if meta[0].lower() not in DATA_URL_TYPES or "base64" not in [m.lower() for m in meta[1:]]:
        raise ImageError(f"{where}: a data: URL of type {meta[0] or 'none'!r}; send a base64 PNG, JPEG, WebP or GIF "
                         "(data:image/png;base64,...)")
    if len(body) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ImageError(f"{where}: over the {MAX_IMAGE_BYTES >> 20} MiB an image may have")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the data: URL is not valid base64") from None


def image_parts(messages: list[dict]) -> tuple[list[dict], list]:
    """Messages whose content may be a list of parts, {"type": "text", "text": ...}, {"type": "image",
    "image": SOURCE} (a path, bytes, a PIL image or a uint8 array) or OpenAI's {"type": "image_url",
    "image_url": {"url": "data:..."}} -> (the messages as the chat template reads them, image parts as
    {"type": "image"}; the image sources in order)."""
    out, sources = [], []
    for i, m in enumerate(messages):
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image" and part.get("image") is not None:
                sources.append((part["image"], where))
                parts.append({"type": "image"})
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                sources.append((data_url_bytes(part["image_url"].get("url"), f"{where}.image_url.url"), where))
                parts.append({"type": "image"})
            elif kind in ("video", "video_url", "input_audio", "audio"):
                raise ImageError(f"{where}: {kind} is not supported (images only)")
            else:
                raise ImageError(f'{where}: a part is {{"type": "text", "text": ...}}, {{"type": "image", "image": ...}} '
                                 'or {"type": "image_url", "image_url": {"url": "data:..."}}')
        out.append({**m, "content": parts})
    return out, sources


def expand_ids(ids: list[int], images: PromptImages, vision) -> list[int]:
    """Each image token of the rendered prompt -> boi + n x image token + eoi (n: that image's soft tokens).
    The prompt must hold exactly one image token per image."""
    tok = vision.image_token_id
    marks = [i for i, t in enumerate(ids) if t == tok]
    if len(marks) != len(images.patches):
        raise ImageError(f"the prompt has {len(marks)} image marker{'s' if len(marks) != 1 else ''} for "
                         f"{len(images.patches)} image{'s' if len(images.patches) != 1 else ''}; give one image "
                         "per marker (and no image token in the text)")
    out, start = [], 0
    for i, n in zip(marks, images.counts):
        out += ids[start:i] + [vision.boi_token_id] + [tok] * n + [vision.eoi_token_id]
        start = i + 1
    return out + ids[start:]


def encode_calls(ids: np.ndarray, chunk: int, image_token_id: int | None):
    """(start, end) of each encode call over ids [T]: at most `chunk` tokens, except that a run of image
    tokens is never split (a call ends before the run, or holds the whole run)."""
    T = len(ids)
    if image_token_id is None:
        return [(s, min(s + chunk, T)) for s in range(0, T, chunk)]
    img = np.asarray(ids) == image_token_id
    calls, s = [], 0
    while s < T:
        e = min(s + chunk, T)
        if e < T and img[e] and img[e - 1]:  # the cut would fall inside a run
            run_start = e - 1
            while run_start > s and img[run_start - 1]:
                run_start -= 1
            if run_start > s:
                e = run_start  # end before the run
            else:  # the call starts at the run: hold it whole
                while e < T and img[e]:
                    e += 1
        calls.append((s, e))
        s = e
    return calls


def soft_rows(images: PromptImages | None, prompt_ids, cached: int, image_token_id: int | None):
    """The soft tokens [S, H] the uncached part of a prompt needs (None without images): the rows of the
    image blocks after the first `cached` ids (a cached prefix must hold whole blocks)."""
    if images is None:
        return None
    ids = np.asarray(prompt_ids).reshape(-1)
    if 0 < cached < len(ids) and ids[cached] == image_token_id and ids[cached - 1] == image_token_id:
        raise DgportError("a cached prefix ends inside an image block")
    soft = np.concatenate(images.soft, axis=0)
    return soft[int(np.count_nonzero(ids[:cached] == image_token_id)):]


def encode_prompt(encode, ids: np.ndarray, positions: np.ndarray, chunk: int, soft, image_token_id) -> None:
    """encode(ids [1, t], positions [1, t], image_embeds or None) over the prompt ids [T], `chunk` tokens a
    call, image blocks whole, each call given its own blocks' rows of `soft` ([S, H] or None: text only)."""
    if soft is None:
        for s, e in encode_calls(ids, chunk, None):
            encode(ids[None, s:e], positions[None, s:e], None)
        return
    used = 0
    for s, e in encode_calls(ids, chunk, image_token_id):
        n = int(np.count_nonzero(ids[s:e] == image_token_id))
        encode(ids[None, s:e], positions[None, s:e], soft[used:used + n] if n else None)
        used += n
    if used != len(soft):
        raise DgportError(f"{len(soft)} soft tokens for {used} image positions")  # expand_ids keeps them equal
