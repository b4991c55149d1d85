"""Read a Hugging Face DiffusionGemma checkpoint folder: config, generation config, tokenizer files
and safetensors weights (never pickle), and check every tensor the text model needs."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dgport import safe_files
from dgport.config import GenerationDefaults, TextConfig
from dgport.errors import CheckpointError
from dgport.vision_config import VisionInfo, expected_vision_tensors, read_vision

from .safetensors_np import FLOAT_DTYPES, SafetensorsFile

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

DEC = "model.decoder."
ENC_SCALAR = "model.encoder.language_model.layers.{i}.layer_scalar"


def expected_tensors(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Every text-model tensor name (as transformers saves it) with its shape."""
    H, I, E, M = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.moe_intermediate_size
    t = {
        f"{DEC}embed_tokens.weight": (cfg.vocab_size, H),
        f"{DEC}norm.weight": (H,),
        f"{DEC}self_conditioning.pre_norm.weight": (H,),
        f"{DEC}self_conditioning.gate_proj.weight": (I, H),
        f"{DEC}self_conditioning.up_proj.weight": (I, H),
        f"{DEC}self_conditioning.down_proj.weight": (H, I),
    }
    for i in range(cfg.num_layers):
        d, kv, p = cfg.head_dims[i], cfg.kv_heads[i], f"{DEC}layers.{i}."
        t[f"{p}self_attn.q_proj.weight"] = (cfg.num_heads * d, H)
        t[f"{p}self_attn.k_proj.weight"] = (kv * d, H)
        if cfg.is_sliding(i):
            t[f"{p}self_attn.v_proj.weight"] = (kv * d, H)
        t[f"{p}self_attn.o_proj.weight"] = (H, cfg.num_heads * d)
        t[f"{p}self_attn.q_norm.weight"] = (d,)
        t[f"{p}self_attn.k_norm.weight"] = (d,)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "pre_feedforward_layernorm_2",
                     "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"):
            t[f"{p}{norm}.weight"] = (H,)
        t[f"{p}mlp.gate_proj.weight"] = (I, H)
        t[f"{p}mlp.up_proj.weight"] = (I, H)
        t[f"{p}mlp.down_proj.weight"] = (H, I)
        t[f"{p}router.proj.weight"] = (E, H)
        t[f"{p}router.scale"] = (H,)
        t[f"{p}router.per_expert_scale"] = (E,)
        t[f"{p}experts.gate_up_proj"] = (E, 2 * M, H)
        t[f"{p}experts.down_proj"] = (E, H, M)
        t[f"{p}layer_scalar"] = (1,)
        t[ENC_SCALAR.format(i=i)] = (1,)
    return t


FIX = "replace it with the checkpoint's own file"
FINITE_CHUNK = 1 << 22  # elements checked at a time: bounded scratch memory for any tensor
# bits of an IEEE float's exponent field: all set means inf or NaN
EXPONENT_MASK = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}


def _read_json(path: Path, root: Path):
    return safe_files.read_json(path, root, CheckpointError, FIX)


def first_non_finite(t: np.ndarray) -> int | None:
    """Flat index of the first NaN or infinity in float tensor `t` (any of F16/BF16/F32/F64), or None.
    Streams through it in chunks on the raw bits (bf16's exponent field is fp32's)."""
    flat = np.ascontiguousarray(t).reshape(-1)
    if t.dtype == np.dtype(np.float16):
        uint, mask = EXPONENT_MASK[2]
    elif t.dtype.itemsize == 2:  # bfloat16
        uint, mask = np.uint16, 0x7F80
    else:
        uint, mask = EXPONENT_MASK[t.dtype.itemsize]
    bits = flat.view(uint)
    mask = uint(mask)
    for i in range(0, bits.size, FINITE_CHUNK):
        bad = (bits[i:i + FINITE_CHUNK] & mask) == mask
        if bad.any():
            return i + int(np.argmax(bad))
    return None


@dataclass
class Checkpoint:
    path: Path
    config: TextConfig
    generation: GenerationDefaults
    raw_config: dict
    tokenizer_files: list[Path]
    _files: dict[str, SafetensorsFile] = field(repr=False)
    root: Path | None = None  # the folder its files really lie in (safe_files.model_root)
    _finite: set = field(default_factory=set, repr=False)
    vision: "VisionInfo | None" = None  # the vision tower (None: a text-only checkpoint, or read text-only)

    def tensor(self, name: str) -> np.ndarray:
        """A text-model tensor by its transformers name, as stored (bf16 via ml_dtypes; memory-mapped).
        The first read of each tensor checks every value is finite (a NaN or infinity would be
        exported silently and turn every answer into garbage)."""
        f = self._files[name]
        t = f.tensor(name)
        if name not in self._finite:
            bad = first_non_finite(t)
            if bad is not None:
                value = t.reshape(-1)[bad]
                raise CheckpointError(f"{f.path}: tensor {name} holds NaN or infinite values ({value} at flat index "
                                      f"{bad}); the checkpoint is damaged: download or save it again")
            self._finite.add(name)
        return t

    def dtype(self, name: str) -> np.dtype:
        return self._files[name].dtype(name)

    def close(self) -> None:
        """Unmap the weight files: their pages count as this process's memory until then (a 52 GB
        checkpoint's worth after an export has read every tensor). `tensor` maps them again."""
        for f in self._files.values():
            f.close()

    @property
    def names(self) -> list[str]:
        return list(expected_tensors(self.config))

    def fingerprint(self) -> str:
        """sha256 over config.json and every safetensors header: identifies the source cheaply."""
        h = hashlib.sha256(safe_files.read_bytes(self.path / "config.json", self.root or self.path, CheckpointError, FIX))
        for f in sorted({id(f): f for f in self._files.values()}.values(), key=lambda f: f.path.name):
            h.update(f.header_bytes)
        return h.hexdigest()


def read_config(path: Path) -> tuple[TextConfig, GenerationDefaults, dict]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder; give the path of a Hugging Face DiffusionGemma checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder; give the checkpoint folder, not a file in it")
    root = safe_files.model_root(path)
    cfg_path = path / "config.json"
    if not os.path.lexists(cfg_path):
        raise CheckpointError(f"{cfg_path}: missing; a Hugging Face checkpoint folder has a config.json")
    raw = _read_json(cfg_path, root)
    text = TextConfig.from_hf(raw, where=str(cfg_path))
    gen_path = path / "generation_config.json"
    gen = _read_json(gen_path, root) if os.path.lexists(gen_path) else {}
    return text, GenerationDefaults.from_hf(gen, text, raw.get("eos_token_id")), raw


def weight_files(path: Path) -> list[Path]:
    """The safetensors files holding the weights, chosen as transformers' from_pretrained(...,
    use_safetensors=True) chooses them (model.safetensors, else the shards its index names), so the
    export and the torch reference read the same tensors. Other *.safetensors names only when neither
    exists (transformers cannot load those; `transformers_loadable` says so)."""
    single, index_path = path / SAFETENSORS_SINGLE, path / SAFETENSORS_INDEX
    if os.path.lexists(single):  # whatever it is: the reader checks it is a regular file inside the folder
        return [single]
    if not os.path.lexists(index_path):
        return sorted(path.glob("*.safetensors"))
    index = _read_json(index_path, safe_files.model_root(path))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: no weight_map of tensor name -> shard file; re-save the checkpoint")
    names = sorted(set(weight_map.values()))
    bad = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
    if bad:
        raise CheckpointError(f"{index_path}: shard {bad[0]!r} is not a .safetensors file in the checkpoint folder")
    missing = [n for n in names if not os.path.lexists(path / n)]
    if missing:
        raise CheckpointError(f"{index_path}: shard {missing[0]} is missing"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; download it again")
    return [path / n for n in names]


def transformers_loadable(path: Path) -> bool:
    """Whether from_pretrained(path, use_safetensors=True) finds the weights read_checkpoint reads."""
    return (path / SAFETENSORS_SINGLE).is_file() or (path / SAFETENSORS_INDEX).is_file()


def read_checkpoint(path, vision: bool = True) -> Checkpoint:
    """Open and validate a checkpoint folder. Tensors are memory-mapped, not loaded. `vision=False`
    ignores a vision tower (text-only exports)."""
    path = Path(path)
    text, gen, raw = read_config(path)
    st = weight_files(path)
    if not st:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{path}: only pickle weights ({', '.join(pickles)}); dgport never unpickles. Convert them with "
                "`model.save_pretrained(dir, safe_serialization=True)` and export that folder"
            )
        raise CheckpointError(f"{path}: no *.safetensors weights found")
    root = safe_files.model_root(path)
    files: dict[str, SafetensorsFile] = {}
    for p in st:
        f = SafetensorsFile(p, root)
        for name in f.names:
            files[name] = f
    for name in expected_tensors(text):
        if name in files and files[name].dtype_name(name) not in FLOAT_DTYPES:
            raise CheckpointError(f"{files[name].path}: tensor {name} is stored as {files[name].dtype_name(name)}; the "
                                  f"model needs floating-point weights ({', '.join(FLOAT_DTYPES)}): save the "
                                  "checkpoint again from its float weights")
    problems = []
    for name, shape in expected_tensors(text).items():
        if name not in files:
            problems.append(f"missing tensor {name} {list(shape)}")
        elif files[name].shape(name) != shape:
            problems.append(f"tensor {name} has shape {list(files[name].shape(name))}, expected {list(shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{path}: {'; '.join(problems[:3])}{more}; the weights do not match config.json")
    info = read_vision(raw, path, text.hidden_size, text.vocab_size, files, str(path / "config.json")) \
        if vision else None
    if info is not None:
        for name, shape in expected_vision_tensors(info.config).items():
            if name not in files:
                problems.append(f"missing tensor {name} {list(shape)}")
            elif files[name].shape(name) != shape:
                problems.append(f"tensor {name} has shape {list(files[name].shape(name))}, expected {list(shape)}")
            elif files[name].dtype_name(name) not in FLOAT_DTYPES:
                problems.append(f"tensor {name} is stored as {files[name].dtype_name(name)}, not as floats")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CheckpointError(f"{path}: vision tower: {'; '.join(problems[:3])}{more}; the weights do not match "
                                  "config.json's vision_config (export with --text-only to leave images out)")
    tok = [path / n for n in TOKENIZER_FILES if os.path.lexists(path / n)]
    if not os.path.lexists(path / "tokenizer.json"):
        raise CheckpointError(f"{path / 'tokenizer.json'}: missing; dgport needs the checkpoint's tokenizer.json")
    for p in tok:  # read later (the export copies them, the tokenizer reads them): refused now, not half-way
        safe_files.check(p, root, CheckpointError, FIX)
    return Checkpoint(path, text, gen, raw, tok, files, root, vision=info)
