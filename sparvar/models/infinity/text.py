"""The T5 text encoder of Infinity, from a local folder only (Flan-T5-XL's encoder), or the demo
model's small byte-level one from its safetensors file.

Prompts become float32 features (B, T, 2048) and a mask of the real tokens (B, T): T is the
longest prompt of the batch (at most 512 tokens), and padded positions are masked everywhere
downstream, so features equal those of unpadded prompts.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from sparvar.errors import SparvarError

GRAPH_PAD = 64  # text lengths of the graphed encoder are rounded up to this, so prompts share graphs

# Flan-T5-XL's encoder (T5 v1.1 XL); builds the architecture without any download.
T5_XL = dict(
    d_model=2048, num_layers=24, num_heads=32, d_kv=64, d_ff=5120, feed_forward_proj="gated-gelu",
    vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
)


# T5 ties its input embeddings to `shared.weight`; safetensors files hold one copy (t5_state)
_TIED = "encoder.embed_tokens.weight"


def build_t5(config: dict):
    """A `transformers` T5 encoder of the given architecture with random weights; no download."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**config))


def t5_state(model) -> dict[str, torch.Tensor]:
    """The encoder's tensors without the tied copy of the embeddings (safetensors stores no aliases)."""
    return {k: v for k, v in model.state_dict().items() if k != _TIED}


def load_t5(model, state: dict[str, torch.Tensor], what: str) -> None:
    """Load tensors saved from `t5_state` (the tied copy may be absent) or say what does not fit."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {_TIED}:
        raise SparvarError(f"{what} does not fit the text encoder: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")


class ByteTokenizer:
    """A tokenizer that needs no files: UTF-8 bytes + EOS (id 1; 0 pads).

    Randomly initialised encoders use it (tests, benchmarks), and the demo model's encoder is
    trained on it (a vocabulary of 259 gives every byte its own id).
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
        self._graphs: dict[tuple, tuple | None] = {}  # (batch, length) -> (graph, ids, mask, out); None: eager

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_folder(cls, path: str | Path, device, dtype, max_length: int = 512) -> "TextEncoder":
        """Load `transformers`' T5 encoder and tokenizer from a local folder; never downloads."""
        from transformers import T5EncoderModel

        tokenizer, model = read_hf_folder(path, T5EncoderModel, "T5 text encoder", "google/flan-t5-xl")
        return cls(model.to(device=device, dtype=dtype), _HFTokenizer(tokenizer), max_length)

    @classmethod
    def load(cls, path: str | Path, config: dict, device, dtype, max_length: int = 512) -> "TextEncoder":
        """A local folder of a `transformers` T5 (official models), or one .safetensors file of an
        encoder of `config`'s architecture that reads bytes (the demo model's, trained with it)."""
        if Path(path).suffix != ".safetensors":
            return cls.from_folder(path, device, dtype, max_length)
        from sparvar.checkpoint import read_state_dict

        model = build_t5(config)
        load_t5(model, read_state_dict(path), str(path))
        return cls(model.to(device=device, dtype=dtype), ByteTokenizer(config["vocab_size"]), max_length)

    @classmethod
    def random(cls, config: dict, device, dtype, seed: int = 0, max_length: int = 512) -> "TextEncoder":
        """An encoder of the given architecture with random weights and the byte tokenizer."""
        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(seed)
            model = build_t5(config)
        return cls(model.to(dtype=dtype), ByteTokenizer(config["vocab_size"]), max_length)

    @torch.inference_mode()
    def __call__(self, prompts: list[str], cuda_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, T, C) float32 and mask (B, T). cuda_graph (CUDA only): pad T up to a
        multiple of GRAPH_PAD and replay one CUDA graph per (batch, T), a few ms instead of
        25 ms of eager launches for T5-XL; padding is masked, so features stay those of the prompts."""
        ids, mask = self.tokenizer(prompts, self.max_length)
        if cuda_graph and self.device.type == "cuda":
            length = min(-(-ids.shape[1] // GRAPH_PAD) * GRAPH_PAD, max(self.max_length, ids.shape[1]))
            ids, mask = (F.pad(t, (0, length - t.shape[1])) for t in (ids, mask))
            ids, mask = ids.to(self.device), mask.to(self.device)
            return self._replay(ids, mask).to(torch.float32, copy=True), mask
        ids, mask = ids.to(self.device), mask.to(self.device)
        feats = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        return feats, mask

    def _forward_4d(self, ids, mask):
        """The forward with the additive 4D mask built here: transformers' own mask code looks at
        the mask's values on the host, which a CUDA graph capture forbids."""
        dtype = self.model.dtype
        bias = torch.zeros(mask.shape, device=mask.device, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
        bias = bias[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
        return self.model(input_ids=ids, attention_mask=bias).last_hidden_state

    def _replay(self, ids, mask):
        key = tuple(ids.shape)
        if key not in self._graphs:
            import transformers

            # transformers 4 reads 4D masks differently: its T5 runs eagerly, without graphs
            new_enough = int(transformers.__version__.split(".")[0]) >= 5
            self._graphs[key] = self._capture(ids, mask) if new_enough else None
        if self._graphs[key] is None:
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        graph, static_ids, static_mask, out = self._graphs[key]
        static_ids.copy_(ids)
        static_mask.copy_(mask)
        graph.replay()
        return out

    def _capture(self, ids, mask):
        static_ids, static_mask = ids.clone(), mask.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs want
            self._forward_4d(static_ids, static_mask)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self._forward_4d(static_ids, static_mask)
        except RuntimeError as err:  # a transformers version whose T5 syncs with the host
            warnings.warn(f"the T5 encoder could not be captured in a CUDA graph ({err}); it runs eagerly")
            return None
        return graph, static_ids, static_mask, out


def read_hf_folder(path: str | Path, model_class, what: str, source: str):
    """(tokenizer, model) of a local `transformers` folder, never downloaded; one-line errors that
    name `what` and the public `source` to download."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise SparvarError(f"{what} folder not found or incomplete: {path} (needs config.json, weights and "
                           f"tokenizer files); download {source} to a local folder and pass its path")
    try:
        return (AutoTokenizer.from_pretrained(str(path), local_files_only=True),
                model_class.from_pretrained(str(path), local_files_only=True))
    except (OSError, ValueError) as err:
        raise SparvarError(f"cannot load the {what} from {path}: {err}") from None


class _HFTokenizer:
    """Adapts a transformers tokenizer to (ids, mask) padded to the longest prompt."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[str], max_length: int):
        out = self.tokenizer(prompts, max_length=max_length, padding="longest", truncation=True, return_tensors="pt")
        return out.input_ids, out.attention_mask.bool()
