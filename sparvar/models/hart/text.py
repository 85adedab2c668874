"""HART's text encoder: a Qwen2 language model's last hidden states, from a local folder only.

As the official `encode_prompts` does: every prompt is padded to `max_length` tokens (300 for
hart-0.7b); the prompt-enhancement system prompt of the official sampler, when given, is
tokenized once, put before every prompt for the forward pass and its positions dropped from the
output; the mask marks the tokens that are not the tokenizer's padding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sparvar.models.infinity.text import ByteTokenizer, read_hf_folder

# The official sampler's default (hart/utils/constants.py `llm_system_prompt`, use_llm_system_prompt=True).
SYSTEM_PROMPT = """Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image generation.

Examples:
- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.
- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.

Please generate only the enhanced description for the prompt below and DO NOT include any additional sentences. Start your response with "Enhanced Prompt:".

User Prompt:\n"""  # noqa: E501

# Qwen2-VL-1.5B-Instruct's language model (believed: the folder's config.json is what loads).
QWEN2_1_5B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=True,
)


class _HFTokens:
    """A transformers tokenizer as the official encoder calls it, one text at a time."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pad_id = tokenizer, tokenizer.pad_token_id

    def __call__(self, text: str, max_length: int, pad: bool) -> torch.Tensor:
        out = self.tokenizer(text, return_tensors="pt", padding="max_length" if pad else "longest",
                             max_length=max_length, truncation=True)
        return out.input_ids[0]


class _ByteTokens:
    """The byte stand-in tokenizer of random text models (its padding id is 0)."""

    pad_id = 0

    def __init__(self, vocab_size: int):
        self.bytes = ByteTokenizer(vocab_size)

    def __call__(self, text: str, max_length: int, pad: bool) -> torch.Tensor:
        ids = self.bytes([text], max_length)[0][0]
        return torch.nn.functional.pad(ids, (0, max_length - len(ids))) if pad else ids


class HARTTextEncoder:
    def __init__(self, model, tokens, max_length: int):
        self.model = model.eval()
        self.tokens = tokens
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_folder(cls, path: str | Path, device, dtype, max_length: int) -> "HARTTextEncoder":
        """`transformers`' model and tokenizer of a local folder (Qwen2-VL-1.5B-Instruct); never downloads."""
        from transformers import AutoModel

        tokenizer, model = read_hf_folder(path, AutoModel, "text model", "mit-han-lab/Qwen2-VL-1.5B-Instruct")
        return cls(model.to(device=device, dtype=dtype), _HFTokens(tokenizer), max_length)

    @classmethod
    def load(cls, path: str | Path, config: dict, device, dtype, max_length: int) -> "HARTTextEncoder":
        """The text model of a local folder (its architecture comes from the folder's config.json)."""
        return cls.from_folder(path, device, dtype, max_length)

    @classmethod
    def random(cls, config: dict, device, dtype, seed: int = 0, max_length: int = 300) -> "HARTTextEncoder":
        """A Qwen2 model of the given architecture with random weights and the byte stand-in tokenizer."""
        from transformers import Qwen2Config, Qwen2Model

        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(seed)
            model = Qwen2Model(Qwen2Config(**config))
        return cls(model.to(dtype=dtype), _ByteTokens(config["vocab_size"]), max_length)

    @torch.inference_mode()
    def __call__(self, prompts: list[str], cuda_graph: bool = False, system_prompt: str = "") -> tuple:
        """Features (B, max_length, C) float32 and the mask of real tokens (B, max_length)."""
        ids = torch.stack([self.tokens(p, self.max_length, pad=True) for p in prompts]).to(self.device)
        mask = ids != self.tokens.pad_id
        if system_prompt:
            prefix = self.tokens(system_prompt, self.max_length, pad=False).to(self.device)
            prefix = prefix[None].expand(len(prompts), -1)
            full = torch.cat([prefix, ids], 1), torch.cat([torch.ones_like(prefix, dtype=torch.bool), mask], 1)
            feats = self.model(full[0], attention_mask=full[1], output_hidden_states=True).hidden_states[-1]
            feats = feats[:, prefix.shape[1]:]
        else:
            feats = self.model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return feats.float(), mask
