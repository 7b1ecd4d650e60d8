"""A resumed run's optimiser and poly schedule: the checkpoint's state, with today's options applied.

Lightning restores the optimiser and the learning-rate scheduler from the checkpoint as they were saved:
their hyper-parameters too. A learning rate, momentum or weight decay given on resume would reach the
saved hyper-parameters but not the optimiser, and a longer run (``max_steps`` or ``max_epochs`` raised)
would keep the poly schedule's old length, so the extra steps ran at learning rate 0.

:func:`apply_options` is the one place that decides: the state that training built (momentum buffers, the
step count of the schedule) comes from the checkpoint; the hyper-parameters come from today's options, as
``configure_optimizers`` just built them, and every change is said in one line. The poly schedule
continues from the checkpoint's step with the new base rates and length: each group's learning rate is
set to ``base * (1 - step / total) ** power`` at that step. A scheduler that is not ``PolynomialLR`` (a
subclass's own ``configure_optimizers``) cannot be re-planned: a change to its options is refused by name.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, PolynomialLR

#: Scheduler state that counts progress (the checkpoint's, kept) rather than configures the schedule.
_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_is_initial", "_get_lr_called_within_step", "base_lrs"}


class ResumeOptionError(ValueError):
    """An option changed on resume that the checkpoint's optimiser or schedule cannot take."""


def options_of(optimizer: Optimizer, scheduler: LRScheduler | None) -> dict[str, Any]:
    """Return the hyper-parameters of a just-configured optimiser and scheduler (no tensors, no state)."""
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    schedule = {k: v for k, v in (scheduler.state_dict() if scheduler else {}).items() if k not in _PROGRESS}
    return {"groups": groups, "schedule": schedule}


def apply_options(optimizer: Optimizer, scheduler: LRScheduler | None, fresh: dict[str, Any]) -> str:
    """Give a restored optimiser and scheduler today's options (``fresh``, from :func:`options_of`).

    Args:
        optimizer: The optimiser, its state restored from the checkpoint.
        scheduler: Its scheduler, restored likewise (None: none).
        fresh: What ``configure_optimizers`` built before the restore.

    Returns:
        One line saying what changed, ``""`` when nothing did.

    Raises:
        ResumeOptionError: the options changed and the scheduler is not a ``PolynomialLR``.
    """
    changes: list[str] = []
    restored = optimizer.param_groups
    for name in sorted({k for group in fresh["groups"] for k in group} - {"lr", "initial_lr"}):
        before = [group.get(name) for group in restored]
        after = [group.get(name) for group in fresh["groups"]]
        if before != after:
            changes.append(f"{name} {_listed(before)} -> {_listed(after)}")
            for group, value in zip(restored, after, strict=True):
                group[name] = value
    old_bases = [group.get("initial_lr", group["lr"]) for group in restored]
    new_bases = [group.get("initial_lr", group["lr"]) for group in fresh["groups"]]
    old_schedule = {
        k: v for k, v in (scheduler.state_dict() if scheduler else {}).items() if k not in _PROGRESS
    }
    if new_bases == old_bases and old_schedule == fresh["schedule"]:
        return _say(changes)
    if not isinstance(scheduler, PolynomialLR):
        changed = ["base learning rate"] * (new_bases != old_bases) + [
            k for k in fresh["schedule"] if old_schedule.get(k) != fresh["schedule"][k]
        ]
        raise ResumeOptionError(
            f"Resuming with changed {', '.join(changed)}: the checkpoint's {type(scheduler).__name__} "
            "cannot be re-planned. Resume with the checkpoint's options, or start a new run from its "
            "weights (--model.init_args.weights <checkpoint>)."
        )
    if new_bases != old_bases:
        changes.append(
            f"base learning rate {_listed(old_bases)} -> {_listed(new_bases)} (every parameter group)"
        )
    state = scheduler.state_dict()
    step, total, power = state["last_epoch"], fresh["schedule"]["total_iters"], fresh["schedule"]["power"]
    if total != state["total_iters"]:
        changes.append(f"poly schedule over {total} steps (was {state['total_iters']}: max_steps/max_epochs)")
    if power != state["power"]:
        changes.append(f"poly power {state['power']} -> {power}")
    rates = [base * (1.0 - min(step, total) / total) ** power for base in new_bases]
    for group, base, rate in zip(restored, new_bases, rates, strict=True):
        group["initial_lr"], group["lr"] = base, rate
    scheduler.load_state_dict({**state, **fresh["schedule"], "base_lrs": new_bases, "_last_lr": rates})
    changes.append(f"the schedule continues from step {step} at learning rate {_listed(rates)}")
    return _say(changes)


def _listed(values: list[Any]) -> str:
    """``[0.01, 0.1]`` -> ``0.01, 0.1``; one distinct value once."""
    distinct = list(dict.fromkeys(values))
    return ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in distinct)


def _say(changes: list[str]) -> str:
    return f"Resumed with changed options: {'; '.join(changes)}." if changes else ""
