"""GPU readiness on the CPU: AMP (bf16, fp16 + GradScaler) and torch.compile through engine.train_one_epoch for every
sparsity mode, and the precision defaults as a pure function of the device's capabilities.

The compile tests use the ``aot_eager`` backend: it traces and partitions forward and backward exactly as inductor
does, but skips the C++ code generation that takes minutes per model on a 2-core CI machine.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import engine
import main as entry
import models
import sparselearning
from conftest import TINY_RUN
from sparselearning.base import combine
from training.amp import Precision, choose_precision, optimizer_supports_fused
from training.distillation import DistillationLoss

MODES = ("dense", "unstructured", "structured", "tokens", "tokens+unstructured")
STEPS = 6


def build(mode: str, amp_dtype: torch.dtype | None, seed: int = 0) -> tuple[torch.nn.Module, engine.StepContext]:
    """The micro model and main.py's training pieces for ``mode``, updating the topology every 2 of 6 steps."""
    torch.manual_seed(seed)
    model = models.create_model("vit_digits_micro", num_classes=10)
    tokens = (models.TokenConfig(enabled=True, ratio=0.7, mode="drop") if mode.startswith("tokens")
              else models.TokenConfig())
    models.apply_token_selection(model, tokens)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scaler = torch.amp.GradScaler("cpu", enabled=amp_dtype == torch.float16)
    cfg = None
    if mode.endswith("unstructured"):
        cfg = sparselearning.SparsityConfig(density=0.3, sparse_init="ERK", update_frequency=2)
    elif mode == "structured":
        cfg = sparselearning.SparsityConfig(density=0.5, pruning_type="structure", atten_density=0.5,
                                            other_density=0.5, update_frequency=2)
    units = models.structure_units(model, scaler) if mode == "structured" else None
    weights = sparselearning.build_sparsifier(cfg, model, optimizer, STEPS, log_fn=lambda record: None, units=units)
    schedule = models.TokenSchedule(model, tokens, STEPS) if tokens.enabled else sparselearning.DenseSparsifier()
    ctx = engine.StepContext(optimizer=optimizer, scaler=scaler, sparsifier=combine(weights, schedule),
                             amp_dtype=amp_dtype, print_freq=1000)
    return model, ctx


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def weight_masks(sparsifier: sparselearning.Sparsifier) -> dict[str, torch.Tensor]:
    members = getattr(sparsifier, "members", [sparsifier])
    return next((m.masks for m in members if hasattr(m, "masks")), {})


def per_step_losses(model: torch.nn.Module, ctx: engine.StepContext, data: list) -> list[float]:
    """One single-batch epoch per step, so every step's loss is seen; the Gumbel noise is drawn from seed 0."""
    torch.manual_seed(0)
    losses, step = [], 0
    plain = DistillationLoss(torch.nn.functional.cross_entropy)
    for i, batch in enumerate(data):
        metrics, step = engine.train_one_epoch(model, plain, [batch], ctx,
                                               torch.device("cpu"), i, step, show_progress=False)
        losses.append(metrics["loss"])
    return losses


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16+GradScaler"])
@pytest.mark.parametrize("mode", MODES)
def test_amp_training_keeps_the_loss_finite_and_the_masks_exact(mode: str, amp_dtype: torch.dtype) -> None:
    model, ctx = build(mode, amp_dtype)
    masks = weight_masks(ctx.sparsifier)
    initial = {name: m.clone() for name, m in masks.items()}
    counts = {name: int(m.sum()) for name, m in masks.items()}
    losses = per_step_losses(model, ctx, batches(STEPS))
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert ctx.scaler.is_enabled() == (amp_dtype == torch.float16)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert params[name].dtype == torch.float32  # autocast leaves the master weights in float32
        assert int(mask.sum()) == counts[name], f"{name}: the active count changed"
        assert bool((params[name][~mask] == 0).all()), f"{name}: a masked weight is non-zero"
    if mode != "dense" and masks:
        assert any(not torch.equal(initial[n], m) for n, m in masks.items()), "no topology update happened"


@pytest.mark.parametrize("mode", ["dense", "unstructured", "tokens"])
def test_compiled_training_matches_eager(mode: str) -> None:
    torch._dynamo.reset()
    data = batches(4)
    eager_model, eager_ctx = build(mode, None)
    compiled_model, compiled_ctx = build(mode, None)
    eager = per_step_losses(eager_model, eager_ctx, data)
    compiled = per_step_losses(torch.compile(compiled_model, backend="aot_eager"), compiled_ctx, data)
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    masks, compiled_masks = weight_masks(eager_ctx.sparsifier), weight_masks(compiled_ctx.sparsifier)
    assert all(torch.equal(masks[n], compiled_masks[n]) for n in masks)


def test_main_compile_flag_trains_the_compiled_model_and_saves_plain_names(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile through main.py (in-process, aot_eager): the same losses as eager, checkpoint keys without _orig_mod."""
    compiled_with: list[torch.nn.Module] = []
    compile_ = torch.compile

    def spy(model: torch.nn.Module, **kwargs):
        compiled_with.append(model)
        return compile_(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", spy)
    flags = (*TINY_RUN, "--epochs", "1", "--model-ema-decay", "0.9", "--density", "0.5", "--update_frequency", "20")
    records = []
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        args = entry.get_args_parser().parse_args([*flags, "--output_dir", str(out)] + ["--compile"] * compiled)
        records.append(entry.main(args))
    assert len(compiled_with) == 1 and isinstance(compiled_with[0], models.vit.VisionTransformer)
    assert records[1]["train_loss"] == pytest.approx(records[0]["train_loss"], rel=1e-4)
    assert records[1]["test_acc1"] == pytest.approx(records[0]["test_acc1"], abs=1.0)
    assert records[1]["ema_test_loss"] == pytest.approx(records[0]["ema_test_loss"], rel=1e-3)
    saved = torch.load(tmp_path / "True" / "checkpoint.pth", weights_only=True)
    assert not any("_orig_mod" in k for k in [*saved["model"], *saved["model_ema"]])
    masks = saved["sparsifier"]["masks"]
    assert "blocks.0.attn.qkv.weight" in masks
    assert all(torch.equal(saved["model_ema"][n] != 0, m) for n, m in masks.items())  # the EMA of the compiled model
    config = json.loads((tmp_path / "True" / "config.json").read_text())
    assert (config["compile"], config["amp"], config["amp_dtype"], config["opt_fused"]) == (True, False, None, False)


# --- precision defaults ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("device", "bf16", "flags", "expected"), [
    ("cuda", True, {}, Precision(torch.bfloat16, grad_scaler=False, fused=True)),
    ("cuda", False, {}, Precision(torch.float16, grad_scaler=True, fused=True)),  # pre-Ampere GPUs
    ("cuda", True, {"amp_dtype": "float16"}, Precision(torch.float16, grad_scaler=True, fused=True)),
    ("cuda", True, {"amp": False, "opt_fused": False}, Precision(None, grad_scaler=False, fused=False)),
    ("cpu", True, {}, Precision(None, grad_scaler=False, fused=False)),  # what the tests run
    ("cpu", True, {"amp": True}, Precision(torch.bfloat16, grad_scaler=False, fused=False)),
    ("cpu", True, {"amp": True, "amp_dtype": "float16", "opt_fused": True},
     Precision(torch.float16, grad_scaler=True, fused=True)),
])
def test_precision_defaults_follow_the_device(device: str, bf16: bool, flags: dict, expected: Precision) -> None:
    assert choose_precision(device, bf16, True, **flags) == expected


def test_fused_is_only_chosen_for_optimizers_that_have_it() -> None:
    assert optimizer_supports_fused("adamw") and optimizer_supports_fused("sgd")
    assert not optimizer_supports_fused("lamb") and not optimizer_supports_fused("no-such-optimizer")
    assert choose_precision("cuda", True, False) == Precision(torch.bfloat16, grad_scaler=False, fused=False)
    with pytest.raises(ValueError, match="--opt-fused needs an optimizer with a fused kernel"):
        choose_precision("cuda", True, False, opt_fused=True)


def test_precision_is_printed_and_recorded() -> None:
    p = Precision(torch.float16, grad_scaler=True, fused=True)
    assert str(p) == "AMP float16, GradScaler on, fused optimizer kernel"
    assert p.flags() == {"amp": True, "amp_dtype": "float16", "opt_fused": True}
    assert Precision(None, False, False).flags() == {"amp": False, "amp_dtype": None, "opt_fused": False}
    args = entry.get_args_parser().parse_args([])
    assert (args.amp, args.amp_dtype, args.opt_fused) == (None, None, None)  # resolved per device by main()
