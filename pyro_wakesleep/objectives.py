r"""
The three objectives of (reweighted) wake-sleep, computed from Pyro traces.

Write :math:`x` for the observations of one data point, :math:`z` for its latents,
:math:`p_\theta(x, z)` for the model and :math:`q_\phi(z \mid x)` for the guide. With
:math:`K` particles :math:`z_k \sim q_\phi(z \mid x)` and log-weights
:math:`\log w_k = \log p_\theta(x, z_k) - \log q_\phi(z_k \mid x)`:

* **wake-theta** (the model's loss). For :math:`K = 1` (classic wake-sleep, Hinton et al.
  1995) it is :math:`-\log p_\theta(x, z_1)` with :math:`z_1` treated as data. For
  :math:`K > 1` (reweighted wake-sleep, Bornschein & Bengio 2015) it is the negative
  importance-weighted bound

  .. math:: -\log \frac{1}{K} \sum_{k=1}^K w_k ,

  with :math:`q_\phi` held fixed (no gradient reaches :math:`\phi`).

* **wake-phi** (a guide loss, RWS): :math:`-\sum_k \bar w_k \log q_\phi(z_k \mid x)` with the
  self-normalized weights :math:`\bar w_k = w_k / \sum_j w_j` held fixed.

* **sleep-phi** (a guide loss): :math:`-\log q_\phi(z \mid x)` at a fantasy
  :math:`(z, x) \sim p_\theta` drawn from the model (see :mod:`pyro_wakesleep.fantasies`).

**One estimate per data point.** A batch is a product of independent data points only when
every site of the model and guide lies inside the batch plate. Such a plate is called *local*
here: its dimension is kept when the log-weights are summed over sites, the log-sum-exp over
particles is taken separately at each of its indices, and the results are summed. A batch of
100 thus gives 100 independent :math:`K`-particle estimates. A site outside the plate (a
global latent, say) couples the batch, and then the plate is not local and the whole batch
shares one weight, as it must.

**Scales.** When every site carries the same scale :math:`s` (mini-batch subsampling with
``subsample_size`` gives every site in the plate :math:`s = N / B`; so does a
:func:`pyro.poutine.scale` around the whole model and guide), the scale multiplies each
per-data-point term: :math:`-s \sum_i \log \frac{1}{K}\sum_k w_{ik}`, which is an unbiased
estimate of the full-data objective. When scales differ between sites (a global latent beside
subsampled local ones, or a scale on some sites only) the scaled log-probabilities enter the
weights themselves (a tempered weight, as in Pyro's ``ReweightedWakeSleep``). With
:math:`K = 1` the two readings coincide.

References

- [1] G. E. Hinton, P. Dayan, B. J. Frey, R. M. Neal, "The wake-sleep algorithm for
  unsupervised neural networks", Science 268 (1995).
- [2] J. Bornschein, Y. Bengio, "Reweighted Wake-Sleep", ICLR 2015.
- [3] T. A. Le, A. R. Kosiorek, N. Siddharth, Y. W. Teh, F. Wood, "Revisiting Reweighted
  Wake-Sleep for Models with Stochastic Control Flow", UAI 2019.
"""

from __future__ import annotations

import math
from numbers import Number, Real
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample

PARTICLE_PLATE = "_wake_sleep_particles"


def sample_sites(trace: Trace) -> list:
    """The sample sites of a trace that carry a log-density (subsample sites excluded)."""
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    ]


def site_log_prob(site: dict, scaled: bool = True) -> torch.Tensor:
    """The (optionally scaled) and masked log-density of one sample site."""
    log_p = site["fn"].log_prob(site["value"])
    return scale_and_mask(log_p, site["scale"] if scaled else 1.0, site["mask"])


def trace_log_prob_sum(trace: Trace) -> torch.Tensor:
    """The scaled log-density of a whole trace, summed to a scalar."""
    total = None
    for site in sample_sites(trace):
        term = site_log_prob(site).sum()
        total = term if total is None else total + term
    return torch.tensor(0.0) if total is None else total


def local_plates(traces: Iterable[Trace]) -> dict:
    """
    The vectorized plates that hold every sample site of every given trace, as a dict
    ``{name: dim}``. Their indices are independent data points (see the module docs).
    """
    common: Optional[dict] = None
    for trace in traces:
        for site in sample_sites(trace):
            plates = {
                f.name: f.dim
                for f in site["cond_indep_stack"]
                if f.vectorized and f.name != PARTICLE_PLATE
            }
            if common is None:
                common = plates
            else:
                common = {name: dim for name, dim in common.items() if plates.get(name) == dim}
            if not common:
                return {}
    return common or {}


def sequential_local_plates(traces: Iterable[Trace]) -> Tuple[str, ...]:
    """
    The sequential plates (``for i in pyro.plate(...)``) that hold every sample site of every
    given trace, by name: their iterations are independent data points too, each site's
    iteration told by its frame's ``counter``.
    """
    common: Optional[set] = None
    for trace in traces:
        for site in sample_sites(trace):
            names = {f.name for f in site["cond_indep_stack"] if not f.vectorized}
            common = names if common is None else common & names
            if not common:
                return ()
    return tuple(sorted(common or ()))


def _iteration(site: dict, plates: Tuple[str, ...]) -> Tuple[int, ...]:
    """The iterations of the sequential ``plates`` a site lies in (its data point)."""
    counters = {f.name: f.counter for f in site["cond_indep_stack"] if not f.vectorized}
    return tuple(counters[name] for name in plates)


def _common_scale(traces: Sequence[Trace]) -> Optional[float]:
    """The scale shared by every sample site, or None where sites differ (or scale by tensor)."""
    scale = None
    for trace in traces:
        for site in sample_sites(trace):
            s = site["scale"]
            if not isinstance(s, Real):
                return None
            if scale is None:
                scale = float(s)
            elif float(s) != scale:
                return None
    return 1.0 if scale is None else scale


def _reduce(log_p: torch.Tensor, keep: frozenset, ndim: int) -> torch.Tensor:
    """Sum ``log_p`` over every dimension but ``keep`` (negative dims), padded to ``ndim``."""
    if log_p.dim() < ndim:
        log_p = log_p.reshape((1,) * (ndim - log_p.dim()) + log_p.shape)
    dims = [d for d in range(-log_p.dim(), 0) if d not in keep]
    return log_p.sum(dims, keepdim=True) if dims else log_p


class LogWeights(NamedTuple):
    """
    Per-particle, per-data-point log-densities of one wake phase.

    ``log_p`` and ``log_q`` have the particle dimension first and one dimension for each local
    plate (size one elsewhere); ``scale`` multiplies each data point's term (see module docs).
    """

    log_p: torch.Tensor
    log_q: torch.Tensor
    scale: float


def log_weights(
    model_traces: List[Trace],
    guide_traces: List[Trace],
    max_plate_nesting: Optional[int],
    vectorized: bool,
) -> LogWeights:
    """
    Collect :math:`\\log p_\\theta(x, z_k)` and :math:`\\log q_\\phi(z_k \\mid x)` per particle
    and per data point from the wake traces.

    :param model_traces: the model traces (replayed on the guide traces), one per particle
        or a single vectorized one.
    :param guide_traces: the matching guide traces.
    :param max_plate_nesting: the model's plate nesting; the particle plate sits just left of it
        when ``vectorized``.
    :param vectorized: whether the traces hold all particles along a particle plate.
    """
    traces = list(model_traces) + list(guide_traces)
    plates = local_plates(traces)
    scale = _common_scale(traces)
    scaled = scale is None
    dims = set(plates.values())
    ndim = max([-d for d in dims], default=0)
    particle_dim = 0
    if vectorized:
        assert max_plate_nesting is not None, "vectorized particles need max_plate_nesting"
        particle_dim = -(max_plate_nesting + 1)
        dims.add(particle_dim)
        ndim = max(ndim, max_plate_nesting + 1)
    keep = frozenset(dims)

    def dims_needed(trace: Trace) -> int:
        return max([len(site["fn"].batch_shape) for site in sample_sites(trace)], default=0)

    ndim = max([ndim] + [dims_needed(t) for t in traces])

    # Data points that are the iterations of sequential plates: one entry each, stacked along
    # a new leftmost dimension (so the particle dimension moves one to the right).
    sequential = sequential_local_plates(traces)
    iterations = sorted(
        {_iteration(site, sequential) for t in model_traces for site in sample_sites(t)}
        if sequential
        else {()}
    )

    def total(trace: Trace) -> Optional[torch.Tensor]:
        sums: dict = {}
        for site in sample_sites(trace):
            term = _reduce(site_log_prob(site, scaled), keep, ndim)
            key = _iteration(site, sequential) if sequential else ()
            sums[key] = term if key not in sums else sums[key] + term
        if not sums:
            return None
        if not sequential:
            return sums[()]
        like = next(iter(sums.values()))
        parts = torch.broadcast_tensors(*[sums.get(k, torch.zeros_like(like)) for k in iterations])
        return torch.stack(parts)

    log_p = [_present(total(t)) for t in model_traces]
    # A guide with no sample sites (a model without latents) contributes log q = 0.
    log_q = [
        torch.zeros_like(lp) if lq is None else lq
        for lp, lq in zip(log_p, (total(t) for t in guide_traces))
    ]
    if vectorized:
        at = ndim + particle_dim + (1 if sequential else 0)
        log_p_k, log_q_k = torch.broadcast_tensors(log_p[0].movedim(at, 0), log_q[0].movedim(at, 0))
    else:
        both = torch.broadcast_tensors(*log_p, *log_q)
        log_p_k = torch.stack(both[: len(log_p)])
        log_q_k = torch.stack(both[len(log_p) :])
    return LogWeights(log_p_k, log_q_k, 1.0 if scale is None else scale)


def _present(log_p: Optional[torch.Tensor]) -> torch.Tensor:
    if log_p is None:
        raise ValueError("The model has no sample site: there is nothing to fit.")
    return log_p


def wake_theta_loss(
    weights: LogWeights, log_proposal: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    :math:`-\\sum_i s \\log \\frac1K \\sum_k w_{ik}` with the guide's densities held fixed.

    :param log_proposal: the log-density of the proposal the particles came from, where it is
        not the guide (:mod:`pyro_wakesleep.defensive`), held fixed too.
    """
    num_particles = weights.log_p.shape[0]
    log_r = weights.log_q if log_proposal is None else log_proposal
    log_w = weights.log_p - log_r.detach()
    bound = torch.logsumexp(log_w, dim=0) - math.log(num_particles)
    return -(weights.scale * bound).sum()


def wake_phi_loss(weights: LogWeights, log_proposal: Optional[torch.Tensor] = None) -> torch.Tensor:
    """
    :math:`-\\sum_i s \\sum_k \\bar w_{ik} \\log q_\\phi(z_{ik} \\mid x_i)` with the
    self-normalized weights held fixed.

    :param log_proposal: as for :func:`wake_theta_loss`: the weights are
        :math:`p_\\theta(x, z_k) / r(z_k \\mid x)`, the guide's density is still the one fitted.
    """
    log_r = weights.log_q if log_proposal is None else log_proposal
    log_w = (weights.log_p - log_r).detach()
    normalized = torch.softmax(log_w, dim=0)
    return -(weights.scale * (normalized * weights.log_q).sum(0)).sum()


def classic_wake_theta_loss(model_trace: Trace) -> torch.Tensor:
    """:math:`-\\log p_\\theta(x, z)` at the guide's sample (classic wake-sleep, K = 1)."""
    return -trace_log_prob_sum(model_trace)


def classic_wake_phi_loss(guide_trace: Trace) -> torch.Tensor:
    """:math:`-\\log q_\\phi(z \\mid x)` at the guide's own sample (wake-phi with K = 1)."""
    return -trace_log_prob_sum(guide_trace)


class PhiObjective(NamedTuple):
    r"""
    The guide's objective: :math:`a \cdot` wake-phi :math:`+ (1 - a) \cdot` sleep-phi, built
    by :meth:`parse` from ``"sleep"`` (:math:`a = 0`, the classic choice), ``"wake"``
    (:math:`a = 1`) or a number :math:`a \in [0, 1]`.
    """

    #: :math:`a`, the weight of wake-phi.
    wake: float

    @classmethod
    def parse(cls, value: Union[str, float, PhiObjective]) -> PhiObjective:
        """
        :param value: ``"sleep"``, ``"wake"``, a number in [0, 1], or a :class:`PhiObjective`.
        :raises ValueError: for anything else.
        """
        if isinstance(value, PhiObjective):
            return value
        if value == "sleep":
            return cls(0.0)
        if value == "wake":
            return cls(1.0)
        if isinstance(value, Number) and not isinstance(value, bool):
            a = float(value)  # type: ignore[arg-type]
            if 0.0 <= a <= 1.0:
                return cls(a)
        raise ValueError(
            "phi_objective must be 'sleep', 'wake' or a float a in [0, 1] (a * wake-phi + "
            f"(1 - a) * sleep-phi), got {value!r}"
        )

    @property
    def sleep(self) -> float:
        """:math:`1 - a`, the weight of sleep-phi."""
        return 1 - self.wake

    @property
    def uses_wake(self) -> bool:
        """Whether wake-phi has a weight (the guide is then trained on wake samples)."""
        return self.wake > 0

    @property
    def uses_sleep(self) -> bool:
        """Whether sleep-phi has a weight (fantasies are then drawn)."""
        return self.wake < 1

    def __str__(self) -> str:
        return {0.0: "sleep", 1.0: "wake"}.get(self.wake, repr(self.wake))


def weighted(weight: float, loss: torch.Tensor) -> torch.Tensor:
    """``weight * loss``, without an operation when the weight is 1."""
    return loss if weight == 1 else weight * loss
