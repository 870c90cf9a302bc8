"""Token merging (ToMe, Bolya et al., ICLR 2023): training-free acceleration of a stock timm ViT.

Every block merges r of its tokens between attention and MLP by bipartite soft matching on the attention keys;
merged tokens are size-weighted averages and attention is proportional (log size added to the logits), so a merged
token weighs as the patches it stands for. The prefix (cls, distillation) tokens are never merged. Built from the
paper's description; ToMe's own code carries a non-commercial licence and is not used.

Modules: ``matching`` (the pure tensor functions), ``config`` (settings, flags, per-block r, token counts),
``patch`` (the hooks on timm's blocks: ``apply_token_merging`` / ``remove_token_merging``).
"""
from models.token_merging.config import SCHEDULES, MergeConfig, add_merge_args, token_counts
from models.token_merging.matching import Matching, bipartite_soft_matching, max_merges, merge_tokens, size_bias
from models.token_merging.patch import (
    TokenMerging,
    apply_token_merging,
    block_tokens,
    merge_plan,
    merge_summary,
    remove_token_merging,
)

__all__ = [
    "Matching",
    "MergeConfig",
    "SCHEDULES",
    "TokenMerging",
    "add_merge_args",
    "apply_token_merging",
    "bipartite_soft_matching",
    "block_tokens",
    "max_merges",
    "merge_plan",
    "merge_summary",
    "merge_tokens",
    "remove_token_merging",
    "size_bias",
    "token_counts",
]
