"""StructuredDST (S²ViTE): unit layout, flags, scores, exact counts, silent and learning units, state, logs.

Resume, plain state, masked zeros, optimizer hygiene and DDP agreement: test_sparsifier_contract.py."""
import logging

import pytest
import torch
import torch.nn.functional as F

import main
import models
from models.compact import compact_model
from models.head_stats import HeadStats, structure_units
from sparselearning import (
    DenseSparsifier,
    Masking,
    SparsityConfig,
    StructuredDST,
    build_sparsifier,
    format_table,
    swap_units,
)
from sparselearning.structured import UnitSlice, expand_units, unit_l1, unit_positions

torch.set_num_threads(1)

# The flag lines of the original structured scripts (reference section 8.3), minus the data path and launcher.
ORIGINAL_SCRIPTS = {
    "0428/deit_tiny_structure": "--model deit_tiny_patch16_224 --batch-size 64 --epochs 600 --pruning_type "
                                "structure_new --atten_head 3 --atten_density 0.7 --other_density 0.7 --density 0.7",
    "0502/vm2": "--model deit_small_patch16_224 --batch-size 64 --epochs 600 --pruning_type structure_new "
                "--atten_head 6 --atten_density 0.7 --other_density 0.6 --density 0.6",
    "0508/line74": "--model deit_small_patch16_224 --batch-size 64 --epochs 600 --pruning_type structure_new "
                   "--atten_head 6 --atten_density 0.4 --other_density 0.3 --density 0.3",
    "0430/deit_base_structure": "--model deit_base_patch16_224 --batch-size 128 --epochs 600 --pruning_type "
                                "structure_new --atten_head 12 --atten_density 0.7 --other_density 0.6 --density 0.6",
}
COMMON = ("--sparse_init fixed_ERK --update_frequency 15000 --growth gradient --death magnitude --redistribution none "
          "--t_end 0.8")


def silent(record: dict) -> None:
    """A log_fn that drops records."""


def batch(step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def structured(init_seed: int = 0, lr: float = 1e-2, **kwargs) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                         StructuredDST]:
    """vit_digits_tiny (4 heads, 256 neurons per block) + AdamW + StructuredDST keeping 2 heads and 128 neurons."""
    torch.manual_seed(init_seed)
    model = models.create_model("vit_digits_tiny", num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    options = {"atten_density": 0.5, "other_density": 0.5, "update_frequency": 3, "log_fn": silent, **kwargs}
    total = options.pop("total_steps", 30)
    return model, optimizer, StructuredDST(model, optimizer, structure_units(model), total, **options)


def train(model, optimizer, sparsifier, steps) -> list[int]:
    """Plain loop; returns the steps at which units moved."""
    changed = []
    for step in steps:
        x, y = batch(step)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if sparsifier.step(step):
            changed.append(step)
    return changed


# ---------------------------------------------------------------------------------------------- layout and flags


def test_units_of_a_timm_vit_are_qkv_row_blocks_and_fc1_rows_with_fc2_columns():
    model = models.create_model("vit_digits_tiny", num_classes=10)
    groups = structure_units(model).groups
    assert [g["name"] for g in groups] == [f"blocks.{i}.{kind}" for i in range(4) for kind in ("attn", "mlp")]
    head, neuron = groups[0], groups[1]
    assert (head["kind"], head["num_units"], neuron["kind"], neuron["num_units"]) == ("head", 4, "neuron", 256)
    assert [(s["param"], s["dim"], s["sections"], s["width"], s["role"]) for s in head["slices"]] == [
        ("blocks.0.attn.qkv.weight", 0, 3, 16, "in"), ("blocks.0.attn.qkv.bias", 0, 3, 16, "bias"),
        ("blocks.0.attn.proj.weight", 1, 1, 16, "out")]
    assert [(s["param"], s["dim"], s["role"]) for s in neuron["slices"]] == [
        ("blocks.0.mlp.fc1.weight", 0, "in"), ("blocks.0.mlp.fc1.bias", 0, "bias"),
        ("blocks.0.mlp.fc2.weight", 1, "out")]
    assert all(len(blk.attn.proj._forward_pre_hooks) == 0 for blk in model.blocks), "describing installs no hook"


def test_unit_geometry_known_answers():
    qkv = UnitSlice("qkv.weight", dim=0, sections=3, width=2, role="in")  # 2 heads of 2 rows: q0 q0 q1 q1 k0 k0 ...
    assert unit_positions(qkv, 2, torch.tensor([1])).tolist() == [2, 3, 6, 7, 10, 11]
    mask = expand_units(torch.tensor([False, True]), qkv, (12, 5))
    assert mask.shape == (12, 5) and mask.all(dim=1).nonzero().flatten().tolist() == [2, 3, 6, 7, 10, 11]
    assert mask.sum() == 30
    column = UnitSlice("fc2.weight", dim=1, sections=1, width=1, role="out")
    assert expand_units(torch.tensor([True, False, True]), column, (2, 3)).tolist() == [[True, False, True]] * 2
    weight = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]])
    assert unit_l1(weight, column, 3).tolist() == [5.0, 7.0, 3.5]
    assert unit_l1(weight, UnitSlice("fc1.weight", 0, 1, 1, "in"), 2).tolist() == [6.0, 9.5]


def test_swap_units_exact_counts_and_the_zero_threshold_edge_case():
    active = torch.tensor([True, True, True, False, False, False])
    death = torch.tensor([3.0, 1.0, 2.0, 0.0, 0.0, 0.0])
    growth = torch.tensor([0.0, 9.0, 0.0, 0.5, 4.0, 0.0])
    # unit 1 dies, then grows back (just-dropped units are candidates, as in SViTE), unit 4 is the next best
    assert swap_units(active, death, growth, 2).nonzero().flatten().tolist() == [0, 1, 4]
    # SViTE grew every unit at or above the n-th best growth score; with all-zero scores that was every unit
    # (a dense layer). Exact counts keep 3 units, ties going to the lower index (units 1 and 2 died and grow back).
    zero = torch.zeros(6)
    assert swap_units(active, death, zero, 2).nonzero().flatten().tolist() == [0, 1, 2]


@pytest.mark.parametrize("script", list(ORIGINAL_SCRIPTS))
def test_original_structured_flag_lines_parse(script):
    args = main.get_args_parser().parse_args(f"{ORIGINAL_SCRIPTS[script]} {COMMON}".split())
    cfg = SparsityConfig.from_args(args)
    assert cfg.structured and cfg.pruning_type == "structure" and cfg.enabled
    assert (cfg.atten_head, cfg.update_frequency, cfg.t_end) == (args.atten_head, 15000, 0.8)
    assert cfg.density == args.density and cfg.sparse_init == "fixed_ERK"


@pytest.mark.parametrize("script,heads,neurons", [("0428/deit_tiny_structure", (2, 3), (537, 768)),
                                                  ("0502/vm2", (4, 6), (921, 1536))])
def test_original_scripts_build_on_the_real_deit(script, heads, neurons, caplog):
    # --unit-multiple 1: the original's exact counts, as cmd/s2vite_*.sh pass it (the default rounds them)
    args = main.get_args_parser().parse_args(f"{ORIGINAL_SCRIPTS[script]} {COMMON} --unit-multiple 1".split())
    model = models.create_model(args.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    with caplog.at_level(logging.WARNING, logger="sparselearning.structured"):
        sparsifier = build_sparsifier(SparsityConfig.from_args(args), model, optimizer, 1_500_000, seed=0,
                                      log_fn=silent, units=structure_units(model))
    assert isinstance(sparsifier, StructuredDST)
    assert f"--density {args.density}" in caplog.text and "ignored" in caplog.text
    record = sparsifier.record()
    assert record["heads_kept"] == [heads[0]] * 12 and record["neurons_kept"] == [neurons[0]] * 12
    assert {layer["numel"] for layer in record["layers"].values()} == {heads[1], neurons[1]}
    qkv = model.blocks[0].attn.qkv.weight
    assert int(qkv.ne(0).any(dim=1).sum()) == 3 * heads[0] * 64
    assert int(model.blocks[0].mlp.fc1.weight.ne(0).any(dim=1).sum()) == neurons[0]


def test_atten_head_mismatch_is_an_error_naming_both_numbers():
    model = models.create_model("vit_digits_tiny", num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"--atten_head 6 does not match the model: blocks.0.attn has 4 heads"):
        StructuredDST(model, optimizer, structure_units(model), 100, atten_head=6, log_fn=silent)
    assert all(len(blk.attn.proj._forward_pre_hooks) == 0 for blk in model.blocks), "nothing installed on failure"
    assert not optimizer._optimizer_step_post_hooks
    StructuredDST(model, optimizer, structure_units(model), 1000, atten_head=4, atten_density=0.5, log_fn=silent)


def test_a_density_that_keeps_no_unit_is_an_error():
    model = models.create_model("vit_digits_micro", num_classes=10)
    with pytest.raises(ValueError, match=r"--atten_density 0.2 keeps int\(2 x 0.2\) = 0 of the 2 heads"):
        StructuredDST(model, torch.optim.AdamW(model.parameters()), structure_units(model), 100, log_fn=silent)


@pytest.mark.parametrize("kwargs,match", [
    ({"pruning_type": "structured"}, "unknown pruning_type 'structured'"),
    ({"pruning_type": "structure", "death": "SET"}, "--death SET selects single weights"),
    ({"pruning_type": "structure", "growth": "momentum"}, "--growth momentum is not defined for heads"),
    ({"pruning_type": "structure", "redistribution": "magnitude"}, "keeps each block's head and neuron counts"),
    ({"pruning_type": "structure", "sparse_include": ("blocks.*",)}, "choose tensors for unstructured masks"),
    ({"atten_density": 0.0}, r"atten_density must be in \(0, 1\]"),
    ({"other_density": 1.5}, r"other_density must be in \(0, 1\]"),
    ({"atten_head": 0}, "atten_head must be a positive int"),
    ({"structure_compat": True}, "--structure-compat needs --pruning_type structure"),
])
def test_structured_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparsityConfig(**kwargs)


def test_structure_new_is_an_alias_and_density_does_not_combine():
    cfg = SparsityConfig(pruning_type="structure_new", density=0.6)
    assert cfg.pruning_type == "structure" and cfg.structured and cfg.enabled
    assert SparsityConfig(density=0.6).pruning_type == "unstructure" and not SparsityConfig().enabled


def test_structured_needs_the_adapter_and_other_modes_install_no_hooks():
    model = models.create_model("vit_digits_tiny", num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=r"units=models.structure_units\(model, scaler\)"):
        build_sparsifier(SparsityConfig(pruning_type="structure"), model, optimizer, 100)
    units = structure_units(model)
    assert isinstance(build_sparsifier(SparsityConfig(), model, optimizer, 100, units=units), DenseSparsifier)
    assert isinstance(build_sparsifier(SparsityConfig(density=0.5), model, optimizer, 1000, units=units,
                                       log_fn=silent), Masking)
    assert all(len(blk.attn.proj._forward_pre_hooks) == 0 for blk in model.blocks)


# ---------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("compat", [False, True])
def test_counts_stay_exact_and_masks_cover_whole_units_through_many_updates(compat):
    records = []
    model, optimizer, sparsifier = structured(compat=compat, update_frequency=2, log_fn=records.append)
    params = dict(model.named_parameters())
    masked = {"qkv.weight", "fc1.weight"} | ({"fc2.weight"} if compat else {"qkv.bias", "fc1.bias"})
    assert {name.split(".", 2)[2].split(".", 1)[1] for name in sparsifier.masks} == masked
    assert train(model, optimizer, sparsifier, range(1, 25))  # masked weights stay zero: test_sparsifier_contract.py
    updates = [r for r in records if r["event"] == "update"]
    assert len(updates) == 11
    for record in records:
        assert record["heads_kept"] == [2] * 4 and record["neurons_kept"] == [128] * 4
    for g in sparsifier.groups:
        active = sparsifier.active[g.name]
        for s in g.slices:
            if s.param in sparsifier.masks:
                assert torch.equal(sparsifier.masks[s.param], expand_units(active, s, params[s.param].shape))
    assert sum(r["swapped_heads"] + r["swapped_neurons"] for r in updates) > 0
    assert records[-1]["explored_heads"] > 0.5


def test_compat_mode_reproduces_sviites_frozen_mlp_topology():
    """SViTE's never-active neurons have zero fc1 row, zero (unmasked but never trained) fc1 bias and a masked fc2
    column, so their gradient score is exactly 0, and the neurons dropped at an update always grow back. By
    default the fc2 column stays unmasked, which gives an informative growth score."""
    swaps = {}
    for compat in (False, True):
        records = []
        model, optimizer, sparsifier = structured(compat=compat, update_frequency=2, log_fn=records.append)
        train(model, optimizer, sparsifier, range(1, 13))
        swaps[compat] = sum(r["swapped_neurons"] for r in records if r["event"] == "update")
    assert swaps[True] == 0 and swaps[False] > 0


def test_pruned_units_are_silent_by_default_and_leak_in_compat_mode():
    for compat in (False, True):
        model, optimizer, sparsifier = structured(compat=compat)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_()
            sparsifier.mask_set.apply_()
        model.eval()
        x, _ = batch(0)
        before = model(x)
        with torch.no_grad():  # perturb the output side of every pruned unit (not uniformly: LayerNorm removes that)
            for g in sparsifier.groups:
                out = next(s for s in g.slices if s.role == "out")
                param = sparsifier.params[out.param]
                pruned = expand_units(~sparsifier.active[g.name], out, param.shape)
                param.add_(torch.randn_like(param) * pruned)
        changed = not torch.allclose(model(x), before, atol=1e-6)
        assert changed == compat


# ---------------------------------------------------------------------------------------------- scores


def captured_head_outputs(model: torch.nn.Module) -> tuple[dict, list]:
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args):
            args[0].retain_grad()
            outputs[name] = args[0]
        return hook

    handles = [blk.attn.proj.register_forward_pre_hook(keep(f"blocks.{i}.attn")) for i, blk in enumerate(model.blocks)]
    return outputs, handles


@pytest.mark.parametrize("use_scaler", [False, True])
def test_head_scores_equal_a_direct_autograd_computation(use_scaler):
    torch.manual_seed(0)
    model = models.create_model("vit_digits_tiny", num_classes=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if use_scaler else None
    stats = HeadStats(model, scaler)
    outputs, handles = captured_head_outputs(model)
    expected = {}
    for step in (1, 2):  # two batches: the window sums over both
        x, y = batch(step, n=6)
        loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        stats.commit()  # what the sparsifier's optimizer post-step hook does
        for name, out in outputs.items():
            g = out.grad.double().reshape(6, -1, 4, 16) / (2.0**12 if use_scaler else 1.0)
            o = out.detach().double().reshape(6, -1, 4, 16)
            taylor = (g * o).sum(dim=(1, 3)).abs().sum(0)
            grad_l1 = g.abs().sum(dim=(0, 1, 3))
            previous = expected.get(name, (0.0, 0.0))
            expected[name] = (previous[0] + taylor, previous[1] + grad_l1)
    for handle in handles:
        handle.remove()
    for name, (taylor, grad_l1) in expected.items():
        sums = stats.sums()[name]
        assert sums["samples"].item() == 12
        assert torch.allclose(sums["taylor"], taylor, rtol=1e-5, atol=1e-12), name
        assert torch.allclose(sums["grad_l1"], grad_l1, rtol=1e-5), name
        assert bool((sums["taylor"] > 0).all())


def test_non_finite_batches_and_passes_without_gradient_are_left_out():
    torch.manual_seed(0)
    model = models.create_model("vit_digits_tiny", num_classes=10)
    stats = HeadStats(model)
    x, y = batch(1)
    F.cross_entropy(model(x), y).backward()
    stats.commit()
    before = {name: {k: v.clone() for k, v in sums.items()} for name, sums in stats.sums().items()}
    (F.cross_entropy(model(x), y) * float("inf")).backward()
    stats.commit()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.inference_mode():
        model(x)
    for name, sums in stats.sums().items():
        assert all(torch.equal(sums[k], before[name][k]) for k in sums), name
    stats.remove()
    model.train()
    F.cross_entropy(model(x), y).backward()
    stats.commit()
    assert all(torch.equal(stats.sums()[n]["samples"], before[n]["samples"]) for n in before), "hooks removed"


def test_death_follows_the_scores_and_regrown_heads_learn():
    """Heads die by the window Taylor score and grow by the window gradient L1 (set by hand here). A head grown from
    the inactive pool gets fresh q/k/v rows and learns. In compat mode its q and k rows stay exactly zero forever
    (SViTE's uniform-attention trap)."""
    for compat in (False, True):
        model, optimizer, sparsifier = structured(compat=compat, update_frequency=3, death_rate=0.005,
                                                  decay_schedule="constant", total_steps=8, t_end=0.5)
        name = "blocks.0.attn"
        active = sparsifier.active[name].nonzero().flatten().tolist()
        inactive = (~sparsifier.active[name]).nonzero().flatten().tolist()
        train(model, optimizer, sparsifier, range(1, 3))
        x, y = batch(3)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        sums = sparsifier.stats.sums()[name]
        sums["taylor"].copy_(torch.tensor([5.0, 5.0, 5.0, 5.0]))
        sums["taylor"][active[1]] = 1.0  # the weakest active head dies ...
        sums["grad_l1"].copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
        sums["grad_l1"][inactive[0]] = 9.0  # ... and this inactive one grows
        assert sparsifier.step(3)
        assert sparsifier.active[name].nonzero().flatten().tolist() == sorted([active[0], inactive[0]])
        qkv = model.blocks[0].attn.qkv.weight
        rows = unit_positions(UnitSlice("", 0, 3, 16, "in"), 4, torch.tensor([inactive[0]]))
        q_k = rows[:32]
        grown = qkv[rows].detach().clone()
        assert bool(grown.eq(0).all()) == compat
        if not compat:
            assert 0.01 < float(grown.std()) < 0.03, "fresh trunc-normal(0.02) rows"
            assert torch.count_nonzero(model.blocks[0].attn.qkv.bias[rows]) == 0
        train(model, optimizer, sparsifier, range(4, 8))
        moved = (qkv[q_k].detach() - grown[:32]).abs().amax()
        assert (float(moved) == 0.0) == compat, "q/k rows of a regrown head must learn (except in compat mode)"
        assert float((qkv[rows[32:]].detach() - grown[32:]).abs().amax()) > 0, "v rows learn in both modes"


def test_neuron_death_is_by_magnitude_and_regrown_neurons_learn():
    model, optimizer, sparsifier = structured(lr=0.0, update_frequency=3, death_rate=0.005,
                                              decay_schedule="constant", t_end=0.5, total_steps=12)
    name, fc1, fc2 = "blocks.1.mlp", model.blocks[1].mlp.fc1, model.blocks[1].mlp.fc2
    weakest = int(sparsifier.active[name].nonzero()[5])
    with torch.no_grad():
        fc1.weight[weakest] *= 1e-4
        fc2.weight[:, weakest] *= 1e-4
    before = sparsifier.active[name].clone()
    train(model, optimizer, sparsifier, range(1, 4))
    after = sparsifier.active[name]
    assert not after[weakest] and int((before & ~after).sum()) == 1 and int(after.sum()) == 128
    grown = int((after & ~before).nonzero())
    assert 0.01 < float(fc1.weight[grown].detach().std()) < 0.03 and float(fc1.bias[grown].detach()) == 0
    for group in optimizer.param_groups:
        group["lr"] = 1e-2
    row = fc1.weight[grown].detach().clone()
    train(model, optimizer, sparsifier, range(4, 7))
    assert float((fc1.weight[grown].detach() - row).abs().amax()) > 0


def test_optimizer_state_is_kept_and_gated_rows_of_joined_units_restart_at_the_next_step():
    """The update keeps the optimizer state. At the next step, Adam entries of units that joined and whose gradient
    was gated while pruned (zero second moment: a never-active head's q and k rows) restart from that step's
    gradient: exp_avg = g and exp_avg_sq = g² before the step, so it is Adam's bias-corrected first step."""
    model, optimizer, sparsifier = structured(update_frequency=3, growth="random", death_rate=1.0,
                                              decay_schedule="constant", seed=1)
    train(model, optimizer, sparsifier, range(1, 3))
    old = {g: a.clone() for g, a in sparsifier.active.items()}
    x, y = batch(3)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    qkv = model.blocks[0].attn.qkv.weight
    before = {k: v.clone() for k, v in optimizer.state[qkv].items()}
    assert sparsifier.step(3)
    assert all(torch.equal(optimizer.state[qkv][k], before[k]) for k in before), "the update itself keeps the state"
    joined = sparsifier.active["blocks.0.attn"] & ~old["blocks.0.attn"]
    assert joined.any()
    rows = unit_positions(UnitSlice("", 0, 3, 16, "in"), 4, joined.nonzero().flatten())
    q_k, v = rows[: rows.numel() * 2 // 3], rows[rows.numel() * 2 // 3:]
    assert torch.count_nonzero(before["exp_avg_sq"][q_k]) == 0 and torch.count_nonzero(before["exp_avg_sq"][v]) > 0
    x, y = batch(4)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = qkv.grad.detach().clone()
    optimizer.step()
    beta1, beta2 = optimizer.param_groups[0]["betas"]
    state = optimizer.state[qkv]
    torch.testing.assert_close(state["exp_avg"][q_k], grad[q_k])  # beta1 * g + (1 - beta1) * g
    torch.testing.assert_close(state["exp_avg_sq"][q_k], grad[q_k].square())
    torch.testing.assert_close(state["exp_avg_sq"][v], beta2 * before["exp_avg_sq"][v] + (1 - beta2) * grad[v] ** 2)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_state_dict_records_the_window_and_load_rejects_mismatches():
    """What StructuredDST's state holds (that it is plain and resumes bit-exactly: test_sparsifier_contract.py)."""
    model, optimizer, sparsifier = structured()
    train(model, optimizer, sparsifier, range(1, 5))
    state = sparsifier.state_dict()
    assert state["format"] == "sparselearning.StructuredDST/1" and state["step"] == 4 and state["grad_steps"] == 1
    assert state["config"]["pruning_type"] == "structure" and state["config"]["atten_density"] == 0.5
    assert set(state["head_stats"]) == {f"blocks.{i}.attn" for i in range(4)}
    with pytest.raises(ValueError, match="not a StructuredDST state dict"):
        sparsifier.load_state_dict({"masks": {}})
    _, _, compat = structured(compat=True)
    with pytest.raises(ValueError, match="trained with structure_compat=False"):
        compat.load_state_dict(state)
    broken = {**state, "masks": {**state["masks"]}}
    torch.manual_seed(0)
    broken["masks"]["blocks.0.mlp.fc1.weight"] = torch.rand(256, 64) < 0.5
    with pytest.raises(ValueError, match="does not cover whole units"):
        sparsifier.load_state_dict(broken)


# ---------------------------------------------------------------------------------------------- reporting


def test_records_print_with_format_table_and_report_counts_the_compact_model():
    records = []
    model, optimizer, sparsifier = structured(log_fn=records.append)
    train(model, optimizer, sparsifier, range(1, 7))
    assert [r["event"] for r in records] == ["init", "update", "update"]
    table = format_table(records[-1])
    assert "blocks.0.attn.heads" in table and "blocks.3.mlp.neurons" in table and "explored" in table
    report = sparsifier.report()
    assert report["heads_kept"] == 8 and report["neurons_kept"] == 512
    assert 0.5 < report["explored_heads"] <= 1.0 and 0.5 < report["explored_neurons"] <= 1.0
    assert report["density"] == pytest.approx(0.5)
    compact = compact_model(model, sparsifier.masks)
    assert report["nonzero_parameters"] == models.count_parameters(compact)[0]
    assert all(isinstance(v, (int, float)) for v in report.values())
