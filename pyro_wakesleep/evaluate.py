r"""
Evaluating a fitted model: the log marginal likelihood :math:`\log p_\theta(x_i)` of each data
point, estimated by importance sampling with the guide as proposal, or computed exactly by
enumerating the latents of a small discrete model.

**Importance sampling** (:func:`importance_log_likelihood`, :func:`evaluate_dataset`). With
:math:`S` draws :math:`z_{is} \sim q_\phi(z \mid x_i)` and weights
:math:`w_{is} = p_\theta(x_i, z_{is}) / q_\phi(z_{is} \mid x_i)`,

.. math::

    \widehat{\log p}(x_i) = \log \frac1S \sum_{s=1}^S w_{is},

the estimator of Burda, Grosse & Salakhutdinov (2016) with :math:`K = S` large. Its mean is a
lower bound on :math:`\log p_\theta(x_i)` that tightens as :math:`S` grows (bias
:math:`\approx \mathrm{Var}(w) / (2 S\, \mathbb{E}[w]^2)`). Alongside, per data point:

* the effective sample size :math:`\mathrm{ESS}_i = (\sum_s w_{is})^2 / \sum_s w_{is}^2`
  (Kong 1992), between 1 and :math:`S`; it equals :math:`S` when the guide is the exact
  posterior, since every weight then equals :math:`p_\theta(x_i)`;
* the standard error of :math:`\widehat{\log p}(x_i)` by the delta method,
  :math:`\mathrm{sd}(w) / (\sqrt S\, \bar w)`; with the unbiased sample variance this is

  .. math:: \mathrm{se}_i = \sqrt{\frac{S / \mathrm{ESS}_i - 1}{S - 1}},

  computed from the running log-sum-exps of :math:`w` and :math:`w^2`, so it never forms a
  weight outside log space.

The particles are drawn ``chunk_size`` at a time along a vectorized particle plate (left of the
model's plates) without gradients, and reduced on the fly, so memory stays bounded by one
chunk however large ``num_samples`` is. Small chunks are also faster on CPU, down to where
Pyro's fixed cost per chunk shows: a large chunk's tensors are handed back to the system when
freed and faulted in afresh for the next chunk. The default, :data:`CHUNK_SIZE` = 25, keeps a
chunk of 100 binarized-MNIST digits under 8 MB per tensor. Measured for 1000 samples on 500
digits, two threads, each in a fresh process: 4.2 s with chunks of 25 against 6.6-6.7 s with
50 and 7.2-7.4 s with 500 (784-200); 9.1-10.1 s against 9.5-9.7 and 15.8-16.1 s
(784-200-200-200). The chunk size orders the random draws of a model with several latent
sites, so a seeded estimate reproduces with the same ``chunk_size`` (and batches).

A model or guide that reads a sampled value into Python (stochastic control flow) is evaluated
with ``vectorize_particles=False``: one particle at a time, still per data point (the
iterations of a sequential ``for i in pyro.plate(...)`` are data points as the indices of a
vectorized plate are); when vectorized particles were asked for and the programs read a value,
the evaluation falls back to that, with a warning.

**Exact enumeration** (:func:`exact_log_likelihood`, in :mod:`pyro_wakesleep.enumeration`
and re-exported here) computes :math:`\log p_\theta(x_i)` for small discrete models.

**Data points** are the indices of the plates that hold every sample site of the model and
guide (see :mod:`pyro_wakesleep.objectives`), flattened to one dimension :math:`N`. A model
with a latent outside its data plate (a global latent) couples the batch: the result then has
one entry, the joint :math:`\log p_\theta(x_1, \dots, x_N)`. Two nested plates that both hold
every site (data points and pixels, say) give one entry per pair of indices. The exact
computation ignores any scale on the sites; the importance estimate does too when every site
carries the same scale (as with ``subsample_size``), and otherwise weighs the scaled densities,
as :func:`pyro_wakesleep.objectives.log_weights` does. Evaluate without subsampling.

References

- [1] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
- [2] A. Kong, "A note on importance sampling using standardized weights", Technical Report 348,
  University of Chicago, Dept. of Statistics (1992).
- [3] A. B. Owen, *Monte Carlo theory, methods and examples* (2013), ch. 9 (importance sampling,
  effective sample size, the delta method for ratio estimates).
- [4] J. Bornschein, Y. Bengio, "Reweighted Wake-Sleep", ICLR 2015.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from pyro import poutine

from . import objectives
from .checks import brief, check_count, check_sites, user_stacklevel
from .enumeration import exact_log_likelihood
from .particles import reads_values
from .traces import guide_then_model, particle_plate, plate_nesting

__all__ = [
    "CHUNK_SIZE",
    "LogLikelihood",
    "evaluate_dataset",
    "exact_log_likelihood",
    "importance_log_likelihood",
]


#: The default number of importance samples drawn at once (see the module docs).
CHUNK_SIZE = 25


class LogLikelihood(NamedTuple):
    """
    Per-data-point estimates of :math:`\\log p_\\theta(x_i)` from importance sampling.

    :ivar log_px: the estimates :math:`\\log \\frac1S \\sum_s w_{is}`, shape ``(N,)``.
    :ivar stderr: their Monte Carlo standard errors (delta method), shape ``(N,)``.
    :ivar ess: the effective sample sizes :math:`(\\sum_s w_{is})^2 / \\sum_s w_{is}^2`,
        shape ``(N,)``.
    """

    log_px: torch.Tensor
    stderr: torch.Tensor
    ess: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        """:math:`\\sum_i \\widehat{\\log p}(x_i)`, the log-likelihood of the whole batch."""
        return self.log_px.sum()

    @property
    def total_stderr(self) -> torch.Tensor:
        """The standard error of :attr:`total`: the data points' errors are independent."""
        return self.stderr.pow(2).sum().sqrt()

    def mean(self) -> torch.Tensor:
        """The average log-likelihood per data point (nats)."""
        return self.log_px.mean()

    def mean_stderr(self) -> torch.Tensor:
        """The Monte Carlo standard error of :meth:`mean`."""
        return self.total_stderr / self.log_px.numel()

    @classmethod
    def cat(cls, parts: Sequence[LogLikelihood]) -> LogLikelihood:
        """Concatenate the results of several batches."""
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in cls._fields))


# ---------------------------------------------------------------------------- helpers


def _check_nesting(value: Optional[int]) -> None:
    if value is not None:
        check_count("max_plate_nesting", value, 0)


# ---------------------------------------------------------------------------- importance sampling


def importance_log_likelihood(
    model: Callable,
    guide: Callable,
    *args: Any,
    num_samples: int = 5000,
    chunk_size: int = CHUNK_SIZE,
    max_plate_nesting: Optional[int] = None,
    vectorize_particles: bool = True,
    **kwargs: Any,
) -> LogLikelihood:
    """
    Estimate :math:`\\log p_\\theta(x_i)` for every data point of a batch by importance
    sampling with the guide as proposal:

    .. math::

        \\widehat{\\log p}(x_i) = \\log \\frac1S \\sum_{s=1}^S
            \\frac{p_\\theta(x_i, z_{is})}{q_\\phi(z_{is} \\mid x_i)},
        \\qquad z_{is} \\sim q_\\phi(z \\mid x_i),

    with its standard error and effective sample size (see the module docs). The function
    evaluates whatever batch the model and guide are given (``model(*args, **kwargs)``); loop
    over a dataset with :func:`evaluate_dataset`. No gradients are taken, and the sample sites
    are hidden from any outer handler.

    :param model: the model; every latent site must be sampled by the guide.
    :param guide: the proposal :math:`q_\\phi(z \\mid x)`, with the model's arguments.
    :param args: the arguments of the model and guide (the data batch).
    :param num_samples: :math:`S`, the number of importance samples per data point.
    :param chunk_size: the number of samples drawn at once along a particle plate; memory grows
        with ``chunk_size`` times the size of one trace.
    :param max_plate_nesting: the number of nested plates of the model and guide; the particle
        plate goes just left of them. Guessed from one trace when ``None``.
    :param vectorize_particles: draw ``chunk_size`` samples at once along a particle plate;
        ``False`` draws them one at a time, for programs with stochastic control flow.
    :param kwargs: keyword arguments of the model and guide.
    :returns: :class:`LogLikelihood` with fields of shape ``(N,)``, in the dtype of the model's
        log-densities (accumulated in float64).
    :raises ValueError: when the guide does not sample exactly the model's latent sites.
    """
    check_count("num_samples", num_samples)
    check_count("chunk_size", chunk_size)
    _check_nesting(max_plate_nesting)
    kw = dict(kwargs)
    return _estimate(
        model, guide, args, kw, num_samples, chunk_size, max_plate_nesting, vectorize_particles
    )[0]


def _estimate(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    num_samples: int,
    chunk_size: int,
    max_plate_nesting: Optional[int],
    vectorize_particles: bool,
) -> Tuple[LogLikelihood, bool]:
    """:func:`importance_log_likelihood`, and whether the particles stayed vectorized."""
    with torch.no_grad(), poutine.block():
        if max_plate_nesting is None:
            max_plate_nesting = plate_nesting(*guide_then_model(model, guide, args, kwargs))
        dim = -(max_plate_nesting + 1)
        log_sum: Optional[torch.Tensor] = None  # log sum_s w_s, per data point
        log_sum_sq: Optional[torch.Tensor] = None  # log sum_s w_s^2
        dtype = None
        done = 0
        while done < num_samples:
            size = min(chunk_size, num_samples - done)
            rng = torch.get_rng_state()
            try:
                weights = _chunk(model, guide, args, kwargs, size, dim, vectorize_particles)
            except Exception as error:
                if not (vectorize_particles and reads_values(error)):
                    raise
                torch.set_rng_state(rng)
                vectorize_particles = False
                warnings.warn(
                    "The model or guide reads a sampled value into Python (stochastic control "
                    f"flow: {brief(error)}): evaluating one particle at a time. Pass "
                    "vectorize_particles=False to say so and avoid this warning.",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
                continue
            log_w = weights.log_p - weights.log_q
            dtype = log_w.dtype
            log_w = log_w.reshape(size, -1).double()
            chunk_sum = torch.logsumexp(log_w, 0)
            chunk_sum_sq = torch.logsumexp(2 * log_w, 0)
            if log_sum is None or log_sum_sq is None:
                log_sum, log_sum_sq = chunk_sum, chunk_sum_sq
            else:
                log_sum = torch.logaddexp(log_sum, chunk_sum)
                log_sum_sq = torch.logaddexp(log_sum_sq, chunk_sum_sq)
            done += size
    assert log_sum is not None and log_sum_sq is not None and dtype is not None
    return _summarize(log_sum, log_sum_sq, num_samples, dtype), vectorize_particles


def _chunk(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    size: int,
    dim: int,
    vectorized: bool,
) -> objectives.LogWeights:
    """The log-weights of ``size`` particles, drawn at once along a plate at ``dim`` or one at
    a time."""
    if vectorized:
        model, guide = particle_plate(model, size, dim), particle_plate(guide, size, dim)
    model_traces, guide_traces = [], []
    for _ in range(1 if vectorized else size):
        model_trace, guide_trace = guide_then_model(model, guide, args, kwargs)
        check_sites(model_trace, guide_trace, "evaluation")
        model_traces.append(model_trace)
        guide_traces.append(guide_trace)
    return objectives.log_weights(model_traces, guide_traces, -dim - 1, vectorized=vectorized)


def _summarize(
    log_sum: torch.Tensor, log_sum_sq: torch.Tensor, num_samples: int, dtype: torch.dtype
) -> LogLikelihood:
    """log p, standard error and ESS from log sum w and log sum w^2 (all in log space)."""
    log_px = log_sum - math.log(num_samples)
    log_ess = 2 * log_sum - log_sum_sq
    finite = torch.isfinite(log_sum)
    ess = torch.where(finite, log_ess.exp(), torch.zeros_like(log_ess))
    if num_samples > 1:
        # S / ESS - 1 = S sum w^2 / (sum w)^2 - 1, the squared coefficient of variation of w.
        cv2 = torch.expm1(math.log(num_samples) - log_ess).clamp(min=0)
        stderr = (cv2 / (num_samples - 1)).sqrt()
        stderr = torch.where(finite, stderr, torch.full_like(stderr, math.nan))
    else:
        stderr = torch.full_like(log_px, math.nan)
    return LogLikelihood(log_px.to(dtype), stderr.to(dtype), ess.to(dtype))


def evaluate_dataset(
    model: Callable,
    guide: Callable,
    data: torch.Tensor,
    *,
    batch_size: int = 100,
    num_samples: int = 5000,
    chunk_size: int = CHUNK_SIZE,
    max_plate_nesting: Optional[int] = None,
    vectorize_particles: bool = True,
    **kwargs: Any,
) -> LogLikelihood:
    """
    :func:`importance_log_likelihood` over a whole dataset, one batch of rows at a time:
    ``model(batch, **kwargs)`` and ``guide(batch, **kwargs)`` for
    ``batch in data.split(batch_size)``; the per-data-point results are concatenated.

    The average test log-likelihood and its Monte Carlo error are then
    ``result.mean()`` and ``result.mean_stderr()``.

    :param model: the model, taking a batch of rows of ``data`` as first argument.
    :param guide: the guide, with the same arguments.
    :param data: the dataset, data points along dimension 0.
    :param batch_size: the number of data points per batch.
    :param num_samples: importance samples per data point.
    :param chunk_size: samples drawn at once (see :func:`importance_log_likelihood`).
    :param max_plate_nesting: guessed from the first batch when ``None``.
    :param vectorize_particles: as for :func:`importance_log_likelihood`.
    :param kwargs: further keyword arguments of the model and guide.
    :returns: :class:`LogLikelihood` with one entry per data point of every batch (``len(data)``
        entries for a model whose data plate holds every site).
    """
    check_count("batch_size", batch_size)
    check_count("num_samples", num_samples)
    check_count("chunk_size", chunk_size)
    _check_nesting(max_plate_nesting)
    parts: List[LogLikelihood] = []
    for batch in data.split(batch_size):
        if max_plate_nesting is None:
            with torch.no_grad(), poutine.block():
                traces = guide_then_model(model, guide, (batch,), kwargs)
            max_plate_nesting = plate_nesting(*traces)
        part, vectorize_particles = _estimate(
            model,
            guide,
            (batch,),
            kwargs,
            num_samples,
            chunk_size,
            max_plate_nesting,
            vectorize_particles,  # after a fallback, the later batches go one at a time
        )
        parts.append(part)
    if not parts:
        raise ValueError("data is empty")
    return LogLikelihood.cat(parts)
