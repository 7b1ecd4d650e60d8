"""apply_options: a restored optimiser and schedule take today's options (issue 20 cases 2 and 3)."""

import pytest
import torch

from deeplab_lit.modules.schedule import ResumeOptionError, apply_options, options_of


def sgd_and_poly(lr: float, total: int, steps: int = 0, momentum: float = 0.9):
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{"params": [weight], "lr": lr}], lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total, power=0.9)
    for _ in range(steps):
        weight.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def restored(saved: tuple[float, int, int], **options):
    """What Lightning restores: an optimiser and scheduler configured today (``options``), loaded with the
    states of one saved after ``saved = (lr, total, steps)``."""
    saved_optimizer, saved_scheduler = sgd_and_poly(*saved)
    optimizer, scheduler = sgd_and_poly(**options)
    fresh = options_of(optimizer, scheduler)
    optimizer.load_state_dict(saved_optimizer.state_dict())
    scheduler.load_state_dict(saved_scheduler.state_dict())
    return optimizer, scheduler, fresh


def test_a_longer_schedule_continues_from_the_saved_step_at_the_poly_rate():
    optimizer, scheduler, fresh = restored((0.01, 4, 4), lr=0.01, total=8)
    assert optimizer.param_groups[0]["lr"] == 0.0  # the finished schedule's rate, as restored
    line = apply_options(optimizer, scheduler, fresh)
    assert "poly schedule over 8 steps (was 4" in line
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**0.9)
    scheduler.step()  # the next step follows the re-planned schedule
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (3 / 8) ** 0.9)
    assert "momentum_buffer" in optimizer.state[optimizer.param_groups[0]["params"][0]]  # state kept


def test_a_new_lr_and_momentum_apply_and_an_unchanged_resume_changes_nothing():
    optimizer, scheduler, fresh = restored((0.01, 8, 2), lr=0.5, total=8, momentum=0.5)
    line = apply_options(optimizer, scheduler, fresh)
    assert "base learning rate 0.01 -> 0.5" in line and "momentum 0.9 -> 0.5" in line
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (6 / 8) ** 0.9)
    assert scheduler.state_dict()["base_lrs"] == [0.5]
    optimizer, scheduler, fresh = restored((0.01, 8, 2), lr=0.01, total=8)
    before = optimizer.param_groups[0]["lr"]
    assert apply_options(optimizer, scheduler, fresh) == ""
    assert optimizer.param_groups[0]["lr"] == before


def test_another_scheduler_whose_options_changed_is_refused_by_name():
    weight = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)
    fresh = options_of(optimizer, scheduler)
    scheduler.load_state_dict({**scheduler.state_dict(), "step_size": 3})
    with pytest.raises(ResumeOptionError, match="step_size: the checkpoint's StepLR cannot be re-planned"):
        apply_options(optimizer, scheduler, fresh)
