"""The command-line flags, in groups that both programs share: main.py takes them all, checkpoint_tool.py the
groups that matter for a checkpoint. DeiT's and SViTE's flag names and defaults, minus those the original parsed
and ignored."""
from __future__ import annotations

import argparse

import torch

import datasets
import models
import sparselearning
from training import recipes
from training.distillation import add_distillation_args


def add_flags(parser: argparse.ArgumentParser, training: bool = True) -> argparse.ArgumentParser:
    """main.py's flags, or with ``training=False`` the groups of them that checkpoint_tool.py takes.

    The flags are added in their historical order: it is the order of a checkpoint's ``args`` and of the flags a
    refused resume lists. The help groups them by what they are for.
    """
    parser.add_argument("--batch-size", default=64, type=int, help="per-process batch size")
    if training:
        parser.add_argument("--epochs", default=300, type=int,
                            help="with --resume, a larger value extends the run: the lr, death-rate and tau schedules "
                                 "and t_end then follow the new length from the resumed step on (docs/resume.md)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="vit_digits_tiny", choices=models.MODEL_NAMES)
    if training:
        _add_model_training_args(model)
        _add_optimization_args(parser)
    datasets.add_data_args(parser)
    sparselearning.add_sparse_args(parser)
    models.add_token_args(parser)
    models.add_merge_args(parser)
    if training:
        add_distillation_args(parser)
        _add_teacher_topk_args(parser)

    runtime = parser.add_argument_group("runtime")
    run = parser.add_argument_group("training run") if training else None
    checkpoint = parser.add_argument_group("checkpoint evaluation and inspection (with --resume FILE; no data "
                                           "needed unless --eval is given)")
    runtime.add_argument("--output_dir", default="",
                         help="checkpoints, log.txt and config.json go here; empty: no saving (checkpoint_tool.py: "
                              "compact.pth and token pictures; empty: next to the checkpoint)")
    runtime.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    runtime.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                         help="native mixed precision (torch.amp); default: on for CUDA, off for CPU")
    runtime.add_argument("--amp-dtype", default=None, choices=("float16", "bfloat16"),
                         help="default: bfloat16 where the device supports it, else float16 (with a GradScaler, as "
                              "the original's AMP)")
    if run is not None:
        run.add_argument("--compile", action="store_true",
                         help="torch.compile the model (after the DDP wrap) for training and evaluation; masks, EMA "
                              "and checkpoints keep the uncompiled parameter names")
    runtime.add_argument("--seed", default=0, type=int)
    runtime.add_argument("--resume", default="",
                         help="checkpoint to continue from (or to evaluate with --eval); the flags that define the "
                              "experiment must equal the checkpoint's (docs/resume.md)")
    if run is not None:
        run.add_argument("--auto-resume", action="store_true",
                         help="continue from <output_dir>/checkpoint.pth if it exists, else start fresh (for job "
                              "scripts); without it or --resume, an --output_dir holding a checkpoint is refused")
        run.add_argument("--save-every-steps", type=int, default=0, metavar="N",
                         help="also write checkpoint.pth every N optimizer steps within an epoch (0: at epoch ends "
                              "only)")
        run.add_argument("--start_epoch", default=0, type=int, help="overwritten by --resume")
    _add_checkpoint_args(checkpoint)
    runtime.add_argument("--dist_url", default="env://", help="torch.distributed init method; torchrun sets env://")
    if run is not None:
        run.add_argument("--print-freq", default=50, type=int, help="steps between progress lines")
        run.add_argument("--verbose", action="store_true",
                         help="print the per-layer density table at every topology update (default: one line per "
                              "update; the table at start and end)")
        run.add_argument("--tensorboard", action="store_true",
                         help="write TensorBoard scalars to <output_dir>/tensorboard")
    else:
        _drop_training_flags(parser)
    # The model's own resolution is the right default; DeiT's 224 would break the small models.
    parser.set_defaults(input_size=None)
    recipes.document_defaults(parser)
    return parser


def _add_model_training_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    g.add_argument("--model-ema", action="store_true", default=True, help="keep and evaluate an EMA of the weights")
    g.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    g.add_argument("--model-ema-decay", type=float, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False)
    g.add_argument("--finetune", default=None, metavar="FILE",
                   help="start from the model weights of FILE (timm DeiT .pth/.safetensors, a checkpoint, an export): "
                        "another class count re-initialises the classifier, another resolution resamples pos_embed; "
                        "a resumed run continues from its checkpoint instead (docs/training.md)")


def _add_optimization_args(parser: argparse.ArgumentParser) -> None:
    """Optimizer, learning-rate schedule and the regularisation of training."""
    g = parser.add_argument_group("optimizer (timm create_optimizer_v2)")
    g.add_argument("--opt", default="adamw", help="timm optimizer name")
    g.add_argument("--opt-eps", default=1e-8, type=float)
    g.add_argument("--opt-betas", default=None, type=float, nargs="+")
    g.add_argument("--opt-fused", action=argparse.BooleanOptionalAction, default=None,
                   help="fused optimizer kernel (torch Adam/AdamW/SGD); default: on for CUDA, off for CPU")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the global gradient norm to this value")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.05)

    g = parser.add_argument_group("learning-rate schedule (timm create_scheduler_v2, stepped per epoch)")
    g.add_argument("--sched", default="cosine", choices=("cosine", "tanh", "step", "multistep", "poly"))
    g.add_argument("--lr", type=float, default=5e-4, help="learning rate for a global batch of 512 (scaled linearly)")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, help="epoch percentages to add lr noise")
    g.add_argument("--lr-noise-pct", type=float, default=0.67)
    g.add_argument("--lr-noise-std", type=float, default=1.0)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--decay-epochs", type=float, default=30, help="step/multistep schedules: epochs per decay")
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, help="step/multistep decay factor")

    g = parser.add_argument_group("regularisation")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--repeated-aug", action="store_true", default=True, help="repeated-augmentation sampler (x3)")
    g.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha; 0 disables")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha; 0 disables")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))


def _add_teacher_topk_args(parser: argparse.ArgumentParser) -> None:
    """TinyViT's stored teacher outputs (training/save_topk.py writes them, training/teacher_topk.py reads them)."""
    g = parser.add_argument_group("stored teacher outputs (TinyViT)")
    g.add_argument("--save-teacher-topk", default="", metavar="DIR",
                   help="run the teacher (--teacher-path, --teacher-model) over --epochs epochs of the training set as "
                        "a run with the same flags sees it (augmentation, mixup/cutmix) and store its top-K outputs "
                        "in DIR; no training")
    g.add_argument("--teacher-topk", default="", metavar="DIR",
                   help="distil (--distillation-type soft or hard) from the outputs stored in DIR, with no teacher in "
                        "memory; the images replay the stored augmentation, so the flags must be those of the save")
    g.add_argument("--teacher-topk-k", default=None, type=int, metavar="K",
                   help="probabilities stored per image (default 10); with --teacher-topk: the K the outputs must "
                        "have (default: the stored K)")


def _add_checkpoint_args(g: argparse._ArgumentGroup) -> None:
    """What checkpoint_tool.py does with --resume FILE (main.py takes them too, as the original's scripts do)."""
    g.add_argument("--eval", action="store_true", help="evaluate and exit")
    g.add_argument("--compact", action="store_true",
                   help="with --eval on a structured checkpoint: write the physically pruned model as compact.pth")
    g.add_argument("--report", action="store_true",
                   help="print what the checkpoint holds: detected selector / sparsity / compact shapes, a per-layer "
                        "table of stored mask density against the zeros in the weights, and warnings")
    g.add_argument("--flops", action="store_true",
                   help="print params (dense, non-zero) and MACs per image (dense, SViTE-theoretical, executed); "
                        "without --resume, of --model with the given sparsity and token flags")
    g.add_argument("--semi-structured", dest="semi_structured", action="store_true",
                   help="with --eval: run the 2:4-masked linears on sparse tensor cores "
                        "(torch.sparse.to_sparse_semi_structured; CUDA, fp16/bf16); elsewhere evaluates dense and "
                        "says why")
    g.add_argument("--export", default="", metavar="DIR",
                   help="write model.safetensors + config.json (timm-loadable where possible) and a compressed "
                        "sparse model.sparse.safetensors into DIR")


# Flags of the shared data, sparsity and token groups that only training reads (augmentation, the topology-update
# schedule, the temperature schedule): checkpoint_tool.py hides and refuses them.
TRAINING_ONLY = ("color_jitter", "aa", "train_interpolation", "hflip", "reprob", "remode", "recount",
                 "update_frequency", "growth", "death", "redistribution", "death_rate", "decay_schedule", "t_end",
                 "atten_head", "structure_compat", "tau_schedule", "mask_init", "nm_method", "srste_decay",
                 "compact_at_budget")


class _TrainingOnly(argparse.Action):
    """Stands in for a training flag in a parser that does not take it: hidden from --help, an error when given,
    its default kept for the component configs that read every field."""

    def __init__(self, option_strings: list[str], dest: str, default: object = None, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs="*", default=default, help=argparse.SUPPRESS)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is a training flag; checkpoint_tool.py does not take it (main.py does)")


def _drop_training_flags(parser: argparse.ArgumentParser) -> None:
    """Replace the ``TRAINING_ONLY`` flags by refusing stand-ins (the parser needs ``conflict_handler="resolve"``)."""
    for action in [a for a in parser._actions if a.dest in TRAINING_ONLY]:  # argparse lists its actions nowhere else
        parser.add_argument(*action.option_strings, dest=action.dest, default=action.default, action=_TrainingOnly)
