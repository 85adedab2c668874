"""What the tests share: small random models, a generation without a model, random block tables,
error measures, and independent oracles (plain numpy re-derivations of what the code computes)."""

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from sparvar.attention.policy import AttentionCall
from sparvar.attention.tables import BlockTable
from sparvar.cli import main as cli_main
from sparvar.models.infinity.text import TextEncoder
from sparvar.models.infinity.transformer import InfinityTransformer
from sparvar.models.infinity.vae import InfinityVAE
from sparvar.models.registry import MODELS
from sparvar.models.var.transformer import VARTransformer
from sparvar.models.var.vqvae import VQVAE
from sparvar.models.varedit.transformer import VAREditTransformer, pool_source
from sparvar.pipeline import Pipeline


# ---- small random models --------------------------------------------------------------------------
def tiny_pipeline(seed: int = 0, **overrides) -> Pipeline:
    """infinity-tiny (text-conditioned) with config fields overridden, random weights, on the CPU."""
    spec = MODELS["infinity-tiny"]
    spec = replace(spec, transformer=replace(spec.transformer, **overrides))
    transformer = InfinityTransformer(spec.transformer).init_weights(seed).eval()
    vae = InfinityVAE(spec.vae).init_weights(seed).eval()
    text = None
    if spec.transformer.text_conditioned:
        text = TextEncoder.random(spec.text, "cpu", torch.float32, seed, spec.transformer.text_max_len)
    else:
        spec = replace(spec, text=None)
    return Pipeline(spec, transformer, vae, text)


def var_pipeline(seed: int = 0, **overrides) -> Pipeline:
    """var-tiny (VAR's 10 scales, 32x32 pixels) with config fields overridden, random weights, on the CPU."""
    spec = MODELS["var-tiny"]
    spec = replace(spec, transformer=replace(spec.transformer, **overrides))
    transformer = VARTransformer(spec.transformer).init_weights(seed).eval()
    return Pipeline(spec, transformer, VQVAE(spec.vae).init_weights(seed).eval())


def edit_pipeline(seed: int = 0, **overrides) -> Pipeline:
    """varedit-tiny (7 scales after a 16x16 source, 32x32 pixels) with config fields overridden,
    random weights, on the CPU."""
    spec = MODELS["varedit-tiny"]
    spec = replace(spec, transformer=replace(spec.transformer, **overrides))
    transformer = VAREditTransformer(spec.transformer).init_weights(seed).eval()
    text = TextEncoder.random(spec.text, "cpu", torch.float32, seed, spec.transformer.text_max_len)
    return Pipeline(spec, transformer, InfinityVAE(spec.vae).init_weights(seed).eval(), text)


@torch.no_grad()  # the sampled tokens are inference tensors
def teacher_forced_logits(pipe: Pipeline, conditions, schedule, tokens, cfg: float, image=None) -> torch.Tensor:
    """Guided logits of one full forward pass (block-causal mask) over the sequence rebuilt from
    the sampled tokens: what the KV-cache loop must have produced scale by scale. `image`: an
    edit's source picture."""
    model, codes = pipe.transformer, pipe.codes
    weights = [model.guidance_weight(k, len(schedule), cfg) for k in range(len(schedule))]
    guidance = any(w != 0 for w in weights)
    summed, inputs = None, []
    for k, drawn in enumerate(tokens):
        summed = codes.accumulate(summed, codes.to_codes(drawn, k, schedule), k, schedule)
        if k + 1 < len(schedule):
            x = codes.next_input(summed, k + 1, schedule)
            inputs.append(torch.cat([x, x]) if guidance else x)
    condition = pipe.encode(conditions)
    if image is not None:
        condition += (pipe._source((image,), len(conditions), schedule),)
    logits = model.forward_full(inputs, schedule, model.prepare(condition, guidance))
    if not guidance:
        return logits
    cond, uncond = logits.chunk(2)
    grids = [h * w for h, w in schedule.sizes]  # HART's logits of scale 0 are its text's last position's
    w = torch.repeat_interleave(torch.tensor(weights), torch.tensor(grids))
    return cond + w.view(1, -1, *[1] * (cond.dim() - 2)) * (cond - uncond)


# ---- a generation without a model ----------------------------------------------------------------
def simulate(
    policy, schedule, num_layers=3, batch=2, heads=2, dim=16, seed=0, dtype=torch.float32, sharpness=8.0, device="cpu",
    pooled_layers=(),
):
    """Random q/k/v per (layer, scale) through a static KV cache laid out as the pipeline's: cache
    (B, H, N_total, D), a source slot (Schedule.source) filled first, scale k writes [offset_k,
    offset_k + n_k), the policy sees the views [:, :, :kv_length(k)] (in `pooled_layers`, the
    source pooled to scale k's grid, as VAREdit's first layer sees it). Returns {(layer, scale):
    (q, k_view, v_view, out)}.

    Queries and keys are unit vectors and queries are scaled by `sharpness` (cosine attention,
    softmax scale 1), so attention is peaked as in real models rather than uniform.
    """
    gen = torch.Generator().manual_seed(seed)
    total, source = schedule.total, schedule.source_length
    cache_k = torch.zeros(num_layers, batch, heads, total, dim, dtype=dtype, device=device)
    cache_v = torch.zeros_like(cache_k)
    cache_k[:, :, :, :source] = F.normalize(torch.randn(num_layers, batch, heads, source, dim, generator=gen), dim=-1)
    cache_v[:, :, :, :source] = torch.randn(num_layers, batch, heads, source, dim, generator=gen)
    policy.reset()
    seen = {}
    for scale, n in enumerate(schedule.lengths):
        start = schedule.offsets[scale]
        end = start + n
        for layer in range(num_layers):
            q = (F.normalize(torch.randn(batch, heads, n, dim, generator=gen), dim=-1) * sharpness).to(device, dtype)
            cache_k[layer, :, :, start:end] = F.normalize(torch.randn(batch, heads, n, dim, generator=gen), dim=-1)
            cache_v[layer, :, :, start:end] = torch.randn(batch, heads, n, dim, generator=gen)
            k, v, keys = cache_k[layer, :, :, :end], cache_v[layer, :, :, :end], schedule
            if layer in pooled_layers:
                k, v, keys = pool_source(k, schedule, scale), pool_source(v, schedule, scale), schedule.pooled(scale)
            call = AttentionCall(layer, scale, num_layers, keys, 1.0)
            seen[layer, scale] = (q, k, v, policy(q, k, v, call))
    return seen


def all_covering(schedule, **extra):
    """SparVAR settings whose every mode runs on `schedule` and keeps every key (windows past every
    grid, the whole top-k, the whole source): sparse passes must then give dense attention."""
    from sparvar.sparsity import get_config

    K = len(schedule)
    settings = dict(sink_scales=1, decision_from_end=2, topk=1.0, local_windows=(99,), csla_scales=K - 1,
                    csla_windows_from_end=(99,) * K, group=24, q_block=32, key_block=32, source_window=None)
    return get_config("paper", **{**settings, **extra})


def capture_tables(monkeypatch) -> dict:
    """The tables the SparVAR policy hands to sparse_attention, keyed by (query length, key length)."""
    import sparvar.sparsity.policy as policy_module
    from sparvar.attention.sparse import sparse_attention

    tables = {}

    def spy(q, k, v, table, scale, backend="auto"):
        tables[q.shape[2], k.shape[2]] = table
        return sparse_attention(q, k, v, table, scale, backend)

    monkeypatch.setattr(policy_module, "sparse_attention", spy)
    return tables


def random_table(b: int, h: int, q_len: int, kv_len: int, q_block: int, key_block: int, *, density: float = 1.0,
                 max_entries: int | None = None, junk: int | None = None, seed: int = 0, device="cpu") -> BlockTable:
    """A sparse plan of (b, h) tables: per query block distinct random key units (up to about
    `density` of them, at most `max_entries`), random counts of at least one, the first query
    block and a fifth of the others empty. Past each count stand random units, or `junk` (an
    index past every unit, for readers that must never touch those entries)."""
    gen = torch.Generator().manual_seed(seed)
    nq, units = -(-q_len // q_block), -(-kv_len // key_block)
    width = min(units, max_entries or units, max(1, round(density * units) + 2))
    order = torch.argsort(torch.rand(b, h, nq, units, generator=gen), dim=-1)[..., :width]
    counts = torch.randint(1, width + 1, (b, h, nq), generator=gen)
    counts.view(-1)[torch.randperm(counts.numel(), generator=gen)[: counts.numel() // 5]] = 0
    counts[..., 0] = 0
    past = torch.randint(0, units, order.shape, generator=gen) if junk is None else torch.full_like(order, junk)
    indices = torch.where(torch.arange(width) < counts[..., None], order, past)
    return BlockTable(counts.int().to(device), indices.int().to(device), q_block, key_block, q_len, kv_len)


# Tables whose translation into a library's inputs must cover exactly the table's mask:
# (the table's batch and heads, the inputs' batch and heads, q_len, kv_len, q_block, key_block, density)
AWKWARD_TABLES = [
    (1, 1, 2, 28, 4096, 10521, 128, 128, 0.165),  # 8B scale 12 with CFG, one table for all
    (2, 3, 2, 3, 200, 300, 64, 64, 0.5),  # per item and head; neither length a multiple of its block
    (1, 2, 3, 2, 130, 129, 128, 16, 0.3),  # the last key block one token long; broadcast over the batch
    (2, 1, 2, 4, 64, 1000, 64, 128, 1.0),
]


def gathered_table() -> BlockTable:
    """A table of single keys (key_block 1, CS4A's gathered form), which block libraries refuse."""
    return BlockTable(torch.ones(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 1, dtype=torch.int32),
                      192, 1, 300, 50)


# ---- measures ---------------------------------------------------------------------------------------
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32 (0 where both are all zeros, as for tables that list nothing)."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def same_generation(a, b) -> bool:
    """Two generations drew the same tokens at every scale and decoded the same pixels."""
    same = len(a.tokens) == len(b.tokens) and all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens))
    return same and torch.equal(a.pixels, b.pixels)


def cli_error(capsys, argv) -> str:
    """The one-line error `sparvar ARGV` ends with (exit status 2, no traceback)."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


# ---- independent oracles ---------------------------------------------------------------------------
def nearest_groups(schedule, src: int, dst: int, group: int) -> torch.Tensor:
    """What cs4a.group_map must give: for each group of `group` consecutive (row-major) tokens of
    scale dst, the group of scale src whose mean cell centre, as a share of its grid, is nearest."""
    def centres(scale):
        h, w = schedule.sizes[scale]
        y, x = np.divmod(np.arange(h * w), w)
        cells = np.stack([(y + 0.5) / h, (x + 0.5) / w], 1)
        return np.array([cells[i : i + group].mean(0) for i in range(0, h * w, group)])

    return torch.from_numpy((((centres(dst)[:, None] - centres(src)[None]) ** 2).sum(-1)).argmin(1))


def detail_energy(latent: np.ndarray) -> np.ndarray:
    """What AdaptiveSkip.score must give for latents (B, c, H, W): the mean square of the latent
    minus its blur through the grid a quarter of its side (means over the pixels of each coarse
    cell, then bilinear interpolation between cell centres, held flat past the outer ones)."""
    def shrink(values, axis, size):  # cell i spans pixels floor(i n / size) .. ceil((i + 1) n / size)
        n = values.shape[axis]
        bounds = [(i * n // size, -(-(i + 1) * n // size)) for i in range(size)]
        return np.stack([values.take(range(a, b), axis).mean(axis) for a, b in bounds], axis)

    def stretch(values, axis, size):  # pixel centres onto the coarse grid's coordinates
        where = (np.arange(size) + 0.5) * values.shape[axis] / size - 0.5
        return np.apply_along_axis(lambda line: np.interp(where, np.arange(len(line)), line), axis, values)

    h, w = latent.shape[-2:]
    coarse = shrink(shrink(latent, 2, max(1, h // 4)), 3, max(1, w // 4))
    blur = stretch(stretch(coarse, 2, h), 3, w)
    return ((latent - blur) ** 2).mean(axis=(1, 2, 3))


RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def difference_picture(a, b, gain: float = 4.0) -> np.ndarray:
    """What eval.draw.difference_map must draw: |a - b| of two RGB pictures, averaged over the
    channels, in [0, 1] of full scale times `gain`, through the five-colour ramp (uint8 RGB)."""
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean(-1) / 255 * gain
    stops = np.linspace(0, 1, len(RAMP))
    rgb = [np.interp(np.clip(d, 0, 1), stops, RAMP[:, c]) for c in range(3)]
    return np.stack(rgb, -1).round().astype(np.uint8)
