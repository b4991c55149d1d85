"""dgport.images against transformers' Gemma4ImageProcessorPil (the same pixel values, positions and
soft-token counts, bit for bit), and the refusals of images dgport cannot use."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from dgport.images import ImageError, ImageSettings, load_image, preprocess

rng = np.random.default_rng(0)


def _arr(h, w, c=3, dtype=np.uint8, hi=256):
    return rng.integers(0, hi, (h, w, c) if c else (h, w), dtype=dtype)


def images():
    p = Image.fromarray(_arr(60, 80)).convert("P", palette=Image.ADAPTIVE)
    transparent = p.copy()
    transparent.info["transparency"] = 3
    jpeg = io.BytesIO()
    Image.fromarray(_arr(300, 200)).save(jpeg, "JPEG")
    return {
        "rgb 480x640": Image.fromarray(_arr(480, 640)),
        "odd 37x1000": Image.fromarray(_arr(37, 1000)),
        "tall 1000x20": Image.fromarray(_arr(1000, 20)),
        "one pixel": Image.fromarray(_arr(1, 1)),
        "exact 48x48": Image.fromarray(_arr(48, 48)),
        "rgba": Image.fromarray(_arr(100, 130, 4), "RGBA"),
        "grey": Image.fromarray(_arr(77, 91, 0), "L"),
        "grey+alpha": Image.fromarray(_arr(77, 91, 2), "LA"),
        "palette": p,
        "palette+transparency": transparent,
        "16-bit": Image.fromarray(_arr(50, 70, 0, np.uint16, 65536)),
        "cmyk": Image.fromarray(_arr(64, 64)).convert("CMYK"),
        "jpeg": load_image(jpeg.getvalue()),
    }


SETTINGS = [{"max_soft_tokens": 280}, {"max_soft_tokens": 70, "pooling_kernel_size": 2, "patch_size": 8},
            {"max_soft_tokens": 1120}, {"max_soft_tokens": 140, "do_normalize": True, "image_mean": [0.5, 0.4, 0.3],
                                        "image_std": [0.2, 0.3, 0.4]}]


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_patches_equal_transformers(kw):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    hf = Gemma4ImageProcessorPil(**kw)
    s = ImageSettings.from_dict(kw, "test")
    for name, img in images().items():
        ref = hf.preprocess([img], return_tensors="np")
        got = preprocess(img, s)
        assert got.pixel_values.dtype == ref["pixel_values"].dtype == np.float32
        assert np.array_equal(got.pixel_values, ref["pixel_values"][0]), name
        assert np.array_equal(got.positions, ref["image_position_ids"][0]), name
        assert got.soft_tokens == int(ref["num_soft_tokens_per_image"][0]), name


def test_sources_agree():
    arr = _arr(33, 47)
    png = io.BytesIO()
    Image.fromarray(arr).save(png, "PNG")
    s = ImageSettings()
    want = preprocess(Image.fromarray(arr), s).pixel_values
    for source in (arr, png.getvalue(), Image.fromarray(arr)):
        assert np.array_equal(preprocess(load_image(source), s).pixel_values, want)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((20, 30, 3), v, np.uint8)) for v in (10, 200)]
    path = tmp_path / "a.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert set(np.unique(np.array(load_image(path).convert("RGB")))) == {10}


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = zlib.compress(b"\0" * 16)
    data = struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    return b"\x89PNG\r\n\x1a\n" + chunk + data


def test_refusals_name_the_image(tmp_path):
    good = io.BytesIO()
    Image.fromarray(_arr(40, 40)).save(good, "PNG")
    cases = {
        "not an image": (b"hello, not an image", "not a readable PNG, JPEG, WebP or GIF"),
        "video": (b"\x00\x00\x00\x18ftypmp42" + b"\0" * 64, "not a readable PNG, JPEG, WebP or GIF"),
        "truncated": (good.getvalue()[:60], "damaged or truncated"),
        "bomb": (_png_header(30_000, 30_000), "too many pixels|over the limit"),
        "absurd side": (_png_header(40_000, 1), "over the limit"),
        "zero": (_png_header(0, 10), "not a readable PNG"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(data)
        with pytest.raises(ImageError, match=message) as e:
            load_image(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), name
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ImageError, match="at least one pixel"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageError, match="file path, bytes"):
        load_image(12)


def test_settings_are_checked(tmp_path):
    for bad, message in [({"max_soft_tokens": 100}, "one of 70"), ({"patch_size": 0}, "patch_size"),
                         ({"image_std": [1, 0, 1]}, "above 0"), ({"rescale_factor": "x"}, "rescale_factor"),
                         ({"do_convert_rgb": False}, "do_convert_rgb")]:
        with pytest.raises(ImageError, match=message):
            ImageSettings.from_dict(bad, "processor_config.json")
    (tmp_path / "processor_config.json").write_text('{"image_processor": {"max_soft_tokens": 560, "patch_size": 14}}')
    s = ImageSettings.from_folder(tmp_path)
    assert (s.max_soft_tokens, s.patch_size, s.pooling_kernel_size) == (560, 14, 3)
    assert ImageSettings.from_folder(tmp_path / "..").max_soft_tokens == 280  # no config: the defaults
    assert s.with_soft_tokens(70).max_soft_tokens == 70
    with pytest.raises(ImageError, match="one of"):
        s.with_soft_tokens(71)


def test_a_thin_image_past_the_towers_position_table_is_refused():
    # the fixture tower's table holds 96 positions a side; a 4000x1 strip would need 210 patches across
    s = ImageSettings(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3, max_position=96)
    with pytest.raises(ImageError, match="too elongated.*crop it"):
        preprocess(load_image(_arr(1, 4000)), s)
    assert preprocess(load_image(_arr(1, 4000)), ImageSettings(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)) \
        .positions[:, 0].max() == 209  # the processor alone would take it
    assert preprocess(load_image(_arr(40, 300)), s).positions[:, 0].max() < 96
