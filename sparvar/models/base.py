"""What every model family shares: the contract the sampler loop (pipeline.py) drives.

A family is a folder under models/ (its transformer, decoder, codes and, for text models, its
text encoder) plus a `Family` entry in the registry. The loop calls the transformer's methods
declared abstract here and the protocols' methods below; code outside models/ asks a family's
capabilities (`Family`), never its name. Families reuse each other's layers where the official
models share them (VAR's attention is Infinity's, HART's tokenizer is VAR's VQVAE).
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch
import torch.nn as nn

from sparvar.attention.policy import AttentionCall, AttentionPolicy
from sparvar.errors import SparvarError
from sparvar.kv_cache import KVCache, make_kv_cache
from sparvar.pruning import Kept, TokenPruning
from sparvar.schedules import Schedule

if TYPE_CHECKING:
    from sparvar.models.registry import ModelSpec


class Attend:
    """A layer's self-attention: attend(layer, q, k, v) -> out, all (B, H, L, D), from a function."""

    def __init__(self, fn: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]):
        self.fn = fn

    def slots(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where this layer's n new keys and values are to be written, if somewhere already."""
        return None

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.fn(layer, q, k, v)


class CachedAttend(Attend):
    """One generation step: the new keys and values go into the KV cache at the scale's offset
    (written there by the qkv kernel, given the cache's slots), and attention over the cache
    goes through the policy, the seam SparVAR plugs into. With `kept` (token pruning,
    pruning.py) only those tokens ran: their keys go to their own slots, stand-ins fill the rest.
    `softmax_scale` is 1 for cosine attention, where q comes scaled."""

    def __init__(self, cache: KVCache, policy: AttentionPolicy, scale: int, schedule: Schedule, depth: int,
                 kept: Kept | None = None, softmax_scale: float = 1.0):
        self.cache, self.policy, self.scale, self.schedule, self.depth = cache, policy, scale, schedule, depth
        self.start, self.kept, self.softmax_scale = schedule.offsets[scale], kept, softmax_scale

    def pruned(self, kept: Kept) -> "CachedAttend":
        """The same step for layers that run on the kept tokens only."""
        return CachedAttend(self.cache, self.policy, self.scale, self.schedule, self.depth, kept, self.softmax_scale)

    def slots(self, layer, n):
        return self.cache.slots(layer, self.start, n) if self.kept is None else None

    def __call__(self, layer, q, k, v):
        if self.kept is None:
            keys, values = self.cache.write(layer, self.start, k, v)
        else:
            n = self.schedule.lengths[self.scale]
            keys, values = self.cache.write_kept(layer, self.start, n, k, v, self.kept.index, self.kept.stand_in)
        index = None if self.kept is None else self.kept.index
        call = AttentionCall(layer, self.scale, self.depth, self.schedule, self.softmax_scale, index)
        return self.policy(q, keys, values, call)


class Prepared(Protocol):
    """A transformer's per-generation tensors (`prepare`): a dataclass of tensors (lists, tuples
    and None allowed), which CUDA graphs copy field by field; the batch is CFG-doubled."""

    start: torch.Tensor  # (B, n_0, C) float32: scale 0's input


class TransformerConfig:
    """Base of a family's transformer config (a frozen dataclass). Code outside the family reads
    depth, width, heads, head_dim and ffn_hidden; the sampling defaults cfg, tau, top_k (one, or
    one per scale) and top_p; num_classes (0 for text models); text_max_len (text models);
    system_prompt (families with one); schedule (families with a fixed schedule)."""

    cross_attention = False  # whether the blocks attend to text through cross-attention (FLOPs)
    latent_per_token = 1  # side of the latent cells one token covers (the image's size before loading)
    # layers whose queries see a source slot (Schedule.source) area-pooled to their own scale's grid
    # (VAREdit's first): the keys' layout there is `schedule.pooled(scale)` (plans, FLOPs)
    pooled_source_layers = ()

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


class ScaleTransformer(nn.Module, metaclass=ABCMeta):
    """What the sampler loop asks of every family's transformer. Subclasses hold `cfg` (depth,
    heads, head_dim), `blocks` and `head`; the steps below are theirs to write."""

    stream = None  # an offload.BlockStream when the blocks stream from CPU memory

    def block(self, layer: int) -> nn.Module:
        """The block of a layer, ready to run (fetched onto the GPU when the blocks stream)."""
        return self.blocks[layer] if self.stream is None else self.stream.fetch(layer)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def new_kv_cache(self, batch: int, capacity: int, kind: str = "static", stored: int | None = None) -> KVCache:
        """A cache of `kind` (kv_cache.KINDS) for `capacity` tokens, `stored` of them kept (lean, fp8)."""
        c = self.cfg
        stored = capacity if stored is None else stored
        return make_kv_cache(kind, c.depth, batch, c.heads, capacity, stored, c.head_dim, self.dtype, self.device)

    @abstractmethod
    def init_weights(self, seed: int = 0) -> "ScaleTransformer":
        """Random weights of the right scale, drawn on the model's device (benchmarks, tests)."""

    def draw_weights(self, seed: int, std: float | Callable[[torch.Tensor], float],
                     ones: tuple[str, ...] = ("norm.weight",)) -> None:
        """init_weights' draw, in parameter order on the model's device: the cosine attention's log
        temperatures log 4, norm scales (names ending in `ones`) 1, biases 0, every other parameter
        normal with `std` (or std(parameter)); buffers 0."""
        gen = torch.Generator(self.device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("scale_mul_1H11"):
                    p.fill_(math.log(4.0))
                elif name.endswith(ones):
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std(p) if callable(std) else std, generator=gen)
            for b in self.buffers():
                b.zero_()

    @abstractmethod
    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An official file's tensors as this module loads them (tensors a file may leave out
        filled in, tensors it keeps for training only left out)."""

    @abstractmethod
    def prepare(self, condition, guidance: bool, negative=None) -> Prepared:
        """The condition tensors of one generation (the text encoder's (features, mask), or class
        labels (B,); families with a source image: (features, mask, source), the source's
        transformer input (B, n, channels) on the last scale's grid); with guidance the batch is
        [cond; uncond], `negative` (a negative prompt's features and mask) taking the
        unconditional half's place where the family has them."""

    @abstractmethod
    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The next scale's input (B, n, channels) from the codes object -> embeddings (B, n, C), float32."""

    @abstractmethod
    def forward_scale(self, x: torch.Tensor, scale: int, schedule: Schedule, prep: Prepared, cache: KVCache,
                      policy: AttentionPolicy, pruning: TokenPruning | None = None):
        """One generation step: scale `scale`'s input (B, n, C) -> its logits; at a scale whose
        codes the family refines (HART's last) the tuple (logits, hidden states), which
        `residual` then reads."""

    def residual(self, hidden: torch.Tensor, codes: torch.Tensor, weight: float,
                 generators: list[torch.Generator]) -> torch.Tensor:
        """What is added to the sampled codes (B, c, h, w) of a scale whose `forward_scale`
        returned hidden states too; only families that refine codes have one."""
        raise NotImplementedError(f"{type(self).__name__} refines no codes")

    @staticmethod
    @abstractmethod
    def guidance_weight(scale: int, num_scales: int, cfg: float) -> float:
        """w in l = l_c + w (l_c - l_u) at one scale; the unconditional half runs where any w is not 0."""

    @staticmethod
    def official_guidance(logits: torch.Tensor, guidance: bool, scale: int, num_scales: int, cfg: float,
                          tau: float) -> torch.Tensor:
        """The guided logits as the official sampler computes them, to the last bit; only
        families with the official sampler have one."""
        raise NotImplementedError("this family has no official sampler")


class Codes(Protocol):
    """Tokens <-> latent for the sampler loop (the family's `codes`): the latent is the running
    sum of every scale's codes on the final grid."""

    def to_codes(self, tokens: torch.Tensor, scale: int, schedule: Schedule) -> torch.Tensor:
        """Sampled tokens of `scale` -> its codes (B, c, h, w)."""

    def accumulate(self, summed: torch.Tensor | None, codes: torch.Tensor, scale: int,
                   schedule: Schedule) -> torch.Tensor:
        """The running sum with one scale's codes added."""

    def next_input(self, summed: torch.Tensor, scale: int, schedule: Schedule) -> torch.Tensor:
        """The transformer's input (B, n, channels) of `scale` from the running sum."""

    def latent_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The latent grid of a token grid."""

    def tokens_of(self, latent: torch.Tensor, schedule: Schedule) -> list[torch.Tensor]:
        """The tokens of every scale that describe a latent (init images)."""

    # families with more_smooth also have soft_codes(probs, scale, schedule): mixtures of codewords


class Decoder(Protocol):
    """The family's image tokenizer, built from spec.vae; families with tiled decode also have
    decode_tiled(latent), the same images in bands of rows."""

    def init_weights(self, seed: int = 0) -> "Decoder": ...

    def checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """The summed latent -> images (B, 3, H, W) in [-1, 1], float32."""

    def latent_of(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the latent the codes' tokens_of reads."""


class TextEncoder(Protocol):
    """Prompts -> (features (B, T, C), mask (B, T) bool): prepare's condition. Families with a
    system prompt take `system_prompt=` in the call too. `model` is the module offload moves."""

    model: nn.Module

    @classmethod
    def load(cls, path: str, config: dict, device, dtype, max_length: int) -> "TextEncoder": ...

    @classmethod
    def random(cls, config: dict, device, dtype, seed: int = 0, max_length: int = 512) -> "TextEncoder": ...

    def __call__(self, prompts: list[str], cuda_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]: ...


# capability -> how a refusal names it
OPTIONS = {
    "token_pruning": "token pruning", "official_sampler": "official sampler", "negative_prompts": "negative prompt",
    "init_images": "init tokens", "more_smooth": "more_smooth", "tiled_decode": "tiled decode",
    "system_prompt": "system prompt", "source_image": "source image",
}


@dataclass(frozen=True)
class Family:
    """A model family's parts and what it can do; `pipeline.py` shows how the loop uses them.

    transformer: a ScaleTransformer built from spec.transformer. decoder: a Decoder built from
    spec.vae. codes: (spec, decoder) -> its Codes. schedule: (spec, aspect, resolution or None)
    -> the scale schedule it generates. text_encoder: a TextEncoder class, for text models.
    configure: (spec, weights, vae) -> (spec, weights, vae): the spec with the architecture the
    checkpoint folders' config files give and the files to read in them (HART); None: the spec
    as registered and the paths as given.
    """

    name: str  # for messages: "Infinity", "VAR", "HART"
    transformer: type[ScaleTransformer]
    decoder: type
    codes: Callable[["ModelSpec", nn.Module], Codes]
    schedule: Callable[["ModelSpec", str, int | None], Schedule]
    text_encoder: type | None = None
    configure: Callable[["ModelSpec", str | None, str | None], tuple] | None = None
    # what it can do; a generation asking for what a family lacks is refused (`refuse`)
    fixed_schedule: bool = False  # generates its transformer config's own schedule only
    token_pruning: bool = True  # FastVAR's pruning (pruning.py) through forward_scale
    official_sampler: bool = True  # draws as the official scripts do (official_guidance)
    official_temperature: bool = True  # the official sampler takes tau
    negative_prompts: bool = False  # text models only
    init_images: bool = True  # the first scales forced to given tokens (official gt_leak)
    more_smooth: bool = False  # Gumbel-softmax mixtures of codewords (codes.soft_codes)
    tiled_decode: bool = False  # decoder.decode_tiled
    system_prompt: bool = False  # text put before every prompt (config.system_prompt is the default)
    # edits a source image, which every generation then needs: the class that turns pictures into
    # the pixels the family encodes and its outputs back to the pictures' shapes (VAREdit)
    source_image: type | None = None
    # the repository of the official code `sparvar bench e2e --official` times for it (bench/official.py)
    official_code: str | None = None
    # the linear layers of a block (paths within it) that precision="fp8" quantises, and those it keeps
    # in the model dtype on purpose; every nn.Linear of a block is in one of the two (tests/test_fp8.py)
    fp8_layers: tuple[str, ...] = ()
    kept_layers: tuple[str, ...] = ()

    def refuse(self, model: str, **asked: bool) -> None:
        """One line naming every option asked for (capability name=True) that this family lacks."""
        missing = [OPTIONS[name] for name, on in asked.items() if on and not getattr(self, name)]
        if missing:
            raise SparvarError(f"{model} ({self.name}) takes no {', '.join(missing)}")
