"""Sparsity methods for ViT training (SViTE and friends), independent of the model code."""
from sparselearning.base import DenseSparsifier, Sparsifier
from sparselearning.config import SparsityConfig, add_sparse_args
from sparselearning.distributions import layer_counts, layer_densities
from sparselearning.dst import Masking, build_sparsifier
from sparselearning.masks import select_parameters
from sparselearning.metrics import density_record, format_table, plot_densities
from sparselearning.nm import nm_parameters
from sparselearning.nm_masking import SRSTE, NMMasking
from sparselearning.structured import StructuredDST, swap_units

__all__ = [
    "DenseSparsifier",
    "Masking",
    "NMMasking",
    "SRSTE",
    "Sparsifier",
    "SparsityConfig",
    "StructuredDST",
    "add_sparse_args",
    "build_sparsifier",
    "density_record",
    "format_table",
    "layer_counts",
    "layer_densities",
    "nm_parameters",
    "plot_densities",
    "select_parameters",
    "swap_units",
]
