"""CLI flags, SparsityConfig validation, and the dense no-op path of build_sparsifier."""
import argparse

import pytest
import torch
from torch import nn

from sparselearning import DenseSparsifier, Masking, Sparsifier, SparsityConfig, add_sparse_args, build_sparsifier

torch.set_num_threads(1)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_sparse_args(parser)
    return parser.parse_args(list(argv))


def test_defaults_are_sviite_except_density():
    cfg = SparsityConfig.from_args(parse())
    assert cfg == SparsityConfig()
    assert cfg.density is None and not cfg.enabled
    assert (cfg.sparse_init, cfg.update_frequency, cfg.growth, cfg.death, cfg.redistribution) == (
        "uniform", 100, "gradient", "magnitude", "none")
    assert (cfg.death_rate, cfg.decay_schedule, cfg.t_end, cfg.erk_power) == (0.5, "cosine", 0.8, 1.0)
    assert cfg.sparse_exclude == () and cfg.sparse_include == ()


def test_every_flag_round_trips():
    args = parse(
        "--density", "0.4", "--sparse_init", "fixed_ERK", "--update_frequency", "7000", "--growth", "momentum",
        "--death", "SET", "--redistribution", "magnitude", "--death-rate", "0.3", "--decay-schedule", "linear",
        "--t_end", "0.5", "--sparse-exclude", "head.weight", "patch_embed.*", "--sparse-include", "blocks.*",
        "--erk-power", "0.5",
    )
    cfg = SparsityConfig.from_args(args)
    assert cfg == SparsityConfig(
        density=0.4, sparse_init="fixed_ERK", update_frequency=7000, growth="momentum", death="SET",
        redistribution="magnitude", death_rate=0.3, decay_schedule="linear", t_end=0.5,
        sparse_exclude=("head.weight", "patch_embed.*"), sparse_include=("blocks.*",), erk_power=0.5,
    )
    assert cfg.enabled
    assert cfg.to_dict()["sparse_exclude"] == ["head.weight", "patch_embed.*"]


def test_parser_rejects_unknown_modes():
    with pytest.raises(SystemExit):
        parse("--sparse_init", "erk")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        ({"density": 1.01}, r"density must be in \(0, 1\]"),
        ({"density": -0.5}, r"density must be in \(0, 1\]"),
        ({"density": float("nan")}, r"density must be in \(0, 1\]"),
        ({"sparse_init": "erk"}, "unknown sparse_init 'erk'; choose from uniform, ERK, fixed_ERK, ER"),
        ({"sparse_init": "custom"}, "unknown sparse_init 'custom'"),
        ({"death": "threshold"}, "unknown death mode 'threshold'; choose from magnitude, SET"),
        ({"growth": "momentum_neuron"}, "unknown growth mode 'momentum_neuron'; choose from gradient, random, mom"),
        ({"redistribution": "nonzeros"}, "unknown redistribution mode 'nonzeros'; choose from none, magnitude, non"),
        ({"decay_schedule": "step"}, "unknown decay schedule 'step'; choose from cosine, constant, linear"),
        ({"update_frequency": 0}, "update_frequency must be a positive int"),
        ({"update_frequency": -100}, "update_frequency must be a positive int"),
        ({"update_frequency": 1.5}, "update_frequency must be a positive int"),
        ({"t_end": 0.0}, r"t_end must be in \(0, 1\]"),
        ({"t_end": 1.2}, r"t_end must be in \(0, 1\]"),
        ({"death_rate": -0.1}, r"death-rate must be in \[0, 1\]"),
        ({"death_rate": 1.5}, r"death-rate must be in \[0, 1\]"),
        ({"erk_power": -1.0}, "erk-power must be a finite number >= 0"),
        ({"sparse_exclude": "head.weight"}, "sparse_exclude must be a sequence of non-empty pattern strings"),
        ({"sparse_include": ("",)}, "sparse_include must be a sequence of non-empty pattern strings"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_from_args_validates():
    with pytest.raises(ValueError, match="t_end"):
        SparsityConfig.from_args(parse("--density", "0.5", "--t_end", "0"))
    with pytest.raises(ValueError, match="density"):
        SparsityConfig.from_args(parse("--density", "2"))


def small_model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


@pytest.mark.parametrize("cfg", [None, SparsityConfig(), SparsityConfig(density=1.0, sparse_init="ERK")])
def test_dense_runs_get_the_no_op_sparsifier(cfg):
    model, optimizer = small_model_and_optimizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsifier = build_sparsifier(cfg, model, optimizer, total_steps=100)
    assert type(sparsifier) is DenseSparsifier
    assert len(optimizer._optimizer_step_post_hooks) == 0, "dense training must not pay for a hook"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sparsifier.step(100) is False and sparsifier.state_dict() == {} and sparsifier.report() == {}


def test_sparse_config_builds_masking_with_its_settings():
    model, optimizer = small_model_and_optimizer()
    cfg = SparsityConfig(density=0.5, sparse_init="ERK", update_frequency=5, growth="random", t_end=0.5)
    sparsifier = build_sparsifier(cfg, model, optimizer, total_steps=100, seed=3, log_fn=lambda record: None)
    assert isinstance(sparsifier, Masking) and isinstance(sparsifier, Sparsifier)
    assert sparsifier.config == cfg and sparsifier.seed == 3
    assert len(optimizer._optimizer_step_post_hooks) == 1
    assert sparsifier.report()["density"] == pytest.approx(0.5, abs=0.01)
