"""Sparsity methods for ViT training (SViTE and friends), independent of the model code."""
from sparselearning.base import DenseSparsifier, Sparsifier

__all__ = ["DenseSparsifier", "Sparsifier"]
