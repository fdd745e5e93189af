"""
Give freshly built modules the values of a checkpoint, once they are known to fit.

``pyro.module`` (with its default ``update_module_params=False``) keeps a module's own fresh
tensors and ignores values already in Pyro's parameter store, so filling the store is not
enough to resume a run in a new process. :meth:`WakeSleep.load` runs the model and guide once
under :class:`RegisteredParams`, which records every parameter they register; :func:`misfits`
compares those with the checkpoint's (same names, same shapes); and :func:`adopt` copies each
loaded value into the tensor registered under its name, which becomes the store's entry, so
that the module computes with the loaded values and the optimizer state attaches to the tensor
that is actually trained.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import pyro
import torch
from pyro.distributions import constraints
from pyro.poutine.messenger import Messenger
from torch.distributions import transform_to

from .files import PathLike


class RegisteredParams(Messenger):
    """
    Record the parameters a run of the model and guide registers: for each name its initial
    tensor (``None`` for a callable or absent one) and its constraint. Changes nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self.registered: Dict[str, Tuple[Optional[torch.Tensor], constraints.Constraint]] = {}

    def _pyro_param(self, msg: dict) -> None:
        # pyro.param sends args (name, init_tensor) and kwargs {constraint, event_dim}.
        args = msg["args"]
        init = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        constraint = msg["kwargs"].get("constraint", constraints.real)
        self.registered.setdefault(msg["name"], (init, constraint))


def _loaded_shape(value: torch.Tensor, constraint: constraints.Constraint) -> torch.Size:
    """The constrained shape of an unconstrained value."""
    try:
        return torch.Size(transform_to(constraint).forward_shape(value.shape))
    except Exception:
        with torch.no_grad():
            return transform_to(constraint)(value).shape


def misfits(
    loaded: Dict[str, torch.Tensor],
    loaded_constraints: Dict[str, constraints.Constraint],
    registered: Mapping[str, Tuple[Optional[torch.Tensor], constraints.Constraint]],
    complete: bool = True,
) -> List[str]:
    """
    How a checkpoint's parameters and those a run of the model and guide registered disagree:
    a shape that differs, a loaded name never registered, a registered name not loaded (the
    last two only for a ``complete`` run).

    :returns: one phrase per problem; empty when the checkpoint fits.
    """
    problems = []
    for name, (init, _) in registered.items():
        if name not in loaded:
            if complete:
                problems.append(f"'{name}' is registered by the model or guide but not saved")
            continue
        if init is None:
            continue
        shape = _loaded_shape(loaded[name], loaded_constraints[name])
        if tuple(init.shape) != tuple(shape):
            problems.append(
                f"'{name}' has shape {tuple(shape)} in the checkpoint and {tuple(init.shape)} "
                "in the model or guide"
            )
    if complete:
        problems += [
            f"'{name}' is saved but never registered by the model or guide"
            for name in loaded
            if name not in registered
        ]
    return problems


def misfit_message(path: PathLike, problems: List[str]) -> str:
    shown = "; ".join(problems[:6])
    if len(problems) > 6:
        shown += f"; and {len(problems) - 6} more"
    return (
        f"{path}: does not fit this model and guide: {shown}. Nothing was loaded into them; "
        "build them as they were when the checkpoint was saved (the same sizes and names)"
    )


def adopt(
    loaded: Dict[str, torch.Tensor],
    registered: Dict[str, Tuple[Optional[torch.Tensor], constraints.Constraint]],
) -> None:
    """
    Make the tensors the model and guide register hold the loaded values: each unconstrained
    registered tensor (a module's parameter, say) that is not the loaded tensor itself gets a
    copy of the loaded value and becomes the store's entry. Constrained ``pyro.param`` sites
    need nothing: Pyro returns the stored value.
    """
    store = pyro.get_param_store()
    stored = dict(store.named_parameters())
    for name, (init, constraint) in registered.items():
        if name not in loaded or init is None or constraint is not constraints.real:
            continue
        current = stored.get(name)
        if current is init or init.shape != loaded[name].shape:
            continue
        with torch.no_grad():
            init.copy_(loaded[name])
        if name in store:
            del store[name]
        store.setdefault(name, init)
