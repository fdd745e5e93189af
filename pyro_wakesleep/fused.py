"""
Fused optimizer steps: the update of a :class:`~pyro.optim.PyroOptim` of Adam or AdamW taken
by one fused torch kernel per group of parameters, instead of one torch optimizer step per
parameter.

:class:`~pyro.optim.PyroOptim` keeps one torch optimizer per parameter and steps them one by
one. For Adam that is eight tensor operations per parameter, each with Python overhead: on the
default SBN 784-200 it costs more than a fifth of a training step on CPU. Torch's fused Adam
(``fused=True``, CPU and CUDA) does the same update in one kernel over all the parameters.
:class:`FusedSteps` takes a PyroOptim's update with a fused optimizer built over the
parameters of the step, whose per-parameter state *is* the state of Pyro's per-parameter
optimizers (the same dictionaries and tensors): Pyro's ``get_state``/``set_state``, and so
checkpoints, see one state whichever way a step was taken, and the hyperparameters are read
from Pyro's optimizers at each step (a change of ``lr`` there is followed).

The result is the same Adam update up to floating-point rounding: the fused kernel evaluates the
same formulas in another order, so a run is not bitwise the same as with Pyro's own stepping
(it is bitwise reproducible, eager or recorded). The fused path is taken only when it cannot
change the meaning of the step; anything else is stepped by Pyro as before:

- the optimizer is a plain :class:`~pyro.optim.PyroOptim` (not a scheduler) of
  :class:`torch.optim.Adam` or :class:`torch.optim.AdamW`, without gradient clipping;
- each parameter's optimizer has one parameter, no step hooks, and ``fused``, ``foreach``,
  ``capturable`` and ``differentiable`` left at their defaults (a user's explicit choice
  wins), hyperparameters that are numbers, and a dense gradient;
- torch supports the fused kernel for the parameters' device and dtype.

Parameters whose hyperparameters differ (per-parameter learning rates) are grouped by them.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Hashable, List, Optional

import torch
from pyro.optim import PyroOptim

#: The torch optimizers stepped by a fused kernel, when a PyroOptim wraps them.
FUSABLE = (torch.optim.Adam, torch.optim.AdamW)

#: Options that must be left at their defaults for the fused path (a user's choice wins).
_DEFAULT_ONLY = {"fused": None, "foreach": None, "capturable": False, "differentiable": False}

#: The number of fused optimizers (groups of parameters) kept.
_MAX_CACHED = 16


def _group_key(optimizer: Any, p: torch.Tensor) -> Optional[Hashable]:
    """The key of the fused group of ``p`` (its optimizer's class, hyperparameters, device
    and dtype), or ``None`` when ``p`` must be stepped by its own optimizer."""
    if type(optimizer) not in FUSABLE or len(optimizer.param_groups) != 1:
        return None
    if optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks:
        return None
    group = optimizer.param_groups[0]
    if len(group["params"]) != 1 or p.grad is None or p.grad.is_sparse:
        return None
    hyper = []
    for name, value in group.items():
        if name == "params":
            continue
        if isinstance(value, torch.Tensor):
            return None
        hyper.append((name, value))
    for name, default in _DEFAULT_ONLY.items():
        if group.get(name) is not default:
            return None
    hyper.sort(key=_first)
    return (type(optimizer), tuple(hyper), p.device, p.dtype)


def _first(item: tuple) -> Any:
    return item[0]


class _Plan:
    """
    The fused steps of one list of parameters, kept while nothing they were made from changes:
    each parameter's optimizer, its parameter group (by value: a changed learning rate makes a
    new plan), its state dictionary (Pyro's ``set_state`` replaces them) and a dense gradient.
    Checking that is a few identity tests per parameter, instead of grouping them afresh.
    """

    def __init__(self, optim: PyroOptim, params: List[torch.Tensor], fused: list) -> None:
        #: The fused optimizers, each with the state it was given (its parameters' own) and
        #: its kernel called directly (or ``None``).
        self.fused = [(f, f.state, _Kernel.of(f)) for f in fused]
        self.params = list(params)
        self.optimizers: List[Any] = [optim.optim_objs[p] for p in params]
        # Copies of the groups (the hyperparameters when planned; "params" is the same list).
        self.groups = [[dict(g) for g in opt.param_groups] for opt in self.optimizers]
        self.states = [opt.state[p] for p, opt in zip(params, self.optimizers)]

    def fits(self, optim: PyroOptim, params: List[torch.Tensor]) -> bool:
        """Whether the plan still takes exactly the update of ``params`` that grouping them
        afresh would."""
        if len(params) != len(self.params):
            return False
        objs, clip = optim.optim_objs, optim.grad_clip
        for p, planned, opt, groups, state in zip(
            params, self.params, self.optimizers, self.groups, self.states
        ):
            grad = p.grad
            if (
                p is not planned
                or grad is None
                or grad.is_sparse
                or clip.get(p) is not None
                or opt._optimizer_step_pre_hooks
                or opt._optimizer_step_post_hooks
                or opt.state.get(p) is not state
                or opt.param_groups != groups
                or objs.get(p) is not opt
            ):
                return False
        return True


class _Kernel:
    """
    The fused Adam or AdamW kernel of a fused optimizer's next steps, called directly: what
    ``optimizer.step()`` does once its state exists (the step counts incremented, then the
    kernel on the parameters, gradients and moments), without the wrapper around it (profiler
    record, step hooks, grouping by device), a fixed cost that a small step notices. The same
    kernel on the same tensors: the same update, bitwise. Planned after a first step by the
    optimizer itself, which creates the state.
    """

    def __init__(self, kernel: Callable, params: list, states: list, hyper: dict) -> None:
        self.kernel, self.params, self.states, self.hyper = kernel, params, states, hyper
        #: Whether the kernel refused its arguments once (the optimizer steps from then on).
        self.refused = False

    @classmethod
    def of(cls, fused: torch.optim.Optimizer) -> Optional[_Kernel]:
        """The direct call of ``fused``'s kernel (its state made by a first step), or ``None``
        where torch has none to call (another version's private operators)."""
        group = fused.param_groups[0]
        adamw = type(fused) is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
        kernel = getattr(torch, "_fused_adamw_" if adamw else "_fused_adam_", None)
        if kernel is None:
            return None
        params = list(group["params"])
        states = [fused.state[p] for p in params]
        beta1, beta2 = group["betas"]
        hyper = dict(amsgrad=group["amsgrad"], lr=group["lr"], beta1=beta1, beta2=beta2,
                     weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=group["maximize"])  # fmt: skip
        return cls(kernel, params, states, hyper)

    def step(self) -> bool:
        """One step; ``False`` (nothing changed) if the kernel refuses its arguments."""
        if self.refused:
            return False
        states = self.states
        steps = [s["step"] for s in states]
        amsgrad = self.hyper["amsgrad"]
        torch._foreach_add_(steps, 1)
        try:
            self.kernel(
                self.params,
                [p.grad for p in self.params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
                steps,
                **self.hyper,
            )
        except (TypeError, RuntimeError):  # another signature: step through the optimizer
            torch._foreach_sub_(steps, 1)
            self.refused = True
            return False
        return True


class FusedSteps:
    """
    The optimizer-step layer of :class:`~pyro_wakesleep.WakeSleep`: takes a PyroOptim's update
    of a list of parameters, fused where it can (see the module's docstring), and by the
    PyroOptim itself otherwise. Its state is the fused optimizers it built, one per group of
    parameters, and the plan of the last steps of each list of parameters (remade when a
    parameter's optimizer, hyperparameters or state changes); the optimizer state proper stays
    in Pyro's per-parameter optimizers.

    :param enabled: ``False`` steps every parameter by its PyroOptim (Pyro's own stepping,
        bitwise).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._fused: Dict[Hashable, torch.optim.Optimizer] = {}
        self._unsupported: set = set()
        self._plans: Dict[Hashable, _Plan] = {}

    def __call__(self, optim: PyroOptim, params: List[torch.Tensor]) -> None:
        """
        Update ``params`` with ``optim``, as ``optim(params)`` does.

        :param optim: the PyroOptim; its per-parameter optimizers must exist already (see
            :func:`~pyro_wakesleep.optimizers.make_optimizers`) for the fused path.
        :param params: the parameters, their gradients in ``.grad``.
        """
        if not self.enabled or type(optim) is not PyroOptim:
            optim(params)
            return
        key = (id(optim), *map(id, params))
        plan = self._plans.get(key)
        if plan is not None and plan.fits(optim, params):
            for fused, state, kernel in plan.fused:
                if kernel is None or not kernel.step():
                    fused.state = state  # a fused optimizer may serve more than one plan
                    fused.step()
            return
        self._plans.pop(key, None)
        groups: Dict[Hashable, List[torch.Tensor]] = {}
        rest: List[torch.Tensor] = []
        for p in params:
            optimizer = optim.optim_objs.get(p)
            group_key = None
            if optimizer is not None and optim.grad_clip.get(p) is None:
                group_key = _group_key(optimizer, p)
            if group_key is None or group_key in self._unsupported:
                rest.append(p)
            else:
                groups.setdefault(group_key, []).append(p)
        stepped = []
        for group_key, members in groups.items():
            fused = self._step(optim, group_key, members)
            if fused is None:
                rest.extend(members)
            else:
                stepped.append(fused)
        if rest:
            optim(rest)
        else:
            if len(self._plans) >= _MAX_CACHED:
                self._plans.clear()
            self._plans[key] = _Plan(optim, params, stepped)

    def _step(
        self, optim: PyroOptim, key: Hashable, params: List[torch.Tensor]
    ) -> Optional[torch.optim.Optimizer]:
        """One fused step of ``params`` (one group): the fused optimizer that took it, or
        ``None`` if torch has no fused kernel for them (nothing was changed)."""
        cls, hyper = key[0], key[1]  # type: ignore[index]
        cache_key = (key, tuple(id(p) for p in params))
        fused = self._fused.get(cache_key)
        held = [] if fused is None else fused.param_groups[0]["params"]
        if fused is None or any(a is not b for a, b in zip(held, params)):  # ids reused
            fused = self._build(cls, hyper, params)
            if fused is None:
                self._unsupported.add(key)
                return None
            if len(self._fused) >= _MAX_CACHED:
                self._fused.clear()  # groups that change at every step: keep memory bounded
            self._fused[cache_key] = fused
        # The state is the per-parameter optimizers' own, shared (not copied): read afresh
        # when planning, since Pyro's set_state (a resume) replaces those dictionaries.
        state: Dict[torch.Tensor, Any] = {}
        for p in params:
            own = optim.optim_objs[p].state[p]
            step = own.get("step")
            if step is not None and (step.device != p.device or step.dtype != torch.float32):
                # The fused kernel keeps the step count on the parameter's device, in float32.
                own["step"] = step.to(device=p.device, dtype=torch.float32)
            state[p] = own
        fused.state = state  # type: ignore[assignment]
        fused.step()
        return fused

    @staticmethod
    def _build(cls: type, hyper: tuple, params: List[torch.Tensor]) -> Optional[Any]:
        """A fused optimizer of class ``cls`` over ``params`` with Pyro's hyperparameters
        ``hyper``, or ``None`` where torch has no fused kernel (device, dtype)."""
        accepted = inspect.signature(cls).parameters
        options = {k: v for k, v in hyper if k in accepted and k not in _DEFAULT_ONLY}
        try:
            fused = cls(params, fused=True, **options)
        except RuntimeError:  # torch: no fused kernel for these parameters
            return None
        # The group exactly as Pyro's optimizers hold it (AdamW's group has a key that its
        # constructor does not take).
        fused.param_groups[0].update({k: v for k, v in hyper if k not in _DEFAULT_ONLY})
        return fused
