"""The sampler loop: condition -> scales 0..K-1 through the transformer -> tokenizer decoder -> images.

    pipe = sparvar.load_pipeline("infinity-2b", weights=..., vae=..., text_encoder=...)
    out = pipe(["a red fox in the snow"], seed=0)          # out.images: list of PIL images

The options of a generation are a GenerationConfig (sparvar/generation.py), checked there. Every
self-attention call goes through the attention policy (`attention=`), the seam SparVAR fills.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from sparvar.attention.policy import AttentionPolicy, DenseAttention
from sparvar.checkpoint import load_strict, read_state_dict
from sparvar.errors import SparvarError
from sparvar.generation import GenerationConfig
from sparvar.graphs import ScaleGraphs
from sparvar.graphs import shapes as graph_shapes
from sparvar.kv_cache import ConcatKVCache, KVCache
from sparvar.models.fp8 import quantize_blocks
from sparvar.models.registry import ModelSpec, create_model, create_vae, get_spec, guess_model
from sparvar.offload import BlockStream, OffloadedModule, move_except_blocks
from sparvar.sampling import OfficialDraws, filter_logits, item_gumbel, sample, smooth_probs
from sparvar.schedules import Schedule
from sparvar.skipping import TokenPruning, resolve_adaptive, resolve_pruning


def resolve_device(device: str | torch.device | None) -> torch.device:
    """auto (or None): the GPU when there is one, else the CPU; cpu, cuda and cuda:N are checked
    against this machine."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise SparvarError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise SparvarError(f"sparvar runs on cpu or cuda, not {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SparvarError("CUDA was asked for but this machine has no usable CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SparvarError(f"{device} asked for but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU, float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


RANDOM_CLASS = "random"  # a condition that asks for a random class (the official label_B None)


def labels_of(spec: ModelSpec, conditions: Sequence) -> list[int | None]:
    """Class indices of a class-conditional model's conditions: indices, digit strings or class names;
    None (or "random") where a random class is to be drawn."""
    labels = []
    for c in conditions:
        if c is None or c == RANDOM_CLASS:
            labels.append(None)
            continue
        if isinstance(c, str) and c in spec.classes:
            c = spec.classes.index(c)
        if isinstance(c, str) and c.isdigit():
            c = int(c)
        if not isinstance(c, int) or not 0 <= c < spec.num_classes:
            raise SparvarError(
                f"{spec.name} is class-conditional: give class indices 0..{spec.num_classes - 1}"
                + (f" or names ({', '.join(spec.classes)})" if spec.classes else "")
                + f", or {RANDOM_CLASS!r}, not {c!r}"
            )
        labels.append(c)
    return labels


def check_conditions(spec: ModelSpec, conditions: Sequence, sampler: str = "sparvar") -> None:
    """Prompts for a text model, classes for the others: a bad one fails before any work."""
    if spec.text_conditioned:
        if not all(isinstance(c, str) for c in conditions):
            raise SparvarError(f"{spec.name} is text-conditioned: give prompts (strings)")
        return
    labels = labels_of(spec, conditions)
    if sampler == "official" and None in labels and any(label is not None for label in labels):
        raise SparvarError("the official sampler draws random classes for the whole batch: ask for all or none")


def resolve_policy(attention: AttentionPolicy | str | None) -> AttentionPolicy:
    """None: plain dense SDPA; a preset name: that SparVAR policy (with stats); a policy: itself."""
    if attention is None:
        return DenseAttention()
    if isinstance(attention, AttentionPolicy):
        return attention
    from sparvar.sparsity import make_policy

    return make_policy(attention)


class StageTimer:
    """Wall time between marks; CUDA events on the GPU, so timing adds no host synchronisation."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def seconds(self) -> list[tuple[str, float]]:
        """(name, seconds since the previous mark) for every mark after the first."""
        if self.cuda:
            self.marks[-1][1].synchronize()
            gap = lambda a, b: a.elapsed_time(b) / 1000  # noqa: E731
        else:
            gap = lambda a, b: b - a  # noqa: E731
        return [(n, gap(self.marks[i][1], t)) for i, (n, t) in enumerate(self.marks[1:])]


@dataclass
class GenerationOutput:
    images: list[Image.Image]
    schedule: Schedule
    tokens: list[torch.Tensor]  # sampled tokens per scale: (B, n_k, bits) for Infinity, (B, n_k) for VAR
    scale_seconds: list[float]  # transformer + sampling time of each scale
    stage_seconds: dict[str, float] = field(default_factory=dict)  # condition, transformer, decode, total
    policy: AttentionPolicy | None = None  # the attention policy that ran (sparse ones have stats())
    # scales whose codes made each image (fewer than len(tokens) where adaptive skip stopped it)
    scales_used: list[int] = field(default_factory=list)
    pixels: torch.Tensor | None = None  # the decoded images (B, 3, H, W) in [-1, 1], float32 on the CPU
    labels: list[int] | None = None  # the classes of class-conditional models (random ones as drawn)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


class Pipeline:
    """The model-independent sampler loop over a family's parts (models/base.py says what they do)."""

    def __init__(self, spec: ModelSpec, transformer, vae, text_encoder=None,
                 text_offload: OffloadedModule | None = None):
        self.spec = spec
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_offload = text_offload  # the text encoder's weights visit the GPU only to encode
        self.codes = spec.family.codes(spec, vae)
        self._cache: tuple[tuple, KVCache] | None = None
        self._policies: dict[str, AttentionPolicy] = {}  # named policies kept for graph replays
        self._pruners: dict[str, TokenPruning] = {}  # named token prunings, likewise
        self._graphs: tuple[tuple, ScaleGraphs] | None = None
        self._warm: tuple | None = None  # key of the last eager run that a capture may follow

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def schedule(self, aspect: str = "1:1", resolution: int | None = None) -> Schedule:
        return self.spec.schedule(aspect, resolution)

    @torch.inference_mode()
    def image_tokens(self, images: torch.Tensor, schedule: Schedule) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> the tokens of every scale that describe them, as the
        official VAE encodes (the official `gt_leak` bits / indices): forcing the first scales of
        a generation to them makes variations of the images."""
        h, w = self.codes.latent_size(schedule.sizes[-1])
        expected = (h * self.spec.vae.patch, w * self.spec.vae.patch)
        if tuple(images.shape[-2:]) != expected:
            raise SparvarError(f"images of {images.shape[-2]}x{images.shape[-1]} pixels do not fit scales up to "
                               f"{schedule.sizes[-1]}: give {expected[0]}x{expected[1]}")
        return self.codes.tokens_of(self.vae.latent_of(images.to(self.device)), schedule)

    def encode(self, conditions: Sequence, cuda_graph: bool = False, system_prompt: str | None = None) -> object:
        """Prompts -> text features and mask, or class labels/names -> label tensor. A system
        prompt (HART's prompt enhancement) goes to the text encoders that take one."""
        check_conditions(self.spec, conditions)
        if self.spec.text_conditioned:
            return self._text(list(conditions), cuda_graph, system_prompt)
        labels = labels_of(self.spec, conditions)
        if None in labels:
            raise SparvarError("random classes are drawn by a generation's own generators: pass them to pipe(...)")
        return torch.tensor(labels, device=self.device)

    def _text(self, prompts: list[str], cuda_graph: bool, system_prompt: str | None):
        """The text encoder's features and mask; an offloaded encoder visits the device for them.
        A system prompt (HART's prompt enhancement) goes to the text encoders that take one."""
        options = {"system_prompt": system_prompt} if system_prompt else {}
        if self.text_offload is None:
            return self.text_encoder(prompts, cuda_graph=cuda_graph, **options)
        self.text_offload.bring()
        try:  # no graphs: the weights sit at another address at every visit
            return self.text_encoder(prompts, **options)
        finally:
            self.text_offload.release()

    def _condition(self, conditions: Sequence, config: GenerationConfig, draws: OfficialDraws | None,
                   generators: list[torch.Generator]) -> tuple[object, object, list[int] | None]:
        """(condition, negative prompt's features or None, class labels or None) of one generation:
        a negative prompt is encoded with the prompts, so both are padded alike; random classes
        are drawn from the generation's generators (the official sampler draws them first)."""
        check_conditions(self.spec, conditions, config.sampler)
        if self.spec.text_conditioned:
            prompts = list(conditions)
            negatives = [config.negative_prompt] * len(prompts) if config.negative_prompt else []
            feats, mask = self._text(prompts + negatives, config.cuda_graphs, config.system_prompt)
            b = len(prompts)
            return (feats[:b], mask[:b]), ((feats[b:], mask[b:]) if negatives else None), None
        labels = labels_of(self.spec, conditions)
        if draws is not None and None in labels:
            labels = draws.labels(self.spec.num_classes, len(labels)).tolist()
        else:
            labels = [int(torch.randint(self.spec.num_classes, (1,), generator=g, device=g.device)) if label is None
                      else label for label, g in zip(labels, generators)]
        return torch.tensor(labels, device=self.device), None, labels

    def _graph_runner(self, key: tuple, prep, cache, policy, schedule, num_scales, pruning) -> ScaleGraphs | None:
        """Graphs for this generation's shapes: none on the first (eager, warm-up) run of a
        shape, captured during the second, replayed from then on."""
        if self._graphs is not None and self._graphs[0] == key:
            return self._graphs[1]
        if self._warm != key:
            self._warm = key
            return None
        self._graphs = None  # release the old graphs' memory first
        self._graphs = (key, ScaleGraphs(self.transformer, schedule, num_scales, prep, cache, policy, pruning))
        return self._graphs[1]

    def _kv_cache(self, kind: str, batch: int, capacity: int, stored: int) -> KVCache:
        if kind == "concat":
            return ConcatKVCache()
        key = (kind, batch, capacity, stored)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the old buffer before allocating the new one
            self._cache = (key, self.transformer.new_kv_cache(batch, capacity, kind, stored))
        return self._cache[1]

    @torch.inference_mode()
    def __call__(
        self,
        conditions: Sequence,
        config: GenerationConfig | None = None,
        *,
        progress: bool = True,
        on_scale: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        **options,
    ) -> GenerationOutput:
        """Generate one image per condition (prompts, or class indices or names).

        `config` (a GenerationConfig, sparvar/generation.py) holds the settings; keyword options
        build one or replace some of its fields: `pipe(["a fox"], seed=0, attention="paper")`.
        `on_scale(k, logits, tokens)` sees each scale's guided logits and sampled tokens.
        """
        if isinstance(conditions, (str, int)):
            conditions = [conditions]
        if not conditions:
            raise SparvarError("nothing to generate: give at least one prompt or class")
        config = GenerationConfig.build(config, **options).resolved(self.spec)
        config.check_device(self.spec, self.device, self.transformer.dtype, len(conditions))
        if config.cuda_graphs and self.transformer.stream is not None:
            raise SparvarError("offload 'blocks' streams the weights through the GPU: run it without CUDA graphs")
        schedule = config.schedule
        attention, prune, cuda_graphs = config.attention, config.prune, config.cuda_graphs
        seeds = config.seeds(len(conditions))
        adaptive = resolve_adaptive(config.adaptive_skip)
        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        draws = OfficialDraws(config.seed, self.device) if config.sampler == "official" else None
        if isinstance(attention, str) and cuda_graphs:  # graphs capture one policy object
            if attention not in self._policies:
                self._policies[attention] = resolve_policy(attention)
            attention = self._policies[attention]
        policy = resolve_policy(attention)
        if isinstance(prune, str) and cuda_graphs:
            if prune not in self._pruners:
                self._pruners[prune] = resolve_pruning(prune)
            prune = self._pruners[prune]
        pruning = resolve_pruning(prune)
        # the unconditional half runs only when some scale mixes it in (Infinity: cfg != 1, VAR: cfg != 0)
        weights = config.guidance_weights(self.spec, len(schedule))
        guidance = any(w != 0 for w in weights)

        timer = StageTimer(self.device)
        timer.mark("start")
        condition, negative, labels = self._condition(conditions, config, draws, generators)
        prep = self.transformer.prepare(condition, guidance, negative)
        timer.mark("condition")
        graphs, num_scales = None, len(schedule) - config.skip_last
        # lean and FP8 caches keep no keys of the last scale that runs: none reads them
        cache = self._kv_cache(config.kv_cache, prep.start.shape[0], schedule.total, schedule.offsets[num_scales - 1])
        if cuda_graphs:
            key = (schedule, num_scales, graph_shapes(prep), id(policy), id(pruning))
            graphs = self._graph_runner(key, prep, cache, policy, schedule, num_scales, pruning)
        if graphs is None or not graphs.captured:
            policy.reset()  # replays re-run the captured policy; its Python state stays as captured
            if pruning is not None:
                pruning.reset()
        if graphs is not None:
            graphs.load(prep)
            prep = graphs.prep  # the graphs' copy: the fresh tensors need not stay alive (memory)
        refining = adaptive.start(len(conditions), num_scales) if adaptive is not None else None
        # the warm-up and capturing generations of CUDA graphs run every scale, so that all get captured
        finish = cuda_graphs and (graphs is None or not graphs.captured)
        x, summed, tokens = prep.start, None, []
        for k in tqdm(range(num_scales), desc="scales", disable=not progress, leave=False):
            if graphs is not None:
                logits = graphs.run(k, x)
            else:
                logits = self.transformer.forward_scale(x, k, schedule, prep, cache, policy, pruning)
            logits, hidden = logits if isinstance(logits, tuple) else (logits, None)
            drawn, codes, logits = self._draw(k, logits, config, guidance, weights, draws, generators)
            if hidden is not None:  # a continuous residual on the sampled codes (HART's diffusion head)
                codes = codes + self.transformer.residual(hidden, codes, weights[k], generators)
            if on_scale is not None:
                on_scale(k, logits, drawn)
            tokens.append(drawn)
            new = self.codes.accumulate(summed, codes, k, schedule)
            summed = new if refining is None else refining.step(k, summed, new, schedule)
            stopped = refining is not None and refining.finished and not finish
            if k + 1 < num_scales and not stopped:
                x = self.transformer.embed_codes(self.codes.next_input(summed, k + 1, schedule))
                x = torch.cat([x, x]) if guidance else x
            timer.mark(f"scale {k}")
            if stopped:
                break
        if self.text_offload is not None or self.transformer.stream is not None:
            # memory modes make the cache again for each generation, so that neither the decoder
            # nor the next text encoding meets it (captured graphs keep theirs)
            cache = None
            if graphs is None:
                self._cache = None
        images = self._decode(summed, config.tiled_decode)
        timer.mark("decode")

        seconds = timer.seconds()
        scale_seconds = [s for name, s in seconds if name.startswith("scale")]
        stages = {
            "condition": seconds[0][1],
            "transformer": sum(scale_seconds),
            "decode": seconds[-1][1],
        }
        stages["total"] = sum(stages.values())
        used = refining.scales_used if refining is not None else [num_scales] * len(conditions)
        return GenerationOutput(to_pil(images), schedule, tokens, scale_seconds, stages, policy, used,
                                images.float().cpu(), labels)

    def _draw(self, k: int, logits: torch.Tensor, config: GenerationConfig, guidance: bool, weights: list[float],
              draws: OfficialDraws | None, generators: list[torch.Generator]):
        """Scale k's tokens and codes from the transformer's logits (both CFG halves): guidance,
        temperature, top-k/top-p and the draw, as our sampler or the official one does; then the
        given tokens of forced scales (init_tokens), or VAR's smoothed codes (more_smooth).
        Returns (tokens, codes, the guided logits the tokens were drawn from)."""
        schedule, tau = config.schedule, config.tau_at(k)
        if draws is not None:
            guided = self.transformer.official_guidance(logits, guidance, k, len(schedule), config.cfg_at(k), tau)
            drawn, filtered = draws.tokens(guided, config.top_k_at(k), config.top_p)
        else:
            guided = logits
            if guidance:
                cond, uncond = logits.chunk(2)
                guided = cond + weights[k] * (cond - uncond)
            drawn = sample(guided / tau, generators, config.top_k_at(k), config.top_p)
        if k < config.init_scales:  # drawn all the same, so the random streams go on as without forcing
            given = config.init_tokens[k].to(drawn.device)
            drawn = given.expand_as(drawn) if given.shape[0] == 1 else given
        elif config.more_smooth:
            if draws is None:
                filtered = filter_logits(guided.float() / tau, config.top_k_at(k), config.top_p)
            noise = draws.gumbel(filtered) if draws is not None else item_gumbel(filtered, generators)
            probs = smooth_probs(filtered, noise, k / max(len(schedule) - 1, 1))
            return drawn, self.codes.soft_codes(probs, k, schedule), guided
        return drawn, self.codes.to_codes(drawn, k, schedule), guided

    def _decode(self, latent: torch.Tensor, tiled: bool | None) -> torch.Tensor:
        """The decoder's images, whole or in bands (tiled_decode in GenerationConfig)."""
        if tiled:
            return self.vae.decode_tiled(latent)
        try:
            return self.vae.decode(latent)
        except torch.cuda.OutOfMemoryError:
            if tiled is False or not self.spec.family.tiled_decode:
                raise
        torch.cuda.empty_cache()  # out of the handler, so the failed decode's maps are gone
        return self.vae.decode_tiled(latent)


PRECISIONS = ("auto", "fp8")
OFFLOADS = (None, "text", "blocks")


def check_offload(offload: str | None, spec: ModelSpec) -> None:
    """An offload load_pipeline knows, of a part the model has."""
    if offload not in OFFLOADS:
        raise SparvarError(f"unknown offload {offload!r}; choose text or blocks, or leave it out")
    if offload == "text" and not spec.text_conditioned:
        raise SparvarError(f"offload 'text': {spec.name} has no text encoder")


def check_precision(precision: str, device: torch.device, dtype: torch.dtype) -> None:
    """`auto`: the matmuls in `dtype`; `fp8`: the blocks' in FP8, where the machine has FP8 matmuls."""
    if precision not in PRECISIONS:
        raise SparvarError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "fp8":
        return
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 9):
            raise SparvarError(f"precision fp8 needs a GPU with FP8 matmuls (Ada or Hopper, compute capability "
                               f"8.9+); {torch.cuda.get_device_name(device)} has none")
        if dtype != torch.bfloat16:
            raise SparvarError(f"precision fp8 runs with dtype bfloat16 on the GPU, not {dtype}")


def _bundled(spec: ModelSpec, option: str) -> str | None:
    """The weights shipped in the package for `option`, if the model has any."""
    path = spec.bundled_path(option)
    if path is not None and not path.is_file():
        raise SparvarError(f"{spec.name}'s bundled weights {path} are missing: reinstall sparvar, or train them "
                           "(sparvar train-demo, docs/demo_model.md)")
    return None if path is None else str(path)


def load_pipeline(
    model: str | ModelSpec = "infinity-demo",
    weights: str | None = None,
    vae: str | None = None,
    text_encoder: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    random_weights: bool = False,
    seed: int = 0,
    precision: str = "auto",
    offload: str | None = None,
) -> Pipeline:
    """A ready pipeline for a named model (or a ModelSpec: a registered one at other sizes).

    Official checkpoints load from local paths (`sparvar models` lists which file goes where);
    the demo model loads the weights shipped in the package unless others are given; models
    that need no files build the parts not given with random weights (seeded).
    `random_weights=True` builds every part with random weights (benchmarks, tests).
    bf16 on GPU, float32 on CPU unless `dtype` says otherwise.
    precision "fp8": the transformer blocks' projections (`Family.fp8_layers`) run as FP8 matmuls
    (models/fp8.py), their weights quantised as they load (random weights are drawn in `dtype` first, so an FP8 pipeline
    holds the quantised weights of the same-seeded full-precision one).
    offload "text": the text encoder waits in CPU memory between encodings; "blocks": that, and
    the transformer blocks stream from CPU memory (offload.py; random weights are drawn on the
    device first).
    """
    spec = get_spec(model)
    device = resolve_device(device)
    dtype = dtype or default_dtype(device)
    check_precision(precision, device, dtype)
    check_offload(offload, spec)
    family = spec.family
    if family.configure is not None and not random_weights:
        spec, weights, vae = family.configure(spec, weights, vae)
    if not random_weights:
        weights = weights or _bundled(spec, "--weights")
        vae = vae or _bundled(spec, "--vae")
        text_encoder = text_encoder or _bundled(spec, "--text-encoder")
        given = {"--weights": weights, "--vae": vae, "--text-encoder": text_encoder}
        missing = [opt for opt in spec.files if given[opt] is None]
        if missing:
            raise SparvarError(f"{spec.name} needs " + ", ".join(f"{opt} ({spec.files[opt]})" for opt in missing))

    if weights is None or random_weights:
        transformer = create_model(spec, device, dtype, seed)
        if precision == "fp8":
            quantize_blocks(transformer, family.fp8_layers)
        if offload == "blocks":
            transformer.stream = BlockStream(transformer.blocks, device)
    else:
        transformer = create_model(spec, "meta", dtype)
        state = read_state_dict(weights)
        other = guess_model(state)
        hint = f"It looks like a checkpoint of {other}; pass --model {other}." if other and other != spec.name else ""
        load_strict(transformer, transformer.checkpoint_state(state), f"{spec.name}'s transformer ({weights})", hint)
        transformer = transformer.to(dtype=dtype).eval()
        streamed = offload == "blocks"
        if precision == "fp8":  # layer by layer onto the device, so only FP8 weights pile up there
            quantize_blocks(transformer, family.fp8_layers, "cpu" if streamed else device)
        if streamed:
            move_except_blocks(transformer, device)
            transformer.stream = BlockStream(transformer.blocks, device)
        else:
            transformer = transformer.to(device=device)

    if vae is None or random_weights:
        decoder = create_vae(spec, device, dtype, seed)
    else:
        decoder = create_vae(spec, "meta")
        state = decoder.checkpoint_state(read_state_dict(vae))
        load_strict(decoder, state, f"{spec.name}'s VAE ({vae})")
        decoder = decoder.to(device=device, dtype=dtype).eval()

    encoder = None
    if spec.text_conditioned:
        if text_encoder is None or random_weights:
            encoder = family.text_encoder.random(spec.text, device, dtype, seed, spec.transformer.text_max_len)
        else:
            encoder = family.text_encoder.load(text_encoder, spec.text, device, dtype, spec.transformer.text_max_len)
    text_offload = OffloadedModule(encoder.model, device) if encoder is not None and offload else None
    return Pipeline(spec, transformer, decoder, encoder, text_offload)

