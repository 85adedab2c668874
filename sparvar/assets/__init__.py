"""Weights shipped with the package: the trained demo model (see sparvar/demo/train.py)."""
