r"""
:class:`VIMCO`: the multi-sample score-function estimator of Mnih & Rezende (2016) for the
:math:`K`-sample importance-weighted bound, as a Pyro loss::

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=VIMCO(num_particles=5))

For one data point :math:`x`, draw :math:`z_1, \dots, z_K \sim q_\phi(z \mid x)` and write
:math:`\log w_k = \log p_\theta(x, z_k) - \log q_\phi(z_k \mid x)`. The estimate of the bound
:math:`\mathcal{L}_K = \mathbb{E}\left[\log \frac1K \sum_k w_k\right]` and its leave-one-out
versions are

.. math::

    \hat L = \log \frac1K \sum_{k=1}^K w_k, \qquad
    \hat L_{-k} = \log \frac1K \Big( \sum_{j \ne k} w_j
        + \exp \frac{1}{K-1} \sum_{j \ne k} \log w_j \Big),

that is, :math:`\hat L_{-k}` replaces :math:`\log w_k` with the mean of the other
:math:`K - 1` log-weights (the geometric-mean baseline of the paper). With the self-normalized
weights :math:`\bar w_k = w_k / \sum_j w_j`, the gradient estimate is

.. math::

    \nabla \hat{\mathcal{L}}_K = \sum_k \bar w_k \nabla \log w_k
        + \sum_k \big(\hat L - \hat L_{-k}\big) \nabla \log q_\phi(z_k \mid x),

unbiased because :math:`\hat L_{-k}` does not depend on :math:`z_k`. It is the gradient of the
surrogate

.. math::

    -\Big[\hat L + \sum_k \operatorname{detach}\big(\hat L - \hat L_{-k}\big)
        \big(\log q_\phi(z_k \mid x) - \operatorname{detach} \log q_\phi(z_k \mid x)\big)\Big]

with the :math:`z_k` held fixed, whose value is :math:`-\hat L`, the loss. (The second term is
zero in value, so ``differentiable_loss`` and ``loss`` agree.)

**Score function only.** The :math:`z_k` are fixed values: a guide site that can
reparameterize (``has_rsample``) is still detached, so no gradient flows through a sample and
the estimator is the score-function one of the paper, whatever the guide's distributions.

**One estimate per data point.** The log-weights come from
:func:`~pyro_wakesleep.objectives.log_weights`, per particle and per data point of a local
plate; each data point :math:`i` has its own :math:`\hat L_i` and baselines, and the loss is
:math:`-\sum_i s \hat L_i`, summed over data points as Pyro's ELBO losses are, with :math:`s`
the common scale of the sites (mini-batch subsampling). A site outside the batch plate (a
global latent) couples the data points, and the batch then has one weight, as it must. Where
scales differ between sites, the scaled log-densities enter the weights (tempered weights, as
in :mod:`~pyro_wakesleep.objectives`) and the score term alike; the score of a scaled site is
then not that of the density it was drawn from, so this case is a heuristic, not the exact
estimator of any bound.

References

- [1] A. Mnih, D. J. Rezende, "Variational inference for Monte Carlo objectives", ICML 2016.
- [2] Y. Burda, R. Grosse, R. Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

import torch
from pyro.distributions import util as dist_util
from pyro.infer import ELBO
from pyro.poutine import Trace
from pyro.util import warn_if_nan

from . import checks, objectives, particles, traces


def leave_one_out_bounds(log_w: torch.Tensor) -> torch.Tensor:
    r"""
    :math:`\hat L_{-k}` for every particle :math:`k` (dimension 0) and data point (the other
    dimensions): :math:`\log \frac1K` of the sum of the weights with :math:`\log w_k` replaced
    by the mean of the other log-weights.

    :param log_w: log-weights, particles first; at least two particles.
    """
    K = log_w.shape[0]
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (K - 1)
    # table[k, j] = log w_j for j != k, and the mean of the others on the diagonal.
    eye = torch.eye(K, dtype=torch.bool, device=log_w.device)
    eye = eye.reshape((K, K) + (1,) * (log_w.dim() - 1))
    table = torch.where(eye, others_mean.unsqueeze(1), log_w.unsqueeze(0))
    return torch.logsumexp(table, dim=1) - math.log(K)


def vimco_terms(weights: objectives.LogWeights) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""
    The loss and the surrogate of one wake phase (see the module docs).

    :param weights: per-particle, per-data-point log-densities, particles first.
    :returns: ``(loss, surrogate)``: :math:`-\sum_i s \hat L_i` and the scalar whose
        gradient is minus the VIMCO estimate; equal in value.
    """
    K = weights.log_p.shape[0]
    log_w = weights.log_p - weights.log_q
    bound = torch.logsumexp(log_w, dim=0) - math.log(K)
    signal = (bound.unsqueeze(0) - leave_one_out_bounds(log_w)).detach()
    score = (signal * (weights.log_q - weights.log_q.detach())).sum(0)
    loss = -(weights.scale * bound).sum()
    return loss, loss - (weights.scale * score).sum()


class VIMCO(ELBO):
    r"""
    Minus the :math:`K`-sample importance-weighted bound, fitted by the VIMCO estimator (see
    the module docs): the model's parameters and the guide's get the gradient of one surrogate,
    so one optimizer (:class:`~pyro.infer.SVI`) trains both.

    :param int num_particles: :math:`K \ge 2`, the guide samples per data point (the
        leave-one-out baseline of a particle needs the others).
    :param bool vectorize_particles: draw the particles at once along a plate left of the
        model's plates (set ``False`` for models whose control flow depends on sampled values).
    :param max_plate_nesting: the number of nested plates in the model and guide; guessed from
        one probe run when not given.
    """

    def __init__(
        self,
        num_particles: int = 5,
        vectorize_particles: bool = True,
        max_plate_nesting: Optional[int] = None,
    ) -> None:
        if checks.check_count("num_particles", num_particles, 1) < 2:
            raise ValueError(
                f"VIMCO needs num_particles >= 2, got {num_particles!r}: the leave-one-out "
                "baseline of each particle is built from the other particles."
            )
        if max_plate_nesting is not None:
            checks.check_count("max_plate_nesting", max_plate_nesting, 0)
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)
        self.num_particles = num_particles
        self.vectorize_particles = vectorize_particles
        self.max_plate_nesting = max_plate_nesting
        self.validated = False

    # ------------------------------------------------------------------ Pyro's ELBO interface

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Minus the estimate of the :math:`K`-sample bound, summed over data points (no
        gradients)."""
        with torch.no_grad():
            loss, _, _ = self.terms(model, guide, args, kwargs, grad=False)
        return warn_if_nan(loss.detach(), "loss").item()

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The surrogate: its value is the loss, its gradient minus the VIMCO estimate."""
        _, surrogate, _ = self.terms(model, guide, args, kwargs)
        return surrogate

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Back-propagate the surrogate into the parameters that the model and guide touch (as
        Pyro's ``Trace_ELBO`` does) and return the loss."""
        loss, surrogate, drawn = self.terms(model, guide, args, kwargs)
        touched = any(site["type"] == "param" for t in drawn for site in t.nodes.values())
        if touched and surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        return warn_if_nan(loss.detach(), "loss").item()

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError("VIMCO draws its particles in terms()")

    # ------------------------------------------------------------------ the computation

    def terms(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, grad: bool = True
    ) -> Tuple[torch.Tensor, torch.Tensor, List[Trace]]:
        """
        Draw the :math:`K` particles (the guide's samples detached) and build the loss and the
        surrogate.

        :param grad: trace the guide's density with a gradient.
        :returns: ``(loss, surrogate, traces)``: the model traces, then the guide traces.
        """
        model_traces, guide_traces, vectorized = particles.wake_traces(
            model,
            guide,
            args,
            kwargs,
            num_particles=self.num_particles,
            vectorize=self.vectorize_particles,
            nesting=lambda _: self.plate_nesting(model, guide, args, kwargs),
            guide_grad=grad,
        )
        if self.vectorize_particles and not vectorized:
            self.vectorize_particles = False  # a fallback: stay sequential
        if not self.validated:
            checks.check_guide_density(guide_traces[0], "wake")
            if dist_util.is_validation_enabled():
                checks.check_model_guide_shapes(
                    model_traces[0], guide_traces[0], self.max_plate_nesting, vectorized
                )
            self.validated = True
        weights = objectives.log_weights(
            model_traces, guide_traces, self.max_plate_nesting, vectorized
        )
        loss, surrogate = vimco_terms(weights)
        return loss, surrogate, model_traces + guide_traces

    def plate_nesting(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> int:
        """``max_plate_nesting``, guessed once from a probe run of the guide and the model
        (which draws nothing from the random streams) when not given."""
        if self.max_plate_nesting is None:
            found = traces.probe(model, guide, args, kwargs)
            self.max_plate_nesting = traces.plate_nesting(*found)
        return self.max_plate_nesting
