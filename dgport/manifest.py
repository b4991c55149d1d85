"""The export manifest `dgport.json`: what an export folder holds, and the checks `run` makes
before trusting it.

The manifest is untrusted input. `read_manifest` checks it against the schema below (types, ranges,
required keys; one line naming the key path), checks that it was not edited since `dgport export`
wrote it (`manifest_sha256`, a digest of everything else in it: an edited canvas length, window or
weight offset would otherwise run silently wrong), and that every artifact is a relative path to a
regular file inside the export. `verify` then checks each artifact's size and sha256. Every file the
runtime reads (graphs, weights, tokenizer, chat template) is an artifact; the generation defaults
live in the manifest itself."""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, safe_files
from . import schema as S
from .config import GenerationDefaults, TextConfig
from .errors import ExportError
from .vision_config import VisionInfo

MANIFEST = "dgport.json"
# 2: per-graph expert form and weights_as_inputs; cpu_graphs whenever the CPU runs other graphs
# 3: schema-checked; config.max_position_embeddings; manifest_sha256; chat template files listed
FORMAT_VERSION = 3
# dgport's cache of exports is keyed by this too: raised when the graphs gain something a cached export
# of the same format version lacks, so it is exported again (r1: the vocabulary-constraint inputs)
CACHE_REVISION = "r2"  # r2: the vision graph and the encoders' image_embeds input
BACKEND_FORMAT = {"cpu": "onnx", "cuda": "onnx", "mlx": "mlx"}
MAX_MANIFEST_BYTES = safe_files.CAPS[MANIFEST]  # 64 MiB; a real export's manifest is ~1 MB (an entry per tensor)

DTYPES = ("fp32", "fp16", "bf16")
ITEMSIZE = {"fp32": 4, "fp16": 2, "bf16": 2, "uint8": 1, "int8": 1}
QUANT_DTYPES = ("uint8", "uint4", "int8")  # quantized ONNX exports' integer weights (uint4: two a byte; int8: the tower)
MOE_FORMS = ("sparse", "unrolled", "dense", "grouped")
GRAPHS = ("encoder", "denoise_step")
# a graph set is the two graphs, or (quantized exports) one graph that does both: exporters/onnx_graph.build_step
GRAPH_SETS = (GRAPHS, ("step",))
# Files the tokenizer reads when they exist (dgport/tokenizer.py): an export must list every one it holds.
TOKENIZER_READS = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def artifact_entries(folder: Path, files) -> dict[str, dict]:
    """{relative path: {size, sha256}} for files inside `folder`."""
    return {rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)} for rel in files}


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its `manifest_sha256` key, in a canonical JSON form."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(folder: Path, *, source: dict, config: TextConfig, generation: GenerationDefaults,
                   tokenizer_files: list[str], formats: dict[str, dict], vision=None) -> dict:
    """Write dgport.json. Each format entry lists its `files` (relative paths); their sizes and
    checksums are recorded under `artifacts` with the tokenizer files'. `vision` (a VisionInfo): the
    export takes images (every format wrote its vision weights)."""
    files = list(dict.fromkeys(list(tokenizer_files) + [f for entry in formats.values() for f in entry["files"]]))
    manifest = {
        "format_version": FORMAT_VERSION,
        "dgport_version": __version__,
        "source": source,
        "config": config.to_dict(),
        "generation": generation.to_dict(),
        "tokenizer_files": list(tokenizer_files),
        "formats": formats,
        "artifacts": artifact_entries(folder, files),
    }
    if vision is not None:
        manifest["vision"] = vision.to_dict()
    manifest = json.loads(json.dumps(manifest))  # the digest is over what a reader will parse
    manifest["manifest_sha256"] = manifest_digest(manifest)
    validate_manifest(manifest)  # a writer bug is caught here, not by the first `run`
    with safe_files.writing(folder / MANIFEST):
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


# ----------------------------------------------------------------------------------------- schema

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
    q = entry.get("quantization")
    if q is not None:
        p = f"{path}.quantization"
        S.obj(q, p, required=("bits", "group_size"), extra=True)
        S.integer(q["bits"], f"{p}.bits", 4, 8)
        if q["bits"] not in (4, 8):
            raise S.SchemaError(f"{p}.bits", f"{q['bits']} is not 4 or 8")
        S.integer(q["group_size"], f"{p}.group_size", 32, 128)
    return []


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


# ----------------------------------------------------------------------------------------- export

@dataclass
class Export:
    path: Path
    manifest: dict
    _config: TextConfig | None = field(default=None, repr=False)
    _generation: GenerationDefaults | None = field(default=None, repr=False)

    @property
    def config(self) -> TextConfig:
        if self._config is None:
            self._config = TextConfig.from_dict(self.manifest["config"])
        return self._config

    @property
    def generation(self) -> GenerationDefaults:
        if self._generation is None:
            self._generation = GenerationDefaults.from_dict(self.manifest["generation"])
        return self._generation

    @property
    def vision(self) -> VisionInfo | None:
        """The vision tower and image settings (None: the export takes no images)."""
        v = self.manifest.get("vision")
        return None if v is None else VisionInfo.from_dict(v, self.config.vocab_size)

    @property
    def formats(self) -> list[str]:
        return list(self.manifest["formats"])

    @property
    def tokenizer_files(self) -> list[str]:
        return list(self.manifest["tokenizer_files"])

    def format(self, name: str) -> dict:
        return self.manifest["formats"][name]

    def file(self, rel: str) -> Path:
        return self.path / rel

    def check_paths(self) -> None:
        """Every artifact a regular file inside the export (no symlink, device or folder), and no
        file the tokenizer would read left unlisted (an added chat_template.jinja)."""
        root = self.path.resolve()
        for rel in self.manifest["artifacts"]:
            p = self.path / rel
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                raise ExportError(f"{p}: missing; the export is partial. Export again with `dgport export`") from None
            except OSError as e:
                raise ExportError(f"{p}: cannot read it ({e.strerror}); export again") from None
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise ExportError(f"{p}: {kind}; every file of an export must be a regular file inside it. "
                                  "Export again")
            try:
                p.resolve().relative_to(root)
            except ValueError:
                raise ExportError(f"{p}: lies outside the export folder {self.path} (through a linked folder); "
                                  "export again") from None
        for name in TOKENIZER_READS:
            if name not in self.manifest["tokenizer_files"] and os.path.lexists(self.path / name):
                raise ExportError(f"{self.path / name}: not listed in {MANIFEST}, so not checked; a file was added "
                                  "to the export. Remove it or export again")

    def verify(self, checksums: bool = True, use_cache: bool = True) -> None:
        """Every artifact present with its recorded size (and sha256 when `checksums`; with
        `use_cache`, files hashed before and unchanged since are trusted)."""
        self.check_paths()
        root = Path(os.path.realpath(self.path))
        for rel, meta in self.manifest["artifacts"].items():
            p = self.path / rel
            st = safe_files.check(p, root, ExportError, "export again")
            if st.st_size != meta["size"]:
                raise ExportError(f"{p}: size {st.st_size} != {meta['size']} recorded in {MANIFEST}; "
                                  "the file is truncated or was changed. Export again")
            if checksums and not (use_cache and _verified_before(p, st, meta["sha256"])):
                digest, hashed = safe_files.sha256(p, root, ExportError, "export again")
                if digest != meta["sha256"]:
                    raise ExportError(f"{p}: sha256 does not match {MANIFEST}; the file was changed or "
                                      "corrupted. Export again")
                if hashed is not None:  # unchanged while it was read: that version is the one verified
                    _remember_verified(p, hashed, meta["sha256"])


def _stamp_path(path: Path, st: os.stat_result, sha: str) -> Path:
    """The stamp of one verified version of a file. st_ctime_ns is in the key because a user can set
    a file's mtime back after editing it (`touch -d`, os.utime) but not its ctime: any write, and
    setting the mtime itself, moves the ctime to now."""
    from .default_model import cache_dir  # late: default_model imports this module

    key = f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{sha}"
    return cache_dir() / "verified" / hashlib.sha256(key.encode()).hexdigest()


def _verified_before(path: Path, st: os.stat_result, sha: str) -> bool:
    """Checksums of multi-GB weights cost seconds: a file is hashed once, then trusted while its
    path, device, inode, size, mtime and ctime stay the same."""
    return _stamp_path(path, st, sha).exists()


def _remember_verified(path: Path, st: os.stat_result, sha: str) -> None:
    try:
        stamp = _stamp_path(path, st, sha)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()
    except OSError:
        pass  # an unwritable cache only means hashing again next time


def _load(path) -> tuple[Path, dict]:
    """The folder and its parsed manifest, top level checked (version, formats map)."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such folder; create it with `dgport export CHECKPOINT {path}`")
    if not path.is_dir():
        raise ExportError(f"{path}: not a folder; give the folder `dgport export` wrote")
    mpath = path / MANIFEST
    if not os.path.lexists(mpath):
        if (path / "config.json").exists():
            raise ExportError(f"{path}: not a dgport export, no {MANIFEST} (it looks like a Hugging Face checkpoint): "
                              f"export it with `dgport export {path} OUT` and use OUT, or use --backend torch")
        raise ExportError(f"{path}: not a dgport export, no {MANIFEST}; give a folder written by "
                          "`dgport export CHECKPOINT OUT`")
    if not stat.S_ISREG(os.lstat(mpath).st_mode):
        raise ExportError(f"{mpath}: not a regular file; export again")
    data = safe_files.read_bytes(mpath, Path(os.path.realpath(path)), ExportError, "export again",
                                 cap=MAX_MANIFEST_BYTES)
    manifest = safe_files.parse_json(data, mpath, ExportError, "export again", constants=False)
    _checked(mpath, _check_top, manifest)
    return path, manifest


def _checked(mpath: Path, fn, *args):
    try:
        return fn(*args)
    except S.SchemaError as e:
        raise ExportError(f"{mpath}: {e}; export again") from None
    except ExportError as e:
        raise ExportError(f"{mpath}: {e}") from None


def _validated(path: Path, manifest: dict) -> Export:
    config, generation = _checked(path / MANIFEST, validate_manifest, manifest)
    return Export(path, manifest, config, generation)


def read_manifest(path) -> Export:
    """Open an export's manifest, schema-checked (the files themselves are checked by `verify`)."""
    return _validated(*_load(path))


def open_export(path, backend: str | None = None, checksums: bool = True) -> Export:
    """Open and verify an export; with `backend`, also require the format that backend runs."""
    path, manifest = _load(path)
    if backend is not None:
        fmt = BACKEND_FORMAT[backend]
        if fmt not in manifest["formats"]:
            raise ExportError(
                f"{path}: has no {fmt} weights (it holds: {', '.join(manifest['formats']) or 'none'}), which "
                f"--backend {backend} needs; export with `dgport export CHECKPOINT OUT --format {fmt}`")
    export = _validated(path, manifest)
    export.verify(checksums=checksums)
    return export
