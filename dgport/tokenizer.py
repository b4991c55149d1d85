"""Tokenizer and chat template: `tokenizers` for ids, jinja2 for the checkpoint's own template.

The files are read through dgport.safe_files (inside the model's folder, regular, size-capped) and
the template, which is code from the model's author, runs in jinja2's immutable sandbox with a
work budget per render (dgport.template_budget): calls, loop iterations and outputs are counted,
and every string or list it builds is measured, refused before it is built when it would be too big."""
from __future__ import annotations

import os
from pathlib import Path

import jinja2

from . import safe_files
from . import template_budget as budget
from .errors import DgportError

# The budget of one render (module attributes, read at each render). A real chat template over a long
# conversation takes a few steps per message; see template_budget.py for what is counted.
MAX_TEMPLATE_STEPS = 1_000_000
MAX_TEMPLATE_CHARS = 64 << 20
FIX = "replace it with the model's own file"


class ChatTokenizer:
    def __init__(self, folder, files=None):
        """`files`: the names this folder may be read from (an export's listed, hashed tokenizer
        files); None reads whichever exist (a Hugging Face checkpoint folder)."""
        from tokenizers import Tokenizer

        folder = Path(folder)
        root = safe_files.model_root(folder)

        def usable(name: str) -> bool:
            return (files is None or name in files) and os.path.lexists(folder / name)

        path = folder / "tokenizer.json"
        if not usable("tokenizer.json"):
            raise DgportError(f"{path}: missing; the export or checkpoint must carry its tokenizer.json")
        text = safe_files.read_text(path, root, DgportError, FIX)
        try:
            self.tok = Tokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            raise DgportError(f"{path}: not a readable tokenizer ({str(e).splitlines()[0][:200]}); "
                              "replace it with the checkpoint's tokenizer.json") from None
        cfg_path = folder / "tokenizer_config.json"
        cfg = {}
        if usable("tokenizer_config.json"):
            cfg = safe_files.read_json(cfg_path, root, DgportError, "replace it with the checkpoint's")
            if not isinstance(cfg, dict):
                raise DgportError(f"{cfg_path}: not a JSON object; replace it with the checkpoint's")
        template = cfg.get("chat_template")
        if usable("chat_template.jinja"):
            template = safe_files.read_text(folder / "chat_template.jinja", root, DgportError, FIX)
        if template is not None and not isinstance(template, str):
            raise DgportError(f"{cfg_path}: chat_template is not a string (named templates are not supported)")
        if template is not None and len(template) > safe_files.CAPS["chat_template.jinja"]:
            raise DgportError(f"{cfg_path}: chat_template is over the "
                              f"{safe_files.size_text(safe_files.CAPS['chat_template.jinja'])} cap; {FIX}")
        self.chat_template = template
        self.bos_token = cfg.get("bos_token") or "<bos>"
        if isinstance(self.bos_token, dict):
            self.bos_token = self.bos_token.get("content", "<bos>")
        if not isinstance(self.bos_token, str):
            raise DgportError(f"{cfg_path}: bos_token is not a string")
        self.bos_id = self.tok.token_to_id(self.bos_token)

    def _template(self) -> jinja2.Template:
        """The chat template compiled once (compiling the Sudoku model's took ~20 ms per render)."""
        if getattr(self, "_compiled", None) is None:
            self._compiled = budget.compile_template(self.chat_template)
        return self._compiled

    def render(self, messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = False,
               tools: list[dict] | None = None) -> str:
        """The chat template over `messages`; `tools` (OpenAI's function tools) reach it as its `tools`
        variable, as transformers' apply_chat_template(tools=...) passes them."""
        if not self.chat_template:
            raise DgportError("this model has no chat template; pass raw=True (CLI: --raw) to send the prompt as is")
        extra = {} if tools is None else {"tools": tools}
        return budget.render(self._template(), MAX_TEMPLATE_STEPS, MAX_TEMPLATE_CHARS,
                             messages=messages, add_generation_prompt=add_generation_prompt,
                             enable_thinking=enable_thinking, bos_token=self.bos_token, **extra)

    def encode(self, text: str) -> list[int]:
        """Token ids of text that already carries its special tokens (e.g. a rendered chat)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, in one call (tokenizers releases the GIL for a batch; `encode` holds it)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)] if texts else []

    def encode_raw(self, text: str) -> list[int]:
        """A raw prompt: its ids with <bos> in front (the model expects every sequence to start with it)."""
        ids = self.encode(text)
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.tok.id_to_token(int(token_id)) or ""
