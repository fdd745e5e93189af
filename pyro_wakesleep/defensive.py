r"""
Defensive importance sampling in the wake phase: the particles come from a mixture of the
guide and the model's prior, so that the weights stay bounded where the guide has (almost) no
mass, and wake-phi can teach the guide about regions it never visits.

With ``defensive`` :math:`d \in (0, 1)` the wake proposal of a data point :math:`x` is

.. math:: r(z \mid x) = (1 - d)\, q_\phi(z \mid x) + d\, p_\theta(z) ,

where :math:`p_\theta(z)` is the density of the model's latent sites only (its observed sites
left out). Each of the :math:`K` particles is drawn from the prior with probability :math:`d`
and from the guide otherwise, and the importance weights are taken against the mixture,

.. math:: w_k = \frac{p_\theta(x, z_k)}{r(z_k \mid x)}, \qquad
   \log r = \operatorname{logaddexp}\big(\log(1 - d) + \log q_\phi(z \mid x),\;
   \log d + \log p_\theta(z)\big) .

Both wake objectives use these weights: wake-theta is :math:`-\log \frac1K \sum_k w_k`, and
wake-phi keeps its form :math:`-\sum_k \bar w_k \log q_\phi(z_k \mid x)` with :math:`\bar w`
the self-normalized mixture weights (held fixed), so particles from the prior that land where
:math:`q_\phi` has little mass pull the guide there (Le et al. 2019). Since
:math:`r \ge d\, p_\theta(z)`, every weight is at most :math:`p_\theta(x \mid z) / d`
(Hesterberg 1995): no particle's weight can explode, and :math:`\frac1K \sum_k w_k` is an
unbiased estimate of :math:`p_\theta(x)` even where the guide has no mass at all on part of
the posterior (plain importance sampling then misses that part and is biased low). The
proposal :math:`r` is held fixed in the gradients, as the guide is without this option.

**One component indicator per particle, shared by the batch.** A particle's latents come
wholly from the prior or wholly from the guide, and that choice is the same for every data
point of the batch: particle :math:`k` of data point :math:`i` is drawn from
:math:`p_\theta(z_i)` with probability :math:`d` and from :math:`q_\phi(z_i \mid x_i)`
otherwise, which is the mixture :math:`r(z_i \mid x_i)` for that data point alone. Each data
point's estimate is therefore unbiased, as above; the estimates of two data points are
correlated through the shared indicators (the same particles are prior draws for both), which
changes the variance of their sum, not its mean. The choice is made once per particle because
a particle is one run of the programs (one trace, global latents included, and one at a time
possibly of its own structure), which one component must produce as a whole.

**Drawing.** Vectorized particles are drawn at once: the guide's particles, then the model's
prior particles (its latents from the prior, its observed sites conditioned on the data, and
any subsample the guide drew), then the indicator picks, particle by particle, which value each
latent site takes; the guide and the model are then replayed on the picked values, which
scores every particle under both programs. One at a time (stochastic control flow), each
particle is either the guide's draw with the model replayed on it, or the model's prior draw
with the guide and the model replayed on it. Vectorized, the guide and the model each run
twice (a draw, then the replay): about twice the cost of the wake phase without the option.
The vectorized indicators are tensors, so such a step can be recorded (``jit=True``); one at a
time, each indicator is read into Python, and the step runs eagerly. A guide with auxiliary
sites (an autoguide's unconstrained draws) cannot score a prior particle and is refused.

References

- [1] T. C. Hesterberg, "Weighted average importance sampling and defensive mixture
  distributions", Technometrics 37(2) (1995).
- [2] T. A. Le, A. R. Kosiorek, N. Siddharth, Y. W. Teh, F. Wood, "Revisiting Reweighted
  Wake-Sleep for Models with Stochastic Control Flow", UAI 2019.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Callable, List, Optional, Tuple

import torch
from pyro import poutine
from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample

from . import objectives, traces


def check_defensive(defensive: Any, num_particles: int) -> float:
    """
    ``defensive`` as a float, if it is a number in :math:`[0, 1)`, and positive only with
    more than one particle.

    :raises ValueError: naming ``defensive`` (and ``num_particles``).
    """
    d = float(defensive) if isinstance(defensive, Real) and not isinstance(defensive, bool) else -1
    if not 0.0 <= d < 1.0:
        raise ValueError(
            "defensive must be a float d in [0, 1), the probability that a wake particle is "
            f"drawn from the model's prior rather than the guide, got {defensive!r}"
        )
    if d > 0 and num_particles < 2:
        raise ValueError(
            f"defensive={defensive!r} needs num_particles > 1: the mixture proposal is "
            "importance sampling over several particles (reweighted wake-sleep). Use "
            "num_particles > 1 with defensive > 0, or defensive=0.0."
        )
    return d


def draw(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    defensive: float,
    particles: Optional[Tuple[int, int]],
    guide_grad: bool,
) -> Tuple[Trace, Trace]:
    """
    The wake particles drawn from the mixture, as
    :func:`~pyro_wakesleep.traces.guide_then_model` draws them from the guide.

    :param defensive: :math:`d`, the probability of a prior particle.
    :param particles: ``(K, dim)``: draw :math:`K` particles at once along a particle plate at
        ``dim``; ``None``: draw one particle.
    :param guide_grad: trace the guide's density with a gradient (the samples have none).
    :returns: ``(model_trace, guide_trace)``, both replayed on the drawn values.
    """
    if particles is not None:
        K, dim = particles
        model, guide = traces.particle_plate(model, K, dim), traces.particle_plate(guide, K, dim)
        from_prior = torch.rand(K) < defensive
        with torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            prior_trace = _prior_trace(model, _subsamples(guide_trace), args, kwargs)
        source = _picked(guide_trace, prior_trace, from_prior, -dim - 1)
    elif bool(torch.rand(()) < defensive):  # one particle: a Python choice of component
        with torch.no_grad():
            source = _prior_trace(model, Trace(), args, kwargs)
    else:
        guide = traces.DetachSamples()(guide) if guide_grad else guide
        source = None
    replayed = guide if source is None else poutine.replay(guide, trace=source)
    model_trace, guide_trace = traces.guide_then_model(model, replayed, args, kwargs, guide_grad)
    _refuse_auxiliary(guide_trace)
    return model_trace, guide_trace


def log_proposal(
    weights: objectives.LogWeights,
    defensive: float,
    model_traces: List[Trace],
    guide_traces: List[Trace],
    max_plate_nesting: Optional[int],
    vectorized: bool,
) -> Optional[torch.Tensor]:
    r"""
    :math:`\log r(z_k \mid x)` per particle and data point, shaped as ``weights.log_q``, with
    no gradient; ``None`` when ``defensive`` is 0 (the proposal is the guide).

    :param weights: the wake log-densities (:func:`~pyro_wakesleep.objectives.log_weights`)
        of the same traces.
    """
    if not defensive:
        return None
    with torch.no_grad():
        # log p(z): the same reduction over the same plates, with the observed sites masked.
        latents = [_latents_only(t) for t in model_traces]
        log_pz = objectives.log_weights(latents, guide_traces, max_plate_nesting, vectorized).log_p
        return torch.logaddexp(
            math.log1p(-defensive) + weights.log_q.detach(), math.log(defensive) + log_pz
        )


def _prior_trace(model: Callable, subsamples: Trace, args: tuple, kwargs: dict) -> Trace:
    """The model's own draw of its latents (detached), its observed sites conditioned on the
    data, on the subsample indices of ``subsamples``."""
    replayed = poutine.replay(traces.DetachSamples()(model), trace=subsamples)
    return poutine.trace(replayed).get_trace(*args, **kwargs)


def _subsamples(trace: Trace) -> Trace:
    """A trace of the subsample sites of ``trace`` alone."""
    kept = Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and site_is_subsample(site):
            kept.add_node(name, **site)
    return kept


def _picked(
    guide_trace: Trace, prior_trace: Trace, from_prior: torch.Tensor, nesting: int
) -> Trace:
    """The guide's trace with each latent site's value taken from ``prior_trace`` for the
    particles ``from_prior`` (a boolean of shape ``(K,)``)."""
    picked = guide_trace.copy()
    for site in objectives.sample_sites(guide_trace):
        name = site["name"]
        if site["is_observed"] or name not in prior_trace.nodes:
            continue  # check_sites names a guide site the model does not have
        value, prior = site["value"], prior_trace.nodes[name]["value"]
        if not isinstance(prior, torch.Tensor) or prior.shape != value.shape:
            raise ValueError(
                f"defensive: the guide draws site '{name}' with shape {tuple(value.shape)} but "
                f"the model's prior draws it with shape {tuple(getattr(prior, 'shape', ()))}; "
                "the guide must sample each latent with the model's shape (its plates)."
            )
        event_dim = getattr(site["fn"], "event_dim", 0)
        mask = from_prior.to(value.device).reshape((-1,) + (1,) * (nesting + event_dim))
        picked.nodes[name] = {**site, "value": torch.where(mask, prior, value)}
    return picked


def _latents_only(trace: Trace) -> Trace:
    """A copy of a model trace whose observed sites contribute zero log-density."""
    copy = trace.copy()
    for site in objectives.sample_sites(trace):
        if site["is_observed"] or site["infer"].get("was_observed"):
            copy.nodes[site["name"]] = {**site, "mask": False}
    return copy


def _refuse_auxiliary(guide_trace: Trace) -> None:
    auxiliary = [
        s["name"]
        for s in objectives.sample_sites(guide_trace)
        if s["infer"].get("is_auxiliary") and not s["is_observed"]
    ]
    if auxiliary:
        raise ValueError(
            f"defensive sampling needs a guide that scores any value of the model's latents, "
            f"but the guide has auxiliary sites ({', '.join(repr(n) for n in auxiliary[:3])}), "
            "as an autoguide does: the auxiliary values behind a prior particle are unknown. "
            "Use defensive=0.0, or a guide that samples each latent site itself."
        )
