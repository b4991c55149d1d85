"""`dgport export --plan` with a vision tower (exporters/plan_vision.py): the vision graph's weights as the
export writes them (every dtype, quantized exports' 8-bit tower), its activation peak for one image at
max_soft_tokens, and the memory plan of the real 26B-A4B config at each precision."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dgport.exporters.export import ExportOptions, export
from dgport.exporters.plan import plan, plan_mlx

DATA = Path(__file__).parent / "data"
REAL_CONFIG = "diffusiongemma-26B-A4B-it.config.json"


@pytest.fixture
def real(tmp_path):
    (tmp_path / "config.json").write_text((DATA / REAL_CONFIG).read_text())
    return tmp_path


@pytest.mark.parametrize("kind", ["fp32", "bf16", "q8"])
def test_plan_counts_the_vision_graph_as_exported(kind, checkpoints, tmp_path):
    opts = ExportOptions(quantize=8, group_size=32, validate=False) if kind == "q8" else \
        ExportOptions(dtype=kind, validate=False)
    summary = export(checkpoints["vision"], tmp_path / "out", opts)
    entry = json.loads((tmp_path / "out" / "dgport.json").read_text())["formats"]["onnx"]
    index = entry["weights"]["tensors"]
    stored = sum(index[n]["nbytes"] for n in entry["vision_graph"]["weights"])
    p = plan(checkpoints["vision"], opts)
    assert p["vision"]["weights_bytes"] == stored  # byte for byte what vision.onnx reads
    assert p["vision"]["stored"] == len(entry["vision_graph"]["weights"])
    actual = summary.files["weights.bin"]
    assert p["weights_bytes"] <= actual <= p["weights_bytes"] + p["padding_max"], (actual, p["weights_bytes"])
    if kind == "q8":  # the tower's linears are int8 in quantized exports
        assert {t["role"] for t in entry["quantized_tensors"].values()} >= {"vision tower"}
    text_only = plan(checkpoints["vision"], ExportOptions(**{**opts.__dict__, "text_only": True}))
    assert text_only["vision"] is None and text_only["weights_bytes"] == p["weights_bytes"] - stored


def test_real_vision_tower_at_each_precision(real):
    layers, D, I, heads, P = 27, 1152, 4304, 16, 2520
    linears = layers * (4 * D * D + 3 * D * I)
    rest = layers * (4 * D + 2 * 72) + D * 3 * 16 ** 2 + 2 * 10240 * D + 2816 * D  # norms, patches, positions, proj
    std = 2 * D  # standardization, fp32 in every export
    want = {"fp32": 4 * (linears + rest + std), "bf16": 2 * (linears + rest) + 4 * std}
    # int8 rows: a byte a weight, an fp32 scale an output column (q/k/v, o, gate/up, down); the rest fp32
    # (in int4 exports too: the tower is never 4-bit)
    columns = layers * (5 * D + 2 * I)
    want["int8"] = want["int4"] = linears + 4 * columns + 4 * (rest + std)
    acts = 2 * heads * P * P * 4 + 10 * P * D * 4
    for label, dtype, bits in (("fp32", "fp32", None), ("bf16", "bf16", None), ("int8", "fp32", 8),
                               ("int4", "fp32", 4)):
        p = plan(real, ExportOptions(dtype=dtype, quantize=bits))
        v = p["vision"]
        assert (v["soft_tokens"], v["patches"]) == (280, P)
        assert v["weights_bytes"] == want[label], label
        assert v["activation_bytes"] == acts
        assert v["image_bytes"] == p["rss_bytes"] + v["resident_bytes"] + acts
        assert v["resident_bytes"] >= v["weights_bytes"] if bits else v["resident_bytes"] == v["weights_bytes"]
    mlx = plan_mlx(real, ExportOptions(quantize=4))
    assert dict(mlx["rows"])["vision tower (mlx/vision.safetensors)"] == want["fp32"]  # MLX never quantizes it


def test_cli_plan_shows_the_vision_graph_and_every_precision(real, tmp_path):
    from click.testing import CliRunner

    from dgport.cli import cli

    r = CliRunner().invoke(cli, ["export", str(real), "--plan", "--quantize", "int8"])
    assert r.exit_code == 0, r.output
    out = r.output
    assert "vision tower (vision.onnx)" in out and "280 soft tokens, 2,520 patches" in out
    assert "attention scores + softmax, 2 x 16 x 2,520^2 fp32" in out and "total with an image" in out
    table = out[out.index("At each precision"):].splitlines()[2:6]
    assert [row.split()[0] for row in table] == ["fp32", "bf16", "int8", "int4"]
    assert table[0].split()[1:3] == ["103.31", "GB"]  # fp32 weights.bin with the tower
    r = CliRunner().invoke(cli, ["export", str(real), "--plan", "--text-only"])
    assert r.exit_code == 0 and "vision" not in r.output and "with an image" not in r.output, r.output


def test_docs_table_is_the_plan(real):
    """docs/images.md's memory plan of the 26B-A4B is what `--plan` computes today."""
    from dgport.exporters.plan import precisions, size

    text = (Path(__file__).parent.parent / "docs" / "images.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:7]]
            for line in text.splitlines() if line.startswith(("| fp32 |", "| bf16 |", "| int8 |", "| int4 |"))
            and "GB" in line}
    got = {label: [size(q["weights_bytes"]), size(q["vision"]["weights_bytes"]),
                   size(q["vision"]["activation_bytes"]), size(q["rss_bytes"]), size(q["vision"]["image_bytes"])]
           for label, q in precisions(real)}

    def gb(cells):  # the docs round to two decimals in GB
        return [f"{float(c.split()[0]) / (1e3 if c.endswith('MB') else 1):.2f} GB" for c in cells]

    assert set(rows) == {"fp32", "bf16", "int8", "int4"}
    for label in rows:
        assert rows[label] == gb(got[label]), label
