"""sparvar: training-free sparse attention for next-scale-prediction image generators."""

from sparvar.errors import SparvarError
from sparvar.generation import GenerationConfig
from sparvar.loading import load_pipeline
from sparvar.models.registry import MODELS, create_model
from sparvar.pipeline import Pipeline

__version__ = "0.1.0"
__all__ = ["MODELS", "GenerationConfig", "Pipeline", "SparvarError", "create_model", "load_pipeline", "__version__"]
