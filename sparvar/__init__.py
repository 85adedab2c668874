"""sparvar: training-free sparse attention for next-scale-prediction image generators."""

from sparvar.errors import SparvarError

__version__ = "0.1.0"
__all__ = ["SparvarError", "__version__"]
