"""The head-score hooks of structured sparsity leave ``torch.compile`` one graph, and compiled scores equal eager ones."""
from __future__ import annotations

import torch
import torch._dynamo
import torch.nn.functional as F

import models
from models.head_stats import structure_units


def hooked_model(name: str) -> tuple[torch.nn.Module, models.HeadStats]:
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10)
    return model, structure_units(model).attach_stats()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(6, 3, 16, 16, generator=gen), torch.randint(0, 10, (6,), generator=gen)


def test_head_score_hooks_cause_no_graph_break() -> None:
    model, _ = hooked_model("vit_digits_tiny")
    explanation = torch._dynamo.explain(model)(batch()[0])
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]  # a tensor hook: 11
    assert explanation.graph_count == 1


def test_compiled_head_scores_equal_eager() -> None:
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model, stats = hooked_model("vit_digits_micro")
        run = torch.compile(model, backend="aot_eager") if compiled else model  # traces forward and backward
        x, y = batch()
        for _ in range(2):  # the second forward must discard nothing and the commit must add both steps
            F.cross_entropy(run(x), y).backward()
            stats.commit()
        results.append(stats.sums())
    eager, compiled = results
    for name, sums in eager.items():
        assert sums["samples"].item() == 12 and compiled[name]["samples"].item() == 12, name
        for key in ("taylor", "grad_l1"):
            assert bool((sums[key] > 0).all()), (name, key)
            torch.testing.assert_close(compiled[name][key], sums[key], rtol=1e-5, atol=1e-9)
