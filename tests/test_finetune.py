"""--finetune: the model weights of any file evaluation reads, loaded into a fresh model before the sparsifier is built;
a classifier of another width keeps timm's init, another resolution is resampled, anything else stops the run; a
resumed run never reads the file."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import interop
import main
import models
import sparselearning
from conftest import TINY_RUN, run_main
from interop.checkpoint import load_checkpoint
from sparselearning.distributions import layer_counts, layer_densities
from training.assemble import ModelConfig, RunConfig, build_run
from training.loaders import LoaderConfig
from training.process import Process
from training.resume_check import compare, run_settings

MICRO = "vit_digits_micro"  # dim 32, 2 blocks of 2 heads, MLP 128, 16 px, 17 tokens


def fresh(num_classes: int = 10, img_size: int | None = None, seed: int = 1,
          tokens: models.TokenConfig | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.create_model(MICRO, num_classes=num_classes, img_size=img_size)
    if tokens is not None:
        models.apply_token_selection(model, tokens)
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """A half-sparse micro model (masked like a trained SViTE model) and one file of every kind evaluation reads."""
    model = fresh(seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    masking = sparselearning.Masking(model, optimizer, density=0.5, total_steps=1000, log_fn=lambda record: None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path_factory.mktemp("finetune")
    files = {"timm .pth": out / "timm.pth", "timm .safetensors": out / "timm.safetensors",
             "checkpoint": out / "checkpoint.pth", "original SViTE": out / "svite.pth"}
    torch.save(state, files["timm .pth"])
    save_file(state, str(files["timm .safetensors"]))
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "sparsifier": masking.state_dict(), "step": 0,
                "epoch": 3, "args": {"model": MICRO}}, files["checkpoint"])
    torch.save({"model": {f"module.{k}": v for k, v in state.items()},
                "mask": {f"module.{k}_{i}": m.float() for i, (k, m) in enumerate(masking.masks.items())},
                "args": argparse.Namespace(model=MICRO, density=0.5)}, files["original SViTE"])
    paths = interop.export_model(model, MICRO, models.TokenConfig(), out / "export")
    files["export"], files["sparse export"] = paths["weights"], paths["sparse"]
    return state, files


@pytest.mark.parametrize("kind", ["timm .pth", "timm .safetensors", "checkpoint", "original SViTE", "export",
                                  "sparse export"])
def test_every_file_kind_loads_its_weights_exactly(source, kind: str) -> None:
    state, files = source
    model = fresh()
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    lines = interop.load_pretrained(model, files[kind], MICRO)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), kind
    assert len(lines) == 1 and "50.0% of its maskable weights are zero" in lines[0], lines
    assert ("epoch 3" in lines[0]) == (kind == "checkpoint")


def test_another_class_count_keeps_timm_init_of_the_classifier(source) -> None:
    state, files = source
    model = fresh(num_classes=7)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    lines = interop.load_pretrained(model, files["timm .pth"], MICRO)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], head[k]) for k in head)  # the fresh head: trunc_normal(0.02), zero bias
    assert torch.count_nonzero(loaded["head.bias"]) == 0 and 0.01 < float(loaded["head.weight"].std()) < 0.03
    assert all(torch.equal(loaded[k], state[k]) for k in state if not k.startswith("head."))
    assert lines[1] == ("--finetune: the file has 10 classes and the model 7: head.weight, head.bias start from "
                        "timm's initialisation")


def test_a_file_without_classifier_keeps_the_fresh_one(tmp_path, source) -> None:
    state, _ = source
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, tmp_path / "backbone.pth")
    model = fresh()
    head = model.head.weight.detach().clone()
    lines = interop.load_pretrained(model, tmp_path / "backbone.pth", MICRO)
    assert torch.equal(model.head.weight, head) and "the file has no classifier and the model 10" in lines[1]


def test_another_resolution_resamples_the_position_embedding_with_timm(source) -> None:
    state, files = source
    model = fresh(img_size=32)  # 8x8 patches instead of 4x4
    lines = interop.load_pretrained(model, files["timm .safetensors"], MICRO)
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[8, 8], old_size=[4, 4], num_prefix_tokens=1)
    assert model.pos_embed.shape == (1, 65, 32) and torch.equal(model.pos_embed.detach(), expected)
    assert torch.equal(model.pos_embed[:, :1].detach(), state["pos_embed"][:, :1])  # the cls position is kept
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state if k != "pos_embed")
    assert lines[1] == ("--finetune: position embedding resampled from 4x4 to 8x8 patches (16 to 32 px; timm's "
                        "resample_abs_pos_embed, bicubic)")


def test_a_distilled_file_keeps_both_prefix_tokens_and_reinits_both_classifiers(tmp_path) -> None:
    """DeiT's distilled models: cls and distillation positions are kept as they are, only the patch grid is
    resampled, and head and head_dist of another class count both keep timm's fresh init."""
    name = "vit_digits_micro_distilled"
    torch.manual_seed(0)
    state = models.create_model(name, num_classes=10).state_dict()
    torch.save(state, tmp_path / "distilled.pth")
    torch.manual_seed(1)
    model = models.create_model(name, num_classes=7, img_size=32)
    fresh_heads = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head")}
    lines = interop.load_pretrained(model, tmp_path / "distilled.pth", name)
    loaded = model.state_dict()
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=[8, 8], old_size=[4, 4], num_prefix_tokens=2)
    assert loaded["pos_embed"].shape == (1, 66, 32) and torch.equal(loaded["pos_embed"], expected)
    assert torch.equal(loaded["pos_embed"][:, :2], state["pos_embed"][:, :2])
    assert sorted(fresh_heads) == ["head.bias", "head.weight", "head_dist.bias", "head_dist.weight"]
    assert all(torch.equal(loaded[k], v) for k, v in fresh_heads.items())
    assert all(torch.equal(loaded[k], state[k]) for k in state if k != "pos_embed" and not k.startswith("head"))
    assert "head.weight, head.bias, head_dist.weight, head_dist.bias start from timm's initialisation" in lines[1]


def test_token_scorers_the_file_lacks_keep_their_init(source) -> None:
    state, files = source
    model = fresh(tokens=models.TokenConfig(enabled=True, num_keep=9))
    scorer = model.state_dict()["gumbel.weight"].clone()
    lines = interop.load_pretrained(model, files["checkpoint"], MICRO)
    assert torch.equal(model.state_dict()["gumbel.weight"], scorer)
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    assert "the global scorers (2 tensors) start from their initialisation" in lines[-1]


def test_bad_files_stop_with_a_message(tmp_path, source) -> None:
    _, files = source
    (tmp_path / "notes.txt").write_text("not weights")
    torch.save(fresh().state_dict(), tmp_path / "micro.pth")
    torch.save(models.create_model("vit_digits_tiny", num_classes=10).state_dict(), tmp_path / "tiny.pth")
    torch.save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    interop.save_compact(models.random_compact_model(MICRO, 0.5, 0.5, num_classes=10), MICRO, tmp_path / "c.pth")
    torch.save(fresh(tokens=models.TokenConfig(enabled=True, num_keep=9)).state_dict(), tmp_path / "scored.pth")
    cases = [
        (tmp_path / "missing.pth", FileNotFoundError, r"--finetune .*missing\.pth does not exist"),
        (tmp_path / "notes.txt", ValueError, r"is not a checkpoint"),
        (tmp_path / "tiny.pth", ValueError, r"does not fit --model vit_digits_micro.*fit --model vit_digits_tiny"),
        (tmp_path / "other.pth", ValueError, r"not a ViT state_dict"),
        (tmp_path / "c.pth", ValueError, r"is a compact .* heads per block \[1, 1\] and MLP widths \[64, 64\].*"
                                         r"--model vit_digits_micro: pass the masked checkpoint"),
        (tmp_path / "scored.pth", ValueError, r"holds global token-selector weights .* pass --token_selection"),
    ]
    for path, error, message in cases:
        model = fresh()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(error, match=message):
            interop.load_pretrained(model, path, MICRO)
        assert all(torch.equal(model.state_dict()[k], before[k]) for k in before), path  # nothing half-loaded
    # a compact state_dict (an export of a compact model, or a trimmed compact.pth) is told apart by its shapes
    torch.save(load_checkpoint(tmp_path / "c.pth")["model"], tmp_path / "c_weights.pth")
    with pytest.raises(ValueError, match=r"is a compact .*heads per block \[1, 1\]"):
        interop.load_pretrained(fresh(), tmp_path / "c_weights.pth", MICRO)


def test_build_run_starts_from_the_file_with_magnitude_masks(source) -> None:
    """The weights are loaded before the EMA copies them and the sparsifier chooses the top-|w| masks from them."""
    state, files = source
    torch.manual_seed(5)
    sparsity = sparselearning.SparsityConfig(density=0.3, sparse_init="ERK", mask_init="magnitude")
    said: list[str] = []
    run = build_run(RunConfig(model=ModelConfig(MICRO, num_classes=10, ema=True, finetune=str(files["timm .pth"])),
                              loader=LoaderConfig(8), total_steps=1000, sparsity=sparsity),
                    Process(0, 1, torch.device("cpu")), log_fn=lambda record: None, say=said.append)
    assert said[0].startswith(f"--finetune: model weights from {files['timm .pth']}")
    masks = run.weight_sparsifier.masks
    shapes = {name: tuple(mask.shape) for name, mask in masks.items()}
    counts = layer_counts(layer_densities(shapes, 0.3, "ERK"), shapes)
    for name, mask in masks.items():
        magnitude = state[name].abs()
        assert int(mask.sum()) == counts[name]
        assert float(magnitude[mask].min()) >= float(magnitude[~mask].max()), name  # the largest |w| are kept
    for name, value in run.model.state_dict().items():
        expected = state[name] * masks[name] if name in masks else state[name]
        assert torch.equal(value, expected), name
        assert torch.equal(run.model_ema.module.state_dict()[name], state[name]), name  # masked later by main.py


def test_a_resume_never_reads_the_file_and_must_name_the_same_one() -> None:
    parser = main.get_args_parser()
    finetuned = parser.parse_args(["--finetune", "pretrained.pth"])
    finetuned.input_size = 16
    assert RunConfig.from_args(finetuned).model.finetune == "pretrained.pth"
    finetuned.resume = "out/checkpoint.pth"
    assert RunConfig.from_args(finetuned).model.finetune is None  # the checkpoint holds the weights

    def settings(*flags: str) -> dict:
        return run_settings(vars(parser.parse_args(list(flags))), 1, 44)

    assert compare(settings("--finetune", "a.pth"), settings("--finetune", "a.pth"))[0] == []
    assert compare(settings(), settings("--finetune", "a.pth"))[0] == [("finetune", None, "a.pth")]
    assert compare(settings("--density", "0.5"), settings("--density", "0.5", "--mask-init", "magnitude"))[0] == [
        ("mask_init", "random", "magnitude")]
    with pytest.raises(ValueError, match="--finetune starts training .* read the file given with --resume"):
        main.main(parser.parse_args(["--eval", "--resume", "x.pth", "--finetune", "x.pth"]))


@pytest.mark.slow
def test_finetune_a_dense_checkpoint_into_a_sparse_run_and_resume_it(tmp_path, capsys) -> None:
    """Dense for one epoch; its checkpoint.pth starts a sparse run with magnitude masks; that run resumes with the
    pretrained file gone (never read again)."""
    run_main(*TINY_RUN, "--epochs", "1", "--output_dir", str(tmp_path / "dense"))
    pretrained = tmp_path / "pretrained.pth"
    (tmp_path / "dense" / "checkpoint.pth").rename(pretrained)
    dense = load_checkpoint(pretrained)["model"]
    flags = [*TINY_RUN, "--finetune", str(pretrained), "--density", "0.3", "--sparse_init", "ERK", "--mask-init",
             "magnitude", "--update_frequency", "20", "--output_dir", str(tmp_path / "sparse")]
    start: dict[str, dict[str, torch.Tensor]] = {}

    def keep_start(run) -> None:
        start["model"] = {k: v.clone() for k, v in run.model.state_dict().items()}
        start["masks"] = {k: v.clone() for k, v in run.weight_sparsifier.masks.items()}

    main.main(main.get_args_parser().parse_args([*flags, "--epochs", "1"]), on_run=keep_start)
    masks = start["masks"]
    counts = layer_counts(layer_densities({k: tuple(m.shape) for k, m in masks.items()}, 0.3, "ERK"),
                          {k: tuple(m.shape) for k, m in masks.items()})
    for name, weight in dense.items():
        if name in masks:
            kept = weight.abs()[masks[name]]
            assert int(masks[name].sum()) == counts[name]
            assert float(kept.min()) >= float(weight.abs()[~masks[name]].max()), name
            assert torch.equal(start["model"][name], weight * masks[name]), name
        else:
            assert torch.equal(start["model"][name], weight), name
    config = json.loads((tmp_path / "sparse" / "config.json").read_text())
    recorded = load_checkpoint(tmp_path / "sparse" / "checkpoint.pth")
    assert config["finetune"] == recorded["args"]["finetune"] == str(pretrained)
    assert config["mask_init"] == recorded["args"]["mask_init"] == recorded["sparsifier"]["config"]["mask_init"] \
        == "magnitude"
    pretrained.unlink()
    capsys.readouterr()
    record = main.main(main.get_args_parser().parse_args([*flags, "--epochs", "2", "--auto-resume"]))
    out = capsys.readouterr().out
    assert f"--finetune {pretrained} is not read: the run continues from" in out and record["epoch"] == 1
