r"""
A Gaussian mixture with one categorical assignment per data point and an amortized guide for
the assignment: the natural case for wake-sleep, whose discrete latent has no
reparameterization.

.. math::

    c_i &\sim \mathrm{Categorical}(\pi), \qquad \pi = \mathrm{softmax}(\alpha), \\
    x_i \mid c_i &\sim \mathcal{N}(\mu_{c_i}, \mathrm{diag}\, \sigma_{c_i}^2),
        \qquad \sigma_c = \exp(\rho_c), \\
    q_\phi(c_i \mid x_i) &= \mathrm{Categorical}(\mathrm{softmax}(g_\phi(x_i))),

with the mixture logits :math:`\alpha`, means :math:`\mu` and log-scales :math:`\rho` the
model's parameters :math:`\theta`, and :math:`g_\phi` an MLP. The exact marginal
:math:`p_\theta(x_i) = \sum_c \pi_c \mathcal{N}(x_i; \mu_c, \sigma_c^2)` is available from
:func:`pyro_wakesleep.evaluate.exact_log_likelihood`. The means start at standard normal
draws; like any mixture fit by local search, the fit can then settle with one component on two
clusters and another unused. :meth:`GaussianMixture.initialize` seeds the means from the data
with k-means++ (Arthur & Vassilvitskii 2007), which avoids that for well-separated clusters.

References

- [1] G. E. Hinton, P. Dayan, B. J. Frey, R. M. Neal, "The wake-sleep algorithm for
  unsupervised neural networks", Science 268 (1995).
- [2] D. Arthur, S. Vassilvitskii, "k-means++: the advantages of careful seeding", SODA 2007.
- [3] T. A. Le, A. R. Kosiorek, N. Siddharth, Y. W. Teh, F. Wood, "Revisiting Reweighted
  Wake-Sleep for Models with Stochastic Control Flow", UAI 2019.
"""

from __future__ import annotations

from typing import Dict, Optional

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .base import Hidden, ModelGuidePair, mlp


class _MixtureParameters(nn.Module):
    """The generative half: mixture logits, component means and log-scales."""

    logits: nn.Parameter
    means: nn.Parameter
    log_scales: nn.Parameter

    def __init__(self, num_components: int, x_dim: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.means = nn.Parameter(torch.randn(num_components, x_dim))
        self.log_scales = nn.Parameter(torch.zeros(num_components, x_dim))


class GaussianMixture(ModelGuidePair):
    """
    A mixture of diagonal Gaussians with an amortized categorical guide.

    Sites: ``"c"`` (``Categorical``, values in ``0 .. num_components - 1``) and ``"x"``
    (observed, ``Normal(...).to_event(1)``), inside the plate ``"data"``. With vectorized
    particles ``c`` has shape ``(K, N)`` and ``means[c]`` has shape ``(K, N, x_dim)``.

    :param num_components: the number of mixture components :math:`C`.
    :param x_dim: the data dimension :math:`D`.
    :param hidden: the hidden layer size(s) of the guide's network (tanh; 0 for affine).
    :param name: the prefix of the parameter names in Pyro's parameter store.
    :param num_data: :math:`N`, the data set's size, for ``model(x, idx=ids)`` and
        ``guide(x, idx=ids)`` on mini-batches with data-point ids (see
        :class:`~pyro_wakesleep.models.ModelGuidePair`); not needed without ``idx``.
    """

    generative: _MixtureParameters

    def __init__(
        self,
        num_components: int,
        x_dim: int,
        hidden: Hidden = 32,
        *,
        name: str = "mixture",
        num_data: Optional[int] = None,
    ) -> None:
        if num_components < 1:
            raise ValueError(f"num_components must be positive, got {num_components!r}")
        super().__init__(x_dim, name, num_data)
        self.num_components = int(num_components)
        self.generative = _MixtureParameters(self.num_components, self.x_dim)
        self.recognition = mlp(self.x_dim, self.num_components, hidden)

    @property
    def weights(self) -> torch.Tensor:
        """The mixture weights :math:`\\pi = \\mathrm{softmax}(\\alpha)`."""
        return torch.softmax(self.generative.logits, -1)

    @property
    def scales(self) -> torch.Tensor:
        """The component scales :math:`\\sigma = \\exp(\\rho)`, shape ``(C, D)``."""
        return self.generative.log_scales.exp()

    @torch.no_grad()
    def initialize(self, data: torch.Tensor, generator: Optional[torch.Generator] = None) -> None:
        """
        Seed the component means from the data by k-means++: the first mean is a uniformly
        drawn data point, each further one a data point drawn with probability proportional to
        its squared distance :math:`d(x)^2` to the nearest mean chosen so far. The mixture
        weights are set uniform and every scale to the data's standard deviation (averaged over
        dimensions), so that early responsibilities are soft.

        :param data: data of shape ``(N, x_dim)``, ``N >= 1``.
        :param generator: an optional random generator for the draws.
        """
        data = data.detach().reshape(-1, self.x_dim).to(self.generative.means)
        num = data.shape[0]
        device = data.device
        chosen = [int(torch.randint(num, (), generator=generator, device=device))]
        for _ in range(1, self.num_components):
            d2 = torch.cdist(data, data[chosen]).min(-1).values.pow(2)
            if not bool(d2.sum() > 0):
                d2 = torch.ones_like(d2)
            chosen.append(int(torch.multinomial(d2, 1, generator=generator)))
        self.generative.means.copy_(data[chosen])
        self.generative.logits.zero_()
        spread = data.std(0).mean() if num > 1 else data.new_tensor(1.0)
        self.generative.log_scales.fill_(float(spread.clamp(min=1e-3).log()))

    def model(
        self,
        x: Optional[torch.Tensor] = None,
        observations: Optional[Dict[str, torch.Tensor]] = None,
        *,
        idx: Optional[torch.Tensor] = None,
    ) -> None:
        """
        The generative model :math:`p_\\theta(x, c) = \\pi_c\\, \\mathcal{N}(x; \\mu_c,
        \\sigma_c^2)`.

        :param x: data of shape ``(N, x_dim)``.
        :param observations: ``{"x": data}``, used instead of ``x`` when given.
        :param idx: the ids in ``[0, num_data)`` of the batch's rows (keyword): the plate is
            then ``pyro.plate("data", num_data, subsample=idx)``, scaled by ``num_data / B``.
        """
        x = self._data(x, observations)
        self._register_generative()
        gen = self.generative
        with self._plate(x, idx):
            c = pyro.sample("c", dist.Categorical(logits=gen.logits))
            loc, scale = gen.means[c], gen.log_scales[c].exp()
            pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x)

    def guide(
        self,
        x: Optional[torch.Tensor] = None,
        observations: Optional[Dict[str, torch.Tensor]] = None,
        *,
        idx: Optional[torch.Tensor] = None,
    ) -> None:
        """
        The recognition model :math:`q_\\phi(c \\mid x)`.

        :param x: data of shape ``(N, x_dim)``.
        :param observations: ``{"x": fantasy}`` from a sleep phase, used instead of ``x``; it
            may carry leading particle dimensions.
        :param idx: the ids in ``[0, num_data)`` of the batch's rows (keyword): the plate is
            then ``pyro.plate("data", num_data, subsample=idx)``, scaled by ``num_data / B``.
        """
        x = self._data(x, observations)
        self._register_recognition()
        with self._plate(x, idx):
            pyro.sample("c", dist.Categorical(logits=self.recognition(x)))
