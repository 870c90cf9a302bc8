"""Is the sparsity a checkpoint claims really in its weights?

Three witnesses are compared with the weights: the masks stored beside them, the training flags recorded in the file,
and the file name (the released SViTE files encode their sparsity in it). The original code's token-selection runs
before 2021-08-14 stored 50% masks while every block stayed dense (the mask-index bug, docs/original-sviite.md); this
is how such a file is caught.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from interop.checkpoint_contents import CheckpointContents
from interop.detect import Detection
from models.flops import is_weight_tensor
from sparselearning.units import kept_count, resolve_multiple

# Densities closer than this agree (masks and weights of a healthy checkpoint agree exactly).
TOLERANCE = 0.01
# A claimed sparsity further than this from the measured one is a false claim.
CLAIM_TOLERANCE = 0.05
_NAME_SPARSITY = re.compile(r"(?:^|[_\-.])(un)?structured?_(\d{1,2})(?=[_\-.]|$)")
_NAME_TOKENS = re.compile(r"sparseinput_(0?\.\d+)")


@dataclass(frozen=True)
class LayerAudit:
    """One tensor: its non-zero fraction, its stored mask's density and the non-zeros the mask says are pruned."""

    name: str
    numel: int
    weight_density: float
    mask_density: float | None
    outside_mask: int

    @property
    def disagrees(self) -> bool:
        return self.mask_density is not None and (
            self.outside_mask > 0 or abs(self.mask_density - self.weight_density) > TOLERANCE)


def audit_layers(contents: CheckpointContents) -> list[LayerAudit]:
    """Every maskable weight, and every other tensor that has a stored mask, in state_dict order."""
    rows = []
    for name, weight in contents.state_dict.items():
        mask = contents.masks.get(name)
        if mask is None and not is_weight_tensor(name, weight):
            continue
        nonzero = weight.ne(0)
        outside = 0 if mask is None else int((nonzero & ~mask.bool()).sum())
        rows.append(LayerAudit(name, weight.numel(), nonzero.float().mean().item(),
                               None if mask is None else mask.float().mean().item(), outside))
    return rows


def format_audit(rows: list[LayerAudit]) -> str:
    """The per-layer table: stored mask density against the zeros actually in the weights."""
    width = max([len(r.name) for r in rows] + [5])
    lines = [f"{'layer':<{width}} {'numel':>10} {'mask density':>12} {'weight density':>14} {'non-zeros outside mask':>22}",
             "-" * (width + 63)]
    for r in rows:
        mask = "-" if r.mask_density is None else f"{r.mask_density:.4f}"
        flag = "  <-- disagrees" if r.disagrees else ""
        lines.append(f"{r.name:<{width}} {r.numel:>10,} {mask:>12} {r.weight_density:>14.4f} {r.outside_mask:>22,}{flag}")
    return "\n".join(lines)


def audit_warnings(contents: CheckpointContents, detection: Detection, rows: list[LayerAudit]) -> list[str]:
    """Loud warnings: masks the weights do not follow, and sparsity claimed by flags or file name but absent."""
    warnings = []
    bad = [r for r in rows if r.disagrees]
    if bad:
        r = bad[0]
        warnings.append(
            f"the stored masks disagree with the weights in {len(bad)} of {sum(r.mask_density is not None for r in rows)}"
            f" masked tensors (e.g. {r.name}: mask density {r.mask_density:.4f}, weight density "
            f"{r.weight_density:.4f}, {r.outside_mask:,} non-zeros where the mask is 0). The weights are what runs.")
        masked_blocks = [r for r in bad if r.name.startswith("blocks.")]
        if detection.selector and masked_blocks and all(r.weight_density > 1 - TOLERANCE for r in masked_blocks):
            warnings.append("the transformer blocks are dense despite their masks: this is the original code's "
                            "mask-index bug, which left token-selection runs made before 2021-08-14 dense "
                            "(docs/original-sviite.md#the-mask-index-bug-before-2021-08-14); the accuracy is that "
                            "of a dense model with a token selector, not of a sparse one")
    warnings += _flag_claims(contents, detection)
    warnings += _name_claims(contents, detection)
    return warnings


def _flag_claims(contents: CheckpointContents, detection: Detection) -> list[str]:
    args, out = contents.args, []
    structured = str(args.get("pruning_type", "")).startswith("structure")
    density = args.get("density")
    if structured:
        heads = int(detection.num_heads * float(args.get("atten_density", 1.0)))
        # a run from before --unit-multiple (or the original SViTE) kept the exact count: multiple 1
        multiple = resolve_multiple(args.get("unit_multiple", 1), detection.mlp_hidden)
        neurons = kept_count(detection.mlp_hidden, float(args.get("other_density", 1.0)), multiple)
        if not (detection.structured or detection.compact) or set(detection.block_heads) != {heads} \
                or set(detection.block_mlp) != {neurons}:
            out.append(f"the recorded flags claim structured sparsity with {heads} heads and {neurons} MLP neurons per "
                       f"block, but the weights have heads {list(detection.block_heads)} and neurons "
                       f"{list(detection.block_mlp)}")
    elif density is not None and float(density) < 1 and detection.weight_density > float(density) + CLAIM_TOLERANCE:
        out.append(f"the recorded flags claim density {float(density):g} but the weights have density "
                   f"{detection.weight_density:.4f}")
    if args.get("token_selection") and detection.selector is None:
        out.append("the recorded flags claim token selection but the file has no token-selector weights")
    return out


def _name_claims(contents: CheckpointContents, detection: Detection) -> list[str]:
    name, out = contents.path.name, []
    match = _NAME_SPARSITY.search(name)
    if match:
        sparsity = int(match.group(2)) / 100
        measured = 1 - detection.weight_density
        if match.group(1):  # "unstructure_50": that fraction of the weights is zero
            if abs(measured - sparsity) > CLAIM_TOLERANCE:
                out.append(f"the file name claims {sparsity:.0%} unstructured sparsity but {measured:.2%} of the "
                           "maskable weights are zero")
        elif not (detection.structured or detection.compact):
            out.append(f"the file name claims {sparsity:.0%} structured sparsity but no head or neuron is pruned")
    tokens = _NAME_TOKENS.search(name)
    if tokens and float(tokens.group(1)) < 1 and detection.selector is None:
        out.append(f"the file name claims token selection (keep {tokens.group(1)}) but the file has no token selector")
    return out
