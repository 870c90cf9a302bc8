"""``--compact-at-budget``: a global-pruning run that goes on as its compact model once the budget is met, exactly
(the compacted model computes the masked one's logits), resumably (before and after the compaction, bit for bit) and
ending in the compact.pth it trained."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import main
import models
import sparselearning
from interop.checkpoint import load_checkpoint, save_atomic
from models.compact import compact_architecture
from training import compaction, loop
from training.assemble import ModelConfig, RunConfig, build_run
from training.loaders import LoaderConfig
from training.process import Process

GLOBAL = sparselearning.SparsityConfig(pruning_type="global", target_macs=0.6, prune_every=1, prune_units=40)


def micro_run(**changes: object):
    cfg = RunConfig(model=ModelConfig("vit_digits_micro", num_classes=10, ema=True, ema_decay=0.5),
                    loader=LoaderConfig(batch_size=8), total_steps=40, sparsity=GLOBAL, compact_at_budget=True)
    torch.manual_seed(0)
    return build_run(RunConfig(**{**cfg.__dict__, **changes}), Process(0, 1, torch.device("cpu")),
                     log_fn=lambda record: None)


def images(seed: int, run) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    size = run.model.patch_embed.img_size
    return torch.randn(8, 3, *size, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def test_the_compacted_model_and_ema_compute_the_masked_ones_logits_and_train_on_alone() -> None:
    run = micro_run()
    step = 0
    while not compaction.due(run):  # engine.train_one_epoch's step, on random images
        step += 1
        x, y = images(step, run)
        loss = F.cross_entropy(run.forward_model(x), y)
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        run.sparsifier.step(step)
        run.model_ema.update(run.model, step=step)
        run.sparsifier.apply_masks(run.model_ema.module)
    assert step < 40 and run.weight_sparsifier.budget_met
    masked, masked_ema = copy.deepcopy(run.model).eval(), copy.deepcopy(run.model_ema.module).eval()
    budget = (run.weight_sparsifier.current_macs, run.weight_sparsifier.dense_macs)
    lr_state = run.lr_scheduler.state_dict()
    compaction.compact(run, epoch=3)
    x, _ = images(0, run)
    with torch.no_grad():
        torch.testing.assert_close(run.model.eval()(x), masked(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(run.model_ema.module(x), masked_ema(x), rtol=0, atol=1e-5)
    run.model.train()
    small = sum(p.numel() for p in run.model.parameters())
    assert small < sum(p.numel() for p in masked.parameters())
    assert models.count_macs(run.model).total == budget[0]
    assert (run.compacted.current_macs, run.compacted.dense_macs, run.compacted.epoch) == (*budget, 3)
    assert run.compacted.architecture == compact_architecture(run.model, "vit_digits_micro")
    assert sum(p.numel() for g in run.optimizer.param_groups for p in g["params"]) == small
    assert not run.optimizer.state and run.forward_model is run.model  # fresh moments; no wrapper on one process
    assert run.lr_scheduler.optimizer is run.optimizer and run.lr_scheduler.state_dict() == lr_state
    assert isinstance(run.sparsifier, sparselearning.DenseSparsifier) and not compaction.due(run)
    checkpoint = run.state().checkpoint(3, step, 0.0, [], {}, 40)
    assert checkpoint["compacted"] == run.compacted.to_dict() and checkpoint["sparsifier"] == {}
    x, y = images(1, run)  # the compact model trains: a step lowers its loss on the batch
    before = F.cross_entropy(run.forward_model(x), y)
    run.optimizer.zero_grad()
    before.backward()
    run.optimizer.step()
    with torch.no_grad():
        assert float(F.cross_entropy(run.forward_model(x), y)) < before.item()


def test_compact_at_budget_needs_global_pruning_and_no_token_modules() -> None:
    with pytest.raises(ValueError, match="--compact-at-budget compacts a global-pruning run.*--pruning_type global"):
        micro_run(sparsity=sparselearning.SparsityConfig(density=0.5))
    with pytest.raises(ValueError, match="--token_selection or --tome-r"):
        micro_run(tokens=models.TokenConfig(enabled=True, ratio=0.7))


def args_of(*extra: str):
    from conftest import TINY_RUN

    args = main.get_args_parser().parse_args([*TINY_RUN, "--epochs", "3", "--pruning_type", "global",
                                              "--target-macs", "0.6", "--prune-every", "4", "--prune-units", "60",
                                              "--compact-at-budget", "--model-ema-decay", "0.9",
                                              "--drop-path", "0.1", "--save-every-steps", "20",
                                              *extra])  # drop path: the rebuilt model's too
    args.pin_mem = False
    return args


def trained(ckpt: dict) -> dict:
    return {key: ckpt[key] for key in ("model", "model_ema", "optimizer", "lr_scheduler", "compacted", "epoch",
                                       "step")}


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


@pytest.mark.slow
def test_a_run_compacted_at_its_budget_fine_tunes_the_compact_model_and_resumes_bit_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """3 epochs of 44 steps; the budget is met in epoch 0, so epoch 1 starts the compact model, which compact.pth
    and --eval of the last checkpoint hold. Resumed from the checkpoint before the compaction (end of epoch 0, and
    mid-way through it) and from those after it (end of epoch 1, and mid-way through it), the run ends
    bit-identical."""
    kept = {}

    def keep_epochs(obj: dict, path: Path) -> None:  # every end-of-epoch checkpoint and the first mid-epoch one of
        save_atomic(obj, path)                       # each epoch, besides checkpoint.pth
        if path.name == "checkpoint.pth" and path.parent.name == "full":
            key = ("mid", obj["epoch"]) if "position" in obj else obj["epoch"]
            if key not in kept:
                kept[key] = path.with_name(f"{key[0]}{key[1]}.pth" if "position" in obj else f"epoch{key}.pth")
                save_atomic(obj, kept[key])

    monkeypatch.setattr(loop, "save_atomic", keep_epochs)
    record = main.main(args_of("--output_dir", str(tmp_path / "full")))
    log = [json.loads(line) for line in (tmp_path / "full" / "log.txt").read_text().splitlines()]
    epochs = [r for r in log if "train_loss" in r]
    assert epochs[0]["macs_fraction"] <= 0.6 and "macs_fraction" not in epochs[1]  # pruned in epoch 0, compact after
    assert [r["epoch"] for r in epochs] == [0, 1, 2] and all(0 < r["train_loss"] < 10 for r in epochs)
    assert 0 <= record["test_acc1"] <= 100 and record["epoch"] == 2
    before, after = load_checkpoint(kept[0]), load_checkpoint(kept[1])
    assert "compacted" not in before and after["compacted"]["epoch"] == 1
    arch = after["compacted"]["architecture"]
    widths = [after["model"][f"blocks.{i}.mlp.fc1.weight"].shape[0] for i in range(2)]
    assert widths == arch["block_mlp_hidden"] and sum(widths) < 2 * 128
    assert after["model"]["cls_token"].shape[-1] == arch["embed_dim"]
    measured = log[-1]["compact_model"]
    assert measured["macs"] == measured["budget_macs"] == after["compacted"]["current_macs"]
    assert measured["macs_agree"] and measured["macs"] / measured["dense_macs"] <= 0.6
    final = load_checkpoint(tmp_path / "full" / "checkpoint.pth")
    compact = load_checkpoint(tmp_path / "full" / "compact.pth")
    assert compact["architecture"] == arch
    assert_same(compact["model"], final["model"])
    evaluated = main.main(main.get_args_parser().parse_args(  # checkpoint_tool rebuilds the compact model too
        ["--model", "vit_digits_micro", "--data-set", "DIGITS", "--num_workers", "0", "--no-pin-mem", "--eval",
         "--resume", str(tmp_path / "full" / "checkpoint.pth")]))
    assert (evaluated["test_acc1"], evaluated["ema_test_acc1"]) == (record["test_acc1"], record["ema_test_acc1"])
    mid = {epoch: load_checkpoint(kept["mid", epoch]) for epoch in (0, 1)}
    assert "compacted" not in mid[0] and mid[1]["compacted"]["epoch"] == 1 and mid[1]["position"]["batch"] > 0
    for key in (0, 1, ("mid", 0), ("mid", 1)):
        out = tmp_path / f"resumed{key}".replace(" ", "").replace("'", "")
        main.main(args_of("--output_dir", str(out), "--resume", str(kept[key])))
        assert_same(trained(load_checkpoint(out / "checkpoint.pth")), trained(final))
