"""Update-step schedule and death-rate decay: pure functions of the step."""
import math

import pytest

from sparselearning.schedules import FINAL_DEATH_RATE, death_rate_at, is_update_step


def test_update_steps_start_at_delta_t_and_stop_before_t_end():
    steps = [s for s in range(0, 1001) if is_update_step(s, update_frequency=100, total_steps=1000, t_end=0.8)]
    assert steps == [100, 200, 300, 400, 500, 600, 700]  # 800 is not < 0.8 * 1000; never step 0


def test_update_steps_with_t_end_one():
    steps = [s for s in range(0, 31) if is_update_step(s, update_frequency=10, total_steps=30, t_end=1.0)]
    assert steps == [10, 20]


def test_sviite_imagenet_schedule_counts_80_updates():
    # docs/original-sviite.md, "Topology-update schedule on ImageNet": bs 64 x 8 GPUs, ΔT 15000, 2502 steps/epoch
    total = 2502 * 600
    updates = [s for s in range(15000, total, 15000) if is_update_step(s, 15000, total, 0.8)]
    assert len(updates) == 80
    assert death_rate_at(updates[0], total, 0.5) == pytest.approx(0.4999, abs=1e-4)
    assert death_rate_at(updates[-1], total, 0.5) == pytest.approx(0.0526, abs=1e-4)


def test_cosine_matches_the_closed_form():
    total, dr0 = 1000, 0.5
    for t in (0, 1, 250, 500, 999, 1000):
        expected = FINAL_DEATH_RATE + (dr0 - FINAL_DEATH_RATE) * (1 + math.cos(math.pi * t / total)) / 2
        assert death_rate_at(t, total, dr0, "cosine") == pytest.approx(expected, abs=1e-15)
    assert death_rate_at(0, total, dr0) == dr0
    assert death_rate_at(total, total, dr0) == pytest.approx(FINAL_DEATH_RATE)
    assert death_rate_at(2 * total, total, dr0) == pytest.approx(FINAL_DEATH_RATE), "clamped after T"


def test_linear_and_constant_schedules():
    assert death_rate_at(0, 100, 0.4, "linear") == 0.4
    assert death_rate_at(50, 100, 0.4, "linear") == pytest.approx((0.4 + FINAL_DEATH_RATE) / 2)
    assert death_rate_at(100, 100, 0.4, "linear") == pytest.approx(FINAL_DEATH_RATE)
    assert [death_rate_at(t, 100, 0.4, "constant") for t in (0, 50, 100)] == [0.4, 0.4, 0.4]


def test_schedules_are_monotone_between_the_end_points():
    for schedule in ("cosine", "linear"):
        rates = [death_rate_at(t, 200, 0.5, schedule) for t in range(201)]
        assert all(a >= b for a, b in zip(rates, rates[1:])), schedule
        assert rates[0] == 0.5 and rates[-1] == pytest.approx(FINAL_DEATH_RATE)


def test_unknown_schedule_and_bad_total_raise():
    with pytest.raises(ValueError, match="unknown decay schedule 'step'; choose from cosine, constant, linear"):
        death_rate_at(10, 100, 0.5, "step")
    with pytest.raises(ValueError, match="total_steps must be positive"):
        death_rate_at(10, 0, 0.5)
