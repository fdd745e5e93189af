"""
The run's optimizers and their learning-rate schedule: the configured learning rates, scaled
in the last ``lr_decay`` fraction of the run by :func:`lr_factor`.
"""

from __future__ import annotations

from typing import Any, Dict

import pyro

from .. import WakeSleep


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


def make_optimizer(name: str, lr: float) -> pyro.optim.PyroOptim:
    """The optimizer ``name`` (``adam``, ``clippedadam`` or ``sgd``) at learning rate ``lr``."""
    if name == "adam":
        return pyro.optim.Adam({"lr": lr})
    if name == "clippedadam":
        return pyro.optim.ClippedAdam({"lr": lr, "clip_norm": 10.0})
    return pyro.optim.SGD({"lr": lr, "momentum": 0.9})


def set_lr_factor(ws: WakeSleep, config: Dict[str, Any], factor: float) -> None:
    """Scale both optimizers' learning rates to ``factor`` times the configured ones."""
    for optim, base in ((ws.optim, config["lr"]), (ws.guide_optim, config["guide_lr"])):
        for torch_optim in optim.optim_objs.values():
            torch_optim = getattr(torch_optim, "optimizer", torch_optim)  # an LR scheduler
            for group in torch_optim.param_groups:
                group["lr"] = (base or config["lr"]) * factor
