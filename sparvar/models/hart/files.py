"""The official HART folders: `llm/` (config.json, the weights, ema_model.bin) and `tokenizer/`
(config.json, the weights). The architecture comes from their config files, as the official
loader (`AutoModel.from_pretrained`) builds it; a weights file given by itself takes the
config.json beside it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sparvar.errors import SparvarError
from sparvar.models.hart.tokenizer import config_from_json
from sparvar.models.hart.transformer import HARTConfig

EMA = "ema_model.bin"  # the official sampler loads these weights over the folder's (use_ema=True)


def _config(path: str, what: str) -> Path:
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        raise SparvarError(f"{what} {path}: no config.json {'in' if path.is_dir() else 'beside'} it; give the "
                           f"official hart-0.7b-1024px/{'llm' if what == '--weights' else 'tokenizer'} folder")
    return folder / "config.json"


def configure(spec, weights: str | None, vae: str | None):
    """(spec with the folders' architecture, transformer weights to read, tokenizer weights to read).
    A folder's transformer weights are its EMA file where it has one, as the official sampler uses."""
    transformer, tokenizer = spec.transformer, spec.vae
    if vae is not None:
        tokenizer = config_from_json(_config(vae, "--vae"), tokenizer)
    if weights is not None:
        model_json = _config(weights, "--weights")
        token_json = _config(vae, "--vae") if vae is not None else None
        transformer = HARTConfig.from_json(model_json, token_json, transformer)
        if Path(weights).is_dir() and (Path(weights) / EMA).is_file():
            weights = str(Path(weights) / EMA)
    return replace(spec, transformer=transformer, vae=tokenizer), weights, vae
