"""Evaluating any checkpoint: original SViTE files, timm weights, bare state_dicts, compact models, ours.

Original-format fixtures are built here from the layout in docs/original-sviite.md ("Original checkpoints"): the
model state_dict in SViTE's parameter order (the global scorer right after the patch embedding), float32 masks keyed
``module.<param>_<index>`` (unstructured) or ``module.<param>_mask`` (structured), and ``args`` as an
``argparse.Namespace``.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch

import interop
import checkpoint_tool
import engine
import main
import models
import sparselearning
from conftest import TINY_RUN, run_main
from datasets import DataConfig
from training.loaders import LoaderConfig, build_val_loader
from interop.checkpoint import load_checkpoint

MICRO = "vit_digits_micro"  # 2 blocks, dim 32, 2 heads of 16, MLP 128; 16 px input, 17 tokens


def parse(*flags: str) -> argparse.Namespace:
    return main.get_args_parser().parse_args([*TINY_RUN, "--model", MICRO, *flags])


def run(capsys, *flags: str) -> tuple[dict, str]:
    """main.main in this process (fast), returning its result and what it printed."""
    result = main.main(parse(*flags))
    return result, capsys.readouterr().out


def svite_order(state_dict: dict[str, torch.Tensor]) -> OrderedDict:
    """SViTE's named_parameters order: the global scorer sits right after the patch embedding."""
    scorer = [k for k in state_dict if k.startswith("gumbel.")]
    out = OrderedDict()
    for key, value in state_dict.items():
        if key in scorer:
            continue
        out[key] = value
        if key == "patch_embed.proj.bias":
            out.update((k, state_dict[k]) for k in scorer)
    return out


def micro_model(seed: int = 0, tokens: int | None = None, layerwise: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.create_model(MICRO, num_classes=10)
    if tokens is not None:
        models.apply_token_selection(model, models.TokenConfig(enabled=True, num_keep=tokens,
                                                               selector="layerwise" if layerwise else "global"))
    return model.eval()


def original_unstructured(model: torch.nn.Module, path: Path, *, prefix_bug: bool = False, token_number: int = 17,
                          density: float = 0.5) -> Path:
    """An original unstructured checkpoint; with ``prefix_bug`` a file of the original code before its mask-index
    fix of 2021-08-14 (commit d16756e): indices skip the scorer and only the patch embedding was ever masked."""
    state = svite_order({k: v.clone() for k, v in model.state_dict().items()})
    masks, index = {}, 0
    generator = torch.Generator().manual_seed(1)
    for name, tensor in state.items():
        if "gumbel" in name and prefix_bug:
            continue  # the buggy loop did not advance the index over the scorer
        if tensor.dim() in (2, 4) and "gumbel" not in name:
            mask = (torch.rand(tensor.shape, generator=generator) < density).float()
            masks[f"module.{name}_{index}"] = mask
            if not prefix_bug or name.startswith("patch_embed"):
                tensor.mul_(mask)
        index += 1
    selection = any("gumbel" in k for k in state)
    args = argparse.Namespace(model="deit_small_patch16_224", density=density, pruning_type="unstructure",
                              token_selection=selection, token_number=token_number, lr=5e-4)
    torch.save({"model": state, "optimizer": {}, "lr_scheduler": {}, "epoch": 599, "model_ema": state,
                "scaler": {}, "args": args, "mask": masks, "atten_mask": {}, "other_mask": {},
                "fired_mask": {k: v.to(torch.uint8) for k, v in masks.items()}, "mask_step": 1000}, path)
    return path


def original_structured(model: torch.nn.Module, path: Path, heads: int = 1, neurons: int = 76) -> Path:
    """An original structure_new checkpoint: pruned heads' q/k/v rows, fc1 rows and fc2 columns are zero."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    atten, other = {}, {}
    for i, blk in enumerate(model.blocks):
        d, dim = blk.attn.head_dim, blk.attn.qkv.in_features
        head_mask = torch.zeros(3, blk.attn.num_heads, d, dim)
        head_mask[:, :heads] = 1
        qkv_mask = head_mask.reshape(-1, dim)
        neuron = torch.zeros(blk.mlp.fc1.out_features)
        neuron[torch.randperm(len(neuron), generator=torch.Generator().manual_seed(i))[:neurons]] = 1
        for key, mask, table in ((f"blocks.{i}.attn.qkv.weight", qkv_mask, atten),
                                 (f"blocks.{i}.mlp.fc1.weight", neuron[:, None].expand(-1, dim), other),
                                 (f"blocks.{i}.mlp.fc2.weight", neuron[None, :].expand(dim, -1), other)):
            state[key].mul_(mask)
            table[f"module.{key}_mask"] = mask.float().contiguous()
    args = argparse.Namespace(model="deit_small_patch16_224", pruning_type="structure_new", atten_head=2,
                              atten_density=0.5, other_density=0.6, density=0.6, token_selection=False)
    torch.save({"model": state, "mask": {}, "atten_mask": atten, "other_mask": other, "fired_mask": {},
                "mask_step": 10, "epoch": 299, "args": args, "model_ema": None}, path)
    return path


# -------------------------------------------------------------------------------------------------------------
# Original SViTE files
# -------------------------------------------------------------------------------------------------------------


def test_original_unstructured_checkpoint_detected_and_evaluated(tmp_path: Path, capsys) -> None:
    path = original_unstructured(micro_model(), tmp_path / "deit_small_unstructure_50_80.0.pth")
    stats, out = run(capsys, "--eval", "--resume", str(path))
    assert "an original SViTE training checkpoint, epoch 599" in out
    assert "token selector: none" in out and "unstructured sparsity" in out
    assert "WARNING" not in out, out
    contents = interop.read_checkpoint(path)
    assert len(contents.masks) == 10 and all(m.dtype == torch.bool for m in contents.masks.values())
    # the evaluated model is exactly the file's weights
    model = models.create_model(MICRO, num_classes=10)
    model.load_state_dict(contents.state_dict)
    reference = engine.evaluate(model.eval(), build_val_loader(DataConfig.from_args(
        parse("--input-size", "16")), LoaderConfig.from_args(parse()), 0, 1)[0], torch.device("cpu"), None)
    assert stats["test_acc1"] == pytest.approx(reference["acc1"]) and stats["test_images"] == 360
    assert stats["ema_test_acc1"] == pytest.approx(reference["acc1"])


def test_original_checkpoint_with_global_selector_uses_its_token_count(tmp_path: Path, capsys) -> None:
    path = original_unstructured(micro_model(tokens=9), tmp_path / "sel.pth", token_number=9)
    assert list(load_checkpoint(path)["model"])[4:6] == ["gumbel.weight", "gumbel.bias"]
    _, out = run(capsys, "--report", "--resume", str(path))
    assert "token selector: global" in out
    assert "token selection: global, k = 9 of 17 tokens, zero mode" in out
    assert "WARNING" not in out and "mask-index bug" not in out


def test_pre_fix_index_checkpoint_is_flagged_dense(tmp_path: Path, capsys) -> None:
    path = original_unstructured(micro_model(tokens=9), tmp_path / "deit_small_unstructure_50_sparseinput_0.95.pth",
                                 prefix_bug=True, token_number=9)
    _, out = run(capsys, "--report", "--resume", str(path))
    assert "until its fix of 2021-08-14 (commit d16756e)" in out  # shifted indices noticed, masks matched by name
    table = [line for line in out.splitlines() if line.startswith("blocks.0.attn.qkv.weight")]
    assert table and "<-- disagrees" in table[0]
    warnings = [line for line in out.splitlines() if line.startswith("WARNING")]
    assert any("disagree with the weights in 9 of 10" in w for w in warnings), warnings
    doc = "docs/original-sviite.md#the-mask-index-bug-before-2021-08-14"
    assert any(doc in w and "dense" in w for w in warnings)
    assert any("file name claims 50% unstructured sparsity" in w for w in warnings)
    assert any("recorded flags claim density 0.5" in w for w in warnings)


def test_original_structured_checkpoint_detected_compacted_and_identical(tmp_path: Path, capsys) -> None:
    path = original_structured(micro_model(), tmp_path / "deit_small_structure_40.pth")
    stats, out = run(capsys, "--eval", "--compact", "--resume", str(path), "--output_dir", str(tmp_path / "out"))
    assert "structured sparsity (zero heads / neurons, dense survivors): heads per block [1, 1] of 2" in out
    assert "MLP neurons [76, 76] of 128" in out and "WARNING" not in out, out
    assert stats["compact_test_acc1"] == pytest.approx(stats["test_acc1"])
    compact = interop.read_checkpoint(tmp_path / "out" / "compact.pth")
    assert compact.state_dict["blocks.0.attn.qkv.weight"].shape == (3 * 16, 32)


def test_structured_claim_without_pruned_units_is_flagged(tmp_path: Path, capsys) -> None:
    path = original_structured(micro_model(), tmp_path / "x.pth")
    ckpt = load_checkpoint(path)
    ckpt["model"] = micro_model(seed=3).state_dict()  # dense weights under structured masks and flags
    torch.save(ckpt, tmp_path / "deit_base_structure_40.pth")
    _, out = run(capsys, "--report", "--resume", str(tmp_path / "deit_base_structure_40.pth"))
    assert "dense weights" in out
    assert "WARNING: the recorded flags claim structured sparsity with 1 heads and 76 MLP neurons" in out
    assert "WARNING: the file name claims 40% structured sparsity but no head or neuron is pruned" in out


def test_mask_keys_map_by_name_never_by_index() -> None:
    assert interop.checkpoint_contents.mask_parameter_name("module.blocks.0.attn.qkv.weight_6") == \
        "blocks.0.attn.qkv.weight"
    assert interop.checkpoint_contents.mask_parameter_name("module.blocks.11.mlp.fc2.weight_mask") == \
        "blocks.11.mlp.fc2.weight"
    assert interop.checkpoint_contents.mask_parameter_name("head.weight_150") == "head.weight"


# -------------------------------------------------------------------------------------------------------------
# Other layouts: bare state_dict, layer-wise selector, compact, timm
# -------------------------------------------------------------------------------------------------------------


def test_bare_state_dict_with_a_selector_asks_for_the_token_count(tmp_path: Path, capsys) -> None:
    torch.save(micro_model(tokens=9).state_dict(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match=r"global token selector but records no token count; pass "
                                         r"--token_selection with --token_number K"):
        main.main(parse("--report", "--resume", str(tmp_path / "bare.pth")))
    _, out = run(capsys, "--report", "--resume", str(tmp_path / "bare.pth"), "--token_selection", "--token_number", "5")
    assert "k = 5 of 17 tokens" in out


def test_layerwise_selector_is_detected_from_block_keys(tmp_path: Path, capsys) -> None:
    model = micro_model(tokens=9, layerwise=True)
    torch.save({"model": model.state_dict()}, tmp_path / "lw.pth")
    stats, out = run(capsys, "--eval", "--resume", str(tmp_path / "lw.pth"), "--token_selection", "--token_number", "9")
    assert "token selector: layer-wise" in out and "token selection: layerwise, k = 9" in out
    assert stats["test_images"] == 360


def test_selector_flag_for_a_file_without_one_is_an_error(tmp_path: Path) -> None:
    torch.save(micro_model().state_dict(), tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="has no token-selector weights .* drop --token_selection"):
        main.main(parse("--report", "--resume", str(tmp_path / "plain.pth"), "--token_selection", "--token_number", "5"))


def test_compact_state_dict_is_detected_and_matches_the_compact_model(tmp_path: Path, capsys) -> None:
    model = micro_model()
    compact = models.compact_model(model, models.random_unit_masks(model, 0.5, 0.5, seed=0)).eval()
    torch.save(compact.state_dict(), tmp_path / "compact_weights.pth")
    _, out = run(capsys, "--flops", "--resume", str(tmp_path / "compact_weights.pth"))
    assert "compact shapes: heads per block [1, 1] of 2, MLP neurons [64, 64] of 128" in out
    contents = interop.read_checkpoint(tmp_path / "compact_weights.pth")
    detection = interop.detect(contents.state_dict, MICRO)
    rebuilt = interop.build_model(contents, detection, MICRO, models.TokenConfig())
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(rebuilt(x), compact(x))
    dense_macs = models.mac_views(model)["dense"]
    assert models.mac_views(rebuilt, reference=model)["executed"] < 0.6 * dense_macs


def test_timm_weights_in_safetensors_are_evaluated(tmp_path: Path, capsys) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    stats, out = run(capsys, "--eval", "--model", "deit_tiny_patch16_224", "--resume", str(tmp_path / "model.safetensors"))
    assert "model weights (a state_dict" in out and "dense weights" in out and "32 px input" in out
    assert stats["test_images"] == 360


# -------------------------------------------------------------------------------------------------------------
# Export
# -------------------------------------------------------------------------------------------------------------


def sparsify(model: torch.nn.Module, density: float = 0.5, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() in (2, 4) and "gumbel" not in name:
                p.mul_(torch.rand(p.shape, generator=generator) < density)
    return model


def test_unstructured_export_loads_into_timm_with_the_same_logits(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = sparsify(timm.create_model("deit_tiny_patch16_224", num_classes=10, img_size=32)).eval()
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pth")
    run(capsys, "--export", str(tmp_path / "export"), "--model", "deit_tiny_patch16_224", "--resume",
        str(tmp_path / "ckpt.pth"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["timm_loadable"] and not config["compact"] and config["token_selection"] is None
    loaded = timm.create_model("deit_tiny_patch16_224", pretrained=True, num_classes=10, img_size=32,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "export" / "model.safetensors"),
                                                           num_classes=10)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(interop.load_export(tmp_path / "export")(x), model(x), rtol=0, atol=0)


def test_compact_and_selector_exports_reload_through_create_model(tmp_path: Path) -> None:
    model = micro_model(tokens=9)
    compact = models.compact_model(model, models.random_unit_masks(model, 0.5, 0.6, seed=1)).eval()
    tokens = models.TokenConfig(enabled=True, num_keep=9)
    interop.export_model(compact, MICRO, tokens, tmp_path / "e")
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["compact"] and not config["timm_loadable"] and config["token_selection"]["num_keep"] == 9
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(interop.load_export(tmp_path / "e")(x), compact(x), rtol=0, atol=0)


def test_compressed_sparse_export_round_trips_exactly_within_the_size_bound(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.create_model("vit_digits_tiny", num_classes=10)
    shapes = {n: tuple(p.shape) for n, p in sparselearning.select_parameters(model).items()}
    densities = sparselearning.layer_densities(shapes, 0.5, "ERK")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in densities:
                p.mul_(torch.rand(p.shape, generator=generator) < densities[name])
    paths = interop.export_model(model, "vit_digits_tiny", models.TokenConfig(), tmp_path)
    restored = interop.load_sparse(paths["sparse"])
    state = model.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], state[k]) and restored[k].dtype == state[k].dtype for k in state)
    ratio = paths["sparse"].stat().st_size / paths["weights"].stat().st_size
    assert models.count_parameters(model)[1] / models.count_parameters(model)[0] < 0.51
    assert ratio <= 0.56, ratio


# -------------------------------------------------------------------------------------------------------------
# Safety and bad input
# -------------------------------------------------------------------------------------------------------------


class _CreatesAFile:
    """Unpickling this would create a file: the proof that no pickled code runs."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


@pytest.mark.slow
def test_a_malicious_pickle_is_refused_and_its_code_never_runs(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    payload = {"model": micro_model().state_dict(), "args": _CreatesAFile(target)}
    torch.save(payload, tmp_path / "evil.pth")  # torch's zip format
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"args": _CreatesAFile(target)}, protocol=2))  # a bare pickle
    for name in ("evil.pth", "evil.pkl"):
        with pytest.raises(ValueError, match=rf"refusing to load .*{name}: it pickles .*could run arbitrary code"):
            interop.read_checkpoint(tmp_path / name)
        proc = run_main(*TINY_RUN, "--eval", "--resume", str(tmp_path / name), check=False)
        assert proc.returncode == 1 and "refusing to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not target.exists()
    pickle.loads((tmp_path / "evil.pkl").read_bytes())  # a plain unpickler would have run it
    assert target.exists()


def test_only_argparse_namespace_is_allowed_beyond_tensors(tmp_path: Path) -> None:
    torch.save({"args": argparse.Namespace(lr=1.0), "model": {"w": torch.ones(1)}}, tmp_path / "ns.pth")
    assert load_checkpoint(tmp_path / "ns.pth")["args"].lr == 1.0
    torch.save({"args": OrderedDict(lr=1.0), "other": re.compile("x")}, tmp_path / "re.pth")
    with pytest.raises(ValueError, match="refusing to load"):
        load_checkpoint(tmp_path / "re.pth")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "truncated", "text", "no_weights"])
def test_bad_checkpoint_files_get_clear_errors(tmp_path: Path, case: str) -> None:
    path = tmp_path / "bad.pth"
    if case == "truncated":
        torch.save({"model": micro_model().state_dict()}, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif case == "text":
        path.write_text("epoch,acc\n1,0.5\n")
    elif case == "no_weights":
        torch.save({"epoch": 3, "notes": "hello"}, path)
    message = {"missing": "does not exist", "truncated": "truncated or corrupt",
               "text": "is not a checkpoint: it is neither a PyTorch file", "no_weights": "holds no model weights"}[case]
    proc = run_main(*TINY_RUN, "--report", "--resume", str(path), check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_shape_mismatch_lists_keys_and_suggests_the_model_that_fits(tmp_path: Path) -> None:
    torch.save({"model": models.create_model("vit_digits_tiny", num_classes=10).state_dict()}, tmp_path / "t.pth")
    with pytest.raises(ValueError) as err:
        main.main(parse("--eval", "--resume", str(tmp_path / "t.pth")))
    message = str(err.value)
    assert "does not fit --model vit_digits_micro" in message
    assert "patch_embed.proj.weight: checkpoint (64, 3, 4, 4) vs model (32, 3, 4, 4)" in message
    assert message.endswith("the weights fit --model vit_digits_tiny")
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(5, 3, 2, 2), "pos_embed": torch.zeros(1, 5, 5)}},
               tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="no known --model fits these weights"):
        main.main(parse("--report", "--resume", str(tmp_path / "odd.pth")))


def test_checkpoint_for_another_dataset_is_refused(tmp_path: Path) -> None:
    torch.save(models.create_model(MICRO, num_classes=7).state_dict(), tmp_path / "seven.pth")
    with pytest.raises(ValueError, match="classifies 7 classes but --data-set DIGITS has 10"):
        main.main(parse("--eval", "--resume", str(tmp_path / "seven.pth")))


# -------------------------------------------------------------------------------------------------------------
# MACs and params
# -------------------------------------------------------------------------------------------------------------


def planned(*flags: str) -> dict[str, float]:
    args = main.get_args_parser().parse_args(["--data-set", "IMNET", "--flops", *flags])
    model, densities, reference = checkpoint_tool.planned_model(args, models.TokenConfig.from_args(args))
    return models.mac_views(model, densities, reference)


@pytest.mark.parametrize("name,gmacs", [("deit_tiny_patch16_224", 1.26), ("deit_small_patch16_224", 4.61),
                                        ("deit_base_patch16_224", 17.58)])
def test_dense_deit_macs_match_timm(name: str, gmacs: float) -> None:
    views = planned("--model", name)
    assert views["dense"] / 1e9 == pytest.approx(gmacs, rel=0.01)
    assert views["executed"] == views["dense"]
    assert views["theoretical"] == pytest.approx(views["dense"], rel=1e-6)  # the odd exactly-zero initial weight


def test_paper_style_savings() -> None:
    svite = ("--sparse_init", "fixed_ERK")
    small = planned("--model", "deit_small_patch16_224", "--density", "0.5", *svite)
    assert 1 - small["paper"] / small["dense"] == pytest.approx(0.455, abs=0.001)
    assert small["params_nonzero"] / small["params"] == pytest.approx(0.5, abs=0.01)
    base = planned("--model", "deit_base_patch16_224", "--density", "0.6", *svite)
    assert 1 - base["paper"] / base["dense"] == pytest.approx(0.381, abs=0.001)
    plus = planned("--model", "deit_small_patch16_224", "--density", "0.5", *svite, "--token_selection",
                   "--token_number", "187")
    assert 0.486 <= 1 - plus["theoretical"] / plus["dense"] <= 0.493
    assert 1 - plus["paper"] / plus["dense"] == pytest.approx(0.486, abs=0.001)
    assert plus["executed"] >= plus["dense"]  # zero mode saves nothing


def test_flops_flag_prints_every_view(capsys) -> None:
    _, out = run(capsys, "--flops", "--token_selection", "--token-ratio", "0.5", "--token-mode", "drop")
    for label in ("params:", "GMACs per image: dense", "theoretical (SViTE", "paper convention", "executed"):
        assert label in out
    executed = float(re.search(r"executed \(.*\): ([\d.e-]+) \(saving ([-\d.]+)%\)", out).group(2))
    assert executed > 30  # drop mode really saves


def test_compact_file_of_a_token_selecting_run_evaluates_on_its_own(tmp_path: Path, capsys) -> None:
    tokens = models.TokenConfig(enabled=True, ratio=0.7, mode="drop")
    model = micro_model()
    models.apply_token_selection(model, tokens)
    compact = models.compact_model(model, models.random_unit_masks(model, 0.5, 0.5, seed=2)).eval()
    interop.save_compact(compact, MICRO, tmp_path / "compact.pth", {"model": MICRO, **tokens.as_flags()})
    stats, out = run(capsys, "--eval", "--resume", str(tmp_path / "compact.pth"))
    assert "a compact (physically pruned) model" in out and "k = 12 of 17 tokens, drop mode" in out
    loader = build_val_loader(DataConfig.from_args(parse("--input-size", "16")), LoaderConfig.from_args(parse()),
                              0, 1)[0]
    assert stats["test_acc1"] == pytest.approx(engine.evaluate(compact, loader, torch.device("cpu"), None)["acc1"])


def test_compact_of_an_unstructured_checkpoint_is_refused_before_evaluating(tmp_path: Path) -> None:
    path = original_unstructured(micro_model(), tmp_path / "u.pth")
    with pytest.raises(ValueError, match="--compact removes pruned heads and neurons, but .* is not structured-sparse"):
        main.main(parse("--eval", "--compact", "--resume", str(path)))
