"""The schema a manifest (`dgport.json`) must satisfy: types, ranges, required keys, the graph
contract's names, weight offsets that stay inside the weights file and never overlap (but for an
unrolled expert's view of its stacked tensor), and the digest that tells an edited manifest apart.
Every failure is one line naming the key path (`schema.SchemaError`) or an `ExportError`."""
from __future__ import annotations

import hashlib
import json
import math

from . import schema as S
from .config import GenerationDefaults, TextConfig
from .errors import ExportError
from .vision_config import VisionInfo

MANIFEST = "dgport.json"
# 2: per-graph expert form and weights_as_inputs; cpu_graphs whenever the CPU runs other graphs
# 3: schema-checked; config.max_position_embeddings; manifest_sha256; chat template files listed
FORMAT_VERSION = 3
DTYPES = ("fp32", "fp16", "bf16")
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "uint8": 1, "int8": 1}
QUANT_DTYPES = ("uint8", "uint4", "int8")  # quantized ONNX exports' integer weights (uint4: two a byte; int8: the tower)
MOE_FORMS = ("sparse", "unrolled", "dense", "grouped")
GRAPHS = ("encoder", "denoise_step")
# a graph set is the two graphs, or (quantized exports) one graph that does both: exporters/onnx_graph.build_step
GRAPH_SETS = (GRAPHS, ("step",))
# Files the tokenizer reads when they exist (dgport/tokenizer.py): an export must list every one it holds.
TOKENIZER_READS = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its `manifest_sha256` key, in a canonical JSON form."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _sha256(value, path):
    S.string(value, path, max_len=64)
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise S.SchemaError(path, f"{value!r} is not a sha256 hex digest")
    return value


def _file_list(value, path):
    files = S.array(value, path, S.relative_file, max_len=100_000)
    if len(set(files)) != len(files):
        raise S.SchemaError(path, "lists a file twice")
    return files


def _io_list(value, path):
    def one(v, p):
        S.obj(v, p, required=("name", "dtype", "shape"))
        S.string(v["name"], f"{p}.name", max_len=256)
        S.string(v["dtype"], f"{p}.dtype", max_len=64)
        S.array(v["shape"], f"{p}.shape",
                lambda d, q: d if isinstance(d, str) and len(d) <= 64 else S.integer(d, q, 0, 1 << 40), max_len=16)
        return v

    return S.array(value, path, one, max_len=100_000)


def _onnx_weights(value, path, artifacts) -> None:
    S.obj(value, path, required=("file", "tensors"))
    wfile = S.relative_file(value["file"], f"{path}.file")
    size = artifacts[wfile]["size"] if wfile in artifacts else None
    S.obj(value["tensors"], f"{path}.tensors", extra=True)
    spans, views = [], []
    for name, t in value["tensors"].items():
        p = f"{path}.tensors.{name}"
        S.obj(t, p, required=("offset", "nbytes", "dtype", "shape"), optional=("view_of",))
        offset = S.integer(t["offset"], f"{p}.offset", 0, 1 << 50)
        nbytes = S.integer(t["nbytes"], f"{p}.nbytes", 0, 1 << 50)
        dtype = S.string(t["dtype"], f"{p}.dtype", choices=DTYPES + QUANT_DTYPES)
        shape = S.array(t["shape"], f"{p}.shape", lambda d, q: S.integer(d, q, 0, 1 << 40), max_len=8)
        if ((math.prod(shape) + 1) // 2 if dtype == "uint4" else math.prod(shape) * ITEMSIZE[dtype]) != nbytes:
            raise S.SchemaError(f"{p}.nbytes", f"{nbytes} does not match shape {shape} of {dtype}")
        if size is not None and offset + nbytes > size:
            raise S.SchemaError(f"{p}.offset", f"bytes {offset}..{offset + nbytes} lie past the end of {wfile} "
                                               f"({size} bytes)")
        if "view_of" in t:
            views.append((name, S.string(t["view_of"], f"{p}.view_of")))
        else:
            spans.append((offset, offset + nbytes, name))
    for name, parent in views:
        _check_view(value["tensors"], name, parent, f"{path}.tensors.{name}")
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise S.SchemaError(f"{path}.tensors.{b}.offset", f"overlaps tensor {a}")


def _check_view(tensors: dict, name: str, parent: str, p: str) -> None:
    """A view (an unrolled expert's weight) is one whole slice along its parent's first axis."""
    t, par = tensors[name], tensors.get(parent)
    if par is None or "view_of" in par:
        raise S.SchemaError(f"{p}.view_of", f"{parent!r} is not a stored tensor of this weights file")
    k, rest = divmod(t["offset"] - par["offset"], t["nbytes"] or 1)
    if (t["dtype"] != par["dtype"] or list(t["shape"]) != list(par["shape"][1:]) or rest
            or not 0 <= k < (par["shape"][0] if par["shape"] else 0) or t["nbytes"] * par["shape"][0] != par["nbytes"]):
        raise S.SchemaError(f"{p}.offset", f"is not one slice of {parent} along its first axis")


# The graph contract's names (README, DESIGN): the runtime feeds every input and binds every output
# the manifest lists, so a name the graph does not have would fail inside onnxruntime. Extend these
# when the graphs gain an input or output.
GRAPH_IO = {
    "encoder": (("input_ids", "position_ids"), ()),
    "denoise_step": (("canvas_ids", "position_ids", "sc_embeds", "temperature", "uniforms"),
                     ("argmax_ids", "entropy", "sampled_ids", "next_sc_embeds")),
    "step": (("input_ids", "position_ids", "sc_embeds", "temperature", "uniforms", "denoise"),
             ("argmax_ids", "entropy", "sampled_ids", "next_sc_embeds")),
}
GRAPH_IO["vision"] = (("pixel_values", "pixel_position_ids"), ("soft_tokens",))
OPTIONAL_OUTPUTS = {"denoise_step": ("logits",), "step": ("logits",)}
WITH_CACHE_OUT = ("encoder", "step")


def _check_io_names(value, path, graph: str, config: TextConfig) -> None:
    past = [f"past_{kv}_{i}" for i in range(config.num_layers) for kv in ("key", "value")] if graph != "vision" else []
    inputs, outputs = GRAPH_IO[graph]
    want_in = set(inputs) | set(past)
    want_out = set(outputs) | ({f"present_{kv}_{i}" for i in range(config.num_layers) for kv in ("key", "value")}
                               if graph in WITH_CACHE_OUT else set())
    for key, want, optional in (("inputs", want_in, ()), ("outputs", want_out, OPTIONAL_OUTPUTS.get(graph, ()))):
        names = [v["name"] for v in value[key]]
        if len(set(names)) != len(names):
            raise S.SchemaError(f"{path}.{key}", "lists a name twice")
        missing = sorted(want - set(names))
        extra = sorted(set(names) - want - set(optional))
        if missing or extra:
            raise S.SchemaError(f"{path}.{key}", f"{'missing ' + missing[0] if missing else 'unknown ' + extra[0]} "
                                                 f"(the {graph} graph contract for {config.num_layers} layers)")


def _onnx_graph(value, path, tensors) -> None:
    # known keys are checked; others are allowed inside format entries, so an exporter can add
    # descriptive keys without breaking readers of the same format version
    S.obj(value, path, required=("file", "weights", "weights_as_inputs", "inputs", "outputs"), extra=True)
    S.relative_file(value["file"], f"{path}.file")
    for i, w in enumerate(S.array(value["weights"], f"{path}.weights", max_len=1_000_000)):
        if not isinstance(w, str) or w not in tensors:
            raise S.SchemaError(f"{path}.weights[{i}]", f"{w!r} is not in weights.tensors")
    S.boolean(value["weights_as_inputs"], f"{path}.weights_as_inputs")
    if "moe" in value:
        S.string(value["moe"], f"{path}.moe", choices=MOE_FORMS)
    _io_list(value["inputs"], f"{path}.inputs")
    _io_list(value["outputs"], f"{path}.outputs")


def _onnx_entry(entry, path, artifacts, config: TextConfig) -> list[str]:
    """Checks an onnx format entry; returns every file it names."""
    # unknown extra keys are allowed in format entries (see _onnx_graph); known ones are strict
    S.obj(entry, path, required=("files", "dtype", "weights", "graphs"), extra=True)
    S.string(entry["dtype"], f"{path}.dtype", choices=DTYPES)
    for key in ("with_logits", "rows"):
        if key in entry:
            S.boolean(entry[key], f"{path}.{key}")
    if "opset" in entry:
        S.integer(entry["opset"], f"{path}.opset", 1, 1000)
    for key in ("attention", "builder", "kv_layout", "cpu_note"):
        if key in entry:
            S.string(entry[key], f"{path}.{key}")
    if "moe" in entry:
        S.obj(entry["moe"], f"{path}.moe", extra=True)
        for dev, forms in entry["moe"].items():
            S.obj(forms, f"{path}.moe.{dev}", extra=True)
            for g, form in forms.items():
                S.string(form, f"{path}.moe.{dev}.{g}", choices=MOE_FORMS)
    if entry.get("quantization") is not None:  # null: not quantized
        _quantization(entry["quantization"], f"{path}.quantization")
    _onnx_weights(entry["weights"], f"{path}.weights", artifacts)
    named = [entry["weights"]["file"]]
    if "vision_graph" in entry:
        _onnx_graph(entry["vision_graph"], f"{path}.vision_graph", entry["weights"]["tensors"])
        _check_io_names(entry["vision_graph"], f"{path}.vision_graph", "vision", config)
        named.append(entry["vision_graph"]["file"])
    for key in ("graphs", "cpu_graphs"):
        if key == "cpu_graphs" and key not in entry:
            continue
        S.obj(entry[key], f"{path}.{key}", extra=True)
        found = [gs for gs in GRAPH_SETS if set(entry[key]) == set(gs)]
        if not found:
            raise S.SchemaError(f"{path}.{key}", f"holds {sorted(entry[key])}; a graph set is "
                                                 + " or ".join("+".join(gs) for gs in GRAPH_SETS))
        for g in found[0]:
            _onnx_graph(entry[key][g], f"{path}.{key}.{g}", entry["weights"]["tensors"])
            _check_io_names(entry[key][g], f"{path}.{key}.{g}", g, config)
            named.append(entry[key][g]["file"])
    return named


def _mlx_entry(entry, path, artifacts, config: TextConfig) -> list[str]:
    S.obj(entry, path, required=("files", "layout", "dtype"), optional=("quantization",), extra=True)
    S.string(entry["layout"], f"{path}.layout", max_len=64)
    S.string(entry["dtype"], f"{path}.dtype", choices=DTYPES)
    if entry.get("quantization") is not None:  # null: not quantized
        _quantization(entry["quantization"], f"{path}.quantization")
    return []


def _bits(value, path: str) -> None:
    S.integer(value, path, 4, 8)
    if value not in (4, 8):
        raise S.SchemaError(path, f"{value} is not 4 or 8")


def _quantization(q, p: str) -> None:
    """A quantized format's record: its bits, group size and (ONNX) each role's bits, which the ONNX
    backend reads to check the CPU's int8 products (runtimes/int8_check.py)."""
    S.obj(q, p, required=("bits", "group_size"), extra=True)
    _bits(q["bits"], f"{p}.bits")
    S.integer(q["group_size"], f"{p}.group_size", 32, 128)
    if "roles" in q:
        S.obj(q["roles"], f"{p}.roles", extra=True)
        for role, r in q["roles"].items():
            S.obj(r, f"{p}.roles.{role}", required=("bits",), extra=True)
            _bits(r["bits"], f"{p}.roles.{role}.bits")


FORMAT_ENTRIES = {"onnx": _onnx_entry, "mlx": _mlx_entry}


def _check_top(manifest) -> None:
    """What every reader needs before looking at a format: the object, the version, the formats map."""
    S.obj(manifest, "", required=("format_version",), extra=True)
    version = manifest["format_version"]
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ExportError(f"export format version {version!r}, this dgport reads version {FORMAT_VERSION}; "
                          "export again with this dgport")
    S.obj(manifest, "", required=("format_version", "dgport_version", "source", "config", "generation",
                                  "tokenizer_files", "formats", "artifacts", "manifest_sha256"), optional=("vision",))
    S.obj(manifest["formats"], "formats", extra=True)
    for name in manifest["formats"]:
        if name not in FORMAT_ENTRIES:
            raise S.SchemaError(f"formats.{name}", f"unknown format (this dgport reads {', '.join(FORMAT_ENTRIES)})")
        S.obj(manifest["formats"][name], f"formats.{name}", extra=True)


def validate_manifest(manifest) -> tuple[TextConfig, GenerationDefaults]:
    """The whole manifest against the schema; SchemaError (path: problem) or ExportError on the first
    problem. Returns the parsed config and generation defaults."""
    _check_top(manifest)
    S.string(manifest["dgport_version"], "dgport_version", max_len=64)
    S.obj(manifest["source"], "source", required=("path", "fingerprint"))
    S.string(manifest["source"]["path"], "source.path")
    S.string(manifest["source"]["fingerprint"], "source.fingerprint", max_len=128)
    config = TextConfig.from_dict(manifest["config"], "config")
    generation = GenerationDefaults.from_dict(manifest["generation"], "generation")
    for i, e in enumerate(generation.eos_token_ids):
        S.integer(e, f"generation.eos_token_ids[{i}]", 0, config.vocab_size - 1)
    S.integer(generation.pad_token_id, "generation.pad_token_id", 0, config.vocab_size - 1)
    if "vision" in manifest:
        vision = VisionInfo.from_dict(manifest["vision"], config.vocab_size)
        if vision.config.text_hidden_size != config.hidden_size:
            raise S.SchemaError("vision.config.text_hidden_size", f"{vision.config.text_hidden_size} is not the "
                                                                  f"text width {config.hidden_size}")
        for name, entry in manifest["formats"].items():
            if name == "onnx" and "vision_graph" not in entry or name == "mlx" and entry.get("vision") is not True:
                raise S.SchemaError(f"formats.{name}", "has no vision weights, but the export takes images")

    artifacts = S.obj(manifest["artifacts"], "artifacts", extra=True)
    for rel, meta in artifacts.items():
        S.relative_file(rel, f"artifacts.{rel}")
        if rel == MANIFEST:
            raise S.SchemaError(f"artifacts.{rel}", "the manifest cannot list itself")
        S.obj(meta, f"artifacts.{rel}", required=("size", "sha256"))
        S.integer(meta["size"], f"artifacts.{rel}.size", 0, 1 << 50)
        _sha256(meta["sha256"], f"artifacts.{rel}.sha256")

    tok = _file_list(manifest["tokenizer_files"], "tokenizer_files")
    if "tokenizer.json" not in tok:
        raise S.SchemaError("tokenizer_files", "does not list tokenizer.json")
    listed = {f"tokenizer_files[{i}]": f for i, f in enumerate(tok)}
    in_formats = set()
    for name, entry in manifest["formats"].items():
        path = f"formats.{name}"
        files = _file_list(entry.get("files"), f"{path}.files")
        in_formats |= set(files)
        listed |= {f"{path}.files[{i}]": f for i, f in enumerate(files)}
        for f in FORMAT_ENTRIES[name](entry, path, artifacts, config):
            if f not in files:
                raise S.SchemaError(path, f"names {f!r}, which is not in its files")
    for where, rel in listed.items():
        if rel not in artifacts:
            raise S.SchemaError(where, f"{rel!r} has no size and sha256 under artifacts")
    unlisted = sorted(set(artifacts) - set(tok) - in_formats)
    if unlisted:
        raise S.SchemaError(f"artifacts.{unlisted[0]}", "belongs to no format and is not a tokenizer file")
    # last, so a value out of range is reported by its key rather than as an edit
    if _sha256(manifest["manifest_sha256"], "manifest_sha256") != manifest_digest(manifest):
        raise ExportError("edited after `dgport export` wrote it (its manifest_sha256 does not match its "
                          "contents); an edited config or weight index would run silently wrong. Export again")
    return config, generation
