"""
The Pyro plumbing of wake-sleep, written once: the particle plate, guide samples without a
gradient path, the guide-then-model replay, a probe run that leaves no trace, the plate-nesting
guess and the parameters a trace touched. :class:`~pyro_wakesleep.WakeSleepLoss` and
:mod:`pyro_wakesleep.evaluate` build on these.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional, Set, Tuple

import pyro
import torch
from pyro import poutine
from pyro.distributions import util as dist_util
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from torch.utils import _pytree as pytree

from .objectives import PARTICLE_PLATE, sample_sites


class DetachSamples(Messenger):
    """Draw each latent sample of the guide without a gradient path through the sample itself.

    Wake-phi differentiates :math:`\\log q_\\phi(z \\mid x)` at fixed :math:`z`; a
    reparameterized draw must not carry :math:`\\phi` into :math:`z` (nor into later guide
    sites computed from it).
    """

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"]:
            return
        if msg["value"] is None:
            msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"])
        if isinstance(msg["value"], torch.Tensor):
            msg["value"] = msg["value"].detach()


def particle_plate(fn: Callable, size: int, dim: int) -> Callable:
    """``fn`` run inside a plate of ``size`` particles at ``dim`` (left of the model's own
    plates), so that one run draws every particle."""

    def vectorized(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate(PARTICLE_PLATE, size, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def trace_replayed(fn: Callable, trace: Trace, args: tuple, kwargs: dict) -> Trace:
    """Trace ``fn`` with the values of ``trace`` at the sites they share."""
    return poutine.trace(poutine.replay(fn, trace=trace)).get_trace(*args, **kwargs)


def guide_then_model(
    model: Callable, guide: Callable, args: tuple, kwargs: dict, guide_grad: bool = True
) -> Tuple[Trace, Trace]:
    """
    Trace the guide, then the model replayed on the guide's samples.

    :param guide_grad: whether the guide's run records gradients (when gradients are on).
    :returns: ``(model_trace, guide_trace)``.
    """
    with torch.set_grad_enabled(guide_grad and torch.is_grad_enabled()):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    return trace_replayed(model, guide_trace, args, kwargs), guide_trace


def probe(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    handler: Optional[Messenger] = None,
) -> Tuple[Trace, Trace]:
    """
    Run the guide, then the model on the guide's sample, outside any step: without gradients
    or Pyro's validation, hidden from outer handlers (``handler``, if given, sees the run), and
    leaving the random streams as they were, so that a probe never changes what a training run
    draws.

    :returns: ``(model_trace, guide_trace)``.
    """
    devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda]
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices):
        with dist_util.validation_enabled(False), handler or contextlib.nullcontext():
            return guide_then_model(model, guide, args, kwargs)


def probe_model(model: Callable, args: tuple, kwargs: dict) -> Trace:
    """Run the model alone outside any step, as :func:`probe` runs guide and model."""
    devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda]
    with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices):
        with dist_util.validation_enabled(False):
            return poutine.trace(model).get_trace(*args, **kwargs)


def plate_nesting(*traces: Trace) -> int:
    """
    How many dimensions, counted from the right, the model's and guide's batch shapes use:
    the depth of their vectorized plates, or of a batch shape or a value (an observation that a
    distribution broadcasts against) that reaches further left. A particle plate just left of
    it lines up with nothing of the model's.
    """
    depth = 0
    for trace in traces:
        for site in sample_sites(trace):
            dims = [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
            dims.append(len(site["fn"].batch_shape))
            value, event_dim = site["value"], getattr(site["fn"], "event_dim", 0)
            if isinstance(value, torch.Tensor):  # an observation broadcast against its fn
                dims.append(value.dim() - event_dim)
            depth = max([depth] + dims)
    return depth


def params(trace: Trace) -> Dict[str, torch.Tensor]:
    """The unconstrained parameters a trace touched, by name."""
    return {
        name: site["value"].unconstrained()  # type: ignore[union-attr]
        for name, site in trace.nodes.items()
        if site["type"] == "param"
    }


def tensors_reached(loss: torch.Tensor, params: Dict[str, torch.Tensor]) -> Set[str]:
    """
    The names of ``params`` that ``loss`` depends on through autograd (a walk of its graph
    back to the leaves): the parameters its gradient reaches. Which trace registered a
    parameter does not say which objective uses it (a model may register a whole module,
    encoder included, as Pyro's semi-supervised VAE does); the graph does.
    """
    leaves = {id(p): name for name, p in params.items()}
    found: Set[str] = set()
    seen: Set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in leaves:
            found.add(leaves[id(variable)])
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def latent_leaves(trace: Trace) -> Dict[str, torch.Tensor]:
    """Make the floating-point latent values of a (fantasy) trace leaves of the autograd
    graph, in place; returns them by site name."""
    leaves = {}
    for site in sample_sites(trace):
        value = site["value"]
        if site["is_observed"] or site["infer"].get("was_observed"):
            continue
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            site["value"] = leaves[site["name"]] = value.detach().clone().requires_grad_(True)
    return leaves


def fantasy_leaves(real: Any, given: Any) -> Tuple[tuple, dict, Dict[str, torch.Tensor]]:
    """
    The guide's sleep-phase arguments ``given = (args, kwargs)`` with every floating-point
    tensor that is not one of the ``real`` arguments (the fantasy, in whatever place it was
    put) replaced by a copy that is a leaf of the autograd graph.

    :returns: ``(args, kwargs, leaves by position)``.
    """
    real_ids = {id(t) for t in pytree.tree_leaves(real) if isinstance(t, torch.Tensor)}
    leaves: Dict[str, torch.Tensor] = {}

    def lift(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in real_ids:
            leaf = t.detach().clone().requires_grad_(True)
            leaves[f"argument {len(leaves)}"] = leaf
            return leaf
        return t

    args, kwargs = pytree.tree_map(lift, given)
    return tuple(args), dict(kwargs), leaves
