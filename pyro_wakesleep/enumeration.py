r"""
The exact log marginal likelihood of a small discrete model, by enumeration.

.. math:: \log p_\theta(x_i) = \log \sum_{z} p_\theta(x_i, z),

summed over every configuration of the latents of one data point: the Cartesian product of the
supports of the latent sites (all :math:`2^H` vectors of a ``Bernoulli(...).to_event(1)`` site
of size :math:`H`, all :math:`C` values of a ``Categorical``). For small models only, such as a
sigmoid belief net on the bars problem, a mixture, or a test case.

Data points are the indices of the plates that hold every sample site (see
:mod:`pyro_wakesleep.evaluate`); the computation ignores any scale on the sites.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from pyro import poutine
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine import Trace

from .checks import check_count
from .objectives import local_plates, sample_sites, site_log_prob
from .traces import particle_plate, plate_nesting


def _base_distribution(fn: Any) -> Any:
    """Strip the wrappers that do not change the support: Independent, expand, mask."""
    while True:
        if isinstance(fn, torch.distributions.Independent):
            fn = fn.base_dist
        elif isinstance(fn, (ExpandedDistribution, MaskedDistribution)):
            fn = fn.base_dist
        else:
            return fn


class _Latent(NamedTuple):
    """One latent site: its name, support values, and the shapes of one configuration."""

    name: str
    values: torch.Tensor  # (n, *base_event_shape): the support of one unit
    num_units: int  # units per configuration; the site has n ** num_units configurations
    shape: Tuple[int, ...]  # the value shape of one configuration, batch dims included
    batch_ndim: int


def _latents(trace: Trace, local_dims: frozenset) -> List[_Latent]:
    latents, bad = [], []
    for site in sample_sites(trace):
        if site["is_observed"]:
            continue
        fn = site["fn"]
        base = _base_distribution(fn)
        values = None
        if getattr(base, "has_enumerate_support", False):
            try:
                support = base.enumerate_support(expand=False)
                values = support.reshape((support.shape[0],) + tuple(base.event_shape))
            except (NotImplementedError, RuntimeError, ValueError):
                values = None
        if values is None:
            bad.append(f"'{site['name']}' ({type(base).__name__})")
            continue
        batch = list(fn.batch_shape)
        for d in local_dims:
            if -d <= len(batch):
                batch[d] = 1
        event = tuple(fn.event_shape)
        units = tuple(batch) + event[: len(event) - len(base.event_shape)]
        latents.append(
            _Latent(site["name"], values, math.prod(units), tuple(batch) + event, len(batch))
        )
    if bad:
        raise ValueError(
            "exact_log_likelihood sums over every latent configuration, so every latent site "
            "must be discrete with an enumerable support (Bernoulli, Categorical, ...); not so "
            "for site(s) " + ", ".join(bad) + ". Use importance_log_likelihood instead."
        )
    return latents


def _configurations(
    latents: List[_Latent], index: torch.Tensor, nesting: int
) -> Dict[str, torch.Tensor]:
    """
    The values of every latent for the configurations ``index`` (mixed radix over the sites and
    their units), each shaped ``(k, 1, ..., 1, *shape)`` with the configuration dim at
    ``-(nesting + 1)`` of the batch shape.
    """
    values = {}
    for latent in latents:
        n = latent.values.shape[0]
        count = n**latent.num_units
        site_index, index = index % count, index // count
        powers = n ** torch.arange(latent.num_units, device=index.device)
        digits = (site_index[:, None] // powers) % n  # (k, units)
        value = latent.values[digits.to(latent.values.device)]  # (k, units, *base_event)
        pad = (1,) * (nesting - latent.batch_ndim)
        values[latent.name] = value.reshape((len(site_index),) + pad + latent.shape)
    return values


def _log_joint(trace: Trace, keep: frozenset, ndim: int, size: int) -> torch.Tensor:
    """Unscaled log p summed over sites and every dim but ``keep``, as ``(size, N)``."""
    total: Any = 0.0
    for site in sample_sites(trace):
        log_p = site_log_prob(site, scaled=False)
        log_p = log_p.reshape((1,) * (ndim - log_p.dim()) + tuple(log_p.shape))
        dims = [d for d in range(-ndim, 0) if d not in keep]
        total = total + (log_p.sum(dims, keepdim=True) if dims else log_p)
    total = torch.as_tensor(total)
    total = total.reshape((1,) * (ndim - total.dim()) + tuple(total.shape))
    total = total.expand((size,) + tuple(total.shape[1:]))
    return total.reshape(size, -1)


def exact_log_likelihood(
    model: Callable,
    *args: Any,
    max_plate_nesting: Optional[int] = None,
    max_configurations: int = 2**20,
    chunk_size: int = 1024,
    **kwargs: Any,
) -> torch.Tensor:
    """
    The exact :math:`\\log p_\\theta(x_i) = \\log \\sum_z p_\\theta(x_i, z)` of every data point,
    by enumerating every configuration of the latents of one data point.

    The model is traced once with the given arguments to find its latent sites, their supports
    and their shapes per data point. The Cartesian product of those supports, :math:`C`
    configurations, is then fed to the model ``chunk_size`` at a time along a plate left of the
    model's plates, each latent :func:`conditioned <pyro.poutine.condition>` on its
    configuration broadcast over the data plate; the joint log-density is summed over sites,
    keeping the configuration and data dimensions, and log-sum-exp'd over configurations.

    The result is differentiable in the model's parameters; wrap the call in
    :func:`torch.no_grad` to evaluate only.

    :param model: a model whose latent sites are all discrete with enumerable support
        (``Bernoulli``, ``Categorical``, ``OneHotCategorical``, their ``.to_event`` and
        ``.expand`` forms, ...) and whose structure does not depend on the latent values.
    :param args: the model's arguments (the data batch).
    :param max_plate_nesting: the number of nested plates of the model; guessed from the trace
        when ``None``.
    :param max_configurations: the largest :math:`C` accepted.
    :param chunk_size: configurations evaluated at once; memory grows with ``chunk_size``
        times the size of one trace.
    :param kwargs: the model's keyword arguments.
    :returns: a tensor of shape ``(N,)`` (see the module docs for what a data point is).
    :raises ValueError: when a latent is continuous or not enumerable, or :math:`C` exceeds
        ``max_configurations`` (the message names the sites), or the model samples a latent
        that its first trace did not have.
    """
    check_count("max_configurations", max_configurations)
    check_count("chunk_size", chunk_size)
    if max_plate_nesting is not None:
        check_count("max_plate_nesting", max_plate_nesting, 0)
    with poutine.block():
        with torch.no_grad():
            trace = poutine.trace(model).get_trace(*args, **kwargs)
        local_dims = frozenset(local_plates([trace]).values())
        latents = _latents(trace, local_dims)
        nesting = plate_nesting(trace)
        if max_plate_nesting is not None:
            nesting = max(nesting, max_plate_nesting)
        counts = [lat.values.shape[0] ** lat.num_units for lat in latents]
        total = math.prod(counts)
        if total > max_configurations:
            per_site = ", ".join(
                f"'{lat.name}' ({lat.values.shape[0]}^{lat.num_units} = {c})"
                for lat, c in zip(latents, counts)
            )
            raise ValueError(
                f"The latents of one data point have {total} configurations, more than "
                f"max_configurations={max_configurations}: {per_site}. Raise "
                "max_configurations, or use importance_log_likelihood."
            )
        dim = -(nesting + 1)
        keep = local_dims | {dim}
        result: Optional[torch.Tensor] = None
        for start in range(0, total, chunk_size):
            size = min(chunk_size, total - start)
            index = torch.arange(start, start + size)
            conditioned = poutine.condition(model, data=_configurations(latents, index, nesting))
            chunk = poutine.trace(particle_plate(conditioned, size, dim)).get_trace(*args, **kwargs)
            new = [s["name"] for s in sample_sites(chunk) if not s["is_observed"]]
            if new:
                raise ValueError(
                    "exact_log_likelihood needs a model whose latent sites do not depend on the "
                    "latent values; site(s) " + ", ".join(f"'{n}'" for n in new) + " appeared "
                    "that the first trace did not have."
                )
            log_p = torch.logsumexp(_log_joint(chunk, keep, nesting + 1, size), 0)
            result = log_p if result is None else torch.logaddexp(result, log_p)
    assert result is not None
    return result
