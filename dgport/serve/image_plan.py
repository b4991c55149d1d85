"""Images in chat requests (OpenAI's content parts), planned on the planning thread: each part checked
(a 400 naming `messages[i].content[j]`), each `data:` URL decoded (base64 a slice at a time, so the
event loop's thread gets the interpreter between slices) and the image decoded and patched under
dgport.images' limits; the prompt's image markers expanded into image blocks. A URL of any other scheme
is refused: dgport never fetches from the network.

The prefix cache keys on image content: image blocks hold the same token ids whatever the image, so a
plan carries one key per image (sha256 of its patches) and where its block starts, and a cached prefix
is reused only when it holds the same images (`reusable_images`)."""

import hashlib

import numpy as np

from ..image_prompt import MAX_IMAGES, PromptImages, data_url_bytes, expand_ids, prepare_images
from ..images import MAX_IMAGE_BYTES, ImageError, ImageSettings
from .protocol import ApiError

IMAGE_BODY_BYTES = 32 << 20  # the request body cap of a model that takes images (4 MiB otherwise)
DETAILS = ("auto", "low", "high")
B64_SLICE = 1 << 20  # base64 characters decoded at a time (a multiple of 4)
TEXT_PART = '{"type": "text", "text": "..."}'
IMAGE_PART = '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}'


def message_content(m, i: int) -> tuple[object, list[tuple[str, str]]]:
    """(message i's content as the chat template reads it, its image URLs with their parts' places).
    Without images, text parts are joined by newlines into one string (as before images); with them,
    the content is the list of parts ({"type": "text", "text"} and {"type": "image"}) in their order."""
    content = m.content
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts, parts, urls = [], [], []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ApiError(400, f"{where}: a text part is {TEXT_PART}", param=where)
            texts.append(part["text"])
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            if (set(part) != {"type", "image_url"} or not isinstance(image, dict) or "url" not in image
                    or not set(image) <= {"url", "detail"}):
                raise ApiError(400, f"{where}: an image part is {IMAGE_PART} (and optionally \"detail\")", param=where)
            if image.get("detail") is not None and image["detail"] not in DETAILS:
                raise ApiError(400, f"{where}.image_url.detail: one of {', '.join(DETAILS)} (dgport ignores it; "
                               "max_soft_tokens sets an image's detail)", param=where)
            if m.role != "user":
                raise ApiError(400, f"{where}: images go in user messages (this one is the {m.role}'s)", param=where)
            urls.append((image["url"], where))
            parts.append({"type": "image"})
        elif kind in ("input_audio", "audio", "video", "video_url", "file", "input_file"):
            raise ApiError(400, f"{where}: {kind} parts are not supported (text and images only)", param=where)
        else:
            raise ApiError(400, f"{where}: a content part is {TEXT_PART} or {IMAGE_PART}", param=where)
    if not urls:
        return "\n".join(texts), []
    return parts, urls


def data_url(url, where: str) -> bytes:
    """The bytes of a base64 data: URL (dgport.image_prompt.data_url_bytes' rules), decoded a slice at a time."""
    import base64
    import binascii

    if not isinstance(url, str):
        raise ImageError(f"{where}: an image URL must be a string")
    head, sep, body = url.partition(",")
    data_url_bytes(head + sep, where)  # the scheme (never the network), the type and base64: checked
    if len(body) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ImageError(f"{where}: over the {MAX_IMAGE_BYTES >> 20} MiB an image may have")
    out = bytearray()
    try:
        for k in range(0, len(body), B64_SLICE):
            out += base64.b64decode(body[k:k + B64_SLICE], validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the data: URL is not valid base64") from None
    return bytes(out)


def plan_images(urls: list[tuple[str, str]], gen, max_soft_tokens) -> tuple[PromptImages | None, list[str]]:
    """(the request's images decoded and patched, one key per image); (None, []) without images. Every
    refusal is a 400 naming the part (or max_soft_tokens, or the model that takes no images)."""
    vision = getattr(gen.backend, "vision", None)
    try:
        settings = (vision.image if vision is not None else ImageSettings()).with_soft_tokens(max_soft_tokens)
    except ImageError as e:
        raise ApiError(400, str(e), param="max_soft_tokens") from e
    if not urls:
        return None, []
    if vision is None:
        from ..backend import no_vision_error

        path = getattr(getattr(gen.backend, "export", None), "path", "this model")
        raise ApiError(400, f"{urls[0][1]}: {no_vision_error(path)}", param=urls[0][1], code="images_not_supported")
    if len(urls) > MAX_IMAGES:
        raise ApiError(400, f"{len(urls)} images; at most {MAX_IMAGES} a request", param="messages")
    patches, keys = [], []
    for url, where in urls:
        try:
            one = prepare_images([(data_url(url, f"{where}.image_url.url"), where)], settings, where)
        except ImageError as e:
            message = str(e) if str(e).startswith(where) else f"{where}: {e}"
            raise ApiError(400, message, param=where) from e
        p = one.patches[0]
        patches.append(p)
        keys.append(hashlib.sha256(p.pixel_values.tobytes() + p.positions.tobytes()).hexdigest())
    return PromptImages(patches, hashlib.sha256("".join(keys).encode()).hexdigest()), keys


def image_count(ids, vision) -> int:
    return 0 if vision is None else int(np.count_nonzero(np.asarray(ids, dtype=np.int64) == vision.image_token_id))


def expand(ids: list[int], images: PromptImages | None, vision) -> tuple[list[int], list[int]]:
    """(ids with each image marker made the image's block, where each block starts); a marker without its
    image (the image token typed as text) is refused (ImageError)."""
    if vision is None or (images is None and not image_count(ids, vision)):
        return ids, []
    images = images or PromptImages([], "")
    marks = [i for i, t in enumerate(ids) if t == vision.image_token_id]
    out = expand_ids(ids, images, vision)
    starts, grown = [], 0
    for mark, n in zip(marks, images.counts):
        starts.append(mark + grown)
        grown += n + 1
    return out, starts


def reusable_images(plan, n: int, cached_keys: list[str]) -> int | None:
    """How many of the plan's images lie in its first `n` ids (a cached prefix), when they are the images
    the cache holds, in whole blocks; None when the cache holds other images (or cuts a block)."""
    starts = plan.image_starts
    m = sum(1 for s in starts if s < n)
    if m != len(cached_keys) or plan.image_keys[:m] != list(cached_keys):
        return None
    if m and starts[m - 1] + plan.images.counts[m - 1] + 2 > n:
        return None
    return m


def images_after(plan, m: int) -> PromptImages | None:
    """The plan's images from the (m+1)-th on (those a run past a cached prefix encodes); None for none."""
    if plan.images is None or m >= len(plan.images.patches):
        return None
    return plan.images if m == 0 else PromptImages(plan.images.patches[m:], "")


def for_cached_row(images: PromptImages | None, ids: list[int], n: int, backend) -> PromptImages | None:
    """What dgport.batch.BatchLoop.add(images=, cached=n) takes for the images after a cached prefix of n
    ids: it skips one soft-token row per image token in the prefix (some the model may have written), so
    those rows are given as zeros ahead of the new images' soft tokens (computed here, on the worker)."""
    if images is None or n == 0:
        return images
    soft = images.encode(backend)
    k = image_count(ids[:n], backend.vision)
    return PromptImages([], images.digest, [np.zeros((k, soft[0].shape[1]), dtype=np.float32), *soft])


def check_no_image_tokens(ids: list[int], gen, param: str) -> None:
    """A completions prompt on a model that takes images holds no image token (images go in chat messages)."""
    vision = getattr(gen.backend, "vision", None)
    if image_count(ids, vision):
        raise ApiError(400, f"{param}: holds the image token (id {vision.image_token_id}) but no image; images go in "
                       "chat messages as image_url parts", param=param)

