"""Models are timm's: same keys, same shapes, same logits; importing the project leaves timm untouched."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import models
from conftest import ROOT


@pytest.mark.parametrize("name", models.DEIT_MODELS)
def test_deit_matches_timm(name: str) -> None:
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    ours = models.create_model(name).eval()
    ref_sd = ref.state_dict()
    assert list(ours.state_dict()) == list(ref_sd)
    ours.load_state_dict(ref_sd, strict=True)
    size = models.default_img_size(name)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(models.SMALL_MODELS))
def test_small_models_are_timm_vits(name: str) -> None:
    ours = models.create_model(name, num_classes=10).eval()
    ref = VisionTransformer(**models.SMALL_MODELS[name], num_classes=10).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
    assert ours.blocks[0].attn.fused_attn, "attention must use scaled_dot_product_attention"


@pytest.mark.slow
def test_importing_project_changes_nothing_in_timm() -> None:
    code = (
        "import warnings; warnings.simplefilter('error');"
        "import timm; before = set(timm.list_models());"
        "import main, models, engine, datasets, sparselearning;"
        "assert set(timm.list_models()) == before;"
        "m = timm.create_model('deit_small_patch16_224');"
        "assert type(m).__module__ == 'timm.models.vision_transformer', type(m)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""


def test_blocks_may_differ_in_heads_and_mlp_width() -> None:
    model = models.create_model("vit_digits_tiny", num_classes=10, block_heads=[4, 3, 2, 1],
                                block_mlp_hidden=[256, 100, 50, 7])
    arch = models.architecture(model)
    assert arch["block_heads"] == [4, 3, 2, 1] and arch["block_mlp_hidden"] == [256, 100, 50, 7]
    assert model.blocks[2].attn.qkv.weight.shape == (3 * 2 * 16, 64)
    assert model.blocks[2].attn.proj.weight.shape == (64, 2 * 16)
    assert model.blocks[3].mlp.fc2.weight.shape == (64, 7)
    logits = model(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    rebuilt = models.create_model("vit_digits_tiny", num_classes=10, block_heads=arch["block_heads"],
                                  block_mlp_hidden=arch["block_mlp_hidden"], head_dim=arch["head_dim"])
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_bad_model_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model 'deit_huge'.*deit_small_patch16_224"):
        models.create_model("deit_huge")
    with pytest.raises(ValueError, match="block_heads needs 4 positive entries"):
        models.create_model("vit_digits_tiny", block_heads=[4, 4])


def test_parameter_counts_match_deit() -> None:
    counts = {name: models.count_parameters(models.create_model(name))[0] for name in models.DEIT_MODELS[:3]}
    assert counts == {"deit_tiny_patch16_224": 5_717_416, "deit_small_patch16_224": 22_050_664,
                      "deit_base_patch16_224": 86_567_656}
