r"""
Memoised wake-sleep (Hewitt, Le & Tenenbaum 2020) as a loss object,
:class:`MemoisedWakeSleepLoss`, driven by :class:`~pyro_wakesleep.WakeSleep` as
:class:`~pyro_wakesleep.WakeSleepLoss` is.

For models with discrete latents, the loss keeps for every data point :math:`n` of the data
set a *memory* :math:`Q_n`: the :math:`M` best distinct latent values found so far, scored by
:math:`\log p_\theta(x_n, z)`, best first. One step, for each data point :math:`x = x_n` of
the batch:

1. **propose** :math:`z_1, \dots, z_K \sim q_\phi(z \mid x)`;
2. **merge**: the candidates are the entries of :math:`Q_n` and the proposals, duplicates
   dropped; each is scored under the current model, :math:`s(z) = \log p_\theta(x, z)`, and
   the :math:`M` best become :math:`Q_n` (a slot stays empty while fewer than :math:`M`
   distinct values have been found);
3. **wake-theta on the memory**:

   .. math:: \mathcal L_\theta = -\log \sum_{z \in Q_n} p_\theta(x, z), \qquad
      -\nabla_\theta \mathcal L_\theta = \sum_m \bar w_m \nabla_\theta \log p_\theta(x, z_m),
      \quad \bar w_m = \frac{p_\theta(x, z_m)}{\sum_{m'} p_\theta(x, z_{m'})},

   the self-normalized gradient over the memory of [1] (the memory is a set, not a sample:
   no proposal density enters the weights). Its value bounds :math:`-\log p_\theta(x)` from
   above, and equals it once the memory holds the posterior's whole support;
4. **the guide**: :math:`a \cdot` memory-phi :math:`+ (1 - a) \cdot` sleep-phi, with
   memory-phi :math:`-\sum_m \bar w_m \log q_\phi(z_m \mid x)` (weights held fixed) and
   sleep-phi :math:`-\log q_\phi(z \mid x)` at fantasies :math:`(z, x) \sim p_\theta`, as in
   :mod:`pyro_wakesleep.objectives`. [1] adds the two gradients; :math:`a = 1/2` (the default)
   is that direction at half the step.

The batch's terms are summed, times the batch plate's scale :math:`N / B` (as in
:mod:`pyro_wakesleep.objectives`). The memory's entries are indexed by the plate's indices,
which is how a Pyro model says which data points a batch holds::

    def model(x, idx):  # x: the batch, idx: its rows' ids in [0, N)
        with pyro.plate("data", N, subsample=idx):
            ...

    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 1e-3}),
                   loss=MemoisedWakeSleepLoss(memory_size=10, num_particles=5))
    ws.step(x[idx], idx)

(``pyro.plate("data", N, subsample_size=B)`` on the full data works too: the guide's draw of
indices is replayed into the model). Every sample site must lie in that plate. The candidates
are scored at once along a particle plate (:mod:`pyro_wakesleep.particles`), so the programs
must not read sampled values into Python. A step computes the new memory and
:class:`~pyro_wakesleep.WakeSleep` commits it (:meth:`MemoisedWakeSleepLoss.commit`) only
once its update succeeded; :meth:`WakeSleep.save` saves it.

References

- [1] L. B. Hewitt, T. A. Le, J. B. Tenenbaum, "Learning to learn generative programs with
  Memoised Wake-Sleep", UAI 2020.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from pyro import poutine
from pyro.distributions import util as dist_util
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from . import checks, objectives, ownership, particles, traces
from .fantasies import FantasyArgsFn, takes_observations
from .loss import WakeSleepLoss, WakeSleepPhases
from .memory import IndexCheck, Memory, Rows
from .objectives import PARTICLE_PLATE, PhiObjective


def _points(value: torch.Tensor, particle: int, plate: int) -> torch.Tensor:
    """A site's value with the data plate's dimension first and the particles' second."""
    return value.movedim((plate, particle), (0, 1))


def _unpoints(points: torch.Tensor, particle: int, plate: int) -> torch.Tensor:
    """The inverse of :func:`_points`."""
    return points.movedim((0, 1), (plate, particle))


def _plates(site: dict) -> List[str]:
    """The names of the plates a site lies in."""
    return [f.name for f in site["cond_indep_stack"]]


class MemoisedWakeSleepLoss(WakeSleepLoss):
    r"""
    Memoised wake-sleep (see the module's documentation): a memory of the :math:`M` best
    latent values per data point, the model trained on the memory, the guide on the memory
    and on fantasies.

    :param int memory_size: :math:`M`, the entries kept per data point.
    :param int num_particles: :math:`K`, the guide's proposals per data point and step.
    :param num_data: :math:`N`, the number of data points: the size of the data plate, which
        it must equal (checked); by default the plate's size.
    :param str plate: the name of the data plate, whose indices index the memory.
    :param int num_sleep_particles: fantasies per data point for sleep-phi.
    :param phi_objective: :math:`a`: ``"wake"`` (memory-phi alone, :math:`a = 1`),
        ``"sleep"`` (sleep-phi alone, :math:`a = 0`) or a float in :math:`[0, 1]`.
    :param max_plate_nesting: as for :class:`~pyro_wakesleep.WakeSleepLoss`, and
        ``fantasy_args`` and ``full_validation`` likewise.

    The memory is this object's state: :meth:`state_dict` and :meth:`load_state_dict`, saved
    with :meth:`WakeSleep.save`. Not for ``WakeSleep(jit=True)`` (the memory update is not a
    recordable tensor program).
    """

    #: ``WakeSleep(jit=True)`` refuses this loss: its memory update cannot be replayed.
    recordable = False

    def __init__(
        self,
        memory_size: int,
        num_particles: int = 1,
        *,
        num_data: Optional[int] = None,
        plate: str = "data",
        num_sleep_particles: int = 1,
        phi_objective: Union[str, float, PhiObjective] = 0.5,
        max_plate_nesting: Optional[int] = None,
        fantasy_args: Optional[FantasyArgsFn] = None,
        full_validation: bool = False,
    ) -> None:
        checks.check_count("memory_size", memory_size, 1)
        if num_data is not None:
            checks.check_count("num_data", num_data, 1)
        if not isinstance(plate, str):
            raise TypeError(f"plate must be the name of the data plate, got {plate!r}")
        super().__init__(num_particles, num_sleep_particles, "sleep", True, max_plate_nesting,
                         fantasy_args, full_validation)  # fmt: skip
        # Memory-phi has M weighted entries even for K = 1: no check on num_particles.
        self.phi_objective = PhiObjective.parse(phi_objective)
        self.memory_size = memory_size
        self.num_data = num_data
        self.plate = plate
        #: The memory (:class:`~pyro_wakesleep.memory.Memory`).
        self.memory = Memory(memory_size, num_data, plate)
        self._pending: Optional[Rows] = None  # the last computation's rows, until committed

    # ------------------------------------------------------------------ the memory

    def state_dict(self) -> Dict[str, Any]:
        """
        A copy of the memory: ``{"scores": (N, M), "values": {site: (N, M, ...)}}``, each
        data point's entries best first, scored :math:`\\log p_\\theta(x_n, z)` by the step
        that last scored them, ``-inf`` at empty slots; ``{}`` before the first step.
        """
        return self.memory.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """
        Replace the memory by a copy of ``state`` (from :meth:`state_dict`; ``{}`` empties
        it).

        :raises ValueError: when ``state`` is not a memory of this loss's sizes; the memory is
            then unchanged.
        """
        self.memory.load_state_dict(state)
        self._pending = None

    def commit(self) -> None:
        """Take up the memory computed by the last :meth:`phases` (``WakeSleep`` calls it once
        its update has succeeded; :meth:`differentiable_loss` and :meth:`loss_and_grads`, the
        methods :class:`~pyro.infer.SVI` calls, call it themselves)."""
        if self._pending is not None:
            self.memory.write(self._pending)
        self._pending = None

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """As :meth:`WakeSleepLoss.differentiable_loss`, then :meth:`commit`."""
        loss = super().differentiable_loss(model, guide, *args, **kwargs)
        self.commit()
        return loss

    def loss_and_grads(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Tuple[float, float]:
        """As :meth:`WakeSleepLoss.loss_and_grads`, then :meth:`commit`."""
        losses = super().loss_and_grads(model, guide, *args, **kwargs)
        self.commit()
        return losses

    # ------------------------------------------------------------------ the computation

    def probe(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        handler: Optional[Messenger] = None,
    ) -> Tuple[Trace, Trace]:
        """As :meth:`WakeSleepLoss.probe`; without a handler, the data plate's indices are
        checked (the first step's probe runs before anything else)."""
        handler = handler or IndexCheck(self.plate, self.num_data)
        return super().probe(model, guide, args, kwargs, handler)

    def _positions(self, site: dict, particle_dim: int) -> Tuple[int, int]:
        """Where a site's value holds the particles and the data plate."""
        frame = next((f for f in site["cond_indep_stack"] if f.name == self.plate), None)
        if frame is None or frame.dim is None:
            raise ValueError(
                f"The guide's site '{site['name']}' is not inside the vectorized "
                f"pyro.plate('{self.plate}'): the memory is kept per data point."
            )
        batch = site["value"].dim() - getattr(site["fn"], "event_dim", 0)
        return batch + particle_dim, batch + frame.dim

    def _per_point(self, model_trace: Trace, guide_trace: Trace, nesting: int) -> Tuple:
        """:math:`\\log p_\\theta(x, z)` and :math:`\\log q_\\phi(z \\mid x)`, ``(B, C)``."""
        both = [model_trace, guide_trace]
        dim = objectives.local_plates(both).get(self.plate)
        if dim is None or objectives.sequential_local_plates(both):
            sites = [s for t in both for s in objectives.sample_sites(t)]
            outside = sorted({s["name"] for s in sites if self.plate not in _plates(s)})
            raise ValueError(
                f"Every sample site of the model and guide must lie in pyro.plate('{self.plate}')"
                f" (one memory per data point); outside it: {outside or 'none'}."
            )
        weights = objectives.log_weights([model_trace], [guide_trace], nesting, True)

        def points(t: torch.Tensor) -> torch.Tensor:
            return t.movedim(dim, 1).reshape(t.shape[0], t.shape[dim], -1).sum(-1).T

        return points(weights.log_p), points(weights.log_q), weights.scale

    def memoise(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, nesting: int, grad: bool
    ) -> Tuple[torch.Tensor, torch.Tensor, Trace, Trace]:
        """
        Propose, merge and re-score (steps 1-3 of the module's docs); the new memory waits
        for :meth:`commit`.

        :param grad: trace the guide's density with a gradient.
        :returns: wake-theta, memory-phi, and the model's and guide's traces of every
            candidate.
        """
        K, M, dim = self.num_particles, self.memory_size, -nesting - 1
        with torch.no_grad():
            proposal = poutine.trace(
                traces.particle_plate(IndexCheck(self.plate, self.num_data)(guide), K, dim)
            ).get_trace(*args, **kwargs)
        site: Any = proposal.nodes.get(self.plate)
        if site is None or not site_is_subsample(site):
            raise ValueError(
                f"The guide has no pyro.plate('{self.plate}'): the memory is indexed by its "
                "indices (pyro.plate(name, N, subsample=indices) in the model and guide); pass "
                "plate= to name another."
            )
        indices, num_data = site["value"], site["fn"].size
        latents = [s for s in objectives.sample_sites(proposal) if not s["is_observed"]]
        where = {s["name"]: self._positions(s, dim) for s in latents}
        proposals = {s["name"]: _points(s["value"], *where[s["name"]]) for s in latents}
        candidates, valid = self.memory.candidates(indices, num_data, proposals)
        given = Trace()  # the candidates, and the plates' indices, to replay
        for name, node in proposal.nodes.items():
            if name in candidates:
                given.add_node(name, **{**node, "value": _unpoints(candidates[name], *where[name])})
            elif site_is_subsample(node) and name != PARTICLE_PLATE:
                given.add_node(name, **node)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            guide_trace = traces.trace_replayed(
                traces.particle_plate(guide, M + K, dim), given, args, kwargs
            )
        model_trace = traces.trace_replayed(
            traces.particle_plate(model, M + K, dim), guide_trace, args, kwargs
        )
        checks.check_sites(model_trace, guide_trace, "wake")
        log_p, log_q, scale = self._per_point(model_trace, guide_trace, nesting)
        ranked = torch.where(valid, log_p.detach(), -math.inf)
        rows, order = self.memory.select(indices, num_data, candidates, ranked)
        kept = rows.scores != -math.inf  # NaN is kept, so that the step fails
        # -log sum_m p(x, z_m) and -sum_m w_m log q(z_m | x) over the new memory
        log_p_m = log_p.gather(1, order).masked_fill(~kept, -math.inf)
        wake_theta = -(scale * torch.logsumexp(log_p_m, 1)).sum()
        log_q_m = log_q.gather(1, order).masked_fill(~kept, 0.0)
        memory_phi = -(scale * (torch.softmax(rows.scores, 1) * log_q_m).sum(1)).sum()
        self._pending = rows
        return wake_theta, memory_phi, model_trace, guide_trace

    def phases(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        *,
        wake: bool = True,
        sleep: bool = True,
        trim: Optional[bool] = None,
    ) -> WakeSleepPhases:
        """
        As :meth:`WakeSleepLoss.phases`, with the memory's objectives in the wake phase; the
        new memory waits for :meth:`commit`.
        """
        trim = self.trim_validation() if trim is None else trim
        a = self.phi_objective
        self._pending = None
        wake_theta = phi = model_graph = guide_graph = None
        theta: Dict[str, torch.Tensor] = {}
        phi_params: Dict[str, torch.Tensor] = {}
        all_traces: List[Trace] = []
        support: List[checks.SupportCheck] = []
        validating = dist_util.is_validation_enabled()
        graphs = not self.validated and torch.is_grad_enabled()

        def nesting(with_guide: bool) -> int:
            return self.plate_nesting(model, guide, args, kwargs, with_guide=with_guide)

        with dist_util.validation_enabled(validating and not trim):
            if wake or (sleep and a.uses_wake):
                grad_phi = sleep and a.uses_wake
                try:
                    wake_theta, memory_phi, model_trace, guide_trace = self.memoise(
                        model, guide, args, kwargs, nesting(True), grad_phi or graphs
                    )
                except Exception as error:
                    if not particles.reads_values(error):
                        raise
                    raise ValueError(
                        "MemoisedWakeSleepLoss scores the candidates at once, along a particle "
                        "plate: the model and guide must not read sampled values into Python "
                        f"(stochastic control flow: {checks.brief(error)})."
                    ) from error
                if trim:
                    support += checks.observed_support(model_trace)
                all_traces += [model_trace, guide_trace]
                theta.update(traces.params(model_trace))
                phi_params.update(traces.params(guide_trace))
                if grad_phi:
                    phi = objectives.weighted(a.wake, memory_phi)
                    checks.check_guide_density(guide_trace, "wake")
                if not self.validated and validating:
                    checks.check_model_guide_shapes(
                        model_trace, guide_trace, self.max_plate_nesting, True
                    )
                model_graph = wake_theta
                guide_graph = phi if grad_phi else ownership.density([guide_trace], graphs)
                if not wake:
                    wake_theta = wake_theta.detach()
            if sleep and a.uses_sleep:
                if self._observations_keyword[0] is not guide:
                    self._observations_keyword = (guide, takes_observations(guide))
                S = self.num_sleep_particles
                log_q, sleep_traces = particles.sleep_traces(
                    model, guide, args, kwargs, num_particles=S, vectorize=True,
                    nesting=nesting, with_observations=self._observations_keyword[1],
                    fantasy_args=self.fantasy_args, first=graphs,
                )  # fmt: skip
                all_traces += sleep_traces
                if model_graph is None:
                    model_graph = ownership.density(sleep_traces[0::2], graphs)
                for t in sleep_traces[0::2]:
                    theta.update(traces.params(t))
                for t in sleep_traces[1::2]:
                    phi_params.update(traces.params(t))
                sleep_phi = objectives.weighted(a.sleep, -log_q / S)
                phi = sleep_phi if phi is None else phi + sleep_phi
                guide_graph = phi
        theta, phi_params = self._owners.split(model_graph, guide_graph, theta, phi_params)
        checks.check_disjoint(theta, phi_params)
        return WakeSleepPhases(
            wake_theta, phi, theta if wake else {}, phi_params if sleep else {}, all_traces, support
        )
