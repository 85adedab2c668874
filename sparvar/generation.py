"""The options of one generation: one frozen dataclass, checked when it is built.

    config = GenerationConfig(seed=3, cfg=4.0, attention="default", skip_last=1)
    out = pipe(["a red fox"], config)              # or pipe(["a red fox"], seed=3, cfg=4.0, ...)

The pipeline, the command line, batch jobs and eval all build one, so every value is checked in
one place, before any work. What needs the model (its default cfg, tau, top-k and top-p, the
schedules it can generate) is settled by `resolved(spec)`; what needs the machine (CUDA graphs,
room for the KV cache) by `check_device`.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from PIL import Image

from sparvar.attention.policy import AttentionPolicy
from sparvar.errors import SparvarError
from sparvar.kv_cache import KINDS as KV_CACHES
from sparvar.models.registry import ModelSpec
from sparvar.schedules import Schedule, parse_schedule
from sparvar.pruning import PRUNE_PRESETS, PruneConfig, TokenPruning, prune_plan
from sparvar.skipping import AdaptiveSkip
from sparvar.sparsity import PRESETS

MAX_SEED = 2**63 - 1  # seeds are signed 64-bit integers; item i of a batch takes seed + i
# "sparvar": every item draws from its own generator (an image depends on its seed alone);
# "official": the official samplers' draws, one generator for the batch (sampling.OfficialDraws)
SAMPLERS = ("sparvar", "official")


@dataclass(frozen=True)
class GenerationConfig:
    """Everything one generation takes besides its conditions."""

    seed: int | tuple[int, ...] = 0  # an int: item i takes seed + i (an image does not depend on its batch)
    # sampling; None: the model's own (`resolved`). top_k 0 and top_p 0 or 1 filter nothing.
    # cfg and tau may also be one value per scale (the official cfg_list and tau_list)
    cfg: float | tuple[float, ...] | None = None  # classifier-free guidance (Infinity: cfg * l_c + (1 - cfg) * l_u)
    tau: float | tuple[float, ...] | None = None  # temperature
    top_k: int | tuple[int, ...] | None = None  # a tuple: one per scale (HART's default)
    top_p: float | None = None
    # "official" draws as the official scripts do, so one seed gives their images (the batch shares
    # one generator); "sparvar" gives item i its own generator seeded seed + i
    sampler: str = "sparvar"
    negative_prompt: str | None = None  # text models: its features take the unconditional half's place
    # variations of given images: the first `init_scales` scales take `init_tokens` (one tensor a
    # scale, batch 1 or one per item; Pipeline.image_tokens makes them from pictures) instead of
    # what was sampled: the official gt_leak
    init_tokens: tuple[torch.Tensor, ...] | None = None
    init_scales: int = 0
    more_smooth: bool = False  # VAR: each scale's codes are Gumbel-softmax mixtures of codewords
    # the scales: an Infinity aspect ratio (width:height) and pixel budget, or a schedule
    # (a Schedule or text such as "1,2,4,8"; it stands for both)
    aspect: str = "1:1"
    resolution: int | None = None
    schedule: Schedule | str | None = None
    attention: str | AttentionPolicy | None = None  # a preset name (`sparvar presets`), a policy; None: dense SDPA
    skip_last: int = 0  # stop that many scales early and decode the codes summed so far (at full size)
    prune: str | PruneConfig | TokenPruning | None = None  # FastVAR token pruning ("fastvar", pruning.py)
    # True or an AdaptiveSkip: each item stops early once its estimate holds little fine detail; the
    # batch runs while any item still refines, a stopped item's codes stay as they were
    # (`out.scales_used`). One host sync per decision scale.
    adaptive_skip: bool | AdaptiveSkip = False
    # replay each scale and the text encoder as CUDA graphs (GPU only): the first generation of a
    # shape runs eagerly, the second captures, later ones replay
    cuda_graphs: bool = False
    # "static": one buffer written in place; "lean": the same without the last scale's keys (none
    # reads them), at one prefix copy per layer; "fp8": lean with the keys and values stored in
    # FP8 (kv_cache.py); "concat": the official code's growing cache
    kv_cache: str = "static"
    # the VAE decoder in bands of rows with its maps in CPU memory (Infinity): True always; None
    # only when the whole decode runs out of GPU memory; False never
    tiled_decode: bool | None = None
    # text put before every prompt in the text model's pass (HART's prompt enhancement); None: the
    # model's own (HART: the official sampler's), "" none. Only models whose text encoder takes one.
    system_prompt: str | None = None
    # the source picture of an edit (VAREdit), or one per condition: PIL images or image files,
    # which `validate` reads (validation.source_images); models that edit need one, others take none
    image: Image.Image | str | Path | tuple | None = None

    def __post_init__(self):
        if isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool):
            object.__setattr__(self, "seed", _integer("seed", self.seed, 0, MAX_SEED))
        else:
            if isinstance(self.seed, (str, bytes)) or not hasattr(self.seed, "__iter__"):
                raise SparvarError(f"seed must be an integer or one integer per item, got {self.seed!r}")
            object.__setattr__(self, "seed", tuple(_integer("seed", s, 0, MAX_SEED) for s in self.seed))
        object.__setattr__(self, "cfg", _per_scale("cfg", self.cfg, 0))
        object.__setattr__(self, "tau", _per_scale("tau", self.tau, 0, above=True))
        if isinstance(self.top_k, (list, tuple)):
            object.__setattr__(self, "top_k", tuple(_integer("top_k", k, 0) for k in self.top_k))
        elif self.top_k is not None:
            _integer("top_k", self.top_k, 0)
        if self.top_p is not None:
            _real("top_p", self.top_p, 0, 1)
        if not isinstance(self.aspect, str):
            raise SparvarError(f"aspect must be text such as '4:3', got {self.aspect!r}")
        if self.resolution is not None:
            _integer("resolution", self.resolution, 1)
        if isinstance(self.schedule, str):
            object.__setattr__(self, "schedule", parse_schedule(self.schedule))
        if self.schedule is not None and not isinstance(self.schedule, Schedule):
            raise SparvarError(f"schedule must be a Schedule or text such as '1,2,4,8', got {self.schedule!r}")
        if self.schedule is not None and (self.aspect != "1:1" or self.resolution is not None):
            raise SparvarError("give a schedule or an aspect ratio and resolution, not both")
        if isinstance(self.attention, str) and self.attention not in PRESETS:
            raise SparvarError(f"unknown attention preset {self.attention!r}; choose one of {', '.join(PRESETS)}")
        if not isinstance(self.attention, (str, AttentionPolicy, type(None))):
            raise SparvarError(f"attention takes a preset name or an AttentionPolicy, not {self.attention!r}")
        _integer("skip_last", self.skip_last, 0)
        if isinstance(self.prune, str) and self.prune not in PRUNE_PRESETS:
            raise SparvarError(f"unknown token pruning {self.prune!r}; choose one of {', '.join(PRUNE_PRESETS)}")
        if not isinstance(self.prune, (str, PruneConfig, TokenPruning, type(None))):
            raise SparvarError(f"prune takes a name, a PruneConfig or a TokenPruning, not {self.prune!r}")
        if not isinstance(self.adaptive_skip, (bool, AdaptiveSkip)):
            raise SparvarError(f"adaptive_skip takes True, False or an AdaptiveSkip, not {self.adaptive_skip!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise SparvarError(f"cuda_graphs takes True or False, not {self.cuda_graphs!r}")
        if self.sampler not in SAMPLERS:
            raise SparvarError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.sampler == "official" and isinstance(self.seed, tuple):
            raise SparvarError("the official sampler seeds one generator for the whole batch: give one seed")
        if self.negative_prompt is not None and (not isinstance(self.negative_prompt, str)
                                                 or not self.negative_prompt.strip()):
            raise SparvarError(f"negative_prompt must be a non-empty text, got {self.negative_prompt!r}")
        _integer("init_scales", self.init_scales, 0)
        if self.init_tokens is not None:
            if isinstance(self.init_tokens, torch.Tensor) or not all(isinstance(t, torch.Tensor) for t in self.init_tokens):
                raise SparvarError("init_tokens takes one tensor of tokens per scale (Pipeline.image_tokens)")
            object.__setattr__(self, "init_tokens", tuple(self.init_tokens))
        if self.init_scales > len(self.init_tokens or ()):
            raise SparvarError(f"init_scales {self.init_scales} needs the tokens of that many scales in init_tokens, "
                               f"got {len(self.init_tokens or ())}")
        if not isinstance(self.more_smooth, bool):
            raise SparvarError(f"more_smooth takes True or False, not {self.more_smooth!r}")
        if self.kv_cache not in KV_CACHES:
            raise SparvarError(f"unknown kv_cache {self.kv_cache!r}; choose one of {', '.join(KV_CACHES)}")
        if self.tiled_decode not in (True, False, None):
            raise SparvarError(f"tiled_decode takes True, False or None, not {self.tiled_decode!r}")
        if self.kv_cache == "concat" and (self.cuda_graphs or self.prune is not None):
            raise SparvarError("CUDA graphs and token pruning need a preallocated KV cache (static, lean or fp8)")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise SparvarError(f"system_prompt must be text ('' for none), not {self.system_prompt!r}")
        if self.image is not None:
            images = tuple(self.image) if isinstance(self.image, (list, tuple)) else (self.image,)
            if not images or not all(isinstance(i, (Image.Image, str, Path)) for i in images):
                raise SparvarError("image takes a PIL image or an image file, or one per condition")
            object.__setattr__(self, "image", images)

    @classmethod
    def build(cls, config: "GenerationConfig | None" = None, **options) -> "GenerationConfig":
        """`config` with some fields replaced, or a new config of the given fields."""
        if config is not None and not isinstance(config, GenerationConfig):
            raise SparvarError(f"config must be a GenerationConfig, not {config!r} (options go as keywords: seed=...)")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise SparvarError(f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**options) if config is None else replace(config, **options)

    def resolved(self, spec: ModelSpec) -> "GenerationConfig":
        """This config for one model: its defaults filled in, its schedule chosen and checked.

        A model trained on a few schedules (the demo, VAR) generates only those; others take any
        schedule within their position grid and level embeddings. No scale has fewer tokens than the
        one before it.
        """
        model = spec.transformer
        schedule = self.schedule or spec.schedule(self.aspect, self.resolution)
        check_schedule(spec, schedule)
        if not self.skip_last < len(schedule):
            raise SparvarError(
                f"skip_last must be in 0..{len(schedule) - 1} for {len(schedule)} scales, got {self.skip_last}")
        if self.negative_prompt is not None and not spec.text_conditioned:
            raise SparvarError(f"{spec.name} is class-conditional: a negative prompt needs a text model")
        family = spec.family
        family.refuse(spec.name, token_pruning=self.prune is not None, official_sampler=self.sampler == "official",
                      negative_prompts=self.negative_prompt is not None, init_images=self.init_scales > 0,
                      more_smooth=self.more_smooth, tiled_decode=bool(self.tiled_decode),
                      system_prompt=bool(self.system_prompt), source_image=self.image is not None)
        if self.prune is not None:  # settings that do not fit the model fail here, not at the pruned scale
            prune_plan(_prune_config(self.prune), model.depth, schedule)
        for name in ("cfg", "tau"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != len(schedule):
                raise SparvarError(f"{name} gives {len(value)} values, one per scale, for {len(schedule)} scales")
        self._check_official_options(spec, schedule)
        top_k = model.top_k if self.top_k is None else self.top_k
        if isinstance(top_k, tuple) and len(top_k) != len(schedule):
            raise SparvarError(f"{len(top_k)} top_k values for {len(schedule)} scales; give one per scale or one")
        default_prompt = model.system_prompt if family.system_prompt else None
        return replace(
            self, schedule=schedule, aspect="1:1", resolution=None,
            cfg=model.cfg if self.cfg is None else self.cfg, tau=model.tau if self.tau is None else self.tau,
            top_k=top_k, top_p=model.top_p if self.top_p is None else self.top_p,
            system_prompt=default_prompt if self.system_prompt is None else self.system_prompt,
        )

    def _check_official_options(self, spec: ModelSpec, schedule: Schedule) -> None:
        """The options the official samplers have, as this model has them."""
        if self.negative_prompt is not None and not any(
                w != 0 for w in self.guidance_weights(spec, len(schedule), spec.transformer.cfg)):
            raise SparvarError("a negative prompt takes the unconditional half's place: it needs guidance (cfg != 1)")
        taus = self.tau if isinstance(self.tau, tuple) else (self.tau,)
        official = self.sampler == "official"
        if official and not spec.family.official_temperature and any(t not in (None, 1) for t in taus):
            raise SparvarError(f"the official {spec.family.name} sampler has no temperature: use tau 1, not {self.tau}")
        if self.init_scales > len(schedule) - self.skip_last:
            raise SparvarError(f"init_scales {self.init_scales} is more than the {len(schedule) - self.skip_last} "
                               "scales generated")
        for k, tokens in enumerate((self.init_tokens or ())[: self.init_scales]):
            if tokens.dim() < 2 or tokens.shape[1] != schedule.lengths[k]:
                raise SparvarError(f"init_tokens of scale {k} have shape {tuple(tokens.shape)}; scale {k} "
                                   f"({schedule.describe().split()[k]}) has {schedule.lengths[k]} tokens")

    def cfg_at(self, scale: int) -> float:
        """The guidance of one scale of a resolved config."""
        return self.cfg[scale] if isinstance(self.cfg, tuple) else self.cfg

    def tau_at(self, scale: int) -> float:
        """The temperature of one scale of a resolved config."""
        return self.tau[scale] if isinstance(self.tau, tuple) else self.tau

    def top_k_at(self, scale: int) -> int:
        """The top-k of one scale of a resolved config."""
        return self.top_k[scale] if isinstance(self.top_k, tuple) else self.top_k

    def guidance_weights(self, spec: ModelSpec, num_scales: int, default_cfg: float | None = None) -> list[float]:
        """w_k in l = l_c + w_k (l_c - l_u) per scale; the unconditional half runs where any is not 0."""
        weight = spec.family.transformer.guidance_weight
        cfg = self.cfg if self.cfg is not None else default_cfg
        return [weight(k, num_scales, cfg[k] if isinstance(cfg, tuple) else cfg) for k in range(num_scales)]

    def seeds(self, items: int) -> list[int]:
        """The seed of each of `items` images."""
        if isinstance(self.seed, tuple):
            if len(self.seed) != items:
                raise SparvarError(f"{len(self.seed)} seeds for {items} conditions")
            return list(self.seed)
        if self.seed + items - 1 > MAX_SEED:
            raise SparvarError(f"seed {self.seed} leaves no room for {items} images: image i takes seed + i, "
                               f"at most {MAX_SEED}")
        return [self.seed + i for i in range(items)]

    def batch_rows(self, spec: ModelSpec, batch: int) -> int:
        """Rows of a batch of `batch` images through the transformer: guidance runs it twice."""
        return batch * (2 if any(w != 0 for w in self.guidance_weights(spec, len(self.schedule))) else 1)

    def memory_needed(self, spec: ModelSpec, dtype: torch.dtype, batch: int) -> dict[str, int]:
        """Bytes a resolved config's generation of `batch` images needs besides the weights, by part:
        the KV cache, the transformer's activations at the largest scale that runs, the decoder's
        feature maps."""
        rows = self.batch_rows(spec, batch)
        return {"KV cache": kv_cache_bytes(spec, self.schedule, rows, dtype, self.kv_cache, self.skip_last),
                "activations": activation_bytes(spec, self.schedule, rows, dtype, self.skip_last),
                "decoder": decoder_bytes(spec, self.schedule, batch, dtype)}

    def check_device(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype, batch: int) -> None:
        """What the machine must offer a resolved config: a GPU for CUDA graphs, memory for a batch
        (memory_needed: on a GPU its memory, on the CPU what the system has available now)."""
        if self.cuda_graphs and device.type != "cuda":
            raise SparvarError("cuda_graphs needs a CUDA device")
        parts = self.memory_needed(spec, dtype, batch)
        need, have = sum(parts.values()), device_memory(device)
        if have is not None and need > have:
            guided = self.batch_rows(spec, batch) > batch
            raise SparvarError(
                f"{batch} image(s) of schedule {self.schedule.describe()}{' with guidance' if guided else ''} in "
                f"{str(dtype).replace('torch.', '')} need about {_size(need)} besides the weights ("
                + ", ".join(f"{name} {_size(n)}" for name, n in parts.items())
                + f"), more than the {_size(have)} {'of' if device.type == 'cuda' else 'available on'} {device}; "
                "generate fewer images at once")


def check_schedule(spec: ModelSpec, schedule: Schedule) -> None:
    """Whether `spec`'s model can generate `schedule` (see `GenerationConfig.resolved`)."""
    if spec.only_schedules and schedule not in spec.only_schedules:
        known = " or ".join(s.describe() for s in spec.only_schedules)
        which = "schedule" if len(spec.only_schedules) == 1 else "schedules"
        raise SparvarError(f"{spec.name} generates only the {which} it was trained on ({known}), not "
                           f"{schedule.describe()}; skipping its last scales stops it early")
    if len(schedule) > spec.max_scales:
        raise SparvarError(f"schedule {schedule.describe()} has {len(schedule)} scales; {spec.name} has level "
                           f"embeddings for {spec.max_scales}")
    for size in (*schedule.sizes, schedule.pos_grid):
        if max(size) > spec.max_side:
            raise SparvarError(f"scale {size[0]}x{size[1]} of schedule {schedule.describe()} is beyond "
                               f"{spec.name}'s position grid of {spec.max_side}x{spec.max_side} tokens")
    for (h, w), (h2, w2) in zip(schedule.sizes, schedule.sizes[1:]):
        if h2 * w2 < h * w:
            raise SparvarError(f"schedule {schedule.describe()} shrinks from {h}x{w} to {h2}x{w2}; scales go "
                               "from coarse to fine")


def kv_cache_bytes(spec: ModelSpec, schedule: Schedule, rows: int, dtype: torch.dtype, kind: str = "static",
                   skip_last: int = 0) -> int:
    """Bytes of a KV cache of `kind` for `rows` batch rows over the schedule: keys and values of
    every layer (lean and fp8: of the scales before the last one run, plus one layer's staging;
    fp8: one byte an element and a float32 scale per token and head)."""
    model = spec.transformer
    size = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * rows * model.width  # keys and values of one layer
    if kind in ("static", "concat"):
        return model.depth * schedule.total * per_token * size
    stored = schedule.offsets[len(schedule) - skip_last - 1]
    element = 1 + 4 / model.head_dim if kind == "fp8" else size
    return int(model.depth * stored * per_token * element) + schedule.total * per_token * size


# working memory of one token (one batch row) of the largest scale, in model widths: the hidden
# states, q, k and v, the MLP's hidden layer and the attention's own buffers. Measured on the first
# demo model (width 128) on a 2-core CPU (float32, guidance): peak RSS grew 182 MB an image with
# dense attention and 235 MB with default, of which 129 MB KV cache; 24 widths make 101 MB.
ACTIVATION_WIDTHS = 24
DECODER_MAPS = 4  # feature maps at full resolution that the decoder holds at once


def activation_bytes(spec: ModelSpec, schedule: Schedule, rows: int, dtype: torch.dtype, skip_last: int = 0) -> int:
    """The transformer's working memory for `rows` batch rows at the largest scale that runs."""
    largest = max(schedule.lengths[: len(schedule) - skip_last])
    return rows * largest * spec.transformer.width * ACTIVATION_WIDTHS * torch.empty((), dtype=dtype).element_size()


def decoder_bytes(spec: ModelSpec, schedule: Schedule, images: int, dtype: torch.dtype) -> int:
    """The decoder's feature maps at full resolution (its first level's channels) for `images`."""
    h, w = spec.image_size(schedule)
    channels = spec.vae.base * spec.vae.ch_mult[0]
    return images * DECODER_MAPS * channels * h * w * torch.empty((), dtype=dtype).element_size()


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of a GPU, or what the machine has available now for the CPU (other
    processes hold the rest); None where the system does not say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as info:
            return next(int(line.split()[1]) * 1024 for line in info if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _prune_config(prune: str | PruneConfig | TokenPruning) -> PruneConfig:
    if isinstance(prune, str):
        return PRUNE_PRESETS[prune].config
    return prune.config if isinstance(prune, TokenPruning) else prune


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e6:.1f} MB"


def _integer(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SparvarError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        raise SparvarError(f"{name} must be in {low}..{high}, got {value}" if high is not None
                           else f"{name} must be {low} or more, got {value}")
    return int(value)


def _per_scale(name: str, value, low: float, above: bool = False):
    """None, one number, or one number per scale (a tuple)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        _real(name, value, low, above=above)
        return value
    values = tuple(value)
    if not values:
        raise SparvarError(f"{name} per scale needs at least one value")
    for v in values:
        _real(name, v, low, above=above)
    return values


def _real(name: str, value, low: float, high: float | None = None, above: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise SparvarError(f"{name} must be a finite number, got {value!r}")
    if value < low or (above and value == low) or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f"{'above' if above else 'at least'} {low}"
        raise SparvarError(f"{name} must be {bound}, got {value}")
