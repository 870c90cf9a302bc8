"""Token merging (ToMe): the patch off equals the stock model, merging identical tokens changes nothing, exact token
counts and MACs per block, AMP, torch.compile, DDP, any checkpoint through checkpoint_tool.py, and bad r refused."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from timm.utils import ModelEmaV3
from torch.utils.flop_counter import FlopCounterMode

import engine
import main
import models
import sparselearning
from conftest import ROOT, TINY_RUN, run_main
from datasets import DataConfig
from interop.checkpoint import load_checkpoint
from models.token_merging import MergeConfig, bipartite_soft_matching, merge_tokens
from test_amp_compile import batches, per_step_losses
from training.loaders import LoaderConfig, build_val_loader

MICRO = "vit_digits_micro"  # 2 blocks, dim 32, 2 heads of 16; 17 tokens (cls + 16 patches)


def micro() -> VisionTransformer:
    torch.manual_seed(0)
    return models.create_model(MICRO, num_classes=10).eval()


def step_context(model: torch.nn.Module, amp_dtype: torch.dtype | None) -> engine.StepContext:
    return engine.StepContext(optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                              scaler=torch.amp.GradScaler("cpu", enabled=False),
                              sparsifier=sparselearning.DenseSparsifier(), amp_dtype=amp_dtype, print_freq=1000)


def layer_scale_micro() -> VisionTransformer:
    """The micro shape with LayerScale, which a copied block forward can forget (ToMe's own patch does)."""
    torch.manual_seed(0)
    return VisionTransformer(**{**models.SMALL_MODELS[MICRO], "num_classes": 10, "init_values": 0.5}).eval()


def paired_patches(batch: int = 3) -> torch.Tensor:
    """16 px images whose 4x4 patches come in identical horizontal pairs (2k, 2k + 1): sets A and B of ToMe's split."""
    pairs = torch.randn(batch, 3, 4, 2, 4, 4)  # image, channel, patch row, pair, pixel row, pixel column
    patches = torch.stack([pairs, pairs], dim=4).reshape(batch, 3, 4, 4, 4, 4)  # ..., patch column, ...
    return patches.permute(0, 1, 2, 4, 3, 5).reshape(batch, 3, 16, 16)


@pytest.mark.parametrize("build", [micro, layer_scale_micro], ids=["deit", "layerscale"])
def test_r0_gives_the_unpatched_logits_and_removal_restores_the_stock_model(build) -> None:
    model, x = build(), torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        stock = model(x)
        models.apply_token_merging(model, MergeConfig(r=(0,)))
        assert models.merge_plan(model) == (0, 0) and len(model.blocks[1]._forward_hooks) == 1
        assert torch.equal(model(x), stock)
        models.apply_token_merging(model, MergeConfig(r=(3,)))
        assert not torch.allclose(model(x), stock)
        models.remove_token_merging(model)
        assert models.merge_plan(model) is None and not model.blocks[1]._forward_hooks
        assert torch.equal(model(x), stock) and set(model.state_dict()) == set(build().state_dict())


@pytest.mark.parametrize("build", [micro, layer_scale_micro], ids=["deit", "layerscale"])
@pytest.mark.parametrize("merges", [(8, 0), (4, 0), (4, 2)])
def test_merging_identical_tokens_with_proportional_attention_equals_the_unmerged_model(
        build, merges: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Position embeddings zeroed, so paired patches give identical tokens (cosine 1, the best match): merged into
    one token of size 2, they get exactly the attention the two copies got."""
    model, x = build(), paired_patches()
    with torch.no_grad():
        model.pos_embed[:, 1:].zero_()
        stock = model(x)
        models.apply_token_merging(model, MergeConfig(r=merges))
        torch.testing.assert_close(model(x), stock, rtol=1e-5, atol=1e-6)
        if merges[0] < 8:  # sizes 1 and 2 side by side: without the log-size bias the attention is not the same
            monkeypatch.setattr("models.token_merging.patch.size_bias",
                                lambda size, dtype: torch.zeros_like(size, dtype=dtype)[:, None, None, :])
            assert not torch.allclose(model(x), stock, rtol=1e-3, atol=1e-4)


def test_matching_keeps_the_prefix_and_averages_by_size() -> None:
    # Prefix 2 (cls + distillation); A = positions 2, 4, 6, B = 3, 5. The prefix is identical to everything.
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0], [0.1, 1.0]]])
    m = bipartite_soft_matching(metric, 2, num_prefix=2)
    # Best edges: A 2 -> B 3 (cosine 0.995), A 6 -> B 3 (0.198), A 4 -> B 3 (0.0995, not among the r = 2 best).
    assert m.src.tolist() == [[0, 2]] and m.dst.tolist() == [[0, 0]] and m.kept.tolist() == [[1]]
    x = torch.arange(7.0).reshape(1, 7, 1)
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 2.0]])
    merged, new_size = merge_tokens(x, size, m)
    # [prefix 0, 1; kept A 4; B 3 with A 2 (size 3) and A 6 (size 2): (3 + 3 * 2 + 2 * 6) / 6; B 5 alone]
    assert merged.flatten().tolist() == [0.0, 1.0, 4.0, 3.5, 5.0] and new_size.tolist() == [[1, 1, 1, 6, 1]]
    with pytest.raises(ValueError, match=r"r must be in \[0, 3\]"):
        bipartite_soft_matching(metric, 4, num_prefix=2)


def test_every_prefix_token_stays_unmerged_and_first() -> None:
    """A second prefix token (a register here; a distillation token likewise) is protected like cls."""
    torch.manual_seed(0)
    model = VisionTransformer(**{**models.SMALL_MODELS[MICRO], "num_classes": 10, "reg_tokens": 1}).eval()
    models.apply_token_merging(model, MergeConfig(r=(8, 4)))  # 16 patches: every A token merges in block 0
    seen, x = [], torch.randn(2, 3, 16, 16)
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(x)
        size = model.token_merging.state.size  # after the last block: 2 prefix + 8 - 4 tokens
        tokens = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        models.remove_token_merging(model)
        unmerged = model.blocks[0](tokens)
    assert model.num_prefix_tokens == 2 and seen[0].shape[1] == 2 + 8 and size.shape == (2, 6)
    torch.testing.assert_close(seen[0][:, :2], unmerged[:, :2])  # the prefix tokens: untouched, first
    assert size[:, :2].eq(1).all() and size.sum(dim=1).eq(18).all()  # the sizes account for every token
    with pytest.raises(ValueError, match=r"block 0 receives 18 tokens \(2 prefix\) and can merge at most 8"):
        models.apply_token_merging(model, MergeConfig(r=(9, 0)))


def tokens_seen(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[int, int]]:
    """(tokens entering each block, tokens its MLP runs on), recorded by hooks during a forward pass."""
    seen: list[list[int]] = []
    handles = [blk.register_forward_pre_hook(lambda m, a: seen.append([a[0].shape[1]])) for blk in model.blocks]
    handles += [blk.mlp.register_forward_pre_hook(lambda m, a: seen[-1].append(a[0].shape[1])) for blk in model.blocks]
    model(x)
    for h in handles:
        h.remove()
    return [tuple(s) for s in seen]


@pytest.mark.parametrize("setup", ["merge", "decreasing", "select+merge", "compact+merge"])
def test_token_counts_and_executed_macs_per_block_are_exact(setup: str) -> None:
    model = models.random_compact_model(MICRO, 0.5, 0.5, num_classes=10) if setup == "compact+merge" else micro()
    for blk in model.blocks:
        blk.attn.fused_attn = False  # so that torch's counter sees the attention matmuls
    if setup == "select+merge":
        models.apply_token_selection(model, models.TokenConfig(enabled=True, num_keep=13, mode="drop"))
    cfg = MergeConfig(r=(4,), schedule="decreasing") if setup == "decreasing" else MergeConfig(r=(5, 3))
    models.apply_token_merging(model, cfg)
    n = 13 if setup == "select+merge" else 17
    merges = (8, 0) if setup == "decreasing" else (5, 3)  # decreasing: 2R at the first block, 0 at the last
    expected = [(n, n - merges[0]), (n - merges[0], n - merges[0] - merges[1])]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert tokens_seen(model.eval(), x) == expected
        with FlopCounterMode(display=False) as counter:
            model(x)
    shapes = models.block_shapes(model)
    assert [(b.tokens, b.tokens - b.merged) for b in shapes] == expected
    assert models.count_macs(model).total == counter.get_total_flops() / 2 / 2  # FLOPs = 2 MACs, 2 images
    assert models.count_macs(model, "dense").total > models.count_macs(model).total
    assert models.token_merging.token_counts(n, 1, merges) == [n, *(c for _, c in expected)]


def test_decreasing_schedule_is_a_line_from_2r_to_0_with_the_same_total() -> None:
    merges = MergeConfig(r=(13,), schedule="decreasing").per_block(12)
    assert merges == (26, 24, 21, 19, 17, 14, 12, 9, 7, 5, 2, 0) and sum(merges) == 13 * 12
    assert MergeConfig(r=(13,)).per_block(12) == (13,) * 12 and MergeConfig(r=(3, 1)).per_block(2) == (3, 1)


def test_deit_small_at_r13_keeps_41_tokens_and_matches_drop70_macs() -> None:
    with torch.device("meta"):
        model = models.create_model("deit_small_patch16_224")
        models.apply_token_merging(model, MergeConfig(r=(13,)))
        assert [b.tokens for b in models.block_shapes(model)][-1] - 13 == 41  # 197 - 12 x 13 (ToMe's count)
        assert models.count_macs(model).total / 1e9 == pytest.approx(2.706, abs=1e-3)  # ToMe: 2.7 GFLOPs
        drop70 = models.create_model("deit_small_patch16_224")
        models.apply_token_selection(drop70, models.TokenConfig(enabled=True, ratio=0.7, mode="drop"))
    target = models.count_macs(drop70).total
    merges = models.merges_for_macs(model, target)
    assert merges == (10,) * 6 + (9,) * 6
    assert models.count_macs(model, merges=merges).total == pytest.approx(target, rel=0.002)


@pytest.mark.parametrize("flags, message", [
    (("--tome-r", "-1"), "integers >= 0"),
    (("--tome-r", "9"), "block 0 receives 17 tokens .* at most 8"),
    (("--tome-r", "7"), "block 1 receives 10 tokens .* at most 5"),
    (("--tome-r", "1", "2", "3"), "3 values but the model has 2 blocks"),
    (("--tome-r", "1", "2", "--tome-schedule", "decreasing"), "give a single R"),
    (("--token-mode", "merge"), "--token-mode merge needs --tome-r"),
    (("--tome-schedule", "decreasing"), "needs --tome-r"),
    (("--token_selection", "--token-mode", "merge", "--tome-r", "2"), "--token_selection --token-mode drop"),
    (("--token_selection", "--token-ratio", "0.7", "--tome-r", "2"), "zero-mode token selection"),
    (("--token_selection", "--token-selector", "layerwise", "--token-mode", "drop", "--token-ratio", "0.7",
      "--tome-r", "2"), "global token selector only"),
])
def test_bad_merge_settings_stop_with_a_message(flags: tuple[str, ...], message: str) -> None:
    args = main.get_args_parser().parse_args([*TINY_RUN, *flags])
    with pytest.raises(ValueError, match=message):
        tokens = models.TokenConfig.from_args(args)
        model = micro()
        models.apply_token_selection(model, tokens)
        models.apply_token_merging(model, MergeConfig.from_args(args))


def test_bf16_autocast_trains_with_merging_and_stays_close_to_float32() -> None:
    model = micro()
    models.apply_token_merging(model, MergeConfig(r=(4,)))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(x)
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)
    losses = per_step_losses(model.train(), step_context(model, torch.bfloat16), batches(1) * 4)  # one batch, 4 steps
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_compiled_select_then_merge_trains_as_eager() -> None:
    torch._dynamo.reset()
    data, results = batches(3), []
    for compiled in (False, True):
        model = micro().train()
        models.apply_token_selection(model, models.TokenConfig(enabled=True, ratio=0.8, mode="drop"))
        models.apply_token_merging(model, MergeConfig(r=(3,)))
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        results.append((per_step_losses(forward, step_context(model, None), data), model))
    (eager, eager_model), (compiled, compiled_model) = results
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_a_merging_model_compiled_after_a_plain_one_still_merges() -> None:
    """torch.compile reuses one graph for every model of a class unless it guards on hooks; merging lives in hooks, so
    a merging model compiled after a plain one ran the plain graph (the suite's compiled ToMe rows ran at dense speed)."""
    torch._dynamo.reset()
    plain, merging = micro().eval(), micro().eval()
    models.apply_token_merging(merging, MergeConfig(r=(3,)))
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        eager_plain, eager_merged = plain(x), merging(x)
        compiled_plain = torch.compile(plain, backend="aot_eager")(x)
        compiled_merged = torch.compile(merging, backend="aot_eager")(x)
    assert not torch.allclose(eager_merged, eager_plain, atol=1e-3)
    torch.testing.assert_close(compiled_plain, eager_plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_merged, eager_merged, rtol=1e-5, atol=1e-5)


def test_ema_copy_merges_on_its_own_weights() -> None:
    model = micro()
    models.apply_token_merging(model, MergeConfig(r=(4,)))
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    x = torch.randn(2, 3, 16, 16)
    assert models.merge_plan(ema.module) == (4, 4)
    with torch.no_grad():
        fresh = micro()
        fresh.load_state_dict(ema.module.state_dict())
        models.apply_token_merging(fresh, MergeConfig(r=(4,)))
        assert torch.equal(ema.module(x), fresh(x)) and not torch.equal(ema.module(x), model(x))


def test_checkpoint_tool_merges_timm_weights_and_honours_a_recorded_r(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    model = micro()
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))  # timm's own format: no flags recorded
    flags = [*TINY_RUN, "--eval", "--model", MICRO, "--resume", str(tmp_path / "model.safetensors")]
    stats = main.main(main.get_args_parser().parse_args([*flags, "--tome-r", "4", "2"]))
    out = capsys.readouterr().out
    assert "r per block [4, 2]; tokens per block 17 -> 13 -> 11" in out
    models.apply_token_merging(model, MergeConfig(r=(4, 2)))
    assert f"executed (what runs: masked weights and zeroed tokens cost the dense price): " \
           f"{models.count_macs(model).total / 1e9:.4g}" in out
    parsed = main.get_args_parser().parse_args([*TINY_RUN, "--input-size", "16"])
    loader, _ = build_val_loader(DataConfig.from_args(parsed), LoaderConfig.from_args(parsed), 0, 1)
    assert stats["test_acc1"] == pytest.approx(engine.evaluate(model, loader, torch.device("cpu"))["acc1"])

    args = main.get_args_parser().parse_args([*TINY_RUN, "--token-mode", "merge", "--tome-r", "3"])
    torch.save({"model": micro().state_dict(), "args": vars(args)}, tmp_path / "checkpoint.pth")  # as main.py saves
    flags = [*TINY_RUN, "--eval", "--model", MICRO, "--resume", str(tmp_path / "checkpoint.pth")]
    main.main(main.get_args_parser().parse_args(flags))
    assert "r per block [3, 3]" in capsys.readouterr().out  # recorded
    main.main(main.get_args_parser().parse_args([*flags, "--tome-r", "0"]))
    assert "r per block [0, 0]" in capsys.readouterr().out  # --tome-r 0 evaluates without merging


@pytest.mark.slow
def test_torchrun_select_then_merge_keeps_ranks_identical_and_evaluates_alike(tmp_path: Path) -> None:
    """DDP (2 processes, gloo): one epoch of select-then-merge; every rank ends with the same weights, and a
    single-process --eval of the checkpoint, merging as its flags record, reproduces the run's top-1."""
    extra = ("--token_selection", "--token-mode", "drop", "--token-ratio", "0.8", "--tome-r", "2")
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path))
    flags = (*TINY_RUN, "--epochs", "1", "--batch-size", "16", "--output_dir", str(tmp_path / "run"), *extra)
    proc = subprocess.run([*torchrun, *flags], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    checkpoint = load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert checkpoint["args"]["tome_r"] == [2]
    single = run_main(*TINY_RUN, "--eval", "--resume", str(tmp_path / "run" / "checkpoint.pth"))
    assert "r per block [2, 2]; tokens per block 14 -> 12 -> 10" in single.stdout
    top1 = float(re.search(r"top-1 ([\d.]+)%", single.stdout).group(1))
    log = (tmp_path / "run" / "log.txt").read_text().splitlines()
    assert top1 == pytest.approx(float(re.search(r'"test_acc1": ([\d.]+)', log[-1]).group(1)), abs=0.01)


def test_study_merges_at_drop70_macs_and_rebuilds_a_post_hoc_row(tmp_path: Path) -> None:
    from benchmarks import study

    dense = models.create_model("vit_digits_tiny", num_classes=10)
    drop70 = models.create_model("vit_digits_tiny", num_classes=10)
    models.apply_token_selection(drop70, models.TokenConfig(enabled=True, ratio=0.7, mode="drop"))
    assert study.TOME_KEEP07_R == models.merges_for_macs(dense, models.count_macs(drop70).total)
    args = main.get_args_parser().parse_args(["--model", MICRO, "--input-size", "16"])
    model = micro()
    (tmp_path / "dense_seed0").mkdir()
    torch.save({"model": model.state_dict(), "args": vars(args)}, tmp_path / "dense_seed0" / "checkpoint.pth")
    (tmp_path / "posthoc").mkdir()
    (tmp_path / "posthoc" / "posthoc.json").write_text(
        f'{{"source": "{tmp_path / "dense_seed0"}", "tome_r": [4, 2], "test_acc1": 50.0}}')
    rebuilt = study.deployed_model(tmp_path / "posthoc")
    models.apply_token_merging(model, MergeConfig(r=(4, 2)))
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert models.merge_plan(rebuilt) == (4, 2) and torch.equal(rebuilt(x), model(x))
    assert study.posthoc_row("dense+tome_keep07", 0, tmp_path / "posthoc")["test_acc1"] == 50.0


def test_study_append_keeps_recorded_rows_and_names_changed_numerics(tmp_path: Path) -> None:
    from benchmarks import study
    from test_benchmarks import fake_study_rows

    rows = fake_study_rows()
    study.write_outputs(rows, tmp_path, "python benchmarks/study.py", 60.0, "0/0/0")
    new = [{**rows[0], "samples_per_sec": 1.0}, {**rows[1], "test_acc1": 95.0},
           {**rows[0], "config": "tome_keep07", "test_acc1": 89.5}]
    changed = study.append_to(new, tmp_path, "python benchmarks/study.py --configs dense tome_keep07")
    assert changed == ["dense seed 1: recorded 90.00, now 95.00"]
    table = (tmp_path / "study.md").read_text()
    assert ("- appended 1 rows by `python benchmarks/study.py --configs dense tome_keep07`" in table
            and "1 reproduced their top-1 exactly and 1 did not: dense seed 1: recorded 90.00, now 95.00" in table)
    assert "- command: `python benchmarks/study.py`" in table
    assert re.search(r"\| tome_keep07 \| 1 \| 89\.50 ± 0\.00 \|.* \| see note \|  \| `--token-mode merge", table)  # not timed
    assert "| dense | 3 | 90.00 ± 1.00 |" in table  # the recorded rows, not the re-trained ones
