"""What every `Sparsifier` promises the trainer, tested once for every method in tests/sparsifiers.py (``CASES``).

Bit-exact resume, a state dict of plain values that ``torch.load(weights_only=True)`` reads, masked weights exactly
zero after every optimizer step, optimizer hygiene at a topology update, and agreement across DDP ranks (a real
2-process torchrun). The method-specific behaviour (golden answers, criteria, unit layout) stays in the method's own
test file.
"""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sparsifiers import (
    CASES,
    OPTIMIZERS,
    UPDATE_FREQUENCY,
    Case,
    assert_same,
    differs,
    make,
    masked_entries,
    train,
)

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("dist_sparsifier_worker.py")
IDS = [case.name for case in CASES]
WEIGHT_MASKING = [case for case in CASES if case.masks_weights]
TOPOLOGY = [case for case in CASES if case.changes_topology]


def round_trip(obj: object) -> object:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint file goes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def assert_plain(value: object, where: str = "state") -> None:
    """Only tensors, numbers, strings, None and str-keyed dicts/lists/tuples of them."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{where}: key {key!r} is not a str"
            assert_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            assert_plain(item, f"{where}[{i}]")
    else:
        assert value is None or isinstance(value, (torch.Tensor, bool, int, float, str)), \
            f"{where}: {type(value).__name__} is not a plain value"


# ---------------------------------------------------------------------------------------------- resume


RESUME_POINTS = {UPDATE_FREQUENCY: "between-update-and-next-step", UPDATE_FREQUENCY + 1: "mid-window"}
RESUMES = [pytest.param(case, stop, id=f"{case.name}-{label}") for case in CASES
           for stop, label in RESUME_POINTS.items() if not case.variant or stop == UPDATE_FREQUENCY + 1]


@pytest.mark.parametrize("case,stop", RESUMES)
def test_resume_is_bit_exact(case: Case, stop: int) -> None:
    """Train k steps, save model + optimizer + sparsifier (+ the global RNG, as main.py does: token selection draws
    its noise from it), rebuild with other weights and another method seed, load, continue: the same updates,
    weights and sparsifier state as the uninterrupted run. Right after an update a method may still owe the
    optimizer something at the next step (StructuredDST's restart of joined units), so both points are tested."""
    straight = make(case, seed=11)
    updates = train(straight, range(1, 11))
    assert (stop - 1 in updates or stop in updates) == case.changes_topology, "non-vacuous: resume next to an update"

    first = make(case, seed=11)
    train(first, range(1, stop + 1))
    checkpoint = round_trip({"model": first.model.state_dict(), "optimizer": first.optimizer.state_dict(),
                             "sparsity": first.sparsifier.state_dict(), "rng": torch.get_rng_state()})

    resumed = make(case, init_seed=123, seed=0)
    resumed.model.load_state_dict(checkpoint["model"])
    resumed.optimizer.load_state_dict(checkpoint["optimizer"])
    resumed.sparsifier.load_state_dict(checkpoint["sparsity"])
    torch.set_rng_state(checkpoint["rng"])
    later = train(resumed, range(stop + 1, 11))

    assert later == [s for s in updates if s > stop]
    assert bool(later) == case.changes_topology
    assert_same(straight.sparsifier.state_dict(), resumed.sparsifier.state_dict(), "sparsifier state")
    assert_same(straight.model.state_dict(), resumed.model.state_dict(), "model")
    assert straight.sparsifier.report() == resumed.sparsifier.report()


# ---------------------------------------------------------------------------------------------- plain state


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_is_plain_and_weights_only_loadable(case: Case) -> None:
    run = make(case)
    train(run, range(1, 5))
    state = run.sparsifier.state_dict()
    assert state, "a method has state to resume"
    assert_plain(state)
    loaded = round_trip(state)
    assert_same(state, loaded)
    other = make(case, init_seed=5, seed=7)
    other.sparsifier.load_state_dict(loaded)
    assert_same(state, other.sparsifier.state_dict(), "reloaded state")


# ---------------------------------------------------------------------------------------------- masked weights


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_masked_weights_are_exactly_zero_after_every_optimizer_step(case: Case) -> None:
    run = make(case)
    params = dict(run.model.named_parameters())
    moved_by_gradient = False
    masks: dict[str, torch.Tensor] = {}

    def check(step: int) -> None:
        nonlocal moved_by_gradient
        for name, masked in masks.items():
            moved_by_gradient |= bool(params[name].grad[masked].ne(0).any())
            assert torch.count_nonzero(params[name].detach()[masked]) == 0, f"{name} at step {step}"

    for step in range(1, 8):
        masks = masked_entries(case, run.sparsifier)  # the masks this optimizer step must keep
        train(run, [step], check)
    assert bool(masks) == case.masks_weights
    # Methods that regrow keep gradients at masked entries dense (the hook keeps them zero); a method that removes
    # units for good masks every entry they own, so they are exactly silent and get no gradient at all.
    assert moved_by_gradient == (case.masks_weights and case.regrows), \
        "gradients at masked entries are dense: the hook keeps them zero"


@pytest.mark.parametrize("case", WEIGHT_MASKING, ids=[c.name for c in WEIGHT_MASKING])
def test_masked_weights_are_zero_even_when_they_held_nan_or_inf(case: Case) -> None:
    run = make(case)
    if not case.masks_at_start:
        train(run, range(1, UPDATE_FREQUENCY + 1))
    params = dict(run.model.named_parameters())
    masks = masked_entries(case, run.sparsifier)
    with torch.no_grad():
        for i, (name, masked) in enumerate(masks.items()):
            params[name][masked] = (float("nan"), float("inf"), -float("inf"))[i % 3]
    run.optimizer.zero_grad()
    run.optimizer.step()  # no gradients: the optimizer skips every parameter, the hook re-masks them
    values = torch.cat([params[name].detach()[masked] for name, masked in masks.items()])
    assert values.numel() > 0 and bool((values == 0).all()), "NaN * 0 = NaN: masked weights must be filled, not scaled"
    assert all(bool(torch.isfinite(p).all()) for p in params.values())


# ---------------------------------------------------------------------------------------------- optimizer hygiene


@pytest.mark.parametrize("case", TOPOLOGY, ids=[c.name for c in TOPOLOGY])
def test_an_update_leaves_the_optimizer_state_alone(case: Case) -> None:
    """The update changes masks, not moments: whatever a method does to the optimizer state of joined entries
    happens at the next optimizer step (a checkpoint in between resumes bit-exactly, see above)."""
    run = make(case)
    train(run, range(1, UPDATE_FREQUENCY))
    before_masks = masked_entries(case, run.sparsifier)
    before_update = []

    def snapshot(step: int) -> None:
        before_update.append({p: {k: v.clone() for k, v in s.items()} for p, s in run.optimizer.state.items()})

    assert train(run, [UPDATE_FREQUENCY], snapshot) == [UPDATE_FREQUENCY]
    assert differs(before_masks, masked_entries(case, run.sparsifier)), "non-vacuous: the masks moved"
    for param, state in before_update[0].items():
        for key, value in state.items():
            assert torch.equal(run.optimizer.state[param][key], value), key


BURN_IN, AFTER = 100, 100


def parts(name: str, shape: torch.Size) -> dict[str, torch.Tensor]:
    """Which entries of a weight are compared together: qkv rows as q and k against v (a regrown head's fresh q/k
    rows get the small gradients, its v rows do not), every other weight by its name without the block index."""
    kind = re.sub(r"^blocks\.\d+\.", "", name)
    if kind.endswith("qkv.weight"):
        rows = torch.arange(shape[0])[:, None].expand(shape)
        return {"qk": rows < 2 * shape[0] // 3, "v": rows >= 2 * shape[0] // 3}
    return {kind: torch.ones(shape, dtype=torch.bool)}


def in_line(optimizer: str, ratio: float) -> bool:
    """Within 1.5x of the survivors. Adam's steps are scale-free, so both ways; plain SGD's steps scale with the
    gradient, and a regrown head's small fresh q/k rows genuinely get a small gradient, so only from above."""
    return ratio <= 1.5 and (optimizer.startswith("sgd") or ratio >= 1 / 1.5)


HYGIENE = [case for case in TOPOLOGY if not case.variant and case.regrows]


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("case", HYGIENE, ids=[c.name for c in HYGIENE])
def test_regrown_weights_step_like_survivors(case: Case, optimizer: str) -> None:
    """The mean |Δw| / lr over the 100 optimizer steps after one update, regrown entries against surviving entries of
    the same weights, on a stationary stream of teacher-labelled batches. Resetting Adam's moments while its
    per-tensor ``step`` keeps counting leaves regrown entries without bias correction (2-5x larger steps)."""
    run = make(case, optimizer=optimizer, total_steps=BURN_IN + AFTER + 1, update_frequency=BURN_IN,
               t_end=(BURN_IN + 1) / (BURN_IN + AFTER + 1), growth="random", death_rate=0.5,
               decay_schedule="constant", seed=3)
    lr = run.optimizer.param_groups[0]["lr"]
    params = dict(run.model.named_parameters())
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(3 * 16 * 16, 10, generator=generator)
    sets: dict[str, list[tuple[str, torch.Tensor]]] = {}
    totals: dict[str, float] = {}
    old: dict[str, torch.Tensor] = {}
    for step in range(1, BURN_IN + AFTER + 1):
        before = {n: p.detach().clone() for n, p in params.items()}
        x = torch.randn(8, 3, 16, 16, generator=generator)
        run.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(run.module(x), (x.flatten(1) @ teacher).argmax(1)).backward()
        run.optimizer.step()
        for label, items in sets.items():
            moved = sum(float((params[n].detach() - before[n]).abs()[w].sum()) for n, w in items)
            totals[label] = totals.get(label, 0.0) + moved / sum(int(w.sum()) for _, w in items) / lr
        if step == BURN_IN:
            old = masked_entries(case, run.sparsifier)
        assert run.sparsifier.step(step) == (step == BURN_IN)
        if step == BURN_IN:
            new = masked_entries(case, run.sparsifier)
            for name in old:
                if not name.endswith("weight"):
                    continue
                now = new.get(name, torch.zeros_like(old[name]))
                regrown, kept = old[name] & ~now, ~old[name] & ~now
                for part, section in parts(name, old[name].shape).items():
                    sets.setdefault(part, []).append((name, regrown & section))
                    sets.setdefault(part + " survivors", []).append((name, kept & section))
            sets = {label: items for label, items in sets.items() if sum(int(w.sum()) for _, w in items) > 0}
    regrown_parts = [label for label in sets if not label.endswith(" survivors")]
    assert regrown_parts, "non-vacuous: the update regrew entries"
    for part in regrown_parts:
        ratio = totals[part] / totals[part + " survivors"]
        assert in_line(optimizer, ratio), f"{optimizer}: regrown {part} move {ratio:.2f}x the survivors' step"


# ---------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_ranks_agree_with_a_real_torchrun(tmp_path: Path) -> None:
    """Every method under DDP on 2 gloo ranks that see different data and a different global RNG."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(tmp_path)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert list(ranks[0]["cases"]) == IDS
    for case in CASES:
        a, b = ranks[0]["cases"][case.name], ranks[1]["cases"][case.name]
        assert a["updates"] == b["updates"], case.name
        assert bool(a["updates"]) == case.changes_topology, case.name
        assert bool(a["masks"]) == case.masks_weights, case.name
        masked = sum(int(m.sum()) for m in a["masks"].values())
        assert masked < sum(m.numel() for m in a["masks"].values()) or not case.masks_weights, case.name
        assert_same(a["masks"], b["masks"], f"{case.name} masks")
        assert_same(a["weights"], b["weights"], f"{case.name} weights")
        assert a["report"] == b["report"], case.name
        assert differs(a["window"], b["window"]) == case.local_statistics, \
            f"{case.name}: per-rank statistics before the first update"
        assert a["loads_unwrapped"] and b["loads_unwrapped"], f"{case.name}: state FQNs carry DDP's 'module.'"
    for case, (name, error) in ranks[0]["corrupted"].items():
        count_and_index_sum_before, after = ranks[1]["corrupted_checksums"][case]
        assert count_and_index_sum_before == after, "the corruption keeps what a count + index-sum checksum sees"
        for rank in ranks:
            message = rank["corrupted"][case][1]
            assert "masks differ across ranks" in message, f"{case}: a corrupted mask must be detected on every rank"
            assert f"['{name}']" in message, f"{case}: the error names exactly the corrupted tensor"
    assert {"unstructured", "structured"} <= set(ranks[0]["corrupted"]), "non-vacuous: both mask granularities"
