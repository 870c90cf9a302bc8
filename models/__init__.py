"""Model construction: timm's ViT classes, never a copy of them."""
from models.vit import (
    DEIT_MODELS,
    MODEL_NAMES,
    SMALL_MODELS,
    architecture,
    count_parameters,
    create_model,
    default_img_size,
    resize_blocks,
)

__all__ = [
    "DEIT_MODELS",
    "MODEL_NAMES",
    "SMALL_MODELS",
    "architecture",
    "count_parameters",
    "create_model",
    "default_img_size",
    "resize_blocks",
]
