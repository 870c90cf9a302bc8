"""One count, one definition (issue 12, item 7): non-zero parameters and theoretical MACs agree between the training
log, the sparsifier, --eval/--flops and the compact model; token flags of --eval read what a checkpoint records."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

import main
import models
from conftest import TINY_RUN
from sparselearning import Masking

MICRO = "vit_digits_micro"


def parse(*flags: str) -> argparse.Namespace:
    return main.get_args_parser().parse_args([*TINY_RUN, "--model", MICRO, *flags])


def structured_model() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A micro ViT with half its heads and MLP neurons masked off, as S²ViTE trains it (proj/fc2 columns unmasked)."""
    torch.manual_seed(0)
    model = models.create_model(MICRO, num_classes=10).eval()
    masks = models.random_unit_masks(model, 0.5, 0.5, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return model, masks


def test_structured_count_is_the_compact_models_everywhere() -> None:
    model, masks = structured_model()
    compact = models.compact_model(model, masks)
    size = sum(p.numel() for p in compact.parameters())
    assert models.nonzero_parameters(model) == models.nonzero_parameters(model, masks) == size
    assert models.count_parameters(model) == (sum(p.numel() for p in model.parameters()), size)
    assert models.mac_views(model)["params_nonzero"] == models.mac_summary(model)["params_nonzero"] == size


def test_structured_theoretical_macs_remove_heads_and_neurons_like_the_compact_model() -> None:
    model, _ = structured_model()
    compact = models.compact_model(model)
    views = models.mac_views(model)
    assert views["theoretical"] == pytest.approx(models.count_macs(compact, "executed").total)
    saving = 1 - views["theoretical"] / views["dense"]
    assert saving > 0.4  # half the heads and neurons; the per-weight count gave about half this
    assert f"(saving {saving:.2%})" in models.mac_report(model)[2]
    assert views["executed"] == views["dense"]  # the masked model still runs the dense matmuls


def test_unstructured_count_is_the_sparsifiers_and_follows_masks() -> None:
    torch.manual_seed(0)
    model = models.create_model(MICRO, num_classes=10)
    masking = Masking(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.5, total_steps=10,
                      update_frequency=2, log_fn=lambda record: None)
    counted = masking.record()["nonzero_parameters"]
    assert models.nonzero_parameters(model, masking.masks) == counted
    assert models.nonzero_parameters(model) == counted  # the zeros in the weights are the masked-off entries
    name = next(iter(masking.masks))
    with torch.no_grad():  # a weight regrown at zero is active: the masks count it, the weights cannot
        dict(model.named_parameters())[name].view(-1)[masking.masks[name].view(-1).nonzero()[0]] = 0
    assert models.nonzero_parameters(model, masking.masks) == counted
    assert models.nonzero_parameters(model) == counted - 1
    assert models.structured_form(model) is None


def token_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = models.create_model(MICRO, num_classes=10)
    models.apply_token_selection(model, models.TokenConfig(enabled=True, ratio=0.5, mode="drop"))
    path = tmp_path / "run" / "ratio.pth"
    path.parent.mkdir()
    torch.save({"model": model.state_dict(), "args": {"model": MICRO, "token_selection": True, "token_ratio": 0.5,
                                                      "token_number": None, "token_mode": "drop"}}, path)
    return path


def test_eval_token_selection_reads_the_recorded_ratio_and_draws_tokens(tmp_path: Path, capsys) -> None:
    path = token_checkpoint(tmp_path)
    stats = main.main(parse("--eval", "--resume", str(path), "--token_selection", "--visualize-tokens", "2"))
    out = capsys.readouterr().out
    assert "k = 9 of 17 tokens" in out and stats["test_images"] == 360
    assert len(list((path.parent / "tokens").glob("val*.png"))) == 2  # next to the checkpoint without --output_dir


@pytest.mark.parametrize("flags, message", [
    (("--token_selection", "--visualize-tokens", "2"), "--visualize-tokens writes PNGs into --output_dir"),
    (("--flops", "--token_selection", "--visualize-tokens", "2"), "--visualize-tokens draws validation images"),
])
def test_visualize_tokens_is_never_silently_ignored(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        main.main(parse("--epochs", "1", *flags))
