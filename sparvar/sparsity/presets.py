"""SparVAR settings, the named presets, the grammar that joins a preset with accelerators
("default+fastvar+skip2": `combination`), and the rules that turn settings into a plan.

A plan says, for every (layer, scale) of a model depth and a schedule, which mode runs:
"dense", "decision" (CS4A's dense pass that picks keys), "cs4a" (CS4A's sparse pass) or
"csla". Rules are written relative to the end of the schedule, so the paper's Infinity
1024x1024 settings carry over to any schedule (other aspect ratios, 512x512, VAR):
- sinks: the longest prefix of scales with at most 128 tokens (Infinity 1024: scales 0-4);
- CS4A in the first 11 layers (a shallower model than 32 layers keeps the share 11/32),
  deciding at the third-last scale (Infinity 1024: 10), sparse at the scales after it;
- CSLA in the other layers at the last 3 query scales, window side by key scale counted from
  the last one: 7, 5, 3, 1, 1, then none (Infinity 1024: scales 12..8), sinks whole.
An edit's source slot before the scales (VAREdit's source picture, Schedule.source) is planned
apart: every sparse pass sees the source tokens in a `source_window` x `source_window` window
around each query's projection onto the source grid (the edit keeps most of the picture in
place), the modes and CS4A's top-k are those of the scales alone (so a layer that sees the source
pooled to each scale's grid runs the same modes), and dense passes see all of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache

from sparvar import layout
from sparvar.errors import SparvarError
from sparvar.pruning import PRUNE_PRESETS
from sparvar.schedules import Schedule
from sparvar.sparsity import cs4a
from sparvar.sparsity.csla import csla_block_table
from sparvar.sparsity.stats import table_density

MODES = ("dense", "decision", "cs4a", "csla")
_PAPER_DEPTH = 32  # Infinity-2B's depth; the paper runs CS4A in layers 0-10 of 2B and 8B


@dataclass(frozen=True)
class SparVARConfig:
    """Knobs of the SparVAR policy; defaults are the paper's Infinity 1024x1024 settings."""

    sink_scales: int | None = None  # None: longest prefix of scales with <= 128 tokens
    # CS4A, in the early layers
    cs4a: bool = True
    cs4a_layers: int = 11
    decision_from_end: int = 3  # decision scale = number of scales - 3
    group: int = 192  # queries sharing one key list
    topk: float = 0.2  # share of the keys kept per group (the cap when `mass` is set)
    topk_multiple: int = 112
    mass: float | None = None  # per-group budgets: keep keys up to this share of attention mass
    local_windows: tuple[int, ...] = (7, 9)  # own-scale window at decision+1, +2, ... (last repeats)
    residual: bool = True
    key_mapping: str = "decision"  # "decision": keys as picked (authors' code); "remap": the paper's
    # CSLA, in the later layers
    csla: bool = True
    csla_scales: int = 3  # last query scales that use CSLA
    csla_windows_from_end: tuple[int, ...] = (7, 5, 3, 1, 1)  # key scale K-1, K-2, ...; older: none
    q_block: int = 128
    key_block: int = 128
    # a sparse scale whose planned block density exceeds this runs dense instead (decided on the
    # scales alone where a source slot comes first)
    max_density: float = 1.0
    # a source slot's window side, in source cells, around each query's projection (None: all of it)
    source_window: int | None = 7

    def __post_init__(self):
        if self.key_mapping not in cs4a.KEY_MAPPINGS:
            raise SparvarError(f"key_mapping must be one of {', '.join(cs4a.KEY_MAPPINGS)}, got {self.key_mapping!r}")
        if not 0 < self.topk <= 1 or (self.mass is not None and not 0 < self.mass <= 1):
            raise SparvarError("topk and mass are shares of the keys / of the attention mass, in (0, 1]")
        if min(self.group, self.q_block, self.key_block, self.topk_multiple) < 1 or not self.local_windows:
            raise SparvarError("group, block sizes and topk_multiple must be positive; give at least one local window")
        if self.source_window is not None and self.source_window < 0:
            raise SparvarError(f"source_window is a side in cells, 0 or more (None: the whole source), not "
                               f"{self.source_window}")


@dataclass(frozen=True)
class Preset:
    description: str
    config: SparVARConfig


PRESETS: dict[str, Preset] = {
    "dense": Preset("full attention everywhere (torch SDPA)", SparVARConfig(cs4a=False, csla=False)),
    "paper": Preset(
        "published SparVAR settings: Infinity 1024 CS4A in layers 0-10 (decide at scale 10, top 20%, "
        "local 7/9, residual), CSLA at scales 10-12, sinks 0-4; same rules on other schedules",
        SparVARConfig(),
    ),
    # Chosen on the demo's calibration prompts (benchmarks/default_calibration.md, candidates in
    # tools/default_candidates.json): the highest PSNR at no more attention density than `paper`.
    "default": Preset(
        "paper, but CS4A in layers 0-13 (paper 0-10; shallower models keep the share of 32) keeping its "
        "top 15% of keys (paper 20%) and one local window of 7 (paper 7 and 9); a scale whose plan keeps "
        "over 40% of the blocks runs dense (on an H200 FlexAttention beats cuDNN's dense kernel only below "
        "about 60% of the blocks)",
        SparVARConfig(cs4a_layers=14, topk=0.15, local_windows=(7,), max_density=0.4),
    ),
    "paper-remap": Preset(
        "paper, with CS4A keys re-mapped into the matching finer scales (the paper's formula)",
        SparVARConfig(key_mapping="remap"),
    ),
    "cs4a": Preset("ablation: CS4A with residual cache, later layers dense", SparVARConfig(csla=False)),
    "cs4a-nores": Preset("ablation: CS4A alone, no residual cache, later layers dense",
                         SparVARConfig(csla=False, residual=False)),
    "csla": Preset("ablation: CSLA in the later layers, early layers dense", SparVARConfig(cs4a=False)),
    "mass": Preset(
        "experimental: paper, but CS4A keeps per (sample, head, group) the keys holding 95% of the "
        "attention mass, at most 30% of the keys",
        SparVARConfig(mass=0.95, topk=0.3),
    ),
}


def get_config(preset: str | SparVARConfig, **overrides) -> SparVARConfig:
    """A preset's settings (by name) with some fields replaced."""
    if isinstance(preset, SparVARConfig):
        config = preset
    elif preset in PRESETS:
        config = PRESETS[preset].config
    else:
        raise SparvarError(f"unknown attention preset {preset!r}; choose one of {', '.join(PRESETS)}")
    names = {f.name for f in fields(SparVARConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise SparvarError(f"unknown SparVAR setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    return SparVARConfig(**{**asdict(config), **overrides})


# ---- the grammar of combinations: an attention preset and accelerators ---------------------------


@dataclass(frozen=True)
class Combination:
    """An attention preset with any of: skip the last N scales, a token pruning, adaptive skip."""

    attention: str = "dense"
    skip_last: int = 0
    prune: str | None = None
    adaptive: bool = False

    def options(self) -> dict:
        """Keyword arguments of the pipeline's call, besides `attention`."""
        return {"skip_last": self.skip_last, "prune": self.prune, "adaptive_skip": self.adaptive}

    @property
    def name(self) -> str:
        """The combination in the grammar of `combination`."""
        parts = [self.attention] + [f"skip{self.skip_last}"] * bool(self.skip_last) + [self.prune] * bool(self.prune)
        return "+".join(parts + ["adaptive"] * self.adaptive)

    def with_accelerators(self, skip_last: int = 0, prune: str | None = None, adaptive: bool = False) -> "Combination":
        """This combination with accelerators given apart from its name (the command line's
        --skip-last, --prune, --adaptive-skip); each kind comes once."""
        twice = [(f"skip{skip_last}", self.skip_last and skip_last), (prune, self.prune and prune),
                 ("adaptive", self.adaptive and adaptive)]
        for part, clash in twice:
            if clash:
                raise SparvarError(f"cannot read {part!r} with {self.name!r}: skipN, a token pruning and adaptive "
                                   "come once each, in the preset or as an option")
        return replace(self, skip_last=self.skip_last or skip_last, prune=self.prune or prune,
                       adaptive=self.adaptive or adaptive)

    def describe(self) -> str:
        parts = [f"{self.attention} attention" if self.attention != "dense" else PRESETS["dense"].description]
        if self.prune:
            parts.append(PRUNE_PRESETS[self.prune].description)
        if self.skip_last:
            parts.append("the last scale skipped" if self.skip_last == 1 else f"the last {self.skip_last} scales skipped")
        if self.adaptive:
            parts.append("adaptive skip (demo thresholds)")
        return "; ".join(parts)


def combination(name: str) -> Combination:
    """Read "default+fastvar+skip2": an attention preset first (dense when left out), then in any
    order `skipN`, a token-pruning name ("fastvar") and `adaptive`."""
    parts = [p.strip() for p in name.split("+")]
    attention = parts.pop(0) if parts and parts[0] in PRESETS else "dense"
    skip, prune, adaptive = None, None, False
    for part in parts:
        if part.startswith("skip") and part[4:].isdigit() and skip is None:
            skip = int(part[4:])
        elif part in PRUNE_PRESETS and prune is None:
            prune = part
        elif part == "adaptive" and not adaptive:
            adaptive = True
        else:
            raise SparvarError(
                f"cannot read {part!r} in {name!r}: write an attention preset ({', '.join(PRESETS)}) followed by "
                f"any of skipN, {', '.join(PRUNE_PRESETS)}, adaptive, each once, joined by '+'"
            )
    return Combination(attention, skip or 0, prune, adaptive)


@dataclass(frozen=True)
class Plan:
    """What runs where, for one (config, depth, schedule)."""

    modes: tuple[tuple[str, ...], ...]  # modes[layer][scale]
    cs4a_layers: int  # layers 0..cs4a_layers-1 are the early (CS4A) layers
    sink_scales: int
    decision_scale: int | None
    topk: int  # keys kept per group at the decision scale (the cap when mass budgets are on)
    local_windows: tuple[int, ...]  # own-scale CS4A window per scale (0 where unused)
    csla_windows: tuple[int | None, ...]  # per key scale: None = all tokens, 0 = none
    density: dict  # (mode, scale) -> planned block density; CS4A: an upper bound of its budget
    source_window: int | None = 0  # a source slot's window side (None: all of it); 0 without a source


def _csla_windows(config: SparVARConfig, schedule: Schedule, sinks: int) -> tuple[int | None, ...]:
    from_end = config.csla_windows_from_end
    back = [len(schedule) - 1 - i for i in range(len(schedule))]
    return tuple(None if i < sinks else (from_end[b] if b < len(from_end) else 0) for i, b in enumerate(back))


def cs4a_budget_density(schedule: Schedule, scale: int, sink_tokens: int, topk: int, group: int, side: int,
                        source_side: int | None = 0) -> float:
    """Upper bound of CS4A's density at a later scale: (sinks + source window + top-k + own window) / keys."""
    windows = [cs4a.local_keys(schedule, scale, group, side), cs4a.source_keys(schedule, scale, group, source_side)]
    mean = sum(float(valid.sum(dim=-1).float().mean()) if valid.numel() else 0.0 for _, valid in windows)
    return min(1.0, (sink_tokens + topk + mean) / schedule.kv_length(scale))


@lru_cache(maxsize=64)
def make_plan(config: SparVARConfig, num_layers: int, schedule: Schedule) -> Plan:
    """Apply the rules (module docstring) to one model depth and schedule."""
    if schedule.source is not None:  # the scales' plan, its passes' densities over the source too
        own = make_plan(config, num_layers, schedule.target)
        density = {}
        for mode, k in own.density:
            if mode == "csla":
                table = csla_block_table(schedule, k, own.csla_windows, config.q_block, config.key_block,
                                         source_window=config.source_window)
                density[mode, k] = float(table_density(table).max())
            elif mode == "cs4a":
                sinks = schedule.offsets[own.sink_scales] - schedule.source_length
                density[mode, k] = cs4a_budget_density(schedule, k, sinks, own.topk, config.group,
                                                       own.local_windows[k], config.source_window)
            else:
                density[mode, k] = own.density[mode, k]
        return replace(own, density=density, source_window=config.source_window)
    K = len(schedule)
    sinks = min(K, config.sink_scales if config.sink_scales is not None else layout.default_sink_scales(schedule))
    windows = _csla_windows(config, schedule, sinks)
    n_cs4a = min(config.cs4a_layers, round(num_layers * config.cs4a_layers / _PAPER_DEPTH))

    density = {}
    if config.csla:
        for k in range(max(sinks, K - config.csla_scales), K):
            d = float(table_density(csla_block_table(schedule, k, windows, config.q_block, config.key_block)).max())
            if d <= config.max_density:
                density["csla", k] = d

    S = K - config.decision_from_end
    local, topk = [0] * K, 0
    if config.cs4a and sinks <= S < K - 1:
        topk = cs4a.topk_budget(schedule.kv_length(S), config.topk, config.topk_multiple)
        for k in range(S + 1, K):
            side = config.local_windows[min(k - S - 1, len(config.local_windows) - 1)]
            d = cs4a_budget_density(schedule, k, schedule.offsets[sinks], topk, config.group, side)
            if d <= config.max_density:
                density["cs4a", k], local[k] = d, side
    decision = S if any(m == "cs4a" for m, _ in density) else None
    if decision is not None:
        density["decision", S] = 1.0

    def mode(layer: int, k: int) -> str:
        wanted = ("decision", "cs4a") if layer < n_cs4a else ("csla",)
        return next((m for m in wanted if (m, k) in density), "dense")

    modes = tuple(tuple(mode(layer, k) for k in range(K)) for layer in range(num_layers))
    return Plan(modes, n_cs4a, sinks, decision, topk, tuple(local), windows, density)
