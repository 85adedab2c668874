"""SparVAR: training-free sparse attention for next-scale prediction (arXiv 2602.04361).

`make_policy(name)` gives an attention policy for the pipeline; `PRESETS` lists the names with
a one-line description; `combination` reads a preset joined with accelerators
("default+fastvar+skip2"); `plan_report` shows what a preset does to a model without weights.
"""

from sparvar.sparsity.csla import PAPER_CSLA_WINDOWS, csla_block_table
from sparvar.sparsity.plan import plan_report
from sparvar.sparsity.policy import SparVARPolicy
from sparvar.sparsity.presets import PRESETS, Combination, SparVARConfig, combination, get_config, make_plan


def make_policy(name: str, backend: str = "auto", sdpa_backend: str = "auto", **overrides) -> SparVARPolicy:
    """The policy of preset `name` ("dense", "paper", "default", ...), some settings replaced.

    `backend` picks the sparse kernel ("auto": FlashAttention-4 where attention/sparse.py's
    `prefers_fa4` says so, else Triton on CUDA; the CPU backend on the CPU);
    `sdpa_backend` pins torch's kernel for the dense calls ("auto", "flash", "cudnn", ...).
    """
    return SparVARPolicy(get_config(name, **overrides), name=name, backend=backend, sdpa_backend=sdpa_backend)


__all__ = [
    "PAPER_CSLA_WINDOWS",
    "PRESETS",
    "Combination",
    "SparVARConfig",
    "SparVARPolicy",
    "combination",
    "csla_block_table",
    "get_config",
    "make_plan",
    "make_policy",
    "plan_report",
]
