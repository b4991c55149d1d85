"""What the untrusted-input tests share: one-line errors, a checkpoint copy to edit, a JSON edit."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def one_line(e) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert msg and "\n" not in msg, msg
    return msg


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """The checkpoint's small JSON files copied (to edit), its weights hard-linked where the file
    system allows (a symlink out of the folder is refused: dgport reads only files inside it)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".json" or f.suffix == ".jinja":
            shutil.copy2(f, dst / f.name)
        else:
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)
    return dst


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    data = change(data) or data
    path.write_text(json.dumps(data))


def text_config_edit(key, value):
    """An edit_json change setting config.json's text_config[key]."""
    return lambda c: c["text_config"].__setitem__(key, value)
