"""--export prints complete loading code that works as printed, and its files come back through --resume.

The printed snippets are run exactly as printed, in a fresh isolated interpreter started outside the repository, so a
missing ``img_size``, class count, architecture argument or a relative path would fail here.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import interop
import engine
import main
import models
from conftest import TINY_RUN
from datasets import DataConfig
from training.loaders import LoaderConfig, build_val_loader

MICRO = "vit_digits_micro"


def parse(*flags: str, model: str = MICRO) -> argparse.Namespace:
    return main.get_args_parser().parse_args([*TINY_RUN, "--model", model, *flags])


def sparsify(model: torch.nn.Module, density: float = 0.5, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() in (2, 4) and "gumbel" not in name:
                p.mul_(torch.rand(p.shape, generator=generator) < density)
    return model.eval()


def export(capsys, model: torch.nn.Module, name: str, tmp_path: Path, tag: str, *flags: str) -> str:
    """Save ``model`` as a trimmed checkpoint, run ``--export`` on it through main.main, return what it printed."""
    torch.save({"model": model.state_dict()}, tmp_path / f"{tag}.pth")
    main.main(parse("--export", str(tmp_path / tag), "--resume", str(tmp_path / f"{tag}.pth"), *flags, model=name))
    return capsys.readouterr().out


def snippet(out: str, header: str) -> str:
    """The code block printed after ``header`` (up to the next blank line)."""
    block = out.split(header, 1)[1].lstrip("\n")
    return block.split("\n\n", 1)[0]


@pytest.mark.slow
def test_printed_snippets_load_the_exported_models_with_equal_logits(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    deit = sparsify(timm.create_model("deit_tiny_patch16_224", num_classes=7, img_size=32))
    digits = sparsify(models.create_model(MICRO, num_classes=10))
    compact = models.compact_model(digits, models.random_unit_masks(digits, 0.5, 0.6, seed=1)).eval()
    models.apply_token_selection(compact, models.TokenConfig(enabled=True, num_keep=9))
    compact.eval()
    timm_header = "load it with timm alone (copy and paste into Python):"
    project_header = "(copy and paste into Python):"

    out_deit = export(capsys, deit, "deit_tiny_patch16_224", tmp_path, "deit", "--input-size", "32")
    out_digits = export(capsys, digits, MICRO, tmp_path, "digits")
    out_compact = export(capsys, compact, MICRO, tmp_path, "compact", "--token_selection", "--token_number", "9")
    assert "img_size=32" in out_deit and "num_classes=7" in out_deit and str(tmp_path / "deit") in out_deit
    assert timm_header not in out_compact and "cannot express per-block head counts" in out_compact

    inputs = {"deit": torch.randn(2, 3, 32, 32), "digits": torch.randn(2, 3, 16, 16),
              "compact": torch.randn(2, 3, 16, 16)}
    torch.save(inputs, tmp_path / "inputs.pt")
    script = ["import torch", f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})", "logits = {}"]
    for tag, code in (("deit", snippet(out_deit, timm_header)), ("digits", snippet(out_digits, timm_header)),
                      ("compact", snippet(out_compact, project_header))):
        script += [code, "with torch.no_grad():", f"    logits[{tag!r}] = model(inputs[{tag!r}])"]
    script.append(f"torch.save(logits, {str(tmp_path / 'logits.pt')!r})")
    (tmp_path / "load.py").write_text("\n".join(script) + "\n")
    # -I: no PYTHONPATH, no script or working directory on sys.path; cwd outside the repository
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "load.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    with torch.no_grad():
        for tag, model in (("deit", deit), ("digits", digits), ("compact", compact)):
            # another process may use another thread count, hence another float summation order: not bit-exact, but a
            # model built differently (wrong img_size, classes, widths) would be far off or fail to load
            torch.testing.assert_close(logits[tag], model(inputs[tag]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["model.sparse.safetensors", "model.safetensors"])
def test_resume_accepts_an_export_with_the_flags_its_config_records(tmp_path: Path, capsys, weights: str) -> None:
    torch.manual_seed(0)
    model = models.create_model(MICRO, num_classes=10)
    models.apply_token_selection(model, models.TokenConfig(enabled=True, num_keep=9, mode="drop"))
    model = sparsify(model)
    interop.export_model(model, MICRO, models.TokenConfig(enabled=True, num_keep=9, mode="drop"), tmp_path / "e")
    stats = main.main(parse("--eval", "--resume", str(tmp_path / "e" / weights)))  # no --token_selection needed
    out = capsys.readouterr().out
    assert "token selection: global, k = 9 of 17 tokens, drop mode" in out
    if weights == "model.sparse.safetensors":
        assert "a compressed sparse export of this project" in out
    loader = build_val_loader(DataConfig.from_args(parse("--input-size", "16")), LoaderConfig.from_args(parse()),
                              0, 1)[0]
    reference = engine.evaluate(model, loader, torch.device("cpu"), None)
    assert stats["test_acc1"] == pytest.approx(reference["acc1"]) and stats["test_images"] == 360


def test_training_resume_from_a_sparse_export_says_it_holds_weights_only(tmp_path: Path) -> None:
    model = sparsify(models.create_model(MICRO, num_classes=10))
    paths = interop.export_model(model, MICRO, models.TokenConfig(), tmp_path)
    with pytest.raises(ValueError, match="holds weights only .* evaluate it with --eval"):
        main.main(parse("--epochs", "1", "--resume", str(paths["sparse"])))
