"""MODEL -> the folder a backend opens.

MODEL may be a dgport export folder (used as is), a Hugging Face checkpoint folder (exported once
into dgport's cache, keyed by checkpoint fingerprint, format, dtype and quantization, then reused),
or a Hugging Face Hub id such as `google/diffusiongemma-26B-A4B-it` (its safetensors, configs and
tokenizer files fetched with huggingface_hub into the Hugging Face cache, then as a checkpoint
folder). `HF_HOME` / `HF_HUB_CACHE` choose the Hub cache and `HF_HUB_OFFLINE=1` forbids downloads."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from . import safe_files
from .errors import CheckpointError, DgportError, ExportError
from .manifest import BACKEND_FORMAT, CACHE_REVISION, FORMAT_VERSION, MANIFEST

# What a DiffusionGemma checkpoint needs from a Hub repo: never pickles, never other large files.
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "tokenizer.model"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_TRUE = {"1", "on", "yes", "true"}
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub_id(text: str) -> bool:
    """'owner/name' as the Hub spells repo ids (no '..', no leading or trailing '.' or '-')."""
    return bool(_HUB_ID.match(text)) and ".." not in text and not any(
        part.endswith((".", "-")) for part in text.split("/"))


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> Path:
    """The Hugging Face cache as huggingface_hub documents it, read at call time (its own constants
    are read once at import): HF_HUB_CACHE, else HF_HOME/hub, else XDG_CACHE_HOME/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_config(repo_id: str) -> Path:
    """A Hub model's config.json alone, fetched into the Hugging Face cache unless it is there (for
    `export --plan`: planning the 26B-A4B needs no download of its weights)."""
    return hub_snapshot(repo_id, ["config.json"]) / "config.json"


def hub_snapshot(repo_id: str, patterns: list[str] = HUB_PATTERNS) -> Path:
    """The local snapshot folder of a Hub model repo (the files `patterns` match), downloading what
    is missing unless offline."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:
        raise DgportError(f"{repo_id}: fetching a model by Hugging Face id needs huggingface_hub: "
                          "pip install 'dgport[serve]' (or give a local folder)") from e
    offline = hub_offline()
    cache = hub_cache_dir()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = cached_commit(repo_dir)  # checked before huggingface_hub reads refs/main as a path component
    try:
        # offline, the checked commit is passed on: huggingface_hub then never reads refs/main itself
        path = snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache, local_files_only=offline,
                                 **({"revision": commit} if offline and commit else {}))
    except LocalEntryNotFoundError as e:
        if offline:
            raise DgportError(f"{repo_id}: not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set; "
                              "download it once online (unset HF_HUB_OFFLINE), point HF_HOME at a cache that "
                              "has it, or give a local folder") from e
        raise DgportError(f"{repo_id}: cannot reach the Hugging Face Hub and the model is not in {cache}; "
                          "check the connection or give a local folder") from e
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        raise DgportError(f"{repo_id}: the Hugging Face Hub refused it (HTTP {status}): no such model, or it is "
                          "gated (accept its licence and `hf auth login`)") from e
    except (OSError, ValueError) as e:
        raise DgportError(f"{repo_id}: fetching from the Hugging Face Hub failed ({e.__class__.__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from e
    path = Path(path)
    real, snapshots = Path(os.path.realpath(path)), Path(os.path.realpath(repo_dir / "snapshots"))
    if real.parent != snapshots or not _COMMIT.match(real.name):
        raise DgportError(f"{path}: the snapshot of {repo_id} lies outside the Hugging Face cache folder "
                          f"{repo_dir / 'snapshots'}; delete {repo_dir} and download it again")
    return path


def cached_commit(repo_dir: Path) -> str | None:
    """The commit `refs/main` of a Hub cache repo folder names, refused unless it is a commit hash
    (40 hex characters): the file is text from the cache, and huggingface_hub uses it as a folder name."""
    ref = repo_dir / "refs" / "main"
    if not os.path.lexists(ref):
        return None
    fix = f"delete {repo_dir} and download the model again"
    text = safe_files.read_bytes(ref, Path(os.path.realpath(repo_dir)), DgportError, fix, cap=safe_files.REF_CAP)
    commit = text.decode("ascii", errors="replace").strip()
    if not _COMMIT.match(commit):
        raise DgportError(f"{ref}: {commit[:60]!r} is not a commit hash (40 hex characters); {fix}")
    return commit


def resolve_checkpoint(model) -> Path:
    """A Hugging Face checkpoint folder for MODEL (a folder, or a Hub id fetched into the Hub cache)."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        return path
    if is_hub_id(text):
        return hub_snapshot(text)
    raise CheckpointError(f"{text}: no such folder, and not a Hugging Face Hub id (owner/name)")


def cached_export_path(checkpoint, backend: str, dtype: str = "fp32", quantize: int | None = None) -> Path:
    """dgport's cache folder for this checkpoint's export: keyed by the checkpoint's fingerprint (config
    and weight headers), its generation config and tokenizer files (a changed chat template must not
    reuse an older export), format, dtype and quantization."""
    from .default_model import cache_dir
    from .exporters.checkpoint import TOKENIZER_FILES, read_checkpoint

    folder = Path(checkpoint)
    ckpt = read_checkpoint(folder)
    root = safe_files.model_root(folder)
    h = hashlib.sha256(ckpt.fingerprint().encode())
    for name in ("generation_config.json", *TOKENIZER_FILES):
        p = folder / name
        h.update(name.encode() + b"\0")
        if os.path.lexists(p):
            safe_files.hash_into(h, p, root, CheckpointError)
        h.update(b"\0")
    fmt = BACKEND_FORMAT[backend]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", _model_name(folder))[:60].strip(".-") or "model"
    quant = f"int{quantize}" if quantize else "none"
    return cache_dir() / "exports" / f"{name}-{h.hexdigest()[:12]}-{fmt}-{dtype}-{quant}-v{FORMAT_VERSION}{CACHE_REVISION}"


def _model_name(folder: Path) -> str:
    """The repo name for a Hub snapshot (.../models--owner--name/snapshots/<commit>), else the folder's."""
    parts = folder.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].split("--")[-1]
    return folder.resolve().name


def resolve_model(model, backend: str, dtype: str = "fp32", quantize: int | None = None) -> Path:
    """The folder `dgport.load(..., backend=backend)` opens for MODEL: an export folder as is; a
    checkpoint (folder or Hub id) exported once into dgport's cache (or as is for backend torch)."""
    text = str(model)
    path = Path(text).expanduser()
    if path.exists() and (path / MANIFEST).exists():
        if backend == "torch":
            raise DgportError(f"{path}: a dgport export; --backend torch runs a Hugging Face checkpoint folder")
        return path
    if path.exists() and not (path / "config.json").exists():
        raise ExportError(f"{path}: neither a dgport export (not a dgport export, no {MANIFEST}) nor a Hugging "
                          "Face checkpoint (no config.json); give an export folder or a checkpoint folder")
    checkpoint = resolve_checkpoint(text)
    if backend == "torch":
        return checkpoint
    from .cache_export import ensure_cached_export

    return ensure_cached_export(checkpoint, cached_export_path(checkpoint, backend, dtype, quantize), backend,
                                what=text, dtype=dtype, quantize=quantize)
