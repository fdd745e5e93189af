r"""
Drawing the particles of each phase: :math:`K` guide samples of the real data with the model
replayed on them (the wake phase), and :math:`S` fantasies :math:`(z, x) \sim p_\theta` with
the guide scored on them (the sleep phase); at once along a particle plate, or one at a time
for programs that read sampled values into Python (stochastic control flow).
:class:`~pyro_wakesleep.WakeSleepLoss` turns the traces into its objectives.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from pyro import poutine
from pyro.poutine import Trace

from . import checks, objectives, traces
from .defensive import draw as defensive_draw
from .fantasies import FantasyArgsFn, draw_fantasy, guide_arguments

#: ``nesting(with_guide)``: the programs' ``max_plate_nesting`` (of the model alone when
#: ``with_guide`` is false), asked only when particles are vectorized.
NestingFn = Callable[[bool], int]

# How torch refuses to read a batch of values (a particle batch) as one Python value.
_VALUE_READS = (
    "cannot be converted to Scalar",
    "only one element tensors can be converted",
    "Boolean value of Tensor with more than one value is ambiguous",
)


def reads_values(error: BaseException) -> bool:
    """Whether ``error`` is torch refusing to read a batch of values as one Python value."""
    return any(text in str(error) for text in _VALUE_READS)


def wake_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    vectorize: bool,
    nesting: NestingFn,
    guide_grad: bool,
    defensive: float = 0.0,
) -> Tuple[List[Trace], List[Trace], bool]:
    """
    The guide's traces of the real data and the model's traces replayed on them, one pair per
    particle, or one pair holding every particle along a plate left of the programs' own.

    :param guide_grad: trace the guide's density with a gradient (its samples detached).
    :param defensive: the probability that a particle is drawn from the model's prior instead
        (defensive sampling, :mod:`pyro_wakesleep.defensive`).
    :returns: ``(model_traces, guide_traces, vectorized)``. ``vectorized`` is false when the
        particles were asked vectorized but the programs read a sampled value into Python:
        they were then drawn one at a time, from the random state the call started with,
        with a warning.
    """
    K = num_particles
    vectorized = vectorize and K > 1
    wrapped_model, wrapped_guide = model, guide
    if vectorized:
        dim = -nesting(True) - 1
        wrapped_guide = traces.particle_plate(guide, K, dim)
        wrapped_model = traces.particle_plate(model, K, dim)
    if guide_grad:
        # Outside the particle plate, so that each sample is drawn after broadcasting.
        wrapped_guide = traces.DetachSamples()(wrapped_guide)
    model_traces, guide_traces = [], []
    for _ in range(1 if vectorized else K):
        rng = torch.get_rng_state()
        try:
            if defensive:
                plate = (K, dim) if vectorized else None
                model_trace, guide_trace = defensive_draw(
                    model,
                    guide,
                    args,
                    kwargs,
                    defensive=defensive,
                    particles=plate,
                    guide_grad=guide_grad,
                )
            else:
                model_trace, guide_trace = traces.guide_then_model(
                    wrapped_model, wrapped_guide, args, kwargs, guide_grad=guide_grad
                )
        except Exception as error:
            if not (vectorized and reads_values(error)):
                raise
            torch.set_rng_state(rng)
            warnings.warn(
                "The model or guide reads a sampled value into Python (stochastic control "
                f"flow: {checks.brief(error)}), which vectorized particles cannot do: "
                "WakeSleep draws the particles one at a time from now on. Pass "
                "vectorize_particles=False to say so and avoid this warning.",
                RuntimeWarning,
                stacklevel=checks.user_stacklevel(),
            )
            return wake_traces(
                model,
                guide,
                args,
                kwargs,
                num_particles=K,
                vectorize=False,
                nesting=nesting,
                guide_grad=guide_grad,
                defensive=defensive,
            )
        checks.check_sites(model_trace, guide_trace, "wake")
        model_traces.append(model_trace)
        guide_traces.append(guide_trace)
    return model_traces, guide_traces, vectorized


def sleep_traces(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    num_particles: int,
    vectorize: bool,
    nesting: NestingFn,
    with_observations: bool,
    fantasy_args: Optional[FantasyArgsFn],
    first: bool = False,
) -> Tuple[torch.Tensor, List[Trace]]:
    r"""
    Fantasies from the model and the guide scored on them.

    :param num_particles: :math:`S`, the fantasies per data point.
    :param vectorize: draw them at once (only for a guide with an ``observations`` keyword,
        whose plate sizes then follow the fantasies).
    :param with_observations: whether the guide takes ``observations=``.
    :param first: the first computation: the model's density is traced with a graph and the
        fantasy is made of autograd leaves, so that a guide that does not read it shows (a
        warning) and which parameters each program's density reaches can be worked out.
    :returns: :math:`\sum_s \log q_\phi(z_s \mid x_s)` and the traces, a model trace and a
        guide trace per draw.
    """
    S = num_particles
    vectorized = vectorize and S > 1 and with_observations
    if vectorized:
        dim = -nesting(False) - 1
        model = traces.particle_plate(model, S, dim)
        guide = traces.particle_plate(guide, S, dim)
    log_q: Any = None
    drawn: List[Trace] = []
    for _ in range(1 if vectorized else S):
        lift = first and not drawn
        if lift:
            # The model's density with a graph; the guide gets the fantasy as leaves (below),
            # so no gradient reaches the model from the sleep loss.
            model_trace = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
        else:
            model_trace = draw_fantasy(model, *args, **kwargs)
        fantasy: Dict[str, torch.Tensor] = traces.latent_leaves(model_trace) if lift else {}
        guide_args, guide_kwargs = guide_arguments(
            model_trace,
            args,
            kwargs,
            use_observations_keyword=with_observations,
            fantasy_args=fantasy_args,
        )
        if lift:
            guide_args, guide_kwargs, data = traces.fantasy_leaves(
                (args, kwargs), (guide_args, guide_kwargs)
            )
            fantasy.update(data)
        guide_trace = traces.trace_replayed(guide, model_trace, guide_args, guide_kwargs)
        checks.check_sites(model_trace, guide_trace, "sleep")
        if not drawn:
            checks.check_guide_density(guide_trace, "sleep")
            if fantasy:
                checks.warn_if_data_independent(guide_trace, fantasy)
        term = objectives.trace_log_prob_sum(guide_trace)
        log_q = term if log_q is None else log_q + term
        drawn += [model_trace, guide_trace]
    return log_q, drawn
