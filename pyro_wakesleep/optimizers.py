"""
Pyro optimizers ahead of an update. :class:`~pyro.optim.PyroOptim` makes one torch optimizer
per parameter the first time it steps it; :func:`make_optimizers` makes them before any update
of a step, so that a constructor that raises (an invalid learning rate, say) or a loaded state
written by another kind of optimizer fails the step with nothing changed, and
:func:`drop_optimizers` undoes that when the step fails later.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pyro
import torch
from pyro.optim import PyroOptim

from .checks import brief

#: What :func:`make_optimizers` made: ``(optimizer, parameter, name, loaded state)``.
Made = List[Tuple[PyroOptim, torch.Tensor, Optional[str], Any]]


def make_optimizers(updates: List[Tuple[PyroOptim, List[torch.Tensor]]]) -> Made:
    """
    Make the torch optimizers that an update is about to need, before any update: PyroOptim
    makes one per parameter the first time it steps it, so a constructor that raises (an
    invalid learning rate, say) or a loaded state written by another optimizer would otherwise
    fail half-way, after other parameters were updated. Made with the gradients set aside, so
    that nothing is stepped; on failure the optimizers made here are dropped again
    (:func:`drop_optimizers`) and the loaded states they took up wait as before.

    :param updates: ``(optimizer, parameters)`` pairs.
    :returns: what was made, for :func:`drop_optimizers` should the step fail later.
    :raises ValueError: naming the parameter whose loaded optimizer state does not fit.
    """
    made: Made = []
    try:
        for optim, params in updates:
            new = [p for p in params if p not in optim.optim_objs]
            if not new:
                continue
            # The loaded states that PyroOptim.set_state left waiting for these parameters.
            waiting = getattr(optim, "_state_waiting_to_be_consumed", {})
            store = pyro.get_param_store()
            for p in new:
                name = store.param_name(p)
                pending = waiting.get(name)
                grad, p.grad = p.grad, None
                try:
                    optim([p])  # makes p's optimizer, takes up its loaded state; no gradient
                except Exception as error:
                    if pending is None:
                        raise
                    raise ValueError(
                        f"The optimizer state loaded for parameter '{name}' cannot be taken up "
                        f"({brief(error)}): it was written by another kind of optimizer? Load "
                        "it with the optimizer it was saved with. No parameter or optimizer "
                        "state was changed."
                    ) from error
                finally:
                    p.grad = grad
                    if p in optim.optim_objs:
                        made.append((optim, p, name, pending))
                check_optimizer_state(optim.optim_objs[p], name)
    except Exception:
        drop_optimizers(made)
        raise
    return made


def drop_optimizers(made: Made) -> None:
    """Undo :func:`make_optimizers`: the optimizers go, their loaded states wait again."""
    for optim, p, name, pending in made:
        optim.optim_objs.pop(p, None)
        optim.grad_clip.pop(p, None)
        if pending is not None:
            optim.set_state({name: pending})


def check_optimizer_state(optimizer: Any, name: Optional[str]) -> None:
    """Refuse a torch optimizer whose parameter groups lack its own hyperparameters: the sign
    of a loaded state written by another kind of optimizer."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # an LR scheduler's
    defaults = getattr(optimizer, "defaults", {})
    for group in getattr(optimizer, "param_groups", []):
        missing = sorted(set(defaults) - set(group))
        if missing:
            raise ValueError(
                f"The optimizer state loaded for parameter '{name}' does not fit "
                f"{type(optimizer).__name__}: it lacks {', '.join(missing)}, so it was written by "
                "another kind of optimizer. Load it with the optimizer it was saved with. No "
                "parameter or optimizer state was changed."
            )
