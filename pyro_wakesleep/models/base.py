"""
The shared parts of the ready-made models: :class:`ModelGuidePair`, the base class of every
model/guide pair in :mod:`pyro_wakesleep.models`; :func:`mlp`, the networks of their
conditionals; and :class:`BernoulliUnits`, their binary units.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Union, cast

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.distribution import COERCIONS
from torch import nn
from torch.nn import functional

from .. import checks
from ..traces import guide_then_model

Hidden = Union[int, Sequence[int]]


def mlp(in_features: int, out_features: int, hidden: Hidden = ()) -> nn.Module:
    """
    An affine map, or an MLP with tanh hidden layers of the given sizes.

    :param in_features: the input size.
    :param out_features: the output size.
    :param hidden: the sizes of the deterministic hidden layers (an int for one layer; empty or
        0 for a single :class:`~torch.nn.Linear`).
    """
    sizes = _hidden_sizes(hidden)
    layers: list = []
    width = in_features
    for size in sizes:
        layers += [nn.Linear(width, size), nn.Tanh()]
        width = size
    layers.append(nn.Linear(width, out_features))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


class BernoulliUnits(dist.Independent):
    """
    A vector of independent binary units, ``BernoulliUnits(logits)`` for
    ``Bernoulli(logits=logits).to_event(1)`` (it is that distribution, a subclass of
    :class:`~pyro.distributions.Independent`), whose ``log_prob`` sums the elementwise
    log-densities before negating them: the same values, one full-size tensor fewer per call
    (it matters with many particles: a ``(K, N, D)`` tensor per site), and whose ``sample``
    compares uniform draws with the probabilities, which is several times faster on CPU than
    ``torch.bernoulli``.

    :param logits: the units' logits, the last dimension being the units.
    """

    def __init__(self, logits: torch.Tensor, validate_args: Optional[bool] = None) -> None:
        super().__init__(_bernoulli(logits, validate_args), 1, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):  # noqa: ANN001 - torch's signature
        if _instance is None and torch.Size(batch_shape) == self.batch_shape:
            # A plate expands every site's distribution to its batch shape, which is usually
            # the shape it has: the distribution itself, without a copy and a view of logits.
            return self
        new = self._get_checked_instance(BernoulliUnits, _instance)
        return super().expand(batch_shape, _instance=new)

    def sample(self, sample_shape=torch.Size()):  # noqa: ANN001, ANN201, B008 - torch's signature
        """
        Draw the units as ``u < sigmoid(logits)`` with ``u`` uniform on :math:`[0, 1)`: the
        same Bernoulli distribution as ``torch.bernoulli`` draws (:math:`P(u < p) = p`), in
        about a third of its time on CPU.
        """
        shape = self._extended_shape(sample_shape)
        logits = self.base_dist.logits
        with torch.no_grad():
            uniform = torch.rand(shape, dtype=logits.dtype, device=logits.device)
            return uniform.lt_(torch.sigmoid(_unexpanded(logits)).expand(shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.base_dist.logits
        if logits.shape != value.shape:
            logits, value = torch.broadcast_tensors(logits, value)
        return -functional.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


def _bernoulli(logits: torch.Tensor, validate_args: Optional[bool]) -> dist.Bernoulli:
    """
    ``dist.Bernoulli(logits=logits)``, made as torch's own ``Bernoulli.expand`` makes one:
    without ``broadcast_all``, which for a single tensor only adds a view of it (a node of the
    autograd graph, at every site of every run). The same distribution, the same values.
    Made the usual way where Pyro coerces distributions (a registered backend) or the logits
    are not a tensor.
    """
    if COERCIONS or not isinstance(logits, torch.Tensor):
        return dist.Bernoulli(logits=logits, validate_args=validate_args)
    base = dist.Bernoulli.__new__(dist.Bernoulli)
    base.logits = base._param = logits
    super(torch.distributions.Bernoulli, base).__init__(logits.shape, validate_args=validate_args)
    return base


def _unexpanded(t: torch.Tensor) -> torch.Tensor:
    """The view of ``t`` without its broadcast dimensions (stride 0, as ``expand`` makes
    them) kept at size 1: the distinct entries of ``t`` once each, so that an elementwise
    function of an expanded prior's logits is computed once, not once per data point."""
    if 0 not in t.stride():
        return t
    size = [1 if stride == 0 else n for n, stride in zip(t.shape, t.stride())]
    return t.as_strided(size, t.stride(), t.storage_offset())


def _hidden_sizes(hidden: Hidden) -> tuple:
    if isinstance(hidden, int):
        sizes: tuple = (hidden,) if hidden > 0 else ()
    else:
        sizes = tuple(int(h) for h in hidden)
    if any(h < 1 for h in sizes):
        raise ValueError(f"hidden layer sizes must be positive, got {hidden!r}")
    return sizes


class ModelGuidePair(nn.Module):
    """
    Base class of the ready-made model/guide pairs: an :class:`~torch.nn.Module` holding a
    generative submodule (``self.generative``, the model's parameters :math:`\\theta`) and a
    recognition submodule (``self.recognition``, the guide's parameters :math:`\\phi`), with
    Pyro methods ``model(x, observations=None)`` and ``guide(x, observations=None)``.

    The submodules are registered with :func:`pyro.module` under ``"{name}_generative"`` and
    ``"{name}_recognition"``, so the model's and the guide's parameters are disjoint, as
    wake-sleep requires. Two instances used in the same parameter store need distinct names.

    The data site is ``"x"``, of shape ``(N, x_dim)`` inside a plate ``"data"`` at dim -1; the
    guide reads ``observations["x"]`` when given (the sleep phase of
    :class:`~pyro_wakesleep.WakeSleep` and of Pyro's ``ReweightedWakeSleep``), which may carry
    extra leading particle dimensions.

    **Mini-batches with data-point ids.** :class:`~pyro_wakesleep.models.HelmholtzMachine`,
    :class:`~pyro_wakesleep.models.GaussianHelmholtz` and
    :class:`~pyro_wakesleep.models.GaussianMixture` also take a keyword ``idx``, the ids in
    :math:`[0, N)` of the batch's rows, with ``num_data`` (:math:`N`, the data set's size)
    given to the constructor: the plate is then
    ``pyro.plate("data", num_data, subsample=idx, dim=-1)``, so that every site is scaled by
    :math:`N / B` for a batch of :math:`B` rows, as for any subsampled plate, and estimators
    that keep a state per data point (memoised wake-sleep,
    :class:`~pyro_wakesleep.memoised.MemoisedWakeSleepLoss`) read the ids from it::

        hm = HelmholtzMachine([784, 200], num_data=len(data))
        ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 1e-3}),
                       loss=MemoisedWakeSleepLoss(memory_size=5, num_particles=5))
        ws.step(data[idx], idx=idx)

    ``idx`` is a keyword (the second positional argument is ``observations``). Without it the
    plate has the batch's size and no scale, whatever ``num_data`` is.

    :param x_dim: the data dimension.
    :param name: the prefix of the parameter names in Pyro's parameter store.
    :param num_data: :math:`N`, the size of the plate ``"data"`` when ``idx`` is given.
    """

    #: The number of plates the model and guide use (the plate ``"data"``).
    max_plate_nesting = 1
    #: The model's parameters :math:`\\theta` (set by subclasses).
    generative: nn.Module
    #: The guide's parameters :math:`\\phi` (set by subclasses).
    recognition: nn.Module

    def __init__(self, x_dim: int, name: str, num_data: Optional[int] = None) -> None:
        super().__init__()
        if "$$$" in name:
            raise ValueError(f"name must not contain '$$$', got {name!r}")
        if num_data is not None:
            checks.check_count("num_data", num_data, 1)
        self.x_dim = int(x_dim)
        self.name = name
        #: :math:`N`, the data set's size: the size of the plate ``"data"`` when the model and
        #: guide are given the batch's ids ``idx``; ``None`` when not set.
        self.num_data = num_data

    # Subclasses define self.generative, self.recognition, model and guide.
    def model(
        self,
        x: Optional[torch.Tensor] = None,
        observations: Optional[Dict[str, torch.Tensor]] = None,
    ) -> None:
        """The generative model :math:`p_\\theta(x, z)`, with the observed site ``"x"``."""
        raise NotImplementedError

    def guide(
        self,
        x: Optional[torch.Tensor] = None,
        observations: Optional[Dict[str, torch.Tensor]] = None,
    ) -> None:
        """The recognition model :math:`q_\\phi(z \\mid x)`."""
        raise NotImplementedError

    def _register_generative(self) -> None:
        pyro.module(f"{self.name}_generative", self.generative)

    def _register_recognition(self) -> None:
        pyro.module(f"{self.name}_recognition", self.recognition)

    @staticmethod
    def _data(
        x: Optional[torch.Tensor], observations: Optional[Dict[str, torch.Tensor]]
    ) -> torch.Tensor:
        if observations is not None:
            if not isinstance(observations, Mapping):
                raise TypeError(
                    "observations must be a dict {'x': data}, got "
                    f"{type(observations).__name__}; pass the batch's data-point ids as the "
                    "keyword idx=, not as the second positional argument"
                )
            return observations["x"]
        if x is None:
            raise ValueError("pass the data x, or observations={'x': x}")
        return x

    def _plate(self, x: torch.Tensor, idx: Optional[torch.Tensor]) -> pyro.plate:
        """
        The plate ``"data"`` of a batch ``x`` (``(..., B, x_dim)``): of size ``B`` without
        ``idx``; with the batch's data-point ids ``idx``, of size :attr:`num_data` subsampled at
        ``idx`` (scale :math:`N / B`).

        :raises ValueError: for ``idx`` without :attr:`num_data`, or not one id per row.
        """
        batch = x.shape[-2]
        if idx is None:
            return pyro.plate("data", batch, dim=-1)
        if self.num_data is None:
            raise ValueError(
                "idx (the batch's data-point ids) needs num_data (the data set's size N): "
                f"build the model with num_data=N, e.g. {type(self).__name__}(..., num_data=N)"
            )
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.shape[0] != batch:
            shape = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(
                f"idx must be a 1-D tensor of one data-point id per row of the batch: the batch "
                f"has {batch} rows, idx has shape {shape}"
            )
        return pyro.plate("data", self.num_data, subsample=idx, dim=-1)

    def _like(self) -> torch.Tensor:
        return next(self.generative.parameters())

    @torch.no_grad()
    def sample(self, num: int) -> torch.Tensor:
        """
        Draw fantasies :math:`x \\sim p_\\theta(x)` from the model (ancestral sampling; the
        model is run under :func:`pyro.poutine.uncondition` and hidden from outer handlers).

        :param num: the number of samples.
        :returns: a tensor of shape ``(num, x_dim)``.
        """
        ref = self._like()
        dummy = torch.zeros(num, self.x_dim, dtype=ref.dtype, device=ref.device)
        with poutine.block():
            trace = poutine.trace(poutine.uncondition(self.model)).get_trace(dummy)
        return cast(torch.Tensor, trace.nodes["x"]["value"])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """
        Encode ``x`` with the guide (one sample :math:`z \\sim q_\\phi(z \\mid x)`) and decode
        it to the mean :math:`\\mathbb{E}_{p_\\theta}[x \\mid z]` of the model's observation
        distribution.

        :param x: data of shape ``(N, x_dim)``.
        :returns: the reconstructions, of shape ``(N, x_dim)``.
        """
        with poutine.block():
            model_trace, _ = guide_then_model(self.model, self.guide, (x,), {})
        observation: Any = model_trace.nodes["x"]["fn"]
        return observation.mean
