"""HART's hybrid tokenizer: VAR's multi-scale VQVAE whose last scale adds a continuous residual.

The official `tokenizer/` folder (HARTAutoEncoderWithDisc) holds the autoencoder under `vae.*`,
the same encoder, decoder and residual quantiser as VAR's VQVAE (models/var), and under `disc.*`
the discriminator it was trained against, which generation never uses and is left out. Codes
differ from VAR's at the last scale only: its tokens (codeword plus the diffusion head's
residual) are added to f_hat as they are, on the final grid, without a Phi convolution.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from sparvar.errors import SparvarError
from sparvar.models.var.quant import ResidualQuantizer
from sparvar.models.var.vqvae import VQVAE, VQVAEConfig
from sparvar.schedules import Schedule


def config_from_json(path: Path, defaults: VQVAEConfig) -> VQVAEConfig:
    """The autoencoder the official loader builds from tokenizer/config.json."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise SparvarError(f"cannot read {path}: {err}") from None
    expected = {"quantizer_type": "var_hybrid", "using_znorm": False, "double_decoder": False,
                "disable_quant_resi": False}
    for key, value in expected.items():
        if cfg.get(key, value) != value:
            raise SparvarError(f"{path}: {key}={cfg[key]!r} is not supported (only {value!r})")
    if cfg.get("share_quant_resi", 4) < 2 or cfg.get("default_qresi_counts", 0):
        raise SparvarError(f"{path}: only partially shared Phi convolutions (share_quant_resi >= 2) are supported")
    fields = dict(vocab="vocab_size", channels="z_channels", base="ch", phis="share_quant_resi", phi_mix="quant_resi")
    values = {name: cfg[key] for name, key in fields.items() if key in cfg}
    if "ch_mult" in cfg:
        values["ch_mult"] = tuple(cfg["ch_mult"])
    if "v_patch_nums" in cfg:
        values["usage_rows"] = len(cfg["v_patch_nums"])
    return VQVAEConfig(**{**defaults.__dict__, **values})


class HARTTokenizer(nn.Module):
    """The `vae` of the official tokenizer folder: images <-> the latent f_hat."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.vae = VQVAE(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    def init_weights(self, seed: int = 0) -> "HARTTokenizer":
        self.vae.init_weights(seed)
        return self

    @staticmethod
    def checkpoint_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The folder's tensors without the training discriminator (disc.*)."""
        return {k: v for k, v in state.items() if not k.startswith("disc.")}

    def latent_of(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.latent_of(images)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """f_hat (B, C, h, w) -> images (B, 3, 16h, 16w) in [-1, 1], float32."""
        return self.vae.decode(latent)


class HybridCodes:
    """Tokens <-> f_hat for the sampler loop: VAR's residual quantiser, except at the last scale."""

    def __init__(self, quantize: ResidualQuantizer):
        self.quantize = quantize

    def to_codes(self, indices: torch.Tensor, scale: int, schedule: Schedule) -> torch.Tensor:
        return self.quantize.to_codes(indices, scale, schedule)

    def accumulate(self, summed: torch.Tensor | None, codes: torch.Tensor, scale: int, schedule: Schedule):
        if scale == len(schedule) - 1:
            return codes if summed is None else summed + codes
        return self.quantize.accumulate(summed, codes, scale, schedule)

    def next_input(self, summed: torch.Tensor, scale: int, schedule: Schedule) -> torch.Tensor:
        return self.quantize.next_input(summed, scale, schedule)

    @staticmethod
    def latent_size(size: tuple[int, int]) -> tuple[int, int]:
        return size

    def tokens_of(self, latent: torch.Tensor, schedule: Schedule) -> list[torch.Tensor]:
        """The discrete tokens of every scale that describe a latent (the continuous rest of the
        last scale is not a token)."""
        return self.quantize.tokens_of(latent, schedule)
