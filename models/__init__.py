"""Model construction: timm's ViT classes, never a copy of them, plus the token-selection and token-merging patches
and the MAC counter.

No file format lives here: reading, detecting, auditing, restoring and exporting checkpoints is ``interop``'s job.
"""
from models.flops import (
    BlockShape,
    MacCount,
    block_shapes,
    count_macs,
    expected_parameters,
    mac_report,
    mac_summary,
    mac_views,
    mask_densities,
    merges_for_macs,
    nonzero_parameters,
    structured_form,
    svite_paper_densities,
    vit_macs,
    weight_densities,
)
from models.semi_structured import SemiStructured, to_semi_structured, two_four_linears
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
    SMALL_DISTILLED,
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
    "SMALL_DISTILLED",
    "SMALL_MODELS",
    "SemiStructured",
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
    "mac_report",
    "mac_summary",
    "mac_views",
    "mask_densities",
    "merges_for_macs",
    "nonzero_parameters",
    "remove_token_selection",
    "resize_blocks",
    "structured_form",
    "svite_paper_densities",
    "tau_at",
    "to_semi_structured",
    "token_scorers",
    "two_four_linears",
    "visualize_tokens",
    "vit_macs",
    "weight_densities",
]

# Structured sparsity: the head/neuron layout and score hooks, and physical compaction.
from models.compact import (  # noqa: E402
    compact_model,
    random_compact_model,
    random_unit_masks,
)
from models.head_stats import HeadStats, StructureUnits, structure_units  # noqa: E402

__all__ += [
    "HeadStats",
    "StructureUnits",
    "compact_model",
    "random_compact_model",
    "random_unit_masks",
    "structure_units",
]

# Global structural pruning: every unit group including the embedding channels, and their MAC count.
from models.global_units import GlobalUnits, global_units  # noqa: E402

__all__ += ["GlobalUnits", "global_units"]

# Token merging (ToMe): training-free, hooks on timm's blocks.
from models.token_merging import (  # noqa: E402
    MergeConfig,
    add_merge_args,
    apply_token_merging,
    merge_plan,
    merge_summary,
    remove_token_merging,
)

__all__ += [
    "MergeConfig",
    "add_merge_args",
    "apply_token_merging",
    "merge_plan",
    "merge_summary",
    "remove_token_merging",
]
