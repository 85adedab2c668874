"""The T5 text encoder of Infinity, from a local folder only (Flan-T5-XL's encoder).

Prompts become float32 features (B, T, 2048) and a mask of the real tokens (B, T): T is the
longest prompt of the batch (at most 512 tokens), and padded positions are masked everywhere
downstream, so features equal those of unpadded prompts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparvar.errors import SparvarError

# Flan-T5-XL's encoder (T5 v1.1 XL); builds the architecture without any download.
T5_XL = dict(
    d_model=2048, num_layers=24, num_heads=32, d_kv=64, d_ff=5120, feed_forward_proj="gated-gelu",
    vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
)


class ByteTokenizer:
    """Stand-in tokenizer for randomly initialised encoders (tests, benchmarks): UTF-8 bytes + EOS.

    It exists because no real tokenizer is available offline without the user's T5 folder; the
    features it gives only make sense for random weights.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __call__(self, prompts: list[str], max_length: int):
        rows = [[3 + b % (self.vocab_size - 3) for b in p.encode()][: max_length - 1] + [1] for p in prompts]
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
        return ids, mask


class TextEncoder:
    def __init__(self, model, tokenizer, max_length: int = 512):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_folder(cls, path: str | Path, device, dtype, max_length: int = 512) -> "TextEncoder":
        """Load `transformers`' T5 encoder and tokenizer from a local folder; never downloads."""
        from transformers import AutoTokenizer, T5EncoderModel

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise SparvarError(
                f"T5 text encoder folder not found or incomplete: {path} (needs config.json, weights and "
                "tokenizer files); download google/flan-t5-xl to a local folder and pass its path"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = T5EncoderModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise SparvarError(f"cannot load the T5 encoder from {path}: {err}") from None
        return cls(model.to(device=device, dtype=dtype), _HFTokenizer(tokenizer), max_length)

    @classmethod
    def random(cls, config: dict, device, dtype, seed: int = 0, max_length: int = 512) -> "TextEncoder":
        """An encoder of the given architecture with random weights and the byte stand-in tokenizer."""
        from transformers import T5Config, T5EncoderModel

        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(seed)
            model = T5EncoderModel(T5Config(**config))
        return cls(model.to(dtype=dtype), ByteTokenizer(config["vocab_size"]), max_length)

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer(prompts, self.max_length)
        ids, mask = ids.to(self.device), mask.to(self.device)
        feats = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return feats, mask


class _HFTokenizer:
    """Adapts a transformers tokenizer to (ids, mask) padded to the longest prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[str], max_length: int):
        out = self.tokenizer(prompts, max_length=max_length, padding="longest", truncation=True, return_tensors="pt")
        return out.input_ids, out.attention_mask.bool()
