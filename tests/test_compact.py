"""Compaction: the physically smaller model computes what the masked model computes, and saves/loads by itself."""
import json

import pytest
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, VisionTransformer

import datasets
import main
import models
from interop.compact_checkpoint import is_compact_checkpoint, load_compact, save_compact
from models.compact import build_compact, compact_model, random_compact_model, random_unit_masks
from models.head_stats import structure_units
from sparselearning import StructuredDST
from conftest import train_steps

torch.set_num_threads(1)


def silent(record: dict) -> None:
    """A log_fn that drops records."""


def trained_structured(compat: bool) -> tuple[torch.nn.Module, StructuredDST]:
    """vit_digits_tiny with random biases, trained 7 steps (updates at 3 and 6) with StructuredDST, in eval mode."""
    torch.manual_seed(0)
    model = models.create_model("vit_digits_tiny", num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sparsifier = StructuredDST(model, optimizer, structure_units(model), 30, atten_density=0.5, other_density=0.5,
                               update_frequency=3, compat=compat, log_fn=silent)
    with torch.no_grad():  # nonzero biases everywhere, so that compat mode has a real leak to fold
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
        sparsifier.mask_set.apply_()
    train_steps(model, optimizer, range(1, 8), sparsifier)
    return model.eval(), sparsifier


def digits_batch() -> torch.Tensor:
    args = main.get_args_parser().parse_args(["--input-size", "16"])
    val, _ = datasets.build_dataset(False, datasets.DataConfig.from_args(args))
    return torch.stack([val[i][0] for i in range(64)])


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    return digits_batch()


@pytest.mark.parametrize("compat", [False, True])
def test_compact_model_equals_the_masked_model(compat, digits):
    model, sparsifier = trained_structured(compat)
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = {"random": model(x), "digits": model(digits)}
        for source in (sparsifier.masks, None):  # from the masks, and from the zero pattern of the weights
            compact = compact_model(model, source).eval()
            arch = models.architecture(compact)
            if source is not None:
                assert arch["block_heads"] == [2] * 4 and arch["block_mlp_hidden"] == [128] * 4
            else:  # an active unit whose input rows are still all zero (compat regrowth) is removed too, exactly
                assert max(arch["block_heads"]) <= 2 and max(arch["block_mlp_hidden"]) <= 128
            for name, inputs in (("random", x), ("digits", digits)):
                assert torch.allclose(compact(inputs), expected[name], atol=1e-5, rtol=0), (source is None, name)
    leak = compact.blocks[0].attn.proj.bias - model.blocks[0].attn.proj.bias
    assert bool(leak.ne(0).any()) == compat, "compat folds the pruned heads' v-bias constant into proj.bias"


def test_blocks_may_keep_different_counts():
    torch.manual_seed(0)
    model = models.create_model("vit_digits_tiny", num_classes=10).eval()
    masks = random_unit_masks(model, 0.5, 0.5, seed=3)
    masks["blocks.1.attn.qkv.weight"][:] = False  # no head left: one dead head is kept, exactly
    masks["blocks.2.attn.qkv.weight"][:] = True
    masks["blocks.3.mlp.fc1.weight"][:7] = True
    masks["blocks.3.mlp.fc1.weight"][7:] = False
    masked = models.create_model("vit_digits_tiny", num_classes=10).eval()
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in masked.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    compact = compact_model(model, masks).eval()
    arch = models.architecture(compact)
    assert arch["block_heads"] == [2, 1, 4, 2] and arch["block_mlp_hidden"] == [128, 128, 128, 7]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(compact(x), masked(x), atol=1e-5, rtol=0)
        assert torch.allclose(compact_model(masked)(x), masked(x), atol=1e-5, rtol=0)


def test_uniform_compact_model_is_a_plain_timm_vit_that_create_model_rebuilds():
    model, sparsifier = trained_structured(compat=False)  # its head-score hooks must not travel into the copy
    compact = compact_model(model, sparsifier.masks).eval()
    assert type(compact) is VisionTransformer
    assert all(type(b.attn) is Attention and type(b.mlp) is Mlp for b in compact.blocks)
    assert all(len(b.attn.proj._forward_pre_hooks) == 0 for b in compact.blocks)
    assert all(len(b.attn.proj._forward_pre_hooks) == 1 for b in model.blocks), "the source model is untouched"
    assert model.blocks[0].attn.qkv.weight.shape == (192, 64)
    rebuilt = build_compact({"model": "vit_digits_tiny", **models.architecture(compact)}).eval()
    rebuilt.load_state_dict(compact.state_dict(), strict=True)
    plain = models.create_model("vit_digits_tiny", num_classes=10, block_heads=[2] * 4, block_mlp_hidden=[128] * 4)
    plain.load_state_dict(compact.state_dict(), strict=True)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), compact(x)) and torch.equal(plain.eval()(x), compact(x))


def test_dense_model_compacts_to_itself():
    torch.manual_seed(0)
    model = models.create_model("vit_digits_micro", num_classes=10).eval()
    compact = compact_model(model)
    assert models.architecture(compact) == models.architecture(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(compact(x), model(x), atol=1e-6, rtol=0)


def test_save_and_load_compact_round_trip(tmp_path):
    model, sparsifier = trained_structured(compat=True)
    compact = compact_model(model, sparsifier.masks).eval()
    path = save_compact(compact, "vit_digits_tiny", tmp_path / "compact.pth")
    ckpt = torch.load(path, weights_only=True)
    assert is_compact_checkpoint(ckpt) and not is_compact_checkpoint({"model": model.state_dict()})
    assert ckpt["architecture"] == json.loads((tmp_path / "compact.json").read_text())
    assert ckpt["architecture"]["model"] == "vit_digits_tiny" and ckpt["architecture"]["img_size"] == 16
    assert ckpt["architecture"]["num_classes"] == 10 and ckpt["architecture"]["head_dim"] == 16
    loaded = load_compact(path)
    assert not loaded.training
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
        assert torch.allclose(loaded(x), model(x), atol=1e-5, rtol=0)
    torch.save({"model": model.state_dict()}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="not a compact checkpoint"):
        load_compact(tmp_path / "checkpoint.pth")


def test_random_compact_deit_small_at_the_s2vite_setting():
    compact = random_compact_model("deit_small_patch16_224", 0.7, 0.6, unit_multiple=1)
    arch = models.architecture(compact)
    assert arch["block_heads"] == [4] * 12 and arch["block_mlp_hidden"] == [921] * 12 and arch["head_dim"] == 64
    removed_per_block = 2 * (3 * 64 * 384 + 3 * 64 + 384 * 64) + (1536 - 921) * (384 + 1 + 384)
    assert models.count_parameters(compact)[0] == 22_050_664 - 12 * removed_per_block
    assert type(compact) is VisionTransformer and not compact.training
