import json
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def official_layouts() -> dict:
    """Key -> shape of the official checkpoints' state dicts (read off their public code)."""
    return json.loads((DATA / "official_layouts.json").read_text())

