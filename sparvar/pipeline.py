"""The sampler loop: condition -> scales 0..K-1 through the transformer -> tokenizer decoder -> images.

    pipe = sparvar.load_pipeline("infinity-2b", weights=..., vae=..., text_encoder=...)  # loading.py
    out = pipe(["a red fox in the snow"], seed=0)          # out.images: list of PIL images

The options of a generation are a GenerationConfig (sparvar/generation.py); a call checks them
with the conditions against the model and the machine (validation.py), then runs the loop
(`generate`). Every self-attention call goes through the attention policy (`attention=`), the
seam SparVAR fills.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from sparvar.attention.policy import AttentionPolicy, DenseAttention
from sparvar.errors import SparvarError
from sparvar.generation import GenerationConfig
from sparvar.graphs import ScaleGraphs
from sparvar.graphs import shapes as graph_shapes
from sparvar.kv_cache import ConcatKVCache, KVCache
from sparvar.models.registry import ModelSpec
from sparvar.offload import OffloadedModule
from sparvar.pruning import TokenPruning, resolve_pruning
from sparvar.sampling import OfficialDraws, filter_logits, item_gumbel, sample, smooth_probs
from sparvar.schedules import Schedule
from sparvar.skipping import resolve_adaptive
from sparvar.validation import check_conditions, labels_of, validate


def resolve_policy(attention: AttentionPolicy | str | None) -> AttentionPolicy:
    """None: plain dense SDPA; a preset name: that SparVAR policy (with stats); a policy: itself."""
    if attention is None:
        return DenseAttention()
    if isinstance(attention, AttentionPolicy):
        return attention
    from sparvar.sparsity import make_policy

    return make_policy(attention)


class StageTimer:
    """Wall time between marks; CUDA events on the GPU, so timing adds no host synchronisation.
    On the GPU it also notes the allocator's peak so far at the end of a stage (a host-side counter)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[tuple[str, object]] = []
        self.peak_gib: dict[str, float] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def note_peak(self, stage: str) -> None:
        if self.cuda:
            self.peak_gib[stage] = torch.cuda.max_memory_allocated(self.device) / 2**30

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
    # on a GPU: torch.cuda.max_memory_allocated (GiB, since its last reset) at the end of condition,
    # transformer and decode, so a rise between two says which stage set the peak
    stage_peak_gib: dict[str, float] = field(default_factory=dict)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]


class Pipeline:
    """The model-independent sampler loop over a family's parts (models/base.py says what they do)."""

    def __init__(self, spec: ModelSpec, transformer, vae, text_encoder=None,
                 text_offload: OffloadedModule | None = None, precision: str = "auto", offload: str | None = None):
        self.spec = spec
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_offload = text_offload  # the text encoder's weights visit the GPU only to encode
        self.precision, self.offload = precision, offload  # as loaded (load_pipeline)
        self.codes = spec.family.codes(spec, vae)
        self._cache: tuple[tuple, KVCache] | None = None
        self._policies: dict[str, AttentionPolicy] = {}  # named policies kept for graph replays
        self._pruners: dict[str, TokenPruning] = {}  # named token prunings, likewise
        self._graphs: tuple[tuple, ScaleGraphs] | None = None
        self._warm: tuple | None = None  # key of the last eager run that a capture may follow

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def validate(self, conditions: Sequence, config: GenerationConfig, batch: int | None = None) -> GenerationConfig:
        """`config` resolved for this pipeline's model once the generation holds (validation.validate)."""
        return validate(self.spec, conditions, config, self.device, self.transformer.dtype, self.precision,
                        self.offload, batch)

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
        """Prompts -> text features and mask, or class labels -> label tensor. A system
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
        if self.spec.text_conditioned:
            prompts = list(conditions)
            negatives = [config.negative_prompt] * len(prompts) if config.negative_prompt else []
            feats, mask = self._text(prompts + negatives, config.cuda_graphs, config.system_prompt)
            b = len(prompts)
            condition = (feats[:b], mask[:b])
            if config.image is not None:  # an edit: the source pictures' input follows the text's
                condition += (self._source(config.image, b, config.schedule),)
            return condition, ((feats[b:], mask[b:]) if negatives else None), None
        labels = labels_of(self.spec, conditions)
        if draws is not None and None in labels:
            labels = draws.labels(self.spec.num_classes, len(labels)).tolist()
        else:
            labels = [int(torch.randint(self.spec.num_classes, (1,), generator=g, device=g.device)) if label is None
                      else label for label, g in zip(labels, generators)]
        return torch.tensor(labels, device=self.device), None, labels

    def _source(self, images, count: int, schedule: Schedule) -> torch.Tensor:
        """The transformer input (count, n, channels) of an edit's source pictures (one, or one per
        item): the family's pixels of them, encoded by the VAE and seen at the last scale's grid."""
        side = self.spec.image_size(schedule)[0]
        pixels = self.spec.family.source_image.pixels(list(images), side).to(self.device)
        source = self.codes.next_input(self.vae.latent_of(pixels), len(schedule) - 1, schedule)
        return source.expand(count, -1, -1) if len(images) == 1 else source

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
        """Generate one image per condition (prompts, or class indices).

        `config` (a GenerationConfig, sparvar/generation.py) holds the settings; keyword options
        build one or replace some of its fields: `pipe(["a fox"], seed=0, attention="paper")`.
        `on_scale(k, logits, tokens)` sees each scale's guided logits and sampled tokens.
        Everything is checked (`validate`) before the first scale runs.
        """
        conditions = [conditions] if isinstance(conditions, (str, int)) else list(conditions)
        config = self.validate(conditions, GenerationConfig.build(config, **options))
        return self.generate(conditions, config, progress=progress, on_scale=on_scale)

    @torch.inference_mode()
    def generate(self, conditions: list, config: GenerationConfig, progress: bool = True,
                 on_scale: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> GenerationOutput:
        """The loop itself, for conditions and a config that `validate` returned (the command
        line, batch jobs, eval and the web page validate before they come here)."""
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
        timer.note_peak("condition")
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
        timer.note_peak("transformer")
        if self.text_offload is not None or self.transformer.stream is not None:
            # memory modes make the cache again for each generation, so that neither the decoder
            # nor the next text encoding meets it (captured graphs keep theirs)
            cache = None
            if graphs is None:
                self._cache = None
        with graphs.between_replays() if graphs is not None else contextlib.nullcontext():
            # the decoder takes the blocks the scales' graphs free; its images leave for the CPU here
            images = self._decode(summed, config.tiled_decode).float().cpu()
        timer.mark("decode")
        timer.note_peak("decode")

        seconds = timer.seconds()
        scale_seconds = [s for name, s in seconds if name.startswith("scale")]
        stages = {
            "condition": seconds[0][1],
            "transformer": sum(scale_seconds),
            "decode": seconds[-1][1],
        }
        stages["total"] = sum(stages.values())
        used = refining.scales_used if refining is not None else [num_scales] * len(conditions)
        pictures = to_pil(images)
        if config.image is not None:  # edits come back in the shapes of their source pictures
            sources = config.image * len(pictures) if len(config.image) == 1 else config.image
            pictures = [self.spec.family.source_image.restore(p, s.size) for p, s in zip(pictures, sources)]
        return GenerationOutput(pictures, schedule, tokens, scale_seconds, stages, policy, used, images,
                                labels, timer.peak_gib)

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


