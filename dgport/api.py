"""Python API: `dgport.load(path, backend=...)` returns a Generator over any backend."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backend import Backend
from .canvas_template import Layout, Template, TemplateError
from .config import GenerationDefaults
from .errors import BackendUnavailable, DgportError
from .loop import (ENCODE_CHUNK, CanvasEvent, StepEvent, check_context, check_encode_chunk,
                   fresh_seed, generate_ids, make_rng)
from .schema import is_int, utf8_text
from .tokenizer import ChatTokenizer

BACKENDS = ("cpu", "cuda", "mlx", "torch")


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # per batch row: whole canvases after the prompt, PAD after the first EOS
    texts: list[str]
    steps_per_canvas: list[int]
    tokens_per_forward: float
    prompt_ids: list[int] = field(default_factory=list)
    finished: bool = False  # stopped on an EOS id
    seed: int | None = None  # the seed of the run (drawn fresh when none was given); None when `rng` was
    hole_texts: list[list[str]] | None = None  # per batch row, with a template: each hole's text
    parsed: object = None  # with json_schema: the answer's JSON value (it always parses and validates)
    tool_calls: list | None = None  # with tools: the calls the answer made (dgport.tool_calls.ToolCall)

    @property
    def text(self) -> str:
        return self.texts[0]

    @property
    def holes(self) -> list[str] | None:
        """With a canvas template: the text the model wrote in each hole, in order (None without one)."""
        return None if self.hole_texts is None else self.hole_texts[0]


class Generator:
    def __init__(self, backend: Backend, tokenizer: ChatTokenizer, defaults: GenerationDefaults):
        self.backend = backend
        self.tokenizer = tokenizer
        self.defaults = defaults

    @property
    def config(self):
        return self.backend.config

    def prompt_ids(self, prompt, raw: bool = False, system: str | None = None, think: bool = False,
                   tools: list[dict] | None = None) -> list[int]:
        """Token ids for a prompt: a list of ids is used as is; a string gets the chat template
        (or only <bos> with raw=True); a list of messages (OpenAI's dicts: role, content, tool_calls,
        tool_call_id) is the conversation. `tools` reach the chat template (dgport.tool_calls)."""
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            from .tool_calls import chat_messages

            if raw:
                raise DgportError("a list of messages is rendered by the chat template; drop raw")
            for i, m in enumerate(prompt):
                content = m.get("content") or ""
                if m.get("role") not in ("system", "user", "assistant", "tool") or not isinstance(content, (str, list)):
                    raise DgportError(f"messages[{i}]: a role (system, user, assistant, tool) and text content "
                                      "(or a list of text and image parts)")
                if isinstance(content, list) and any(not isinstance(p, dict) or p.get("type") != "text" and
                                                     p != {"type": "image"} for p in content):
                    raise DgportError(f"messages[{i}]: image parts need images (generate(..., images=) or parts "
                                      "with their image)")
            messages = ([{"role": "system", "content": system}] if system else []) + chat_messages(prompt)
            return self.tokenizer.encode(self.tokenizer.render(messages, enable_thinking=think, tools=tools))
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DgportError("the prompt is empty; give some text")
            utf8_text(prompt, "the prompt")
            if system is not None:
                utf8_text(system, "the system prompt")
            if raw:
                return self.tokenizer.encode_raw(prompt)
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            return self.tokenizer.encode(self.tokenizer.render(messages, enable_thinking=think, tools=tools))
        arr = np.asarray(prompt)
        if arr.dtype.kind not in "iu" and arr.size:
            raise DgportError(f"the prompt is a string or a list of integer token ids (got {arr.dtype} values)")
        ids = [int(i) for i in arr.reshape(-1)]
        if not ids:
            raise DgportError("the prompt is empty; give at least one token id")
        return ids

    def settings(self, max_new_tokens=None, **sampler_overrides) -> GenerationDefaults:
        return self.defaults.with_overrides(max_new_tokens=max_new_tokens, **sampler_overrides)

    def generate(self, prompt, max_new_tokens: int | None = None, seed: int | None = None,
                 rng: np.random.Generator | None = None, raw: bool = False, system: str | None = None,
                 think: bool = False, on_step=None, on_canvas=None, keep_cache: bool = False,
                 encode_chunk: int = ENCODE_CHUNK, template=None, json_schema=None, tools=None, tool_choice=None,
                 parallel_tool_calls=None, images=None, max_soft_tokens: int | None = None,
                 **sampler_overrides) -> GenerationResult:
        """Generate after `prompt` (string or token ids). `rng` (a numpy Generator) wins over `seed`;
        with neither, a fresh seed is drawn and returned as the result's `seed`. Sampler settings (max_denoising_steps, entropy_bound, t_min,
        t_max, stability_threshold, confidence_threshold, eos_token_ids, pad_token_id) override the
        checkpoint's generation defaults. `keep_cache=True` continues after what is already encoded.
        `encode_chunk`: prompt tokens per encode call (bounds the encoder's attention memory).
        `template`: a dgport.Template (or its list of parts, or its Layout: already tokenized) the answer
        must follow: its text is fixed in the canvas, its holes are filled; max_new_tokens defaults to
        the canvases it spans. `json_schema` (a dict or its JSON text, the subset in
        docs/structured-output.md): the answer is JSON valid against it (compiled into a template with
        constrained holes), its value on the result's `parsed`. `tools` (OpenAI's function tools, rendered
        by the chat template), `tool_choice` ("auto", "none", "required", {"type": "function", "function":
        {"name": ...}}: a forced call, by a template) and `parallel_tool_calls` (False: the first call
        only): the result's `tool_calls` are the calls the answer made, its `text` the rest
        (docs/structured-output.md). `images` (paths, bytes, PIL images, HxWx3 uint8 arrays) go before the
        text of a string prompt's user turn; messages carry theirs as content parts ({"type": "image",
        "image": ...} or OpenAI's image_url with a data: URL); `max_soft_tokens` (70, 140, 280, 560, 1120;
        default the checkpoint's) sets each image's detail (docs/images.md)."""
        if json_schema is not None:
            template = schema_template(json_schema, template)
        calls = None
        if tools is not None or tool_choice is not None or parallel_tool_calls is not None:
            calls, template = self._tools(tools, tool_choice, parallel_tool_calls, template, raw, think)
        prompt, pimg = self.prompt_images(prompt, images, max_soft_tokens, raw)
        ids, settings, rng, seed, layout = self._prepare(prompt, max_new_tokens, seed, rng, raw, system, think,
                                                         template, sampler_overrides,
                                                         None if calls is None else calls["tools"], pimg)
        check_encode_chunk(encode_chunk)
        check_context(self.config, self.backend.cache_len if keep_cache else 0, len(ids), settings.max_new_tokens)
        if not keep_cache:
            self.backend.reset()
        out = generate_ids(self.backend, ids, settings, rng, on_step=on_step, on_canvas=on_canvas,
                           encode_chunk=encode_chunk, template=layout, images=pimg)
        res = self._result(out, ids, settings, seed)
        if json_schema is not None:
            from .json_schema import parse_answer

            res.parsed = parse_answer(res.text)
        if calls is not None:
            from .tool_calls import split_calls

            answer = [t for t in out.token_ids if t != settings.pad_token_id]
            content, found = split_calls(answer, self.tokenizer, calls["tokens"], calls["names"], calls["parallel"])
            res.tool_calls = found if calls["mode"] != "none" else []
            if calls["mode"] != "none":
                text = self.tokenizer.decode(content)
                res.texts = ["" if found and not text.strip() else text]  # (a switch's whitespace before its call)
        return res

    def _tools(self, tools, tool_choice, parallel, template, raw, think):
        """generate's tools arguments checked: ({tools, mode, names, tokens, parallel}, the template: a forced
        call's, or the one given)."""
        from .tool_calls import ToolError, ToolTokens, check_tools, choose, forced_template

        if tools is None:
            raise ToolError("tool_choice and parallel_tool_calls need tools")
        if raw:
            raise ToolError("tools are rendered by the chat template; drop raw")
        tools = check_tools(tools)
        mode, forced = choose(tools, tool_choice, parallel)
        state = {"tools": tools, "mode": mode, "names": {t["function"]["name"] for t in tools},
                 "tokens": ToolTokens(self.tokenizer), "parallel": parallel is not False}
        if mode in ("forced", "switch"):
            if template is not None:
                raise ToolError("a forced tool call is a template of its own; drop template / json_schema")
            if think:
                raise ToolError("a forced tool call fixes the answer from its first position, where thinking "
                                "mode's thought channel would go; drop think")
            if mode == "forced":
                template = forced_template(forced)
            else:
                from .tool_switch import CallSwitch

                template = CallSwitch(tools, self.tokenizer, self.config.canvas_length)
        return state, template

    def generate_batch(self, prompts, seeds=None, max_new_tokens: int | None = None, raw: bool = False,
                       system: str | None = None, templates=None, max_batch: int | None = None,
                       encode_chunk: int = ENCODE_CHUNK, images=None, max_soft_tokens: int | None = None,
                       **sampler_overrides) -> list[GenerationResult]:
        """Generate after each of `prompts` (strings or token-id lists, of any lengths) as one batch.
        Returns one result per prompt, each exactly what `generate(prompt, seed=its seed)` returns
        (the randomness contract per row; see docs/python-api.md for where floats may differ).
        `seeds`: one per prompt (None entries, or no list: fresh seeds, reported on the results);
        `templates`: one per prompt (None entries: free); `max_batch`: rows per backend call (None: all);
        `images`: one list per prompt (None entries: none), as generate's.
        The single-row cache (`keep_cache`) is not used or changed."""
        from .batch import BatchLoop

        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise DgportError("prompts must be a non-empty list of prompts (strings or token-id lists)")
        n = len(prompts)
        seeds = [None] * n if seeds is None else list(seeds)
        templates = [None] * n if templates is None else list(templates)
        images = [None] * n if images is None else list(images)
        if len(seeds) != n or len(templates) != n or len(images) != n:
            raise DgportError(f"seeds, templates and images need one entry per prompt ({n}); got {len(seeds)} seeds, "
                              f"{len(templates)} templates and {len(images)} image lists")
        check_encode_chunk(encode_chunk)
        with_images = [self.prompt_images(p, im, max_soft_tokens, raw) for p, im in zip(prompts, images)]
        prepared = [self._prepare(p, max_new_tokens, s, None, raw, system, False, t, sampler_overrides, None, pimg)
                    for (p, pimg), s, t in zip(with_images, seeds, templates)]
        for ids, settings, *_ in prepared:
            check_context(self.config, 0, len(ids), settings.max_new_tokens)
        loop = BatchLoop(self.backend, max_batch)
        entries = []
        try:
            for (ids, settings, rng, _, layout), (_, pimg) in zip(prepared, with_images):
                entries.append(loop.add(ids, settings, rng, layout, encode_chunk=encode_chunk, images=pimg))
            loop.run()
        finally:
            for e in list(loop.entries):
                loop.remove(e)
        return [self._result(e.row.result, ids, settings, seed)
                for e, (ids, settings, _, seed, _) in zip(entries, prepared)]

    def prompt_images(self, prompt, images, max_soft_tokens=None, raw: bool = False):
        """(the prompt as the chat template reads it, its PromptImages or None): images from `images` or
        from messages' content parts, decoded and patched (dgport.image_prompt)."""
        from .image_prompt import image_parts, prepare_images

        sources = [] if images is None else images
        if images is not None and (isinstance(images, (str, bytes)) or not isinstance(images, (list, tuple))):
            raise DgportError("images must be a list of images (paths, bytes, PIL images or uint8 arrays)")
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            prompt, in_parts = image_parts(prompt)
            if in_parts and sources:
                raise DgportError("give the images either as message content parts or as images=, not both")
            sources = list(sources) or in_parts
        elif isinstance(prompt, str) and sources and not raw:
            text = [{"type": "text", "text": prompt}] if prompt.strip() else []
            prompt = [{"role": "user", "content": [{"type": "image"}] * len(sources) + text}]
        vision = getattr(self.backend, "vision", None)
        settings = None if vision is None else vision.image.with_soft_tokens(max_soft_tokens)
        if max_soft_tokens is not None and vision is None:
            from .images import ImageSettings

            ImageSettings().with_soft_tokens(max_soft_tokens)  # the value is checked all the same
        if not sources:
            return prompt, None
        if vision is None:
            from .backend import no_vision_error

            raise no_vision_error(getattr(getattr(self.backend, "export", None), "path", "this model"))
        return prompt, prepare_images(list(sources), settings)

    def _prepare(self, prompt, max_new_tokens, seed, rng, raw, system, think, template, overrides, tools=None,
                 images=None):
        """(prompt ids, settings, rng, seed, template layout) of one generation, every argument checked;
        `images` (PromptImages): the prompt's image tokens expanded to their soft-token slots."""
        if max_new_tokens is not None and (not is_int(max_new_tokens) or max_new_tokens <= 0):
            raise DgportError(f"max_new_tokens must be a positive integer (got {max_new_tokens!r})")
        layout = None
        if template is not None:
            if think:
                raise TemplateError("a template fixes the answer from its first position, so it cannot follow "
                                    "thinking mode's thought channel; drop think or the template")
            layout = template if isinstance(template, Layout) or getattr(template, "is_layout", False) else \
                (template if isinstance(template, Template) else Template(template)).layout(self.tokenizer)
            max_new_tokens = layout.check_budget(self.config.canvas_length, max_new_tokens)
        settings = self.settings(max_new_tokens, **overrides)
        settings.validate()
        if rng is None:
            seed = fresh_seed(seed)
            rng = make_rng(seed)
        elif not isinstance(rng, np.random.Generator):
            raise DgportError(f"rng must be a numpy.random.Generator (got {type(rng).__name__})")
        else:
            seed = None
        ids = self.prompt_ids(prompt, raw=raw, system=system, think=think, tools=tools)
        vision = getattr(self.backend, "vision", None)
        if images is not None or vision is not None and vision.image_token_id in ids:
            from .image_prompt import PromptImages, expand_ids

            ids = expand_ids(ids, images or PromptImages([], ""), vision)  # (markers without images: refused)
        return ids, settings, rng, seed, layout

    def _result(self, out, ids, settings, seed) -> GenerationResult:
        return GenerationResult(
            token_ids=[out.token_ids],
            texts=[self.tokenizer.decode([t for t in out.token_ids if t != settings.pad_token_id])],
            steps_per_canvas=out.steps_per_canvas,
            tokens_per_forward=out.tokens_per_forward(settings.pad_token_id),
            prompt_ids=ids,
            finished=out.finished,
            seed=seed,
            hole_texts=None if out.holes is None else [[self.tokenizer.decode(h) for h in out.holes]],
        )


def schema_template(json_schema, template=None) -> Template:
    """The template a JSON schema compiles to (refused beside a template of one's own)."""
    from .json_schema import compile_schema

    if template is not None:
        raise DgportError("give either json_schema or template, not both (a schema is compiled into a template)")
    return compile_schema(json_schema)


def load(path=None, backend: str = "cpu", **backend_options) -> Generator:
    """Open a model: what `dgport run` takes. `path` is a dgport export folder, a Hugging Face
    checkpoint folder or a Hub id (a checkpoint is exported once into dgport's cache and reused;
    backend 'torch' runs the checkpoint itself). Without `path`: the shipped Sudoku model (exported
    into dgport's cache on first use)."""
    if backend not in BACKENDS:
        raise DgportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "torch":  # before a checkpoint is exported for a runtime that is not installed
        package = "onnxruntime" if backend in ("cpu", "cuda") else "mlx.core"
        try:
            importlib.import_module(package)
        except ImportError as e:
            raise BackendUnavailable(f"backend {backend!r} needs the {package.split('.')[0]} package, which is "
                                     f"not installed: pip install 'dgport[{backend}]'") from e
    if path is None:
        from .default_model import ensure_default_export

        path = Path(ensure_default_export(backend))
    elif backend == "torch":
        from .resolve import resolve_checkpoint

        path = resolve_checkpoint(path)
    else:
        from .resolve import resolve_model

        path = resolve_model(path, backend)
    if backend == "torch":
        from .exporters.checkpoint import read_config
        from .runtimes.torch_ref import TorchRefBackend

        _, defaults, _ = read_config(path)
        return Generator(TorchRefBackend(path, **backend_options), ChatTokenizer(path), defaults)
    from .manifest import open_export

    export = open_export(path, backend)
    if backend in ("cpu", "cuda"):
        from .runtimes.onnx import OnnxBackend

        runtime = OnnxBackend(export, device=backend, **backend_options)
    else:
        from .runtimes.mlx import MlxBackend

        runtime = MlxBackend(export, **backend_options)
    return Generator(runtime, ChatTokenizer(path, files=export.tokenizer_files), export.generation)
