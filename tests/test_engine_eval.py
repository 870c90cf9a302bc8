"""engine.evaluate: exact metrics, and no per-batch host round trip (the counts stay on the device)."""
from __future__ import annotations

import pytest
import torch

import engine
import models

CONVERSIONS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")


def loader(batches: int, batch_size: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(batches)
    return [(torch.randn(batch_size, 3, 16, 16, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(batches)]


def count_host_transfers(monkeypatch: pytest.MonkeyPatch, fn) -> tuple[object, int]:
    """Run fn() and count Python number <-> tensor conversions: torch.tensor(...) and Tensor.item/tolist/cpu/float/
    int/bool. On CUDA each of them is a blocking copy."""
    calls = 0

    def counting(original):
        def wrapper(*args, **kwargs):
            nonlocal calls
            calls += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(torch, "tensor", counting(torch.tensor))
    for name in CONVERSIONS:
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    result = fn()
    monkeypatch.undo()
    return result, calls


def test_evaluate_converts_nothing_per_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = models.create_model("vit_digits_micro", num_classes=10).eval()
    device = torch.device("cpu")
    _, few = count_host_transfers(monkeypatch, lambda: engine.evaluate(model, loader(2), device))
    _, many = count_host_transfers(monkeypatch, lambda: engine.evaluate(model, loader(7), device))
    assert few == many, f"{many - few} host conversions for 5 more batches"


def test_evaluate_metrics_are_exact() -> None:
    torch.manual_seed(0)
    model = models.create_model("vit_digits_micro", num_classes=10).eval()
    data = loader(3, batch_size=7) + loader(1, batch_size=2)  # a short last batch
    stats = engine.evaluate(model, data, torch.device("cpu"))
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    with torch.no_grad():
        logits = model(x)
    assert stats["images"] == 23
    assert stats["acc1"] == pytest.approx(100.0 * float((logits.argmax(1) == y).float().mean()))
    assert stats["acc5"] == pytest.approx(100.0 * float((logits.topk(5, 1).indices == y[:, None]).any(1).float().mean()))
    assert stats["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
