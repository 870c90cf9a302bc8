"""Model construction: timm's ViT classes, never a copy of them, plus the token-selection patch and the MAC counter."""
from models.flops import (
    BlockShape,
    MacCount,
    block_shapes,
    count_macs,
    expected_parameters,
    mac_summary,
    mask_densities,
    svite_paper_densities,
    vit_macs,
    weight_densities,
)
from models.token_selection import (
    GlobalTokenSelector,
    TokenConfig,
    TokenSchedule,
    TokenScorer,
    add_token_args,
    apply_token_selection,
    gumbel_topk,
    remove_token_selection,
    tau_at,
    token_scorers,
    visualize_tokens,
)
from models.vit import (
    DATA_MODELS,
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
    "BlockShape",
    "DATA_MODELS",
    "DEIT_MODELS",
    "GlobalTokenSelector",
    "MODEL_NAMES",
    "MacCount",
    "SMALL_MODELS",
    "TokenConfig",
    "TokenSchedule",
    "TokenScorer",
    "add_token_args",
    "apply_token_selection",
    "architecture",
    "block_shapes",
    "count_macs",
    "count_parameters",
    "create_model",
    "default_img_size",
    "expected_parameters",
    "gumbel_topk",
    "mac_summary",
    "mask_densities",
    "remove_token_selection",
    "resize_blocks",
    "svite_paper_densities",
    "tau_at",
    "token_scorers",
    "visualize_tokens",
    "vit_macs",
    "weight_densities",
]

# Structured sparsity: the head/neuron layout and score hooks, and physical compaction.
from models.compact import (  # noqa: E402
    compact_model,
    is_compact_checkpoint,
    load_compact,
    random_compact_model,
    random_unit_masks,
    save_compact,
)
from models.head_stats import HeadStats, StructureUnits, structure_units  # noqa: E402

__all__ += [
    "HeadStats",
    "StructureUnits",
    "compact_model",
    "is_compact_checkpoint",
    "load_compact",
    "random_compact_model",
    "random_unit_masks",
    "save_compact",
    "structure_units",
]

# Reading any checkpoint (this project's, the original SViTE's, timm's), what is really in it, and export.
from models.audit import LayerAudit, audit_layers, audit_warnings, format_audit  # noqa: E402
from models.checkpoint_contents import CheckpointContents, read_checkpoint  # noqa: E402
from models.detect import Detection, check_fits, detect  # noqa: E402
from models.export import export_message, export_model, load_export, load_sparse, save_sparse  # noqa: E402
from models.flops import mac_report, mac_views, nonzero_parameters, structured_form  # noqa: E402
from models.restore import build_model, describe, load_weights, resolve_tokens, token_summary  # noqa: E402

__all__ += [
    "CheckpointContents",
    "Detection",
    "LayerAudit",
    "audit_layers",
    "audit_warnings",
    "build_model",
    "check_fits",
    "describe",
    "detect",
    "export_message",
    "export_model",
    "format_audit",
    "load_export",
    "load_sparse",
    "load_weights",
    "mac_report",
    "mac_views",
    "nonzero_parameters",
    "read_checkpoint",
    "resolve_tokens",
    "save_sparse",
    "structured_form",
    "token_summary",
]
