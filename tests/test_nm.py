"""N:M sparsity (issue 17): the pattern functions, SR-STE's straight-through step, N:M DST, the flags, the compressed
N:M export and 2:4 inference. Resume, DDP agreement and mask enforcement are the contract tests' (tests/sparsifiers.py
cases ``nm-srste`` and ``nm-dst``)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import interop
import main
import models
import sparselearning
from conftest import TINY_RUN, run_main
from interop.nm_format import pack_nm, unpack_nm
from sparselearning import SRSTE, NMMasking, SparsityConfig
from sparselearning.nm import is_nm, magnitude_nm_mask, parse_nm, random_nm_mask, top_in_groups
from sparsifiers import batch, micro_vit, silent
from training.resume_check import compare, run_settings

BLOCK_LINEARS = [f"blocks.{b}.{layer}.weight" for b in (0, 1)
                 for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]


def parse_sparse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sparselearning.add_sparse_args(parser)
    return parser.parse_args(list(flags))


# ---------------------------------------------------------------------------------------------- the pattern


def test_top_in_groups_takes_exactly_the_count_of_every_group_by_score_then_tie_order() -> None:
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 5.0]])
    assert top_in_groups(scores, 4, 2).tolist() == [[True, True, False, False, True, False, False, True]]
    within = torch.tensor([[False, True, True, True, True, True, True, False]])
    per_group = torch.tensor([1, 3])
    assert top_in_groups(scores, 4, per_group, within).tolist() == [[False, True, False, False,
                                                                     True, True, True, False]]
    tied = torch.zeros(64, 8)
    draws = {tuple(top_in_groups(tied, 4, 2, tie_seed=s).flatten().tolist()) for s in range(3)}
    assert len(draws) == 3, "tied entries are taken in an order drawn from the seed, not by index"
    assert all(is_nm(top_in_groups(tied, 4, 2, tie_seed=s), 2, 4) for s in range(3))


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_random_and_magnitude_masks_are_exactly_n_of_m(n: int, m: int) -> None:
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(0))
    assert is_nm(random_nm_mask(weight.shape, n, m, seed=1), n, m)
    mask = magnitude_nm_mask(weight, n, m)
    assert is_nm(mask, n, m)
    kept, dropped = weight.abs().reshape(-1, m), mask.reshape(-1, m)
    assert bool((kept.masked_fill(~dropped, float("inf")).min(1).values
                 >= kept.masked_fill(dropped, -1).max(1).values).all()), "the N largest magnitudes of each group"


@pytest.mark.parametrize("text", ["4:4", "0:4", "3:2", "2-4", "two:four", ""])
def test_a_bad_nm_pattern_stops_with_the_rule(text: str) -> None:
    with pytest.raises(ValueError, match=r"--nm must be N:M with 0 < N < M"):
        parse_nm(text)
    with pytest.raises(ValueError, match=r"--nm must be N:M"):
        SparsityConfig.from_args(parse_sparse("--sparse_init", "nm", "--nm", text))


@pytest.mark.parametrize("flags,message", [
    (("--sparse_init", "nm"), "takes both --sparse_init nm and --nm"),
    (("--nm", "2:4"), "takes both --sparse_init nm and --nm"),
    (("--sparse_init", "nm", "--nm", "2:4", "--density", "0.3"), "keeps a density of exactly 2/4"),
    (("--sparse_init", "nm", "--nm", "2:4", "--pruning_type", "structure"), "does not combine with --pruning_type"),
    (("--sparse_init", "nm", "--nm", "2:4", "--nm-method", "dst", "--redistribution", "magnitude"),
     "use --redistribution none"),
    (("--sparse_init", "nm", "--nm", "2:4", "--growth", "random"), "--nm-method srste recomputes the mask"),
    (("--sparse_init", "nm", "--nm", "2:4", "--srste-decay", "-1"), "--srste-decay must be a finite number"),
])
def test_inconsistent_nm_flags_stop_with_the_fix(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SparsityConfig.from_args(parse_sparse(*flags))


def test_nm_flags_build_the_chosen_method_with_density_n_over_m() -> None:
    cfg = SparsityConfig.from_args(parse_sparse("--sparse_init", "nm", "--nm", " 2 : 4", "--density", "0.5"))
    assert (cfg.nm, cfg.nm_pattern, cfg.density, cfg.nm_method, cfg.srste_decay) == ("2:4", (2, 4), 0.5, "srste", 2e-4)
    model = micro_vit()
    optimizer = torch.optim.AdamW(model.parameters())
    assert type(sparselearning.build_sparsifier(cfg, model, optimizer, 10, log_fn=silent)) is SRSTE
    dst = SparsityConfig.from_args(parse_sparse("--sparse_init", "nm", "--nm", "1:4", "--nm-method", "dst"))
    model = micro_vit()
    sparsifier = sparselearning.build_sparsifier(dst, model, torch.optim.AdamW(model.parameters()), 10, log_fn=silent)
    assert type(sparsifier) is NMMasking and sparsifier.report()["density"] == 0.25
    assert sparsifier.config == dst, "from_config keeps every setting"


def test_a_failed_srste_build_leaves_no_hook_on_the_optimizer() -> None:
    model = micro_vit()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)  # the block weights are not in it
    with pytest.raises(ValueError, match="are not in the optimizer"):
        SRSTE(model, optimizer, 10, log_fn=silent)
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


# ---------------------------------------------------------------------------------------------- which tensors


def test_the_blocks_linears_are_masked_and_patch_embedding_and_head_stay_dense_unless_included() -> None:
    model = micro_vit()
    sparsifier = SRSTE(model, torch.optim.SGD(model.parameters(), lr=0.1), 10, log_fn=silent)
    assert list(sparsifier.masks) == BLOCK_LINEARS
    params = dict(model.named_parameters())
    assert bool((params["head.weight"] != 0).all()) and bool((params["patch_embed.proj.weight"] != 0).all())
    model = micro_vit()
    included = NMMasking(model, torch.optim.SGD(model.parameters(), lr=0.1), 10, log_fn=silent,
                         sparse_include=("blocks.*", "head.weight", "patch_embed.proj.weight"))
    assert set(included.masks) == {*BLOCK_LINEARS, "head.weight", "patch_embed.proj.weight"}
    assert all(is_nm(mask, 2, 4) for mask in included.masks.values())  # the conv groups its 3x4x4 = 48 inputs


def test_an_input_width_that_is_not_a_multiple_of_m_stops_naming_the_tensor() -> None:
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 6), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"2\.weight \(2, 6\) \(6 inputs\) is not a multiple of 4.*--sparse-exclude"):
        NMMasking(model, torch.optim.SGD(model.parameters(), lr=0.1), 10, sparse_include=("*.weight",))
    with pytest.raises(ValueError, match=r"\(blocks\.\*\) by default, and this model has none.*--sparse-include"):
        SRSTE(model, torch.optim.SGD(model.parameters(), lr=0.1), 10)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("build", [
    pytest.param(lambda m, o: SRSTE(m, o, 40, update_frequency=1, log_fn=silent), id="srste-every-step"),
    pytest.param(lambda m, o: NMMasking(m, o, 40, update_frequency=2, log_fn=silent), id="dst-gradient"),
    pytest.param(lambda m, o: NMMasking(m, o, 40, nm="1:4", update_frequency=2, growth="random", death="SET",
                                        log_fn=silent), id="dst-1:4-random-SET"),
    pytest.param(lambda m, o: NMMasking(m, o, 40, nm="3:8", update_frequency=2, growth="momentum", log_fn=silent),
                 id="dst-3:8-momentum"),
])
def test_every_update_keeps_exactly_n_of_every_m(build) -> None:
    torch.manual_seed(0)
    model = micro_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sparsifier = build(model, optimizer)
    n, m = sparsifier.nm
    params = dict(model.named_parameters())
    changed = 0
    for step in range(1, 13):
        x, y = batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        before = {name: mask.clone() for name, mask in sparsifier.masks.items()}
        changed += sparsifier.step(step)
        for name, mask in sparsifier.masks.items():
            assert is_nm(mask, n, m), f"{name} at step {step}"
            assert torch.count_nonzero(params[name].detach()[~mask]) == 0, f"{name} at step {step}"
        if isinstance(sparsifier, SRSTE):
            dense = sparsifier.dense_weights()
            assert all(torch.equal(mask, magnitude_nm_mask(dense[name], n, m))
                       for name, mask in sparsifier.masks.items()), "SR-STE's mask is the top-N of the dense |w|"
        elif step % 2 == 0:
            rate = sparsifier.death_rate(step)
            for name, mask in sparsifier.masks.items():
                joined = int((mask & ~before[name]).sum())
                assert joined <= math.ceil(rate * int(mask.sum())), "a group regrows what the layer's death took"
    assert changed >= 4, "non-vacuous: the topology moved"


def test_srste_step_is_the_straight_through_gradient_plus_the_decay_of_pruned_weights() -> None:
    """y = x (w⊙m)ᵀ + b and L = Σ y·c give dL/d(w⊙m) = cᵀx; SR-STE applies it to every dense weight, pruned ones
    included, and adds λ(1−m)⊙w: with plain SGD, w' = w − η(cᵀx + λ(1−m)⊙w)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 3)
    model = nn.Sequential(layer)
    lr, decay = 0.5, 0.1
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    dense = layer.weight.detach().clone()
    sparsifier = SRSTE(model, optimizer, 100, decay=decay, sparse_include=("0.weight",), update_frequency=50,
                       log_fn=silent)
    mask = sparsifier.masks["0.weight"].clone()
    assert torch.equal(mask, magnitude_nm_mask(dense, 2, 4))
    x, c = torch.randn(5, 8), torch.randn(5, 3)
    y = model(x)
    assert torch.allclose(y, x @ (dense * mask).T + layer.bias), "the forward pass sees the masked weights"
    (y * c).sum().backward()
    grad = c.T @ x
    assert torch.allclose(layer.weight.grad, grad), "the gradient of w⊙m is dense"
    optimizer.step()
    expected = dense - lr * (grad + decay * (~mask) * dense)
    assert torch.allclose(sparsifier.dense_weights()["0.weight"], expected, atol=1e-6)
    assert torch.allclose(layer.weight.detach(), expected * mask, atol=1e-6), "the parameter holds w⊙m"
    assert bool((sparsifier.dense_weights()["0.weight"][~mask] != dense[~mask]).all()), "pruned weights learn"


def test_srste_decay_reaches_a_fused_step_under_a_grad_scaler_unscaled() -> None:
    """A fused optimizer unscales inside its kernel (``optimizer.grad_scale``): the decay added to the still-scaled
    gradient must be scaled too, so the step equals the one without a scaler."""
    weights = []
    for scaled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, fused=scaled)
        sparsifier = SRSTE(model, optimizer, 100, decay=0.1, sparse_include=("0.weight",), update_frequency=50,
                           log_fn=silent)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
        loss = model(torch.ones(2, 8)).square().sum()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        weights.append(sparsifier.dense_weights()["0.weight"])
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_srste_log_records_every_hundredth_update_and_reports_the_flip_rate() -> None:
    records = []
    model = micro_vit()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sparsifier = SRSTE(model, optimizer, 300, log_fn=records.append)
    for step in range(1, 201):
        x, y = batch(step % 5)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step(step)
    assert [(r["event"], r["step"]) for r in records] == [("init", 0), ("update", 100), ("update", 200)]
    report = sparsifier.report()
    assert "death_rate" not in report and 0 < report["flip_rate"] < 0.5 and report["density"] == 0.5


def test_resume_compares_the_nm_flags_as_unstructured_ones() -> None:
    def settings(*flags: str) -> dict:
        return run_settings(vars(main.get_args_parser().parse_args([*TINY_RUN, *flags])), 1, 10)

    nm = ("--sparse_init", "nm", "--nm", "2:4")
    assert [d[0] for d in compare(settings(), settings(*nm))[0]] == ["nm"]
    assert [d[0] for d in compare(settings(*nm), settings(*nm, "--nm-method", "dst"))[0]] == ["nm_method"]
    assert [d[0] for d in compare(settings(*nm), settings(*nm, "--srste-decay", "0"))[0]] == ["srste_decay"]
    assert compare(settings(*nm, "--update_frequency", "5"), settings(*nm))[0], "the schedule acts on N:M runs"


# ---------------------------------------------------------------------------------------------- export, inference


def test_nm_layout_round_trips_exactly_at_half_size_plus_positions() -> None:
    weight = torch.randn(64, 32)
    mask = magnitude_nm_mask(weight, 2, 4)
    mask[0, :4] = torch.tensor([True, False, True, False])
    weight = weight * mask
    weight[0, 0] = 0.0  # a kept weight that is zero stays kept
    values, positions = pack_nm(weight, mask, 2, 4)
    assert values.numel() == weight.numel() // 2 and positions.numel() == weight.numel() // 2 * 2 // 8
    dense, restored = unpack_nm(values, positions, weight.shape, 2, 4)
    assert torch.equal(dense, weight) and torch.equal(restored, mask)
    _, odd = unpack_nm(*pack_nm(weight.reshape(-1, 16), random_nm_mask((128, 16), 3, 8, 0), 3, 8), (128, 16), 3, 8)
    assert torch.equal(odd, random_nm_mask((128, 16), 3, 8, 0))
    with pytest.raises(ValueError, match="exactly 2 of every 4"):
        pack_nm(weight, torch.ones_like(mask), 2, 4)


@pytest.fixture
def srste_checkpoint(tmp_path: Path) -> Path:
    """A project checkpoint of the micro ViT after 6 SR-STE steps (masks, pruned values and masked weights)."""
    torch.manual_seed(0)
    model = models.create_model("vit_digits_micro", num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sparsifier = SRSTE(model, optimizer, 10, log_fn=silent)
    for step in range(1, 7):
        x, y = batch(step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sparsifier.step(step)
    args = vars(main.get_args_parser().parse_args([*TINY_RUN, "--sparse_init", "nm", "--nm", "2:4"]))
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "sparsifier": sparsifier.state_dict(), "step": 6, "epoch": 0,
                "args": args}, path)
    return path


def test_eval_and_export_of_an_srste_checkpoint_store_its_masks_in_the_nm_layout(srste_checkpoint: Path,
                                                                               tmp_path: Path, capsys) -> None:
    """``--semi-structured`` on a CPU evaluates dense and says why; the export holds the 2:4 weights at about half
    the dense size, with the masks, and reads back exactly."""
    checkpoint = torch.load(srste_checkpoint, weights_only=True)
    out = tmp_path / "export"
    flags = [*TINY_RUN, "--eval", "--resume", str(srste_checkpoint), "--semi-structured", "--export", str(out)]
    main.main(main.get_args_parser().parse_args(flags))
    printed = capsys.readouterr().out
    assert "2:4 kernels not used, the model runs dense: torch.sparse.to_sparse_semi_structured runs on CUDA GPUs " \
           "only" in printed and "Accuracy of" in printed
    assert json.loads((out / "config.json").read_text())["nm"] == "2:4"
    state, masks = interop.load_sparse(out / "model.sparse.safetensors"), interop.load_sparse_masks(
        out / "model.sparse.safetensors")
    assert set(masks) == set(BLOCK_LINEARS)
    for name, mask in checkpoint["sparsifier"]["masks"].items():
        assert torch.equal(masks[name], mask) and torch.equal(state[name], checkpoint["model"][name])
    block_bytes = sum(checkpoint["model"][name].numel() * 4 for name in BLOCK_LINEARS)
    stored = (out / "model.sparse.safetensors").stat().st_size - (out / "model.safetensors").stat().st_size
    assert -0.49 * block_bytes < stored < -0.45 * block_bytes, "2:4 blocks take half their size plus 1/32"
    assert set(interop.read_checkpoint(out / "model.sparse.safetensors").masks) == set(BLOCK_LINEARS)


def test_semi_structured_conversion_refuses_cpu_and_fp32_with_the_reason() -> None:
    model = micro_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = models.to_semi_structured(model, torch.bfloat16)
    assert result.converted == [] and "CUDA GPUs only" in result.summary()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the model is left as it was"
    assert "float16 or bfloat16" in models.semi_structured.unsupported_reason(torch.device("cuda"), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="2:4 kernels (torch.sparse.to_sparse_semi_structured) need a CUDA GPU of compute "
                           "capability 8.0+; this machine has none")
def test_semi_structured_linears_give_the_masked_dense_logits() -> None:
    torch.manual_seed(0)
    model = models.create_model("vit_digits_tiny", num_classes=10).cuda().eval()
    SRSTE(model, torch.optim.SGD(model.parameters(), lr=0.1), 10, log_fn=silent)
    model.to(torch.bfloat16)
    x = torch.randn(256, 3, 16, 16, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        dense = model(x).float()
        result = models.to_semi_structured(model, torch.bfloat16)
        sparse = model(x).float()
    assert result.reason is None and result.converted, result.summary()
    assert torch.allclose(sparse, dense, atol=5e-2, rtol=2e-2), (sparse - dense).abs().max()


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_srste_run_checkpoints_an_nm_model_whose_ema_follows_the_masks(tmp_path: Path) -> None:
    run_main(*TINY_RUN, "--epochs", "1", "--model-ema-decay", "0.9", "--output_dir", str(tmp_path),
             "--sparse_init", "nm", "--nm", "2:4", "--update_frequency", "1", "--t_end", "1")
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    epoch = next(r for r in log if "epoch" in r)
    assert epoch["density"] == 0.5 and 0 < epoch["flip_rate"] < 0.5 and "death_rate" not in epoch
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    masks = checkpoint["sparsifier"]["masks"]
    assert list(masks) == BLOCK_LINEARS
    for name, mask in masks.items():
        assert is_nm(mask, 2, 4)
        for weights in (checkpoint["model"], checkpoint["model_ema"]):
            assert torch.count_nonzero(weights[name][~mask]) == 0, name
        assert checkpoint["sparsifier"]["pruned_values"][name].numel() == mask.numel() // 2
