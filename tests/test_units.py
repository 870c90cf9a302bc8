"""sparselearning.units: the one definition of a head and a neuron agrees with what timm's modules compute."""
import dataclasses

import torch

import models
from models.head_stats import block_units, unit_groups
from sparselearning.units import (
    V_SECTION,
    UnitGroup,
    expand_units,
    head_group,
    heads_in_qkv,
    neuron_group,
    select_units,
    units_alive,
)

torch.set_num_threads(1)


def test_a_head_is_its_qkv_row_blocks_and_proj_columns_in_timm_attention():
    torch.manual_seed(0)
    model = models.create_model("vit_digits_tiny", num_classes=10).eval()
    attn = model.blocks[0].attn
    heads, _ = block_units("blocks.0", attn, model.blocks[0].mlp)
    assert (heads.num_units, heads_in_qkv(attn.qkv.out_features, attn.head_dim)) == (4, 4)
    off = torch.tensor([False, False, True, False])  # head 2 pruned
    params = dict(model.named_parameters())
    with torch.no_grad():
        for spec in heads.slices:
            if spec.role != "out":
                params[spec.param].mul_(expand_units(~off, spec, params[spec.param].shape))
    seen = {}
    attn.proj.register_forward_pre_hook(lambda module, args: seen.update(o=args[0]))
    x = torch.randn(2, 5, attn.qkv.in_features)
    qkv = attn.qkv(x).reshape(2, 5, 3, 4, attn.head_dim)  # timm's own view of the rows
    attn(x)
    assert bool(qkv[:, :, :, 2].eq(0).all()) and bool(qkv[:, :, :, [0, 1, 3]].ne(0).any(dim=-1).all())
    out = dataclasses.replace(heads.output, dim=-1)  # proj's input columns are the last axis of its input
    assert bool(select_units(seen["o"], out, 4, torch.tensor([2])).eq(0).all()), "a head with zero v is silent"
    assert bool(select_units(seen["o"], out, 4, torch.tensor([0, 1, 3])).ne(0).all())
    assert units_alive(params[heads.primary.param], heads.primary, 4).tolist() == [True, True, False, True]
    v_bias = select_units(attn.qkv.bias, heads.primary, 4, torch.tensor([1]), sections=[V_SECTION])
    assert torch.equal(v_bias, attn.qkv.bias.reshape(3, 4, -1)[2, 1])


def test_a_neuron_is_its_fc1_row_and_fc2_column():
    torch.manual_seed(0)
    mlp = models.create_model("vit_digits_micro", num_classes=10).blocks[1].mlp
    neurons = neuron_group("blocks.1.mlp", mlp.fc1.out_features)
    assert [s.param for s in neurons.slices] == ["blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc1.bias",
                                                 "blocks.1.mlp.fc2.weight"]
    index = torch.tensor([3, 7])
    assert torch.equal(select_units(mlp.fc1.weight, neurons.primary, 128, index), mlp.fc1.weight[index])
    assert torch.equal(select_units(mlp.fc2.weight, neurons.output, 128, index), mlp.fc2.weight[:, index])


def test_the_adapter_reports_the_units_definition_as_plain_dicts():
    model = models.create_model("vit_digits_micro", num_classes=10)
    groups = unit_groups(model)
    attn = model.blocks[0].attn
    assert UnitGroup.from_dict(groups[0]) == head_group("blocks.0.attn", attn.num_heads, attn.head_dim)
    assert UnitGroup.from_dict(groups[1]) == neuron_group("blocks.0.mlp", model.blocks[0].mlp.fc1.out_features)
    assert head_group("a", 2, 4, qkv_bias=False).to_dict()["slices"][1]["param"] == "a.proj.weight"
