"""
The Pyro plumbing of wake-sleep, written once: the particle plate, guide samples without a
gradient path, the guide-then-model replay, a probe run that leaves no trace, the plate-nesting
guess and the parameters a trace touched. :class:`~pyro_wakesleep.WakeSleepLoss` and
:mod:`pyro_wakesleep.evaluate` build on these.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Optional, Tuple

import pyro
import torch
from pyro import poutine
from pyro.distributions import util as dist_util
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger

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


def plate_nesting(*traces: Trace) -> int:
    """
    How many dimensions, counted from the right, the model's and guide's batch shapes use:
    the depth of their vectorized plates, or of a batch shape that reaches further left. A
    particle plate just left of it lines up with nothing of the model's.
    """
    depth = 0
    for trace in traces:
        for site in sample_sites(trace):
            dims = [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None]
            depth = max([depth, len(site["fn"].batch_shape)] + dims)
    return depth


def params(trace: Trace) -> Dict[str, torch.Tensor]:
    """The unconstrained parameters a trace touched, by name."""
    return {
        name: site["value"].unconstrained()  # type: ignore[union-attr]
        for name, site in trace.nodes.items()
        if site["type"] == "param"
    }
