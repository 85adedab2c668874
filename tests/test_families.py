"""The family contract (models/base.py): every family fills it, lacks options by its capabilities
only, and code outside models/ never asks a family's name."""

import inspect
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from sparvar.errors import SparvarError
from sparvar.generation import GenerationConfig
from sparvar.models.base import OPTIONS, ScaleTransformer
from sparvar.models.registry import FAMILIES, MODELS

PACKAGE = Path(__file__).parent.parent / "sparvar"
TINY = {family: next(s for s in MODELS.values() if s.family is family and s.name.endswith("-tiny"))
        for family in FAMILIES.values()}
# capability -> generation options that ask for it
ASKS = {
    "token_pruning": dict(prune="fastvar"),
    "official_sampler": dict(sampler="official", tau=1.0),
    "negative_prompts": dict(negative_prompt="blurry"),
    "init_images": dict(init_scales=1, init_tokens=(torch.zeros(1, 1, dtype=torch.long),)),
    "more_smooth": dict(more_smooth=True),
    "tiled_decode": dict(tiled_decode=True),
    "system_prompt": dict(system_prompt="be brief"),
    "source_image": dict(image=Image.new("RGB", (8, 8))),
}


def test_every_capability_a_generation_can_ask_for_is_named():
    assert set(ASKS) == set(OPTIONS)


@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES)
def test_every_family_transformer_fills_the_abstract_base(family):
    assert issubclass(family.transformer, ScaleTransformer)
    assert not inspect.isabstract(family.transformer)


@pytest.mark.parametrize("capability", ASKS)
@pytest.mark.parametrize("family", FAMILIES.values(), ids=FAMILIES)
def test_a_family_refuses_what_it_lacks_in_one_line(family, capability):
    spec = TINY[family]
    config = GenerationConfig(**ASKS[capability])
    if getattr(family, capability):
        try:
            config.resolved(spec)
        except SparvarError as err:  # other checks may fail (a prompt on a class model), not the capability
            assert "takes no" not in str(err)
        return
    with pytest.raises(SparvarError) as err:
        config.resolved(spec)
    message = str(err.value)  # VAR's models are class-conditional, which their message for negative prompts says
    assert "\n" not in message and OPTIONS[capability] in message and spec.name in message


def test_no_family_name_is_compared_outside_the_models():
    names = "|".join(re.escape(f.name.lower()) for f in FAMILIES.values())
    compared = re.compile(rf"(==|!=|\bin)\s*\(?\s*[\"'](?:{names})[\"']|family\s*(==|!=|\bin\b)|hasattr\([^)]*decode")
    found = [f"{path.relative_to(PACKAGE)}:{i}" for path in PACKAGE.rglob("*.py") if "models" not in path.parts
             for i, line in enumerate(path.read_text().splitlines(), 1) if compared.search(line)]
    assert not found


@pytest.mark.parametrize("floor", ["kernels", "attention", "kv_cache.py"])
def test_lower_floors_import_nothing_from_the_models(floor):
    """kv_cache, attention and kernels sit under the models: a family may use them, not the reverse."""
    root = PACKAGE / floor
    files = [root] if root.is_file() else sorted(root.rglob("*.py"))
    upward = [f"{path.relative_to(PACKAGE)}: {line.strip()}" for path in files for line in path.read_text().splitlines()
              if re.match(r"\s*(from|import)\s+sparvar\.models\b", line)]
    assert not upward
