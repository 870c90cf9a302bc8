"""DeiT distillation (the loss, its flags, the teacher) and the dense model as its own teacher."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.deit import VisionTransformerDistilled

import engine
import interop
import main as entry
import models
import sparselearning
from conftest import TINY_RUN, run_main
from interop.checkpoint import save_atomic
from training import process
from training.assemble import ModelConfig, PrecisionConfig, RunConfig, ScheduleConfig, build_run
from training.distillation import DistillationConfig, DistillationLoss, kd_loss
from training.loaders import LoaderConfig
from training.resume_check import compare, run_settings
from training.teacher import load_teacher

MICRO = "vit_digits_micro"
CPU = torch.device("cpu")


def fixed_batch(classes: int = 10, batch: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(samples, student logits, teacher logits, labels) drawn from seed 0."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, 3, 16, 16, generator=g), torch.randn(batch, classes, generator=g),
            3 * torch.randn(batch, classes, generator=g), torch.randint(0, classes, (batch,), generator=g))


def hand_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """sum_b sum_k p_t (log p_t - log p_s) at temperature tau, times tau^2, over the logits' numel: DeiT's soft term."""
    p_t = torch.softmax(teacher / tau, dim=1)
    log_ratio = torch.log_softmax(teacher / tau, dim=1) - torch.log_softmax(student / tau, dim=1)
    return (p_t * log_ratio).sum() * tau ** 2 / student.numel()


# ------------------------------------------------------------------------------------------------ the loss


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_loss_is_the_hand_computed_kl_mix_on_the_class_head(tau: float) -> None:
    samples, student, teacher, labels = fixed_batch()
    seen = []
    loss = DistillationLoss(F.cross_entropy, lambda x: seen.append(x) or teacher, "soft", alpha=0.3, tau=tau)
    expected = 0.7 * F.cross_entropy(student, labels) + 0.3 * hand_kl(student, teacher, tau)
    torch.testing.assert_close(loss(samples, student, labels), expected, rtol=1e-6, atol=1e-7)
    assert seen[0] is samples  # the teacher sees the student's very input


def test_a_distilled_models_pair_feeds_base_to_the_class_head_and_kd_to_the_dist_head() -> None:
    samples, student, teacher, labels = fixed_batch()
    dist_head = student.flip(0)
    hard = DistillationLoss(F.cross_entropy, lambda x: teacher, "hard", alpha=0.5)
    expected = 0.5 * F.cross_entropy(student, labels) + 0.5 * F.cross_entropy(dist_head, teacher.argmax(1))
    torch.testing.assert_close(hard(samples, (student, dist_head), labels), expected)
    soft = DistillationLoss(F.cross_entropy, lambda x: teacher, "soft", alpha=1.0, tau=2.0)
    torch.testing.assert_close(soft(samples, (student, dist_head), labels), hand_kl(dist_head, teacher, 2.0))


def test_kind_none_is_the_plain_criterion_and_the_teacher_gets_no_gradient() -> None:
    samples, student, _, labels = fixed_batch()
    assert torch.equal(DistillationLoss(F.cross_entropy)(samples, student, labels), F.cross_entropy(student, labels))
    teacher = torch.nn.Linear(3 * 16 * 16, 10)
    logits = student.clone().requires_grad_()
    DistillationLoss(F.cross_entropy, lambda x: teacher(x.flatten(1)), "soft")(samples, logits, labels).backward()
    assert logits.grad is not None and teacher.weight.grad is None


def test_the_loss_refuses_a_teacher_mismatch_and_bad_settings() -> None:
    with pytest.raises(ValueError, match="need one"):
        DistillationLoss(F.cross_entropy, None, "soft")
    with pytest.raises(ValueError, match="takes none"):
        DistillationLoss(F.cross_entropy, lambda x: x, "none")
    with pytest.raises(ValueError, match="--distillation-alpha"):
        DistillationLoss(F.cross_entropy, lambda x: x, "hard", alpha=1.5)
    with pytest.raises(ValueError, match="--distillation-tau"):
        DistillationConfig("soft", None, "t.pth", tau=0)
    with pytest.raises(ValueError, match="no kd term"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), "none")


# ------------------------------------------------------------------------------------------------ flags


def parse(*flags: str) -> argparse.Namespace:
    return entry.get_args_parser().parse_args(list(flags))


def test_flags_keep_deits_names_and_defaults_and_refuse_half_a_teacher() -> None:
    args = parse()
    assert (args.teacher_model, args.teacher_path, args.distillation_type, args.distillation_alpha,
            args.distillation_tau) == (None, "", "none", 0.5, 1.0)
    assert DistillationConfig.from_args(parse("--distillation-type", "hard", "--teacher-path", "t.pth")).enabled
    with pytest.raises(ValueError, match="--distillation-type soft needs a teacher: pass --teacher-path"):
        DistillationConfig.from_args(parse("--distillation-type", "soft"))
    with pytest.raises(ValueError, match="--teacher-path without --distillation-type"):
        DistillationConfig.from_args(parse("--teacher-path", "t.pth"))
    with pytest.raises(ValueError, match="--teacher-model without --distillation-type"):
        DistillationConfig.from_args(parse("--teacher-model", "regnety_160"))


def test_resuming_with_another_teacher_is_refused() -> None:
    def settings(*flags: str) -> dict:
        args = parse(*flags)
        args.input_size = 16
        return run_settings(vars(args), 1, 44)

    teacher = ("--distillation-type", "soft", "--teacher-path", "dense/checkpoint.pth")
    assert compare(settings(*teacher), settings(*teacher, "--output_dir", "elsewhere"))[0] == []
    changed = compare(settings(*teacher), settings("--distillation-type", "hard", "--teacher-path", "other.pth",
                                                   "--distillation-tau", "4"))[0]
    assert [name for name, _, _ in changed] == ["teacher_path", "distillation_type", "distillation_tau"]
    assert [name for name, _, _ in compare(settings(), settings(*teacher))[0]] == ["distillation_type"]
    # without distillation the teacher settings do nothing
    assert compare(settings("--distillation-tau", "2"), settings())[0] == []


# ------------------------------------------------------------------------------------------------ the teacher


def saved_model(path: Path, name: str = MICRO, args: dict | None = None, **kwargs) -> torch.nn.Module:
    torch.manual_seed(1)
    model = models.create_model(name, num_classes=10, **kwargs).eval()
    save_atomic({"model": model.state_dict(), **({"args": args} if args is not None else {})}, path)
    return model


def test_a_checkpoint_that_records_its_model_teaches_frozen_and_draws_nothing(tmp_path: Path) -> None:
    model = saved_model(tmp_path / "checkpoint.pth", args={"model": MICRO})
    rng = torch.get_rng_state()
    teacher = load_teacher(None, str(tmp_path / "checkpoint.pth"), num_classes=10, img_size=16, device=CPU)
    assert torch.equal(torch.get_rng_state(), rng), "building the teacher must not move the student's seeds"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = fixed_batch()[0]
    assert torch.equal(teacher(x), model(x))


def test_a_timm_teacher_loads_a_safetensors_file_strictly(tmp_path: Path) -> None:
    torch.manual_seed(2)
    cnn = timm.create_model("test_resnet", num_classes=10).eval()
    save_file(cnn.state_dict(), tmp_path / "teacher.safetensors")
    teacher = load_teacher("test_resnet", str(tmp_path / "teacher.safetensors"), num_classes=10, img_size=16,
                           device=CPU)
    x = fixed_batch()[0]
    assert torch.equal(teacher(x), cnn(x)) and not teacher.training
    with pytest.raises(ValueError, match=r"does not fit --teacher-model test_resnet with 100 classes: shape mismatch"):
        load_teacher("test_resnet", str(tmp_path / "teacher.safetensors"), num_classes=100, img_size=16, device=CPU)
    with pytest.raises(ValueError, match="neither a timm model"):
        load_teacher("no_such_net", str(tmp_path / "teacher.safetensors"), num_classes=10, img_size=16, device=CPU)


def test_a_teacher_that_cannot_teach_this_student_stops_with_a_message(tmp_path: Path) -> None:
    saved_model(tmp_path / "bare.pth")
    with pytest.raises(ValueError, match="does not record its model; pass --teacher-model"):
        load_teacher(None, str(tmp_path / "bare.pth"), num_classes=10, img_size=16, device=CPU)
    with pytest.raises(ValueError, match="10 classes at 16 px, but the student has 10 classes at 32 px"):
        load_teacher(MICRO, str(tmp_path / "bare.pth"), num_classes=10, img_size=32, device=CPU)
    with pytest.raises(ValueError, match="does not fit --model vit_digits_tiny.*fit --model vit_digits_micro"):
        load_teacher("vit_digits_tiny", str(tmp_path / "bare.pth"), num_classes=10, img_size=16, device=CPU)
    with pytest.raises(ValueError, match="does not exist"):
        load_teacher(MICRO, str(tmp_path / "missing.pth"), num_classes=10, img_size=16, device=CPU)


def micro_run(distillation: DistillationConfig, name: str = MICRO, **kwargs):
    torch.manual_seed(0)
    cfg = RunConfig(model=ModelConfig(name, num_classes=10, img_size=16), loader=LoaderConfig(6), total_steps=1000,
                    schedule=ScheduleConfig(warmup_epochs=0), precision=PrecisionConfig(amp=False, opt_fused=False),
                    distillation=distillation, **kwargs)
    return build_run(cfg, process.Process(0, 1, CPU), log_fn=lambda record: None)


def test_the_dense_model_teaches_its_sparse_student_with_the_kl_mix(tmp_path: Path) -> None:
    """Item 3: a dense checkpoint of the same architecture distils a masked student; the run's loss on a fixed batch
    is (1 - α) CE + α τ² KL on the class head, and the student starts where it would without a teacher."""
    dense = saved_model(tmp_path / "checkpoint.pth", args={"model": MICRO})
    sparsity = sparselearning.SparsityConfig(density=0.5, sparse_init="ERK")
    plain = micro_run(DistillationConfig(), sparsity=sparsity)
    run = micro_run(DistillationConfig("soft", None, str(tmp_path / "checkpoint.pth"), alpha=0.4, tau=2.0),
                    sparsity=sparsity)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), run.model.state_dict().values()))
    assert all(torch.equal(plain.weight_sparsifier.masks[k], m) for k, m in run.weight_sparsifier.masks.items())
    samples, _, _, labels = fixed_batch()
    run.model.train()
    student = run.model(samples)
    expected = 0.6 * F.cross_entropy(student, labels) + 0.4 * hand_kl(student, dense(samples), 2.0)
    torch.testing.assert_close(run.criterion(samples, student, labels), expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ distilled models

DISTILLED = "vit_digits_micro_distilled"


def test_a_small_distilled_model_is_timms_class_averaging_its_heads_in_eval() -> None:
    ours = models.create_model(DISTILLED, num_classes=10)
    ref = VisionTransformerDistilled(**models.SMALL_MODELS[MICRO], num_classes=10)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = fixed_batch()[0]
    ours.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
        ours.train().set_distilled_training(True)
        cls_logits, dist_logits = ours(x)  # no dropout in the small configurations: the same heads as in eval
        torch.testing.assert_close((cls_logits + dist_logits) / 2, ref(x))
    assert models.default_img_size(DISTILLED) == 16 and ours.num_prefix_tokens == 2


def test_a_distilled_run_trains_both_heads_against_labels_and_teacher(tmp_path: Path) -> None:
    dense = saved_model(tmp_path / "checkpoint.pth", args={"model": MICRO})
    assert not micro_run(DistillationConfig(), name=DISTILLED).model.distilled_training
    run = micro_run(DistillationConfig("hard", None, str(tmp_path / "checkpoint.pth")), name=DISTILLED)
    samples, _, _, labels = fixed_batch()
    run.model.train()
    cls_logits, dist_logits = run.model(samples)
    expected = 0.5 * F.cross_entropy(cls_logits, labels) + 0.5 * F.cross_entropy(dist_logits, dense(samples).argmax(1))
    torch.testing.assert_close(run.criterion(samples, (cls_logits, dist_logits), labels), expected)
    before = run.model.head_dist.weight.detach().clone()
    seen = []
    run.criterion.teacher.register_forward_hook(lambda module, args, out: seen.append((module.training, out.dtype)))
    bf16 = dataclasses.replace(run.step_context(), amp_dtype=torch.bfloat16)
    stats, step = engine.train_one_epoch(run.forward_model, run.criterion, [(samples, labels)], bf16, CPU, 0, 0,
                                         show_progress=False)
    assert step == 1 and torch.isfinite(torch.tensor(stats["loss"]))
    assert seen == [(False, torch.bfloat16)], "the teacher runs in eval mode under the student's autocast"
    assert not torch.equal(before, run.model.head_dist.weight), "head_dist learns from the teacher"


def test_unstructured_masks_cover_head_dist_like_head_and_structured_units_are_the_blocks() -> None:
    unstructured = micro_run(DistillationConfig(), name=DISTILLED, sparsity=sparselearning.SparsityConfig(density=0.5))
    masks = unstructured.weight_sparsifier.masks
    assert masks["head_dist.weight"].float().mean() == masks["head.weight"].float().mean() == 0.5
    excluded = sparselearning.select_parameters(unstructured.model, exclude=("head*",))
    assert "head.weight" not in excluded and "head_dist.weight" not in excluded
    structure = sparselearning.SparsityConfig(pruning_type="structure", atten_density=0.5, other_density=0.5)
    distilled = micro_run(DistillationConfig(), name=DISTILLED, sparsity=structure).weight_sparsifier.masks
    plain = micro_run(DistillationConfig(), sparsity=structure).weight_sparsifier.masks
    assert distilled.keys() == plain.keys() and all(torch.equal(distilled[k], plain[k]) for k in plain)


def test_the_token_selector_always_keeps_cls_and_the_distillation_token() -> None:
    torch.manual_seed(0)
    model = models.create_model(DISTILLED, num_classes=10)
    models.apply_token_selection(model, models.TokenConfig(enabled=True, num_keep=4, mode="drop"))
    scorer = model.gumbel
    with torch.no_grad():
        scorer.weight.fill_(1.0)
        scorer.bias.zero_()
    tokens = torch.randn(8, 18, 32)
    tokens[:, :2] = -10.0  # the prefix tokens score lowest, far below every patch
    for training in (True, False):
        scorer.train(training)
        mask, idx = scorer.select(tokens)
        assert idx.shape == (8, 4) and idx[:, :2].tolist() == [[0, 1]] * 8 and mask.sum(1).tolist() == [4.0] * 8
    assert [b.tokens for b in models.block_shapes(model)] == [4, 4]
    model.train().set_distilled_training(True)
    cls_logits, dist_logits = model(fixed_batch()[0])
    assert cls_logits.shape == dist_logits.shape == (6, 10)


def test_macs_count_the_distillation_token_in_every_block_and_head_dist() -> None:
    with torch.device("meta"):
        distilled = models.create_model(DISTILLED, num_classes=10)
    count = models.count_macs(distilled, "dense")
    dim, tokens = 32, 16 + 2
    assert count.layers["head_dist"] == count.layers["head"] == dim * 10
    assert count.layers["blocks.0.attn.qkv"] == tokens * dim * 3 * dim
    assert count.layers["blocks.1.attn.matmul"] == 2 * tokens * tokens * dim
    assert count.total == models.vit_macs(dim, [models.BlockShape(2, 16, 128, tokens)] * 2, num_patches=16,
                                          patch_dim=48, num_classes=10, distilled=True).total


def test_compaction_export_and_teacher_keep_the_distillation_token(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = models.create_model(DISTILLED, num_classes=10).eval()
    masks = models.random_unit_masks(model, 0.5, 0.5, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    compact = models.compact_model(model, masks).eval()
    assert isinstance(compact, VisionTransformerDistilled) and models.architecture(compact)["block_heads"] == [1, 1]
    x = fixed_batch()[0]
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(compact(x), expected, atol=1e-5, rtol=0)
        paths = interop.export_model(model, DISTILLED, models.TokenConfig(), tmp_path / "export")
        assert torch.equal(interop.load_export(tmp_path / "export")(x), expected)
        scope: dict = {}
        exec(json.loads(paths["config"].read_text())["load_with_timm"], scope)  # timm alone rebuilds it
        assert torch.equal(scope["model"](x), expected)
        interop.save_compact(compact, DISTILLED, tmp_path / "compact.pth")
        teacher = load_teacher(None, str(tmp_path / "compact.pth"), num_classes=10, img_size=16, device=CPU)
        torch.testing.assert_close(teacher(x), expected, atol=1e-5, rtol=0)
    state = model.state_dict()
    detection = interop.detect(state, DISTILLED)  # the dist token is a prefix token: 16 patches at 16 px
    assert detection.structured and (detection.img_size, detection.block_heads) == (16, (1, 1))
    with pytest.raises(ValueError, match=f"unexpected key dist_token.*fit --model {DISTILLED}"):
        interop.check_fits(state, MICRO)


@pytest.mark.slow
def test_a_dense_run_teaches_its_sparse_version_end_to_end(tmp_path: Path) -> None:
    """Item 3 as a user runs it: one dense epoch, then a 50% sparse run distilled from its checkpoint.pth."""
    run_main(*TINY_RUN, "--epochs", "1", "--output_dir", str(tmp_path / "dense"))
    teacher = tmp_path / "dense" / "checkpoint.pth"
    proc = run_main(*TINY_RUN, "--epochs", "1", "--density", "0.5", "--teacher-path", str(teacher),
                    "--distillation-type", "soft", "--distillation-tau", "2", "--output_dir", str(tmp_path / "sparse"))
    assert (f"teacher {teacher} (the model it records): 27,946 parameters; soft distillation, alpha 0.5, tau 2.0"
            in proc.stdout)
    record = json.loads((tmp_path / "sparse" / "log.txt").read_text().splitlines()[-1])
    assert record["density"] == 0.5 and 0 < record["train_loss"] < 10
    config = json.loads((tmp_path / "sparse" / "config.json").read_text())
    assert (config["distillation_type"], config["teacher_path"], config["distillation_tau"]) == ("soft", str(teacher), 2.0)
