"""
Which registered parameters are the model's (:math:`\\theta`, trained by wake-theta) and which
the guide's (:math:`\\phi`, trained by the phi objective): those each program's log-density
reaches through autograd. Registration alone misleads when a model registers the guide's
networks too, as Pyro's semi-supervised VAE does with ``pyro.module("ss_vae", self)``.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, List, Optional, Set, Tuple

import torch
from pyro.poutine import Trace

from . import objectives, traces

Params = Dict[str, torch.Tensor]


class ParameterOwners:
    """
    The split of parameters between model and guide, worked out from the programs' autograd
    graphs when both are at hand (always at the first computation) and kept for that set of
    parameter names; for a new set without both graphs, a parameter that one side's graph
    reaches is that side's, and the registrations say the rest.
    """

    def __init__(self) -> None:
        self._known: Dict[FrozenSet[str], Tuple[Set[str], Set[str]]] = {}

    def split(
        self,
        model_graph: Optional[torch.Tensor],
        guide_graph: Optional[torch.Tensor],
        theta: Params,
        phi: Params,
    ) -> Tuple[Params, Params]:
        """
        :param model_graph: a scalar computed from the model's log-density, or ``None``.
        :param guide_graph: a scalar computed from the guide's log-density, or ``None``.
        :param theta: the parameters the model's traces registered, by name.
        :param phi: the parameters the guide's traces registered, by name.
        :returns: the model's and the guide's parameters.
        """
        candidates = {**theta, **phi}
        key = frozenset(candidates)
        if key in self._known:
            model_names, guide_names = self._known[key]
        elif not (_has_grad(model_graph) or _has_grad(guide_graph)):
            return theta, phi
        else:
            model_reach = _reached(model_graph, candidates)
            guide_reach = _reached(guide_graph, candidates)
            model_names = (
                model_reach if model_reach is not None else set(theta) - (guide_reach or set())
            )
            guide_names = (
                guide_reach if guide_reach is not None else set(phi) - (model_reach or set())
            )
            if model_reach is not None and guide_reach is not None:
                self._known[key] = (model_names, guide_names)
        return (
            {n: p for n, p in candidates.items() if n in model_names},
            {n: p for n, p in candidates.items() if n in guide_names},
        )


def density(programs: List[Trace], graphs: bool) -> Optional[torch.Tensor]:
    """The summed log-density of traces, when they were traced for their graphs."""
    if not graphs or not programs:
        return None
    return sum(objectives.trace_log_prob_sum(t) for t in programs)  # type: ignore[return-value]


def _has_grad(loss: Optional[torch.Tensor]) -> bool:
    return loss is not None and loss.requires_grad


def _reached(loss: Optional[torch.Tensor], params: Params) -> Optional[Set[str]]:
    return traces.tensors_reached(loss, params) if _has_grad(loss) else None  # type: ignore
