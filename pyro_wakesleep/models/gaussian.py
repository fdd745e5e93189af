r"""
A Helmholtz machine with a continuous latent space: the generative model of a variational
autoencoder for binary data (Kingma & Welling 2014), trained by wake-sleep.

.. math::

    z &\sim \mathcal{N}(0, I_{d_z}), \\
    x \mid z &\sim \prod_{j=1}^{D} \mathrm{Bernoulli}(x_j; \sigma(f_\theta(z))_j), \\
    q_\phi(z \mid x) &= \mathcal{N}(z; \mu_\phi(x), \mathrm{diag}\, s_\phi(x)^2),

with :math:`f_\theta` an MLP (tanh hidden layers), :math:`\mu_\phi, s_\phi` the two heads of an
MLP, and :math:`s_\phi = \mathrm{softplus}(\cdot) + 10^{-4}`. The guide's sample is
reparameterized, so the same pair also runs under :class:`~pyro.infer.Trace_ELBO`.

References

- [1] D. P. Kingma, M. Welling, "Auto-Encoding Variational Bayes", ICLR 2014.
- [2] G. E. Hinton, P. Dayan, B. J. Frey, R. M. Neal, "The wake-sleep algorithm for
  unsupervised neural networks", Science 268 (1995).
"""

from __future__ import annotations

from typing import Dict, Optional

import pyro
import pyro.distributions as dist
import torch
from torch.nn import functional

from .base import BernoulliUnits, Hidden, ModelGuidePair, mlp

MIN_SCALE = 1e-4


class GaussianHelmholtz(ModelGuidePair):
    """
    Standard normal latents, a Bernoulli decoder and an amortized diagonal-Gaussian guide.

    Sites: ``"z"`` (``Normal(0, 1).expand([z_dim]).to_event(1)``) and ``"x"`` (observed,
    ``Bernoulli(logits=decoder(z)).to_event(1)``), inside the plate ``"data"``.

    :param x_dim: the data dimension :math:`D`.
    :param z_dim: the latent dimension :math:`d_z`.
    :param hidden: the hidden layer size(s) of the decoder and of the encoder (tanh).
    :param name: the prefix of the parameter names in Pyro's parameter store.
    :param num_data: :math:`N`, the data set's size, for ``model(x, idx=ids)`` and
        ``guide(x, idx=ids)`` on mini-batches with data-point ids (see
        :class:`~pyro_wakesleep.models.ModelGuidePair`); not needed without ``idx``.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Hidden = 200,
        *,
        name: str = "gaussian_helmholtz",
        num_data: Optional[int] = None,
    ) -> None:
        super().__init__(x_dim, name, num_data)
        self.z_dim = int(z_dim)
        self.generative = mlp(self.z_dim, self.x_dim, hidden)
        self.recognition = mlp(self.x_dim, 2 * self.z_dim, hidden)

    def model(
        self,
        x: Optional[torch.Tensor] = None,
        observations: Optional[Dict[str, torch.Tensor]] = None,
        *,
        idx: Optional[torch.Tensor] = None,
    ) -> None:
        """
        The generative model
        :math:`p_\\theta(x, z) = \\mathcal{N}(z; 0, I)\\, p_\\theta(x \\mid z)`.

        :param x: binary data of shape ``(N, x_dim)`` (float).
        :param observations: ``{"x": data}``, used instead of ``x`` when given.
        :param idx: the ids in ``[0, num_data)`` of the batch's rows (keyword): the plate is
            then ``pyro.plate("data", num_data, subsample=idx)``, scaled by ``num_data / B``.
        """
        x = self._data(x, observations)
        self._register_generative()
        ref = self._like()
        loc = torch.zeros(self.z_dim, dtype=ref.dtype, device=ref.device)
        with self._plate(x, idx):
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            pyro.sample("x", BernoulliUnits(self.generative(z)), obs=x)

    def encode(self, x: torch.Tensor) -> tuple:
        """The guide's mean :math:`\\mu_\\phi(x)` and scale :math:`s_\\phi(x)`."""
        out = self.recognition(x)
        loc, raw = out[..., : self.z_dim], out[..., self.z_dim :]
        return loc, functional.softplus(raw) + MIN_SCALE

    def guide(
        self,
        x: Optional[torch.Tensor] = None,
        observations: Optional[Dict[str, torch.Tensor]] = None,
        *,
        idx: Optional[torch.Tensor] = None,
    ) -> None:
        """
        The recognition model :math:`q_\\phi(z \\mid x)`.

        :param x: binary data of shape ``(N, x_dim)``.
        :param observations: ``{"x": fantasy}`` from a sleep phase, used instead of ``x``; it
            may carry leading particle dimensions.
        :param idx: the ids in ``[0, num_data)`` of the batch's rows (keyword): the plate is
            then ``pyro.plate("data", num_data, subsample=idx)``, scaled by ``num_data / B``.
        """
        x = self._data(x, observations)
        self._register_recognition()
        loc, scale = self.encode(x)
        with self._plate(x, idx):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
