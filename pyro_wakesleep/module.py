"""
:class:`WakeSleepModule`: the wake-sleep objective as a :class:`torch.nn.Module`, for plain
torch optimizers, :class:`~torch.nn.parallel.DistributedDataParallel` and training
frameworks (in the spirit of Pyro's ``ELBOModule``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, List, Optional

import torch
from torch import nn

from .loss import WakeSleepLoss
from .wake_sleep import WakeSleep


def _owner(fn: Callable) -> Optional[nn.Module]:
    """The nn.Module a model or guide belongs to: itself, or the object of a bound method."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


class WakeSleepModule(nn.Module):
    """
    The objective of one wake-sleep step as a module: ``forward(*args, **kwargs)`` returns the
    scalar :meth:`WakeSleep.differentiable_loss`, whose gradient is the wake-theta gradient on
    the model's parameters and the phi gradient on the guide's::

        hm = HelmholtzMachine([784, 200])
        objective = WakeSleepModule(hm.model, hm.guide)
        optimizer = torch.optim.Adam(objective.parameters(), lr=1e-3)
        for x in batches:
            optimizer.zero_grad()
            objective(x).backward()
            optimizer.step()

    Under :class:`~torch.nn.parallel.DistributedDataParallel`, which averages gradients over
    processes, wrap the module as it is: ``DistributedDataParallel(objective)``.

    Its parameters are those of the ``nn.Module``\\ s the model and guide belong to (the
    module itself, or the object of a bound method such as ``hm.model``), plus any given as
    ``modules``. The first call checks that every parameter the model and guide use is among
    them: a bare ``pyro.param`` lives only in Pyro's parameter store, where a torch optimizer
    or DDP would not see it.

    ``WakeSleepLoss(...)(model, guide)`` gives one, as ``ELBO.__call__`` gives an
    ``ELBOModule``.

    :param model: the model.
    :param guide: the guide.
    :param modules: further ``nn.Module``\\ s holding parameters of the model or guide.
    :param loss: the :class:`~pyro_wakesleep.WakeSleepLoss`; or give its options as
        ``kwargs``.
    :param kwargs: the estimator's options, as for :class:`WakeSleep` (``num_particles``,
        ``phi_objective``, ``max_plate_nesting``, ``jit``, ...; no optimizer).
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        modules: Iterable[nn.Module] = (),
        loss: Optional[WakeSleepLoss] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        members: List[nn.Module] = []
        for m in [_owner(model), _owner(guide), *modules]:
            if m is not None and all(m is not other for other in members):
                members.append(m)
        self.members = nn.ModuleList(members)
        # A plain attribute (not a submodule): the estimator holds no parameters itself.
        self.wake_sleep = WakeSleep(model, guide, None, loss=loss, **kwargs)
        self._checked = False

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """
        :returns: the scalar wake-sleep surrogate loss of a step on ``args`` and ``kwargs``.
        """
        if not self._checked:
            self._check_parameters(args, kwargs)
        return self.wake_sleep.differentiable_loss(*args, **kwargs)

    def _check_parameters(self, args: tuple, kwargs: dict) -> None:
        own = {id(p) for p in self.parameters()}
        ws = self.wake_sleep
        params = ws.loss.params(ws.model, ws.guide, args, kwargs)
        outside = [name for name, p in params.items() if id(p) not in own]
        if outside:
            raise ValueError(
                "WakeSleepModule: parameter(s) "
                + ", ".join(f"'{n}'" for n in sorted(outside))
                + " belong to no nn.Module of this objective, so a torch optimizer or "
                "DistributedDataParallel would not train them. Hold them in an nn.Module "
                "(registered with pyro.module, or a PyroModule) and pass it as modules=[...]."
            )
        self._checked = True
