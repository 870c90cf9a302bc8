"""The paper's numbers that our measurements are set beside, with where each comes from.

These are quotations, not measurements. docs/paper-numbers.md gives the source of each and the meaning of the tags (V
verified in a public source, D digitized from the SViTE README figure, C computed with the MAC formula, R recalled
from the paper and unconfirmed). They live here, as data, so that the results page (docs/results.md) can be
generated without typing a number.
"""
from __future__ import annotations

from dataclasses import dataclass

DENSE_SMALL_TOP1 = 79.90  # DeiT-Small, the SViTE paper's baseline (docs/paper-numbers.md) [V]


@dataclass(frozen=True)
class Anchor:
    """One ImageNet-1k result of the paper (DeiT-Small family unless the setting says otherwise).

    Args:
        setting: the paper's name for it.
        top1: ImageNet top-1 (%).
        flops_saving: FLOP saving against dense, as a fraction (None: not reported).
        time_saving: running-time saving against dense, as a fraction (None: not reported; 0: none expected).
        source: where the numbers come from, with their tags (docs/paper-numbers.md).
    """

    setting: str
    top1: float
    flops_saving: float | None
    time_saving: float | None
    source: str

    @property
    def mac_ratio(self) -> float | None:
        """Dense MACs over the method's: 1 / (1 - saving), comparable with our MAC ratio."""
        return None if self.flops_saving is None else 1.0 / (1.0 - self.flops_saving)

    @property
    def speedup(self) -> float | None:
        """Dense time over the method's: 1 / (1 - time saving), comparable with our measured speedup."""
        return None if self.time_saving is None else 1.0 / (1.0 - self.time_saving)


PAPER: dict[str, Anchor] = {
    "dense": Anchor("DeiT-Small dense", DENSE_SMALL_TOP1, 0.0, 0.0, "SViTE paper baseline = DeiT README [V]"),
    "sviite_d50": Anchor("SViTE-Small, 50% sparsity", 79.76, 0.455, 0.0,
                         "top-1: SViTE README figure [D]; FLOPs [C]; no speed-up with masked dense kernels"),
    "sviite_d30": Anchor("SViTE-Small, 70% sparsity", 78.0, 0.637, 0.0,
                         "top-1: SViTE README figure, ≈ [D]; FLOPs [C]; no speed-up with masked dense kernels"),
    "s2vite_h07_m06": Anchor("S²ViTE-Small, 40% structured", 79.22, 0.3163, 0.2265,
                             "top-1: SPViT paper via gmlwns2000/sttabt [V]; FLOPs and time [R]"),
    "sviteplus_keep07_d50": Anchor("SViTE+ Small, 5% data and 50% weight sparsity (this row keeps 70% of the tokens)",
                                   80.18, 0.4932, 0.044, "SViTE abstract and released checkpoint name [V]; the "
                                   "paper keeps 95% of the tokens, we keep 70%"),
}

# Which paper setting each benchmark-suite mode stands for (masked50 is SViTE's unstructured 50%, compact S²ViTE's
# 0.7/0.6 structure). The token modes have none: SViTE+ zeroes tokens on an unstructured model, so it saves no time.
SUITE_TO_PAPER = {"masked50": "sviite_d50", "compact": "s2vite_h07_m06"}

# Measured token-reduction speed-ups on DeiT-Small by other methods (V100), for scale (docs/paper-numbers.md).
COMPARATORS = "ToMe 1.67× at −0.44 top-1, EViT ≈1.5× at −0.3, DynamicViT ≈1.4–1.5× at −0.5 (DeiT-Small, V100)"

# ToMe's own numbers for DeiT-Small at r = 13 (facebookresearch/ToMe README and paper; docs/paper-numbers.md) [V].
TOME = ("ToMe, DeiT-Small, r = 13: 2.7 GFLOPs; 1.67× on a V100 (1550 against 930 img/s) and top-1 79.36 (−0.44) "
        "trained with merging; 78.83 (−0.97) off the shelf, no training")
