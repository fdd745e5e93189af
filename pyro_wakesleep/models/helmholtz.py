r"""
The binary Helmholtz machine: a layered sigmoid belief net with a bottom-up recognition net
(Hinton, Dayan, Frey & Neal 1995).

With layer sizes :math:`(D, H_1, \dots, H_L)` the generative model (``model``) is

.. math::

    z_L &\sim \prod_j \mathrm{Bernoulli}(\sigma(b_j)), \\
    z_{l} \mid z_{l+1} &\sim \mathrm{Bernoulli}(\sigma(f_{l+1}(z_{l+1}))),
        \quad l = L-1, \dots, 1, \\
    x \mid z_1 &\sim \mathrm{Bernoulli}(\sigma(f_1(z_1))),

and the recognition model (``guide``) runs bottom-up,

.. math::

    q(z_1, \dots, z_L \mid x) = \prod_{l=1}^L \mathrm{Bernoulli}(z_l; \sigma(g_l(z_{l-1}))),
    \qquad z_0 = x,

where :math:`\sigma` is the logistic function and each :math:`f_l, g_l` is an affine map or,
with ``hidden``, an MLP with deterministic tanh hidden layers. Every unit is binary and
stochastic, so the pair is the natural case for wake-sleep: no reparameterization is needed.

References

- [1] G. E. Hinton, P. Dayan, B. J. Frey, R. M. Neal, "The wake-sleep algorithm for
  unsupervised neural networks", Science 268 (1995).
- [2] P. Dayan, G. E. Hinton, R. M. Neal, R. S. Zemel, "The Helmholtz machine", Neural
  Computation 7 (1995).
- [3] J. Bornschein, Y. Bengio, "Reweighted Wake-Sleep", ICLR 2015.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import pyro
import torch
from torch import nn

from .base import BernoulliUnits, Hidden, ModelGuidePair, mlp


def _last_linear(f: nn.Module) -> nn.Linear:
    linears = [m for m in f.modules() if isinstance(m, nn.Linear)]
    return linears[-1]


class _SigmoidBeliefNet(nn.Module):
    """The generative half: top-layer prior logits and top-down maps ``f_L, ..., f_1``."""

    prior_logits: nn.Parameter
    top_down: nn.ModuleList

    def __init__(self, layer_sizes: Sequence[int], hidden: Hidden) -> None:
        super().__init__()
        self.prior_logits = nn.Parameter(torch.zeros(layer_sizes[-1]))
        # top_down[i] maps layer i + 1 to layer i (layer 0 is x): f_{i+1}.
        self.top_down = nn.ModuleList(
            mlp(layer_sizes[i + 1], layer_sizes[i], hidden) for i in range(len(layer_sizes) - 1)
        )


class HelmholtzMachine(ModelGuidePair):
    """
    A layered sigmoid belief net with a bottom-up sigmoid recognition net (see the module
    docs for the equations).

    Sites: ``"x"`` (observed) and ``"z1"``, ..., ``"zL"`` (``z1`` next to the data), each a
    vector ``Bernoulli(...).to_event(1)`` inside the plate ``"data"``::

        hm = HelmholtzMachine([784, 200, 200])
        ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 1e-3}),
                       max_plate_nesting=hm.max_plate_nesting)

    :param layer_sizes: :math:`(D, H_1, \\dots, H_L)`: the data dimension followed by the sizes
        of the stochastic layers, bottom-up (``[16, 8, 1]`` for the bars problem).
    :param hidden: sizes of deterministic tanh hidden layers inside every map
        :math:`f_l, g_l` (empty: affine maps, the classic Helmholtz machine).
    :param name: the prefix of the parameter names in Pyro's parameter store.
    :param num_data: :math:`N`, the data set's size, for ``model(x, idx=ids)`` and
        ``guide(x, idx=ids)`` on mini-batches with data-point ids (see
        :class:`~pyro_wakesleep.models.ModelGuidePair`); not needed without ``idx``.
    """

    generative: _SigmoidBeliefNet
    recognition: nn.ModuleList

    def __init__(
        self,
        layer_sizes: Sequence[int],
        hidden: Hidden = (),
        *,
        name: str = "helmholtz",
        num_data: Optional[int] = None,
    ) -> None:
        sizes = [int(s) for s in layer_sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(
                "layer_sizes must hold the data dimension and at least one latent layer size, "
                f"all positive, got {list(layer_sizes)!r}"
            )
        super().__init__(sizes[0], name, num_data)
        self.layer_sizes = tuple(sizes)
        self.num_layers = len(sizes) - 1
        self.generative = _SigmoidBeliefNet(sizes, hidden)
        # bottom_up[i] maps layer i to layer i + 1: g_{i+1}.
        self.recognition = nn.ModuleList(
            mlp(sizes[i], sizes[i + 1], hidden) for i in range(self.num_layers)
        )

    @torch.no_grad()
    def sparse_init_(
        self, scale: float = 0.1, data_bias: float = -3.0, hidden_bias: float = -1.4
    ) -> HelmholtzMachine:
        """
        Re-initialize for sparse binary data: every parameter drawn from
        :math:`\\mathcal{N}(0, \\text{scale}^2)`, then the biases of the maps into the data
        layer set to ``data_bias`` and those into the layers between the data and the top
        (generative and recognition) to ``hidden_bias``, so that units start mostly off; the
        top layer keeps small random biases. It draws from torch's
        global random stream. (The bars recipe of the command uses it.)

        :returns: self.
        """
        for p in self.parameters():
            p.copy_(scale * torch.randn_like(p))
        for i, f in enumerate(self.generative.top_down):
            _last_linear(f).bias.fill_(data_bias if i == 0 else hidden_bias)
        for g in list(self.recognition)[:-1]:
            _last_linear(g).bias.fill_(hidden_bias)
        return self

    def model(
        self,
        x: Optional[torch.Tensor] = None,
        observations: Optional[Dict[str, torch.Tensor]] = None,
        *,
        idx: Optional[torch.Tensor] = None,
    ) -> None:
        """
        The generative model :math:`p_\\theta(x, z_1, \\dots, z_L)`.

        :param x: binary data of shape ``(N, D)`` (float).
        :param observations: ``{"x": data}``, used instead of ``x`` when given.
        :param idx: the ids in ``[0, num_data)`` of the batch's rows (keyword): the plate is
            then ``pyro.plate("data", num_data, subsample=idx)``, scaled by ``num_data / B``.
        """
        x = self._data(x, observations)
        self._register_generative()
        gen = self.generative
        with self._plate(x, idx):
            z = pyro.sample(f"z{self.num_layers}", BernoulliUnits(gen.prior_logits))
            for layer in range(self.num_layers - 1, 0, -1):
                logits = gen.top_down[layer](z)
                z = pyro.sample(f"z{layer}", BernoulliUnits(logits))
            pyro.sample("x", BernoulliUnits(gen.top_down[0](z)), obs=x)

    def guide(
        self,
        x: Optional[torch.Tensor] = None,
        observations: Optional[Dict[str, torch.Tensor]] = None,
        *,
        idx: Optional[torch.Tensor] = None,
    ) -> None:
        """
        The recognition model :math:`q_\\phi(z_1, \\dots, z_L \\mid x)`, bottom-up.

        :param x: binary data of shape ``(N, D)``.
        :param observations: ``{"x": fantasy}`` from a sleep phase, used instead of ``x``; it
            may carry leading particle dimensions.
        :param idx: the ids in ``[0, num_data)`` of the batch's rows (keyword): the plate is
            then ``pyro.plate("data", num_data, subsample=idx)``, scaled by ``num_data / B``.
        """
        h = self._data(x, observations)
        self._register_recognition()
        with self._plate(h, idx):
            for layer, g in enumerate(self.recognition, start=1):
                h = pyro.sample(f"z{layer}", BernoulliUnits(g(h)))
