"""
The run's optimizers and their learning-rate schedule.

Without ``--lr-decay`` the optimizers are Pyro's plain wrappers. With it each is a
:class:`pyro.optim.LambdaLR` over the same torch optimizer, whose factor is :func:`lr_factor`
of the scheduler's step count; the training loop steps the schedulers once after each of its
steps (:func:`step_schedules`), so that main-loop step ``done`` runs at ``lr *
lr_factor(config, done, total)``. The schedulers' states (their step counts) travel in the
optimizer states of the run's checkpoint, so a resumed run continues the schedule where it
stopped. Candidate selection steps the optimizers but not the schedulers: its steps run at
factor 1, and the winner's schedulers start the main loop at step 0.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import pyro
import torch
from pyro.optim import PyroLRScheduler, PyroOptim
from pyro.optim.clipped_adam import ClippedAdam as TorchClippedAdam

from .. import WakeSleep

Schedule = Callable[[int], float]


def lr_factor(config: Dict[str, Any], done: int, total: int) -> float:
    """
    The learning-rate factor of a run's step: 1 until the last ``lr_decay`` fraction of the
    run, then geometric down to ``lr_final``.

    :param config: the run's configuration (``lr_decay`` and ``lr_final`` are read).
    :param done: the main-loop steps taken before this one.
    :param total: the main-loop steps of the whole run.
    """
    decay = config.get("lr_decay", 0.0)
    start = 1.0 - decay
    fraction = done / max(total, 1)
    if not decay or fraction < start:
        return 1.0
    return config["lr_final"] ** ((fraction - start) / decay)


def lr_schedule(config: Dict[str, Any], total: int) -> Optional[Schedule]:
    """
    The learning-rate factor by main-loop step for a run of ``total`` steps, or ``None``
    without ``lr_decay``.
    """
    if not config["lr_decay"]:
        return None

    def factor(done: int) -> float:
        return lr_factor(config, done, total)

    return factor


def make_optimizer(name: str, lr: float, schedule: Optional[Schedule] = None) -> PyroOptim:
    """
    The optimizer ``name`` (``adam``, ``clippedadam`` or ``sgd``) at learning rate ``lr``,
    scheduled by ``schedule`` when given.
    """
    if schedule is None:
        if name == "adam":
            return pyro.optim.Adam({"lr": lr})  # type: ignore[attr-defined]
        if name == "clippedadam":
            return pyro.optim.ClippedAdam({"lr": lr, "clip_norm": 10.0})
        return pyro.optim.SGD({"lr": lr, "momentum": 0.9})  # type: ignore[attr-defined]
    constructor: Any
    if name == "adam":
        constructor, args = torch.optim.Adam, {"lr": lr}
    elif name == "clippedadam":
        constructor, args = TorchClippedAdam, {"lr": lr, "clip_norm": 10.0}
    else:
        constructor, args = torch.optim.SGD, {"lr": lr, "momentum": 0.9}
    return pyro.optim.LambdaLR(  # type: ignore[attr-defined]
        {"optimizer": constructor, "optim_args": args, "lr_lambda": schedule}
    )


def step_schedules(ws: WakeSleep) -> None:
    """Advance the learning-rate schedules of both optimizers of ``ws`` by one step."""
    for optim in {id(o): o for o in (ws.optim, ws.guide_optim)}.values():
        if isinstance(optim, PyroLRScheduler):
            optim.step()


def _scheduler_state(
    optimizer_state: Dict[str, Any], schedule: Schedule, lr: float, done: int
) -> Dict[str, Any]:
    """A LambdaLR state at step ``done`` for an optimizer state saved without one."""
    groups = optimizer_state["param_groups"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr), schedule
    )
    state = scheduler.state_dict()
    state.update(
        base_lrs=[lr] * len(groups),
        last_epoch=done,
        _step_count=done + 1,
        _last_lr=[group["lr"] for group in groups],
        lr_lambdas=[None] * len(groups),
    )
    return state


def add_scheduler_states(
    ws: WakeSleep, checkpoint: Dict[str, Any], config: Dict[str, Any], schedule: Schedule, done: int
) -> None:
    """
    Let a decaying run resume from a checkpoint whose optimizer states hold no scheduler
    state (written before the schedule was kept by schedulers): each such state is given one
    at step ``done`` and set to wait for its parameter again. Its saved learning rate is used
    for the next step, as it was then.

    :param ws: the run's WakeSleep, just loaded from ``checkpoint``.
    :param checkpoint: the checkpoint, as :func:`pyro_wakesleep.checkpoint.read` returns it.
    :param config: the run's configuration.
    :param schedule: the run's schedule (:func:`lr_schedule`).
    :param done: the main-loop steps taken before the checkpoint was written.
    """
    guide_lr = config["guide_lr"] or config["lr"]
    pairs = [(ws.optim, checkpoint["optim"], config["lr"])]
    if checkpoint["guide_optim"] is not None:
        pairs.append((ws.guide_optim, checkpoint["guide_optim"], guide_lr))
    for optim, states, lr in pairs:
        old = {
            name: {
                "scheduler": _scheduler_state(state, schedule, lr, done),
                "optimizer": state,
            }
            for name, state in states.items()
            if "scheduler" not in state
        }
        if old and optim is not None:
            optim.set_state(old)
