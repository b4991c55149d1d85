"""The Hugging Face modules behind the Backend protocol: the reference the other backends are
checked against (tests, `dgport check`, benchmarks). Never imported on the `run` path.

encode = `model.model.encoder` writing a transformers DynamicCache (sliding layers keep the last
`sliding_window - 1` positions); denoise = the full model's decoder pass with tied lm_head and
softcap, then the same temperature, sampling, entropy and self-conditioning handling as
`DiffusionGemmaGenerationMixin._denoising_step`. The self-conditioning logits stay a torch tensor.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dgport.backend import StepOutput
from dgport.config import TextConfig
from dgport.errors import BackendUnavailable


def inverse_cdf_torch(probs, uniforms):
    """The randomness contract's draw on torch tensors: probs [N, V] float32, uniforms [N] float32."""
    import torch

    cdf = torch.cumsum(probs, dim=-1)
    idx = (cdf <= uniforms[:, None]).sum(dim=-1)
    return torch.clamp(idx, max=probs.shape[-1] - 1)


class TorchRefBackend:
    def __init__(self, checkpoint, dtype: str = "fp32", model=None):
        try:
            import torch
            from transformers import DiffusionGemmaForBlockDiffusion
        except ImportError as e:
            raise BackendUnavailable(
                "backend 'torch' needs torch and transformers: pip install 'dgport[export]'"
            ) from e
        from dgport.exporters.checkpoint import (  # validates the folder with dgport's messages
            SAFETENSORS_INDEX, SAFETENSORS_SINGLE, read_checkpoint, transformers_loadable)
        from dgport.errors import CheckpointError

        self._torch = torch
        ckpt = read_checkpoint(checkpoint)
        self.config: TextConfig = ckpt.config
        if model is None and not transformers_loadable(Path(checkpoint)):
            raise CheckpointError(
                f"{checkpoint}: the torch backend loads weights through transformers, which reads only "
                f"{SAFETENSORS_SINGLE} or the shards named by {SAFETENSORS_INDEX}; rename the weights file "
                "to model.safetensors (`dgport export` can also skip the comparison with --no-validate)"
            )
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[dtype]
        if model is None:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # keep stderr to dgport's own one-line messages
            # use_safetensors: never fall back to a pytorch_model.bin (pickle) lying beside the safetensors
            model = DiffusionGemmaForBlockDiffusion.from_pretrained(Path(checkpoint), dtype=torch_dtype,
                                                                    use_safetensors=True).eval()
        if dtype == "fp64":  # validation's precise reference; grouped_mm has no float64 kernel
            model.config._experts_implementation = "eager"
        self.model = model
        self._path = checkpoint
        self.vision = ckpt.vision if getattr(model.model.encoder, "vision_tower", None) is not None else None
        self._logits = None
        self.reset()

    @property
    def last_logits(self) -> np.ndarray | None:
        """The last step's logits [B, C, V] as float32 numpy (converted on request)."""
        return None if self._logits is None else self._logits.float().numpy()

    @property
    def cache_len(self) -> int:
        return self._cache_len

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        self._cache_len = 0
        self._sc_logits = None

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    def encode_images(self, pixel_values: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """transformers' get_image_features: soft tokens [N, P / k**2, H] float32 (each image's own
        first, zero rows after them)."""
        from dgport.backend import no_vision_error

        if self.vision is None:
            raise no_vision_error(self._path)
        torch = self._torch
        pos = np.ascontiguousarray(positions, dtype=np.int64)
        enc = self.model.model.encoder
        with torch.no_grad():
            feats = enc.get_image_features(torch.from_numpy(np.ascontiguousarray(pixel_values, np.float32)).to(
                self.model.dtype), torch.from_numpy(pos)).pooler_output.float().numpy()
        k2 = self.vision.config.pooling_kernel_size ** 2
        counts = [int(np.count_nonzero((p != -1).any(-1))) // k2 for p in pos]
        feats = feats.reshape(-1, feats.shape[-1])
        out = np.zeros((pos.shape[0], pos.shape[1] // k2, feats.shape[-1]), np.float32)
        start = 0
        for i, n in enumerate(counts):
            out[i, :n] = feats[start:start + n]
            start += n
        return out

    def encode(self, ids: np.ndarray, positions: np.ndarray, image_embeds=None) -> None:
        from dgport.backend import image_embeds_input

        torch = self._torch
        ids_t = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        pos_t = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))
        B, T = ids_t.shape
        image_embeds = image_embeds_input(ids, image_embeds, self.vision, self.config.hidden_size)
        inputs = {"input_ids": ids_t}
        mm = None
        if image_embeds is not None:  # what the encoder's forward does with pixel_values, from given soft tokens
            enc = self.model.model.encoder
            with torch.no_grad():
                e = enc.get_input_embeddings()(ids_t)
            where = ids_t == self.vision.image_token_id
            e[where] = torch.from_numpy(image_embeds).to(e.dtype)
            inputs, mm = {"inputs_embeds": e}, where.long()
        # the same mask mapping generate() builds from an all-ones 2-D mask
        masks = self.model.model.encoder.create_masks_for_generate(
            config=self.model.config,
            inputs_embeds=torch.empty((B, T, 0), dtype=self.model.dtype),
            attention_mask=torch.ones((B, self._cache_len + T), dtype=torch.bool),
            past_key_values=self.cache,
            position_ids=pos_t,
            mm_token_type_ids=mm,
        )
        with torch.no_grad():
            self.model.model.encoder(**inputs, attention_mask=masks, past_key_values=self.cache, position_ids=pos_t)
        self._cache_len += T

    def new_canvas(self) -> None:
        self._sc_logits = None

    def cache_numpy(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(K, V) of one layer as float32 numpy arrays (copies; for tests and validation)."""
        kv = self.cache.layers[layer]
        return kv.keys.float().numpy().copy(), kv.values.float().numpy().copy()

    def set_token_masks(self, masks) -> None:
        """The vocabulary constraints' table, bool [K, V] (None: none)."""
        from dgport.vocab_constraints import check_masks

        self._masks = None if masks is None else self._torch.from_numpy(check_masks(masks, self.config.vocab_size))

    def denoise(self, canvas, positions, temperature, uniforms, classes=None) -> StepOutput:
        torch = self._torch
        allowed = None
        if classes is not None:
            from dgport.vocab_constraints import check_classes

            masks = getattr(self, "_masks", None)
            cls = check_classes(classes, np.shape(canvas), None if masks is None else masks.shape[0])
            allowed = masks[torch.from_numpy(cls)]
        with torch.no_grad():
            logits = self.model(
                decoder_input_ids=torch.from_numpy(np.ascontiguousarray(canvas, dtype=np.int64)),
                past_key_values=self.cache,
                self_conditioning_logits=self._sc_logits,
                decoder_position_ids=torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)),
            ).logits
            self._logits = logits
            proc = logits / torch.tensor(np.float32(temperature))
            if allowed is not None:  # the MASKED value of exporters/onnx_head.py
                proc = torch.where(allowed, proc, torch.tensor(-1e30, dtype=proc.dtype))
            probs = torch.softmax(proc, dim=-1, dtype=torch.float32)
            B, C, V = probs.shape
            sampled = inverse_cdf_torch(probs.view(-1, V), torch.from_numpy(
                np.ascontiguousarray(uniforms, dtype=np.float32)).view(-1)).view(B, C)
            argmax = torch.argmax(proc, dim=-1)
            entropy = torch.distributions.Categorical(logits=proc).entropy()
            self._sc_logits = proc.to(self.model.model.decoder.embed_tokens.weight.dtype)
        return StepOutput(argmax.numpy().astype(np.int64), entropy.float().numpy(), sampled.numpy().astype(np.int64))

    # ---------------------------------------------------------------- rows (dgport.backend.RowBackend)
    # The reference runs each row alone, one after another, through the single-row methods above on
    # that row's own cache: what batched backends must reproduce.
    def open_row(self, copy_of: int | None = None) -> int:
        import copy

        from transformers import DynamicCache

        rows = self.__dict__.setdefault("_rows", {})
        if copy_of is None:
            state = {"cache": DynamicCache(config=self.model.config.get_text_config(decoder=True)), "len": 0,
                     "sc": None}
        else:
            src = self._row(copy_of)
            state = {"cache": copy.deepcopy(src["cache"]), "len": src["len"], "sc": None}
        rid = self.__dict__.get("_next_row", 0)
        self._next_row = rid + 1
        rows[rid] = state
        return rid

    def _row(self, row: int) -> dict:
        from dgport.errors import DgportError

        state = self.__dict__.get("_rows", {}).get(row)
        if state is None:
            raise DgportError(f"row {row!r} is not open on this backend")
        return state

    def close_row(self, row: int) -> None:
        self._row(row)
        del self._rows[row]

    def row_cache_len(self, row: int) -> int:
        return self._row(row)["len"]

    def _as_row(self, state: dict, fn):
        """Run fn() with the row's cache, length and signal in place of the single-row state."""
        saved = self.cache, self._cache_len, self._sc_logits, self._logits
        self.cache, self._cache_len, self._sc_logits = state["cache"], state["len"], state["sc"]
        try:
            return fn()
        finally:
            state["cache"], state["len"], state["sc"] = self.cache, self._cache_len, self._sc_logits
            self.cache, self._cache_len, self._sc_logits, self._logits = saved

    def encode_row(self, row: int, ids: np.ndarray, positions: np.ndarray, image_embeds=None) -> None:
        self._as_row(self._row(row), lambda: self.encode(ids, positions, image_embeds))

    def denoise_rows(self, rows, canvas, positions, temperatures, uniforms, fresh, classes=None) -> StepOutput:
        outs = []
        for i, row in enumerate(rows):
            state = self._row(row)
            if fresh[i]:
                state["sc"] = None
            kw = {} if classes is None else {"classes": np.asarray(classes)[i:i + 1]}
            outs.append(self._as_row(state, lambda i=i, kw=kw: self.denoise(
                canvas[i:i + 1], positions[i:i + 1], np.float32(temperatures[i]), uniforms[i:i + 1], **kw)))
        return StepOutput(*(np.concatenate([getattr(o, f) for o in outs]) for f in StepOutput._fields))
