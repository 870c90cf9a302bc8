"""The EMA of a sparse model carries the model's sparsity: same zero pattern, same density, compactable."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import models
import sparselearning
from sparselearning.base import SparsifierChain
from conftest import TINY_RUN, run_main
from interop.checkpoint import load_checkpoint

UNSTRUCTURED = ("--density", "0.1", "--sparse_init", "fixed_ERK", "--update_frequency", "20", "--growth", "gradient")
STRUCTURED = ("--pruning_type", "structure_new", "--atten_head", "2", "--atten_density", "0.5",
              "--other_density", "0.5", "--update_frequency", "20", "--density", "0.5", "--sparse_init", "fixed_ERK")
TOKENS = (*UNSTRUCTURED, "--token_selection", "--token-ratio", "0.7", "--token-mode", "drop")


def masks_of(sparsifier_state: dict) -> dict[str, torch.Tensor]:
    """The masks of a saved sparsifier, whether it stands alone or is a member of a chain."""
    if "masks" in sparsifier_state:
        return sparsifier_state["masks"]
    return next(member["masks"] for member in sparsifier_state.values() if "masks" in member)


RUNS = {"unstructured": UNSTRUCTURED, "structured": STRUCTURED, "tokens": TOKENS}


@pytest.fixture(scope="module")
def run(request, tmp_path_factory) -> Path:
    """One epoch (44 steps, one topology update) with EMA on at decay 0.9: a dense EMA would be non-zero almost everywhere."""
    out = tmp_path_factory.mktemp(request.param)
    run_main(*TINY_RUN, "--epochs", "1", "--model-ema-decay", "0.9", "--output_dir", str(out), *RUNS[request.param])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS), indirect=True)
def test_ema_has_exactly_the_zero_pattern_of_the_masks(run: Path) -> None:
    ckpt = load_checkpoint(run / "checkpoint.pth")
    masks = masks_of(ckpt["sparsifier"])
    ema = ckpt["model_ema"]
    assert ema.keys() == ckpt["model"].keys()
    for name, mask in masks.items():
        assert torch.equal(ema[name] != 0, mask), f"{name}: EMA non-zeros differ from the mask"
    active = sum(int(m.sum()) for m in masks.values())
    assert sum(int((ema[n] != 0).sum()) for n in masks) == active
    assert not torch.equal(ema["blocks.0.mlp.fc1.weight"], ckpt["model"]["blocks.0.mlp.fc1.weight"])  # a real EMA


@pytest.mark.slow
@pytest.mark.parametrize("run", ["structured"], indirect=True)
def test_structured_ema_compacts_to_the_model_architecture(run: Path) -> None:
    ckpt = load_checkpoint(run / "checkpoint.pth")
    ema = models.create_model("vit_digits_micro", num_classes=10)
    ema.load_state_dict(ckpt["model_ema"])
    ema.eval()
    compact = models.compact_model(ema)  # from the EMA's own zero pattern
    trained = load_checkpoint(run / "compact.pth")["architecture"]
    arch = models.architecture(compact)
    assert arch["block_heads"] == trained["block_heads"] == [1, 1]
    assert arch["block_mlp_hidden"] == trained["block_mlp_hidden"] == [64, 64]
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(compact(x), ema(x), rtol=1e-5, atol=1e-5)


def test_apply_masks_zeroes_exactly_the_masked_entries_of_a_copy() -> None:
    """Through a chain with a token schedule (a no-op member); NaN at a masked position becomes an exact zero."""
    model = models.create_model("vit_digits_micro", num_classes=10)
    models.apply_token_selection(model, models.TokenConfig(enabled=True, ratio=0.7, mode="drop"))
    optimizer = torch.optim.AdamW(model.parameters())
    masking = sparselearning.Masking(model, optimizer, density=0.2, total_steps=1000, log_fn=lambda record: None)
    chain = SparsifierChain(masking, models.TokenSchedule(model, models.TokenConfig(enabled=True), 1000))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.normal_()
        ema.blocks[0].mlp.fc1.weight[~masking.masks["blocks.0.mlp.fc1.weight"]] = float("nan")
    gumbel = ema.gumbel.weight.clone()
    chain.apply_masks(ema)
    params = dict(ema.named_parameters())
    for name, mask in masking.masks.items():
        assert torch.equal(params[name] != 0, mask), name
    assert torch.equal(ema.gumbel.weight, gumbel)  # unmasked parameters untouched
    with pytest.raises(ValueError, match="same parameter names"):
        masking.apply_masks(torch.nn.Linear(2, 2))
