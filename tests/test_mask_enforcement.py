"""Mask enforcement follows the live parameters: device moves, replaced parameters, detaching the hooks.

Exact zeros after every optimizer step, also over NaN/Inf: test_sparsifier_contract.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import models
from models.head_stats import structure_units
from sparselearning import Masking, StructuredDST


def silent(record: dict) -> None:
    """A log_fn that drops records."""


def build(kind: str):
    """vit_digits_micro + SGD + the sparsifier of ``kind`` (half of the weights, heads and neurons kept)."""
    torch.manual_seed(0)
    model = models.create_model("vit_digits_micro", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    if kind == "unstructured":
        sparsifier = Masking(model, optimizer, density=0.5, total_steps=100, update_frequency=10, log_fn=silent)
    else:
        sparsifier = StructuredDST(model, optimizer, structure_units(model), 100, atten_density=0.5,
                                   other_density=0.5, update_frequency=10, log_fn=silent)
    return model, optimizer, sparsifier


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    optimizer.zero_grad()
    F.cross_entropy(model(x.to(model.cls_token.dtype)), y).backward()
    optimizer.step()


def masked_values(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[name].detach()[~mask.to(params[name].device)] for name, mask in masks.items()])


KINDS = ["unstructured", "structured"]


@pytest.mark.parametrize("kind", KINDS)
def test_masks_follow_their_parameters_to_another_device_and_dtype(kind: str) -> None:
    model, optimizer, sparsifier = build(kind)
    model.double()  # same Parameter objects, new tensors behind them
    train_step(model, optimizer)
    assert masked_values(model, sparsifier.masks).dtype == torch.float64
    assert not bool(masked_values(model, sparsifier.masks).any())

    # The only second device of a CPU-only machine. model.to("meta") would create new Parameter objects (an error,
    # see below); swapping keeps them, as model.cuda() does.
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert next(iter(sparsifier.mask_set.params.values())).device.type == "meta"
    optimizer.step()  # the hook runs (no gradients, so SGD skips every parameter)
    assert {m.device.type for m in sparsifier.masks.values()} == {"meta"}
    assert {m.device.type for m in sparsifier.mask_set.fired.values()} == {"meta"}


@pytest.mark.parametrize("kind", KINDS)
def test_a_parameter_replaced_by_load_state_dict_assign_is_an_error_naming_it(kind: str) -> None:
    model, optimizer, sparsifier = build(kind)
    dense = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(dense)  # in place: the masks are enforced on the loaded weights
    train_step(model, optimizer)
    assert not bool(masked_values(model, sparsifier.masks).any())

    model.load_state_dict(dense, assign=True)  # new Parameter objects: the optimizer and masks hold the old ones
    first = next(iter(sparsifier.masks))
    with pytest.raises(RuntimeError, match=rf"masked parameter '{first}' was replaced in the model.*assign=True"):
        train_step(model, optimizer)


@pytest.mark.parametrize("kind", KINDS)
def test_remove_detaches_every_hook(kind: str) -> None:
    model, optimizer, sparsifier = build(kind)
    hooked_modules = [m for m in model.modules() if m._forward_pre_hooks]
    sparsifier.remove()
    assert not optimizer._optimizer_step_post_hooks
    assert all(not m._forward_pre_hooks for m in hooked_modules)
    train_step(model, optimizer)
    assert bool(masked_values(model, sparsifier.masks).any()), "masks are no longer enforced"
    if kind == "structured":
        assert all(probe.grad is None for probe in sparsifier.stats.probes.values()), "no head-score taps"
