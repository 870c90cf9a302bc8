"""Masking: tensor selection, initial masks, topology updates, optimizer statistics, state, reporting.

Resume, plain state, masked zeros, optimizer hygiene and DDP agreement: test_sparsifier_contract.py."""
import logging
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sparselearning import Masking, format_table, layer_counts, layer_densities, plot_densities

torch.set_num_threads(1)

TINY_VIT_MASKED = [
    "patch_embed.proj.weight",
    *[f"blocks.{i}.{part}.weight" for i in range(2) for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")],
    "head.weight",
]


def silent(record: dict) -> None:
    """A log_fn that drops records."""


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, masking: Masking, steps: range) -> list[int]:
    """Plain loop; returns the steps at which the topology changed."""
    changed = []
    for step in steps:
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if masking.step(step):
            changed.append(step)
    return changed


def masked_vit(init_seed: int = 0, **kwargs) -> tuple[nn.Module, torch.optim.Optimizer, Masking]:
    """Tiny ViT + AdamW + Masking; ``init_seed`` seeds the weights, a ``seed`` kwarg goes to Masking."""
    model = tiny_vit(init_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    options = {"density": 0.5, "total_steps": 30, "update_frequency": 3, "log_fn": silent, **kwargs}
    return model, optimizer, Masking(model, optimizer, **options)


class OneWeight(nn.Module):
    def __init__(self, rows: int = 2, cols: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, cols))


def hand_made(mask: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, **kwargs) -> tuple[OneWeight, Masking]:
    """A one-tensor model with the given mask, weight and gradient, ready for an update at step 10."""
    model = OneWeight(*weight.shape)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    options = {"sparse_init": "uniform", "update_frequency": 10, "death_rate": 0.5, "decay_schedule": "constant",
               "t_end": 1.0, "log_fn": silent, **kwargs}
    masking = Masking(model, optimizer, density=0.5, total_steps=100, **options)
    state = masking.state_dict()
    state["masks"]["weight"], state["fired"]["weight"] = mask.clone(), mask.clone()
    masking.load_state_dict(state)
    with torch.no_grad():
        model.weight.copy_(weight)
    model.weight.grad = grad.clone()
    return model, masking


# ---------------------------------------------------------------------------------------------- which tensors


def test_default_set_is_sviites_on_a_timm_vit():
    model = tiny_vit()
    model.gumbel = nn.Linear(32, 1)  # a token selector: never masked
    optimizer = torch.optim.AdamW(model.parameters())
    masking = Masking(model, optimizer, density=0.5, total_steps=1000, log_fn=silent)
    assert list(masking.masks) == TINY_VIT_MASKED
    assert all(m.dtype == torch.bool for m in masking.masks.values())


def test_wrapped_model_keys_have_no_module_prefix():
    model = tiny_vit()
    wrapped = nn.DataParallel(model)
    masking = Masking(wrapped, torch.optim.AdamW(wrapped.parameters()), density=0.5, total_steps=1000, log_fn=silent)
    assert list(masking.masks) == TINY_VIT_MASKED
    assert list(masking.state_dict()["masks"]) == TINY_VIT_MASKED


def test_include_and_exclude_patterns():
    model = tiny_vit()
    optimizer = torch.optim.AdamW(model.parameters())
    masking = Masking(model, optimizer, density=0.5, total_steps=1000, log_fn=silent,
                      sparse_exclude=["head.weight", "patch_embed.*"])
    assert list(masking.masks) == TINY_VIT_MASKED[1:-1]
    masking = Masking(model, optimizer, density=0.5, total_steps=1000, log_fn=silent,
                      sparse_include=["blocks.0.*"], sparse_exclude=["*.fc2.weight"])
    assert list(masking.masks) == ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight"]


@pytest.mark.parametrize("flag", ["sparse_include", "sparse_exclude"])
def test_pattern_matching_nothing_is_an_error_naming_it(flag):
    model = tiny_vit()
    with pytest.raises(ValueError, match=rf"{flag} pattern 'block.*.qkv.weight' matches no maskable parameter"):
        Masking(model, torch.optim.AdamW(model.parameters()), density=0.5, total_steps=1000, log_fn=silent,
                **{flag: ["block.*.qkv.weight"]})


def test_pattern_on_a_non_maskable_tensor_is_an_error():
    model = tiny_vit()
    with pytest.raises(ValueError, match="'pos_embed' matches no maskable parameter"):
        Masking(model, torch.optim.AdamW(model.parameters()), density=0.5, total_steps=1000, log_fn=silent,
                sparse_include=["pos_embed"])


def test_nothing_left_to_mask_is_an_error():
    model = tiny_vit()
    with pytest.raises(ValueError, match="no parameter left to mask"):
        Masking(model, torch.optim.AdamW(model.parameters()), density=0.5, total_steps=1000, log_fn=silent,
                sparse_exclude=["*"])
    norm_only = nn.Sequential(nn.LayerNorm(8), nn.LayerNorm(8))
    with pytest.raises(ValueError, match="no parameter left to mask"):
        Masking(norm_only, torch.optim.AdamW(norm_only.parameters()), density=0.5, total_steps=1000, log_fn=silent)


def test_masked_parameter_outside_the_optimizer_is_an_error():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.blocks.parameters())
    with pytest.raises(ValueError, match=r"\['patch_embed.proj.weight', 'head.weight'\] are not in the optimizer"):
        Masking(model, optimizer, density=0.5, total_steps=1000, log_fn=silent)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "fail before touching weights"


# ---------------------------------------------------------------------------------------------- construction


@pytest.mark.parametrize("sparse_init", ["ERK", "fixed_ERK", "uniform", "ER"])
def test_initial_masks_have_exact_counts_and_zero_the_weights(sparse_init):
    model, _, masking = masked_vit(sparse_init=sparse_init)
    shapes = {name: tuple(m.shape) for name, m in masking.masks.items()}
    expected = layer_counts(layer_densities(shapes, 0.5, sparse_init), shapes)
    params = dict(model.named_parameters())
    for name, mask in masking.masks.items():
        assert int(mask.sum()) == expected[name]
        assert not params[name][~mask].any(), f"{name}: masked weights must be zero"
        assert params[name][mask].ne(0).all(), f"{name}: active weights keep their init"
    assert masking.report()["density"] == pytest.approx(0.5, abs=1e-3)


def test_initial_masks_depend_on_seed_not_on_global_rng():
    _, _, a = masked_vit(init_seed=0)
    torch.manual_seed(999)
    _, _, b = masked_vit(init_seed=5)  # other weight init and global RNG state, same mask seed
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    model = tiny_vit()
    other = Masking(model, torch.optim.AdamW(model.parameters()), density=0.5, total_steps=1000, seed=1, log_fn=silent)
    assert any(not torch.equal(a.masks[n], other.masks[n]) for n in a.masks)


def test_unknown_init_raises_and_leaves_the_model_untouched():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="unknown sparse_init 'erk'"):
        Masking(model, optimizer, density=0.5, total_steps=100, sparse_init="erk", log_fn=silent)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(optimizer._optimizer_step_post_hooks) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"density": None}, "Masking needs a density"),
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        ({"total_steps": 0}, "total_steps must be a positive int"),
        ({"growth": "momentum_neuron"}, "unknown growth mode"),
        ({"death": "threshold"}, "unknown death mode"),
        ({"redistribution": "nonzeros"}, "unknown redistribution mode"),
        ({"update_frequency": 0}, "update_frequency must be a positive int"),
        ({"death_rate": 2.0}, "death-rate"),
        ({"t_end": 0.0}, "t_end"),
        ({"sparse_exclude": "head.weight"}, "sparse_exclude must be a sequence of non-empty pattern strings"),
    ],
)
def test_masking_rejects_bad_arguments(kwargs, match):
    model = tiny_vit()
    options = {"density": 0.5, "total_steps": 100, "log_fn": silent, **kwargs}
    with pytest.raises(ValueError, match=match):
        Masking(model, torch.optim.AdamW(model.parameters()), **options)


def test_warns_when_no_update_can_happen():
    model = tiny_vit()
    with pytest.warns(UserWarning, match="never be updated"):
        Masking(model, torch.optim.AdamW(model.parameters()), density=0.5, total_steps=100, update_frequency=80,
                log_fn=silent)


# ---------------------------------------------------------------------------------------------- one update


def test_magnitude_death_and_gradient_growth_known_answer():
    mask = torch.tensor([[True, True, True, True], [False, False, False, False]])
    weight = torch.tensor([[0.1, -0.5, 2.0, 0.3], [0.0, 9.0, 0.0, 0.0]])  # 9.0: stale value at an inactive slot
    grad = torch.tensor([[5.0, 0.0, 0.0, 0.2], [1.0, 3.0, 0.0, 0.0]])
    model, masking = hand_made(mask, weight, grad)
    assert masking.step(10) is True
    # ceil(0.5 * 4) = 2 die: 0.1 and 0.3 (smallest |w|); 2 grow: largest |grad| among inactive incl. just dropped
    assert masking.masks["weight"].tolist() == [[True, True, True, False], [False, True, False, False]]
    expected = torch.tensor([[0.1, -0.5, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(model.weight.detach(), expected)  # 0.1 dropped and regrown keeps its value; new weight is 0
    assert masking.fired_masks["weight"].tolist() == [[True, True, True, True], [False, True, False, False]]


def test_tied_scores_break_by_a_seeded_order_with_exact_counts():
    """All active magnitudes tie and all growth scores tie: counts stay exact and the choice is a function of the
    seed (ties are tested in depth in test_ties.py)."""
    mask = torch.tensor([[True, False, True, False], [True, False, True, False]])
    weight = torch.tensor([[1.0, 0.0, -1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    chosen = set()
    for seed in range(6):
        model, masking = hand_made(mask, weight, torch.ones(2, 4), seed=seed)
        masking.step(10)
        assert int(masking.masks["weight"].sum()) == 4
        chosen.add(tuple(masking.masks["weight"].flatten().tolist()))
    assert len(chosen) > 1


def test_set_death_in_an_update():
    mask = torch.ones(2, 4, dtype=torch.bool)
    weight = torch.tensor([[-3.0, -0.1, -0.2, 0.5], [0.05, 2.0, 0.4, -1.0]])
    model, masking = hand_made(mask, weight, torch.zeros(2, 4), death="SET")
    masking.step(10)
    # 4 die (-0.1, -0.2, 0.05, 0.4) and the same 4 slots regrow (the only free ones) keeping their values
    assert masking.masks["weight"].all()
    assert torch.equal(model.weight.detach(), weight)


def test_grown_equals_died_per_layer_during_training():
    model, optimizer, masking = masked_vit(sparse_init="ERK")
    counts = {n: int(m.sum()) for n, m in masking.masks.items()}
    before = {n: m.clone() for n, m in masking.masks.items()}
    assert train(model, optimizer, masking, range(1, 13)) == [3, 6, 9, 12]
    assert {n: int(m.sum()) for n, m in masking.masks.items()} == counts
    unchanged = [n for n in before if torch.equal(before[n], masking.masks[n])]
    assert all(masking.masks[n].all() for n in unchanged), "every non-dense layer must have changed topology"
    assert len(unchanged) <= 1
    assert masking.report()["explored_rate"] > masking.report()["density"]
    assert all(torch.equal(f | m, f) for f, m in zip(masking.fired_masks.values(), masking.masks.values()))


def test_step_updates_only_on_schedule_and_once_per_step():
    model, optimizer, masking = masked_vit(total_steps=10, update_frequency=2, t_end=0.5)
    records = []
    masking.log_fn = records.append
    updates = train(model, optimizer, masking, range(1, 11))
    assert updates == [2, 4]  # 6 is not < 0.5 * 10
    assert [r["step"] for r in records] == [2, 4]
    assert masking.step(4) is False, "a repeated call for the same step must not update twice"


def test_dense_erk_layer_never_changes():
    model, optimizer, masking = masked_vit(density=0.95, sparse_init="ERK")
    dense = [n for n, m in masking.masks.items() if m.all()]
    assert dense, "at density 0.95 ERK must make some layer dense"
    train(model, optimizer, masking, range(1, 7))
    assert all(masking.masks[n].all() for n in dense)


def test_random_growth_exact_counts_and_independent_of_global_rng():
    runs = []
    for global_seed in (1, 2):
        model, optimizer, masking = masked_vit(growth="random")
        counts = {n: int(m.sum()) for n, m in masking.masks.items()}
        torch.manual_seed(global_seed)
        train(model, optimizer, masking, range(1, 7))
        assert {n: int(m.sum()) for n, m in masking.masks.items()} == counts
        runs.append(masking)
    assert all(torch.equal(runs[0].masks[n], runs[1].masks[n]) for n in runs[0].masks)
    model, optimizer, other_seed = masked_vit(growth="random", seed=7)
    train(model, optimizer, other_seed, range(1, 7))
    assert any(not torch.equal(runs[0].masks[n], other_seed.masks[n]) for n in runs[0].masks)


@pytest.mark.parametrize("optimizer_kind", ["adamw", "sgd"])
def test_momentum_growth_picks_largest_first_moment(optimizer_kind):
    model = OneWeight(2, 4)
    if optimizer_kind == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    masking = Masking(model, optimizer, density=0.5, total_steps=100, sparse_init="uniform", growth="momentum",
                      update_frequency=10, decay_schedule="constant", death_rate=0.5, t_end=1.0, log_fn=silent)
    state = masking.state_dict()
    mask = torch.tensor([[True, True, False, False], [True, True, False, False]])
    state["masks"]["weight"], state["fired"]["weight"] = mask, mask.clone()
    masking.load_state_dict(state)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, 1.0, 0.0, 0.0], [2.0, 0.2, 0.0, 0.0]]))
    model.weight.grad = torch.ones(2, 4)  # must be ignored by momentum growth
    optimizer.step()  # creates the optimizer state (lr 0: weights unchanged)
    key = "exp_avg" if optimizer_kind == "adamw" else "momentum_buffer"
    optimizer.state[model.weight][key].copy_(torch.tensor([[0.0, 0.0, -4.0, 0.5], [0.0, 0.0, 0.1, 3.0]]))
    masking.step(10)
    # 2 die (0.1, 0.2); 2 grow: largest |first moment| among inactive slots, -4.0 (flat 2) and 3.0 (flat 7)
    assert masking.masks["weight"].tolist() == [[False, True, True, False], [True, False, False, True]]


def test_momentum_growth_without_momentum_is_a_clear_error():
    model, masking = hand_made(torch.tensor([[True, False]]), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2),
                               growth="momentum")
    with pytest.raises(RuntimeError, match="momentum growth needs an 'exp_avg' .* or 'momentum_buffer'"):
        masking.step(10)


def test_gradient_growth_without_gradient_is_a_clear_error():
    model, masking = hand_made(torch.tensor([[True, False]]), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2))
    model.weight.grad = None
    with pytest.raises(RuntimeError, match=r"gradient growth needs weight.grad"):
        masking.step(10)


@pytest.mark.parametrize("redistribution", ["magnitude", "nonzero"])
def test_redistribution_moves_growth_between_layers_keeping_the_total(redistribution):
    model, optimizer, masking = masked_vit(sparse_init="uniform", redistribution=redistribution)
    records = []
    masking.log_fn = records.append
    counts = {n: int(m.sum()) for n, m in masking.masks.items()}
    train(model, optimizer, masking, range(1, 4))
    after = {n: int(m.sum()) for n, m in masking.masks.items()}
    assert sum(after.values()) == sum(counts.values()), "total regrown must equal total dropped"
    assert after != counts, "redistribution must move density between layers"
    assert all(0 < after[n] <= m.numel() for n, m in masking.masks.items())
    assert records[-1]["layers"]["head.weight"]["nonzero"] == after["head.weight"]


def test_non_finite_gradient_skips_the_update(caplog):
    model, optimizer, masking = masked_vit()
    train(model, optimizer, masking, range(1, 3))
    before = {n: m.clone() for n, m in masking.masks.items()}
    x, y = batch(3)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    model.blocks[1].mlp.fc1.weight.grad[0, 0] = float("inf")
    with caplog.at_level(logging.WARNING, logger="sparselearning"):
        assert masking.step(3) is False
    assert masking.skipped_updates == [3]
    assert all(torch.equal(before[n], masking.masks[n]) for n in before)
    assert "non-finite" in caplog.text and "blocks.1.mlp.fc1.weight" in caplog.text and "step 3" in caplog.text
    assert train(model, optimizer, masking, range(4, 7)) == [6], "later updates still happen"


def test_non_finite_momentum_skips_momentum_growth():
    model, optimizer, masking = masked_vit(growth="momentum")
    train(model, optimizer, masking, range(1, 3))
    x, y = batch(3)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.state[model.head.weight]["exp_avg"][0, 0] = float("nan")
    assert masking.step(3) is False and masking.skipped_updates == [3]


def _train_with_grad_scaler(masking_kwargs: dict, poison_step: int = 0) -> tuple[nn.Module, Masking, list[int]]:
    model, optimizer, masking = masked_vit(**masking_kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    changed = []
    for step in range(1, 4):
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y) * (float("inf") if step == poison_step else 1.0)
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)  # unscales .grad in place, skips the step on inf/NaN
        scaler.update()
        if masking.step(step):
            changed.append(step)
    return model, masking, changed


def test_grad_scaler_gradients_are_read_unscaled():
    plain_model, plain_optimizer, plain = masked_vit()
    assert train(plain_model, plain_optimizer, plain, range(1, 4)) == [3]
    model, masking, changed = _train_with_grad_scaler({})
    assert changed == [3]
    assert all(torch.equal(plain.masks[n], masking.masks[n]) for n in plain.masks)
    assert all(torch.equal(p, q) for p, q in zip(plain_model.parameters(), model.parameters()))


def test_grad_scaler_overflow_at_an_update_step_skips_the_update():
    model, masking, changed = _train_with_grad_scaler({}, poison_step=3)
    reference_model, reference_optimizer, reference = masked_vit()
    train(reference_model, reference_optimizer, reference, range(1, 3))
    assert changed == [] and masking.skipped_updates == [3]
    assert all(torch.equal(reference.masks[n], masking.masks[n]) for n in reference.masks)
    assert all(torch.equal(p, q) for p, q in zip(reference_model.parameters(), model.parameters()))


# ---------------------------------------------------------------------------------------------- optimizer statistics


@pytest.mark.parametrize("optimizer_kind,key", [("adamw", "exp_avg_sq"), ("sgd", "momentum_buffer")])
def test_optimizer_statistics_stay_dense_at_masked_positions(optimizer_kind, key):
    """Masked weights get dense gradients, so their moments are valid and an update resets nothing (the contract in
    test_sparsifier_contract.py checks the update leaves the optimizer state alone). SViTE zeroed SGD momentum at
    masked positions every step; momentum growth then saw only the weights dropped in this update and filled the
    rest by index. The buffers now track the dense gradient everywhere."""
    model = tiny_vit()
    if optimizer_kind == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    masking = Masking(model, optimizer, density=0.5, total_steps=30, update_frequency=10, log_fn=silent)
    train(model, optimizer, masking, range(1, 3))
    checked = 0
    for name, param in model.named_parameters():
        if name in masking.masks and not masking.masks[name].all():
            assert torch.count_nonzero(optimizer.state[param][key][~masking.masks[name]]) > 0, name
            checked += 1
    assert checked > 0


# ---------------------------------------------------------------------------------------------- state


def test_state_dict_records_masks_step_and_config():
    """What Masking's state holds (that it is plain and resumes bit-exactly: test_sparsifier_contract.py)."""
    model, optimizer, masking = masked_vit()
    train(model, optimizer, masking, range(1, 5))
    state = masking.state_dict()
    assert list(state["masks"]) == TINY_VIT_MASKED and list(state["fired"]) == TINY_VIT_MASKED
    assert all(m.dtype == torch.bool for m in [*state["masks"].values(), *state["fired"].values()])
    assert state["step"] == 4 and state["last_update_step"] == 3 and state["seed"] == 0
    assert state["death_rate"] == pytest.approx(masking.death_rate(4))
    assert state["config"]["density"] == 0.5 and state["config"]["growth"] == "gradient"


def test_load_state_dict_rejects_mismatches():
    _, _, masking = masked_vit()
    with pytest.raises(ValueError, match="not a Masking state dict"):
        masking.load_state_dict({"masks": {}})
    state = masking.state_dict()
    del state["masks"]["head.weight"]
    with pytest.raises(ValueError, match=r"missing \['head.weight'\]"):
        masking.load_state_dict(state)
    state = masking.state_dict()
    state["masks"]["head.weight"] = state["masks"]["head.weight"].float()
    with pytest.raises(ValueError, match="expected bool"):
        masking.load_state_dict(state)


# ---------------------------------------------------------------------------------------------- reporting


def test_records_report_table_and_plot(tmp_path):
    records = []
    model, optimizer, masking = masked_vit(log_fn=records.append)
    train(model, optimizer, masking, range(1, 4))
    assert [r["event"] for r in records] == ["init", "update"]
    record = records[-1]
    assert list(record["layers"]) == TINY_VIT_MASKED
    total = sum(p.numel() for p in model.parameters())
    masked = sum(m.numel() for m in masking.masks.values())
    active = sum(int(m.sum()) for m in masking.masks.values())
    assert record["density"] == pytest.approx(active / masked)
    assert record["nonzero_parameters"] == total - masked + active
    assert record["density_all"] == pytest.approx((total - masked + active) / total)
    assert record["explored_rate"] == pytest.approx(sum(int(f.sum()) for f in masking.fired_masks.values()) / masked)
    assert record["explored_rate"] > records[0]["explored_rate"] == pytest.approx(records[0]["density"])
    assert record["death_rate"] == pytest.approx(masking.death_rate(3))
    qkv = record["layers"]["blocks.0.attn.qkv.weight"]
    assert qkv["numel"] == 96 * 32 and qkv["density"] == qkv["nonzero"] / qkv["numel"]

    report = masking.report()
    assert set(report) == {"density", "density_all", "explored_rate", "nonzero_parameters", "death_rate"}
    assert report["nonzero_parameters"] == record["nonzero_parameters"]
    assert isinstance(report["nonzero_parameters"], int)

    table = format_table(record)
    assert all(name in table for name in TINY_VIT_MASKED) and "explored" in table and "96x32" in table

    path = plot_densities(record, tmp_path / "density.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_log_fn_prints_the_table(capsys):
    model = tiny_vit()
    Masking(model, torch.optim.AdamW(model.parameters()), density=0.5, total_steps=1000)
    out = capsys.readouterr().out
    assert "sparsity init at step 0" in out and "blocks.1.mlp.fc2.weight" in out


# ---------------------------------------------------------------------------------------------- library use


def test_docstring_example_runs_literally(capsys):
    doc = Masking.__doc__
    code = textwrap.dedent(doc.split("Example (a plain PyTorch loop; the three added lines are marked ``# +``)::\n")[1]
                           .split("\n    Args:")[0])
    added = [line for line in code.splitlines() if "# +" in line]
    assert len(added) == 3, "the example must add at most three lines to a plain loop"
    namespace: dict = {}
    exec(compile(code, "Masking.__doc__", "exec"), namespace)
    model, masking = namespace["model"], namespace["masking"]
    assert masking._last_update_step == 100, "one topology update at step 100 (< 0.8 * 200)"
    params = dict(model.named_parameters())
    for name, mask in masking.masks.items():
        assert torch.count_nonzero(params[name][~mask]) == 0
    shapes = {name: tuple(m.shape) for name, m in masking.masks.items()}
    expected = layer_counts(layer_densities(shapes, 0.5, "ERK"), shapes)
    assert {n: int(m.sum()) for n, m in masking.masks.items()} == expected
    assert "sparsity update at step 100" in capsys.readouterr().out
    assert math.isclose(masking.report()["density"], 0.5, abs_tol=1e-3)
