"""SViTE+ token selection: the Gumbel top-k math, both placements and modes, the tau schedule, configuration errors."""
from __future__ import annotations

import argparse
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import models
from models.token_selection import drop_tokens, sample_gumbel, zero_tokens
from sparselearning import Masking

N_TOKENS = 17  # vit_digits_micro: 16 patches + cls
DIM = 32


def micro(**token_kw) -> torch.nn.Module:
    """The micro ViT, optionally patched; fixed weights so that two calls build the same model."""
    torch.manual_seed(0)
    model = models.create_model("vit_digits_micro", num_classes=10)
    if token_kw:
        models.apply_token_selection(model, models.TokenConfig(enabled=True, **token_kw))
    return model


def images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Reference selection: cls first, then the k - 1 highest-scoring patches, in ascending position order."""
    ranked = scores.clone()
    ranked[:, 0] = float("inf")
    return ranked.topk(k, dim=1).indices.sort(dim=1).values


def gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x[torch.arange(x.shape[0])[:, None], idx]


# ---------------------------------------------------------------------------------------------------------------
# gumbel_topk
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 9, N_TOKENS])
@pytest.mark.parametrize("noisy", [False, True])
def test_exactly_k_kept_and_cls_always_among_them(k: int, noisy: bool) -> None:
    logits = torch.randn(6, N_TOKENS)
    logits[:, 0] = -1e4  # cls would never win on its own score
    noise = sample_gumbel(logits) if noisy else None
    mask, idx = models.gumbel_topk(logits, k, tau=0.1, noise=noise)
    assert mask.shape == (6, N_TOKENS) and idx.shape == (6, k)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(1) == k).all() and (mask[:, 0] == 1).all() and (idx[:, 0] == 0).all()
    assert (idx.diff(dim=1) > 0).all(), "indices are sorted and distinct"
    assert torch.equal(mask.gather(1, idx), torch.ones(6, k))
    perturbed = logits.log_softmax(1) + (0 if noise is None else noise)
    assert torch.equal(idx, topk_indices(perturbed, k))


def test_selection_ranks_perturbed_logits_and_ignores_tau() -> None:
    # Large score gaps: at tau = 0.1 the float32 soft scores underflow to exact zeros (SViTE ranked those, so ties
    # broke arbitrarily); the perturbed logits still rank every token.
    logits = torch.linspace(0, 400, N_TOKENS).flip(0).repeat(2, 1)
    noise = sample_gumbel(logits)
    soft, _ = models.gumbel_topk(logits, 5, tau=0.1, hard=False, noise=noise)
    assert (soft == 0).sum() > N_TOKENS
    chosen = [models.gumbel_topk(logits, 5, tau=tau, noise=noise)[1] for tau in (0.1, 1.0, 10.0)]
    assert all(torch.equal(c, chosen[0]) for c in chosen)
    assert torch.equal(chosen[0], topk_indices(logits.log_softmax(1) + noise, 5))


def test_soft_scores_are_the_gumbel_softmax() -> None:
    logits, noise = torch.randn(2, N_TOKENS), sample_gumbel(torch.zeros(2, N_TOKENS))
    soft, _ = models.gumbel_topk(logits, 4, tau=2.0, hard=False, noise=noise)
    torch.testing.assert_close(soft, torch.softmax((logits.log_softmax(1) + noise) / 2.0, dim=1))


def test_gumbel_noise_is_finite_and_from_torch_rng() -> None:
    like = torch.zeros(1000, 64)
    torch.manual_seed(5)
    first = sample_gumbel(like)
    torch.manual_seed(5)
    assert torch.equal(first, sample_gumbel(like)) and torch.isfinite(first).all()
    assert abs(first.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni: the Gumbel(0, 1) mean


def test_straight_through_gradient_matches_hand_derivation() -> None:
    torch.manual_seed(3)
    tau, k = 0.7, 6
    s = torch.randn(3, 9, dtype=torch.float64)
    g = -torch.empty(3, 9, dtype=torch.float64).exponential_().log()
    upstream = torch.randn(3, 9, dtype=torch.float64)
    logits = s.clone().requires_grad_(True)
    mask, _ = models.gumbel_topk(logits, k, tau, noise=g)
    (mask * upstream).sum().backward()

    # d/ds of sum(u * y_soft) with y = softmax((log_softmax(s) + g) / tau); cls is a constant 1 (no gradient).
    p = torch.softmax(s, 1)
    y = torch.softmax((torch.log(p) + g) / tau, 1)
    u = upstream.clone()
    u[:, 0] = 0
    d_z = y * (u - (u * y).sum(1, keepdim=True))  # softmax backward
    d_logp = d_z / tau
    d_s = d_logp - p * d_logp.sum(1, keepdim=True)  # log_softmax backward
    torch.testing.assert_close(logits.grad, d_s, rtol=1e-5, atol=1e-6)  # the selector computes in float32


# ---------------------------------------------------------------------------------------------------------------
# The patched model
# ---------------------------------------------------------------------------------------------------------------


def test_state_dict_keys_are_svites() -> None:
    base = set(micro().state_dict())
    glob = micro(num_keep=9)
    assert set(glob.state_dict()) - base == {"gumbel.weight", "gumbel.bias"}
    layerwise = micro(num_keep=9, selector="layerwise")
    assert set(layerwise.state_dict()) - base == {"gumbel.weight", "gumbel.bias", "blocks.0.attn.gumbel.weight",
                                                  "blocks.0.attn.gumbel.bias", "blocks.1.attn.gumbel.weight",
                                                  "blocks.1.attn.gumbel.bias"}
    sd = layerwise.state_dict()
    assert sd["gumbel.weight"].shape == (1, DIM) and sd["blocks.1.attn.gumbel.bias"].shape == (1,)
    assert all((v == 0).all() for key, v in sd.items() if "gumbel.bias" in key)
    wide = models.TokenScorer(768, N_TOKENS, 9, 1, "zero", False)
    assert 0.016 < wide.weight.std().item() < 0.024  # trunc-normal(0.02)


def test_data_models_are_deit_plus_layerwise_selectors() -> None:
    assert set(models.DATA_MODELS) <= set(models.MODEL_NAMES)
    assert models.default_img_size("deit_tiny_patch16_224_data") == 224
    model = models.create_model("deit_tiny_patch16_224_data", num_classes=10)
    assert sorted(models.token_scorers(model)) == sorted(["gumbel"] + [f"blocks.{i}.attn.gumbel" for i in range(12)])
    assert all(s.num_keep == 197 and s.mode == "zero" for s in models.token_scorers(model).values())
    args = argparse.Namespace(model="deit_tiny_patch16_224_data", token_selection=True, token_number=187,
                              token_ratio=None, token_selector="global", token_mode="zero", tau_schedule="linear",
                              eval_noise=False, visualize_tokens=0)
    cfg = models.TokenConfig.from_args(args)
    assert cfg.selector == "layerwise"
    models.apply_token_selection(model, cfg)
    assert {s.num_keep for s in models.token_scorers(model).values()} == {187}
    models.apply_token_selection(model, models.TokenConfig())  # without --token_selection: plain DeiT, as SViTE
    assert not models.token_scorers(model) and "gumbel.weight" not in model.state_dict()


@pytest.mark.parametrize("selector", ["global", "layerwise"])
@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_keeping_every_token_equals_unpatched(selector: str, mode: str) -> None:
    plain, patched = micro(), micro(selector=selector, mode=mode)  # no k: keep all N tokens
    x = images()
    for train in (False, True):
        plain.train(train)
        patched.train(train)
        assert torch.equal(patched(x), plain(x))


def test_disabled_and_removed_equal_unpatched() -> None:
    plain, x = micro().eval(), images()
    off = micro()
    models.apply_token_selection(off, models.TokenConfig())
    assert list(off.state_dict()) == list(plain.state_dict()) and torch.equal(off.eval()(x), plain(x))
    removed = micro(num_keep=5, selector="layerwise", mode="drop")
    models.remove_token_selection(removed)
    assert list(removed.state_dict()) == list(plain.state_dict())
    assert isinstance(removed.patch_drop, torch.nn.Identity)
    assert not removed.blocks[0].attn._forward_pre_hooks and not removed.blocks[0].attn._forward_hooks
    assert torch.equal(removed.eval()(x), plain(x))


def test_apply_is_idempotent_and_keeps_weights() -> None:
    model = micro(num_keep=9, selector="layerwise", mode="drop")
    scorers = models.token_scorers(model)
    weights = {name: s.weight.detach().clone() for name, s in scorers.items()}
    models.apply_token_selection(model, models.TokenConfig(enabled=True, num_keep=5, selector="layerwise"))
    again = models.token_scorers(model)
    assert all(again[name] is scorers[name] and torch.equal(s.weight, weights[name]) for name, s in again.items())
    attn = model.blocks[0].attn
    assert len(attn._forward_pre_hooks) == 1 and not attn._forward_hooks  # zero mode: no scatter hook
    assert {s.num_keep for s in again.values()} == {5}
    models.apply_token_selection(model, models.TokenConfig(enabled=True, num_keep=5))
    assert list(models.token_scorers(model)) == ["gumbel"] and not attn._forward_pre_hooks


def test_exactly_k_tokens_enter_the_blocks_in_drop_mode() -> None:
    model = micro(num_keep=6, mode="drop").eval()
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(images())
        tokens = model._pos_embed(model.patch_embed(images()))
    assert seen[0].shape == (3, 6, DIM)
    assert torch.equal(seen[0][:, 0], tokens[:, 0]), "the cls token is kept, first"


def test_eval_is_deterministic_unless_eval_noise() -> None:
    x = images()
    model = micro(num_keep=5, selector="layerwise").eval()
    assert torch.equal(model(x), model(x))
    noisy = micro(num_keep=5, selector="layerwise", eval_noise=True).eval()
    assert not torch.equal(noisy(x), noisy(x))


def global_reference(model: torch.nn.Module, x: torch.Tensor, k: int, mode: str, noisy: bool) -> torch.Tensor:
    """The global selector by hand: score, top-k with cls forced, then zero or gather, then the stock blocks."""
    tokens = model._pos_embed(model.patch_embed(x))
    logits = F.linear(tokens, model.gumbel.weight, model.gumbel.bias).squeeze(-1)
    perturbed = logits.log_softmax(1) + (sample_gumbel(logits) if noisy else 0)
    idx = topk_indices(perturbed, k)
    if mode == "zero":
        keep = torch.zeros_like(logits).scatter(1, idx, 1.0)
        tokens = tokens * keep[..., None]
    else:
        tokens = gather(tokens, idx)
    for blk in model.blocks:
        tokens = blk(tokens)
    return model.forward_head(model.norm(tokens))


@pytest.mark.parametrize("mode", ["zero", "drop"])
@pytest.mark.parametrize("train", [False, True])
def test_global_selector_matches_hand_reference(mode: str, train: bool) -> None:
    model, x = micro(num_keep=7, mode=mode).train(train), images()
    torch.manual_seed(11)
    out = model(x)
    torch.manual_seed(11)
    with torch.no_grad():
        ref = global_reference(model, x, 7, mode, noisy=train)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_layerwise_selector_matches_hand_reference(mode: str) -> None:
    """Zero: the block's normalised input is multiplied by its mask before qkv (SViTE). Drop: attention runs on the
    kept tokens and its output is scattered back; the MLP sees every token."""
    k = 9
    model, x = micro(num_keep=k, selector="layerwise", mode=mode).eval(), images()
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(x))
        idx = topk_indices(model.gumbel(tokens).squeeze(-1), k)
        keep = torch.zeros(3, N_TOKENS).scatter(1, idx, 1)[..., None]
        tokens = gather(tokens, idx) if mode == "drop" else tokens * keep
        for blk in model.blocks:
            h = blk.norm1(tokens)
            n = h.shape[1]
            kept = models.token_scorers(model)["blocks.0.attn.gumbel"].keep_count(n)
            idx = topk_indices(blk.attn.gumbel(h).squeeze(-1), kept)
            if mode == "zero":
                update = blk.attn.forward(h * torch.zeros(3, n).scatter(1, idx, 1)[..., None])  # .forward: no hooks
            else:
                update = torch.zeros_like(h)
                update[torch.arange(3)[:, None], idx] = blk.attn.forward(gather(h, idx))
            tokens = tokens + update
            tokens = tokens + blk.mlp(blk.norm2(tokens))
        ref = model.forward_head(model.norm(tokens))
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    assert kept == (round(k * k / N_TOKENS) if mode == "drop" else k)


@pytest.mark.parametrize("selector", ["global", "layerwise"])
@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_scorers_learn_through_the_straight_through_mask(selector: str, mode: str) -> None:
    model = micro(num_keep=6, selector=selector, mode=mode).train()
    F.cross_entropy(model(images()), torch.tensor([1, 2, 3])).backward()
    for name, scorer in models.token_scorers(model).items():
        assert scorer.weight.grad is not None and scorer.weight.grad.abs().sum() > 0, name


def test_zero_and_drop_helpers() -> None:
    x, mask = torch.randn(2, 5, 3), torch.tensor([[1.0, 0, 1, 0, 0], [1, 1, 0, 0, 1]])
    idx = torch.tensor([[0, 2], [0, 1]])
    assert torch.equal(zero_tokens(x, mask), x * mask[..., None])
    assert torch.equal(drop_tokens(x, mask, idx), torch.stack([x[0, [0, 2]], x[1, [0, 1]]]))


def test_bf16_autocast_drop_mode() -> None:
    model = micro(num_keep=6, selector="layerwise", mode="drop").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images())
    assert torch.isfinite(out).all()


def test_deepcopy_keeps_each_copy_on_its_own_scorers() -> None:
    model = micro(num_keep=6, selector="layerwise", mode="drop").eval()
    ema = copy.deepcopy(model)
    assert ema.patch_drop.scorer is ema.gumbel and ema.gumbel is not model.gumbel
    hook = next(iter(ema.blocks[0].attn._forward_pre_hooks.values()))
    assert hook.__self__ is ema.blocks[0].attn.gumbel
    x = images()
    before = model(x)
    with torch.no_grad():
        for scorer in models.token_scorers(ema).values():
            scorer.weight.normal_()
    assert torch.equal(model(x), before) and not torch.equal(ema(x), before)
    models.remove_token_selection(ema)
    assert len(model.blocks[0].attn._forward_pre_hooks) == len(model.blocks[0].attn._forward_hooks) == 1


# ---------------------------------------------------------------------------------------------------------------
# Co-training with weight sparsity and the optimizer
# ---------------------------------------------------------------------------------------------------------------


def test_masking_sparsifies_blocks_and_leaves_selectors_dense() -> None:
    model = micro(num_keep=9, selector="layerwise").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    masking = Masking(model, optimizer, density=0.5, total_steps=10, update_frequency=2, log_fn=lambda r: None)
    assert not any("gumbel" in name for name in masking.masks)
    for step in range(1, 5):
        loss = F.cross_entropy(model(images()), torch.tensor([1, 2, 3]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        masking.step(step)
    params = dict(model.named_parameters())
    masks = masking.masks
    assert abs(sum(m.sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values()) - 0.5) < 0.001
    layers = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    assert {n for n in masks if n.startswith("blocks.")} == {f"blocks.{i}.{x}.weight" for i in range(2) for x in layers}
    assert all((params[n][~m] == 0).all() and (~m).any() for n, m in masks.items() if n.startswith("blocks."))
    for name, scorer in models.token_scorers(model).items():
        assert scorer.weight.count_nonzero() == DIM, f"{name} must stay dense"


def test_weight_decay_follows_svite() -> None:
    model = micro(num_keep=9, selector="layerwise")
    optimizer = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        if "gumbel" in name:
            assert decay[id(p)] == (0.05 if name.endswith("weight") else 0.0), name


# ---------------------------------------------------------------------------------------------------------------
# Temperature schedule
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule, start, middle, end", [("linear", 10.0, 5.05, 0.1), ("reversed", 0.1, 5.05, 10.0)])
def test_tau_schedule(schedule: str, start: float, middle: float, end: float) -> None:
    model = micro(num_keep=9, selector="layerwise", tau_schedule=schedule)
    sched = models.TokenSchedule(model, models.TokenConfig(enabled=True, tau_schedule=schedule), total_steps=200)
    taus = lambda: [s.tau.item() for s in models.token_scorers(model).values()]  # noqa: E731
    assert taus() == pytest.approx([start] * 3) and sched.report() == {"tau": pytest.approx(start)}
    assert sched.step(100) is False
    assert taus() == pytest.approx([middle] * 3) and sched.report()["tau"] == pytest.approx(middle)
    sched.step(200)
    assert taus() == pytest.approx([end] * 3)
    assert models.tau_at(300, 200, schedule) == pytest.approx(end)


def test_tau_schedule_state_round_trip(caplog: pytest.LogCaptureFixture) -> None:
    cfg = models.TokenConfig(enabled=True, num_keep=9)
    sched = models.TokenSchedule(micro(num_keep=9), cfg, total_steps=100)
    sched.step(37)
    state = sched.state_dict()
    assert state["step"] == 37 and state["tau"] == pytest.approx(models.tau_at(37, 100, "linear"))
    fresh_model = micro(num_keep=9)
    fresh = models.TokenSchedule(fresh_model, cfg, total_steps=100)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state and fresh_model.gumbel.tau.item() == pytest.approx(state["tau"])
    longer = models.TokenSchedule(micro(num_keep=9), cfg, total_steps=200)
    with caplog.at_level(logging.WARNING):
        longer.load_state_dict(state)
    assert "checkpoint had linear over 100" in caplog.text and longer.report()["tau"] == pytest.approx(
        models.tau_at(37, 200, "linear"))
    with pytest.raises(ValueError, match="not a TokenSchedule state dict"):
        fresh.load_state_dict({"step": 3})


# ---------------------------------------------------------------------------------------------------------------
# Configuration and bad input
# ---------------------------------------------------------------------------------------------------------------


def parse(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_digits_micro")
    models.add_token_args(parser)
    return parser.parse_args(list(flags))


def test_flags_and_defaults() -> None:
    assert models.TokenConfig.from_args(parse()) == models.TokenConfig()
    cfg = models.TokenConfig.from_args(parse("--token_selection", "--token-ratio", "0.5", "--token-selector",
                                             "layerwise", "--token-mode", "drop", "--tau-schedule", "reversed",
                                             "--eval-noise", "--visualize-tokens", "4"))
    assert cfg == models.TokenConfig(True, None, 0.5, "layerwise", "drop", "reversed", True, 4)
    assert cfg.to_dict()["ratio"] == 0.5
    # SViTE's scripts: 187 / 177 / 138 / 99 of 197 tokens for 5 / 10 / 30 / 50% data sparsity.
    ks = [models.TokenConfig(enabled=True, ratio=r).keep_count(197) for r in (0.95, 0.9, 0.7, 0.5)]
    assert ks == [187, 177, 138, 99]
    assert models.TokenConfig(enabled=True).keep_count(197) == 197
    assert models.TokenConfig(enabled=True, ratio=0.001).keep_count(197) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_keep=0), "--token_number must be an int >= 1"),
    (dict(num_keep=-3), "--token_number must be an int >= 1"),
    (dict(ratio=0.0), r"--token-ratio must be in \(0, 1\]"),
    (dict(ratio=1.5), r"--token-ratio must be in \(0, 1\]"),
    (dict(num_keep=9, ratio=0.5), "either --token_number .* or --token-ratio"),
    (dict(selector="random"), "unknown token selector 'random'; choose from global, layerwise"),
    (dict(mode="prune"), "unknown token mode 'prune'; choose from zero, drop"),
    (dict(tau_schedule="cosine"), "unknown tau schedule 'cosine'; choose from linear, reversed"),
    (dict(visualize=-1), "--visualize-tokens must be an int >= 0"),
])
def test_bad_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        models.TokenConfig(enabled=True, **kwargs)


def test_bad_input_elsewhere() -> None:
    with pytest.raises(ValueError, match="--token_number, --eval-noise need --token_selection"):
        models.TokenConfig(num_keep=9, eval_noise=True)
    with pytest.raises(ValueError, match="--token_number 18 must be between 1 and the 17 tokens"):
        micro(num_keep=18)
    with pytest.raises(ValueError, match="k must be in"):
        models.gumbel_topk(torch.randn(2, 5), 6, 1.0)
    with pytest.raises(ValueError, match="unknown tau schedule"):
        models.tau_at(1, 10, "step")
    with pytest.raises(ValueError, match="no token selector"):
        models.TokenSchedule(micro(), models.TokenConfig(enabled=True), 10)
    with pytest.raises(ValueError, match="total_steps must be a positive int"):
        models.TokenSchedule(micro(num_keep=3), models.TokenConfig(enabled=True), 0)
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        models.apply_token_selection(torch.nn.Linear(2, 2), models.TokenConfig(enabled=True))
    with pytest.raises(ValueError, match="global token selector"):
        models.visualize_tokens(micro(), images(), "unused")
    with pytest.raises(SystemExit):
        parse("--token-mode", "shrink")


# ---------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------


def test_visualize_tokens_greys_out_dropped_patches(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    model = micro(num_keep=5).train()
    paths = models.visualize_tokens(model, images(2), tmp_path / "viz" / "tokens")
    assert [p.name for p in paths] == ["tokens_000.png", "tokens_001.png"] and model.training
    picture = torch.tensor(np.array(Image.open(paths[0])), dtype=torch.float32)
    assert picture.shape == (16 * 14, (16 + 2 + 16) * 14, 3)  # image | separator | selection, upscaled x14
    right = picture[:, -16 * 14:].reshape(4, 4 * 14, 4, 4 * 14, 3)  # the selection, as 4 x 4 patches
    spread = right.amax(dim=(1, 3, 4)) - right.amin(dim=(1, 3, 4))
    assert (spread <= 0.25 * 255 + 1).sum() == 12, "cls + 4 patches kept: the other 12 are low-contrast grey"
