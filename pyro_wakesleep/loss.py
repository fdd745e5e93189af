r"""
:class:`WakeSleepLoss`: the wake-sleep objective as a loss object, as Pyro's
:class:`~pyro.infer.ELBO` is, with ``loss``, ``differentiable_loss`` and ``loss_and_grads``.

It owns every trace of a step: the wake phase (:math:`K` guide samples of the real data and
the model replayed on them), the sleep phase (fantasies :math:`(z, x) \sim p_\theta` and the
guide scored on them), the plate-nesting guess, the probe run and the failure-path retrace.
The objectives themselves are written once, in :mod:`pyro_wakesleep.objectives`; how the
particles of each phase are drawn in :mod:`pyro_wakesleep.particles`; fantasies in
:mod:`pyro_wakesleep.fantasies`; which parameters are the model's and which the guide's in
:mod:`pyro_wakesleep.ownership`; the Pyro plumbing in :mod:`pyro_wakesleep.traces`.

:class:`~pyro_wakesleep.WakeSleep` drives it as :class:`~pyro.infer.SVI` drives an ELBO, with
two optimizers and an atomic update. It also works under SVI itself::

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}),
              loss=WakeSleepLoss(num_particles=5, phi_objective="wake"))
    wake_theta, phi = svi.step(x)

The differentiable loss is wake-theta plus phi, whose gradient is the wake-theta gradient on
the model's parameters :math:`\theta` and the phi gradient on the guide's :math:`\phi` (no
gradient crosses from one objective to the other's parameters), so one optimizer over both
takes the wake-sleep step.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import pyro
import torch
from pyro.distributions import util as dist_util
from pyro.infer import ELBO
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger

from . import checks, objectives, ownership, particles, traces
from .defensive import check_defensive, log_proposal
from .fantasies import FantasyArgsFn, takes_observations
from .objectives import PhiObjective
from .ownership import ParameterOwners


class WakeSleepPhases(NamedTuple):
    """
    What one computation of the losses gives: the ``wake_theta`` and ``phi`` losses (``None``
    for a phase not asked for), the parameters each objective touched (``theta``: the
    model's, ``phi_params``: the guide's, unconstrained, by name), the traces (wake model
    traces, wake guide traces, then a model and a guide trace per sleep draw; empty after a
    replay) and the support checks of the observed values.
    """

    wake_theta: Optional[torch.Tensor]
    phi: Optional[torch.Tensor]
    theta: Dict[str, torch.Tensor]
    phi_params: Dict[str, torch.Tensor]
    traces: List[Trace]
    support: List[checks.SupportCheck]

    @property
    def total(self) -> torch.Tensor:
        """The scalar to differentiate: wake-theta plus phi."""
        if self.wake_theta is None or self.phi is None:
            alone = self.phi if self.wake_theta is None else self.wake_theta
            return 0 if alone is None else alone  # type: ignore[return-value]
        return self.wake_theta + self.phi


class WakeSleepLoss(ELBO):
    r"""
    The (reweighted) wake-sleep objective of a model and guide.

    It is an :class:`~pyro.infer.ELBO` so that :class:`~pyro.infer.SVI` takes it as it takes
    Pyro's ``ReweightedWakeSleep``; only the methods of the ELBO interface are used.

    :param int num_particles: :math:`K`, the number of guide samples per data point in the wake
        phase. ``1`` is classic wake-sleep; ``K > 1`` is reweighted wake-sleep.
    :param int num_sleep_particles: the number of fantasies per data point in the sleep phase.
    :param phi_objective: ``"sleep"`` (sleep-phi, the classic choice), ``"wake"`` (wake-phi),
        or a float :math:`a \in [0, 1]` for :math:`a \cdot` wake-phi :math:`+ (1 - a) \cdot`
        sleep-phi (see :class:`~pyro_wakesleep.objectives.PhiObjective`).
    :param bool vectorize_particles: draw the particles at once along a plate left of the
        model's plates (set ``False`` for models whose control flow depends on sampled values).
        Vectorized sleep particles need a guide with an ``observations`` keyword, since the
        guide's plate sizes come from its data argument; otherwise fantasies are drawn one
        at a time.
    :param max_plate_nesting: the number of nested plates in the model and guide; guessed from
        one trace when not given.
    :param fantasy_args: an optional ``fantasy_args(observations, *args, **kwargs)`` returning
        the guide's ``(args, kwargs)`` for the sleep phase, for models whose observations are not
        simply one of their arguments (see :mod:`pyro_wakesleep.fantasies`).
    :param bool full_validation: with Pyro's validation enabled (its default), run all of
        Pyro's distribution checks on every computation. By default they run on the first
        one only; later ones check the support of every observed value, but do not re-check
        the arguments of each distribution nor the samples the model and guide drew
        themselves (which lie in their support by construction).
    :param float defensive: :math:`d \in [0, 1)`: draw each wake particle from the model's
        prior with probability :math:`d` (defensive importance sampling, needs ``K > 1``; see
        :mod:`pyro_wakesleep.defensive`). ``0`` draws every particle from the guide.
    """

    def __init__(
        self,
        num_particles: int = 1,
        num_sleep_particles: int = 1,
        phi_objective: Union[str, float, PhiObjective] = "sleep",
        vectorize_particles: bool = True,
        max_plate_nesting: Optional[int] = None,
        fantasy_args: Optional[FantasyArgsFn] = None,
        full_validation: bool = False,
        defensive: float = 0.0,
    ) -> None:
        checks.check_count("num_particles", num_particles, 1)
        self.defensive = check_defensive(defensive, num_particles)
        checks.check_count("num_sleep_particles", num_sleep_particles, 1)
        if max_plate_nesting is not None:
            try:
                checks.check_count("max_plate_nesting", max_plate_nesting, 0)
            except ValueError:
                raise ValueError(
                    f"max_plate_nesting must be a non-negative integer or None, got "
                    f"{max_plate_nesting!r}"
                ) from None
        if fantasy_args is not None and not callable(fantasy_args):
            raise TypeError("fantasy_args must be callable: fn(observations, *args, **kwargs)")
        super().__init__(num_particles=num_particles, vectorize_particles=vectorize_particles)
        self.num_particles = num_particles
        self.num_sleep_particles = num_sleep_particles
        self.phi_objective = PhiObjective.parse(phi_objective)
        if num_particles == 1 and self.phi_objective.uses_wake:
            # One particle has self-normalized weight 1: wake-phi is -log q(z) at q's own draw,
            # whose expected gradient is zero.
            message = (
                "wake-phi with num_particles=1 has zero expected gradient (the one particle's "
                "self-normalized weight is 1): the guide would not learn from it. Use "
                "num_particles > 1 (reweighted wake-sleep) with phi_objective='wake'"
            )
            if not self.phi_objective.uses_sleep:
                raise ValueError(message + ", or phi_objective='sleep'.")
            warnings.warn(message + ".", RuntimeWarning, stacklevel=checks.user_stacklevel())
        self.vectorize_particles = vectorize_particles
        self.max_plate_nesting = max_plate_nesting
        self.fantasy_args = fantasy_args
        self.full_validation = bool(full_validation)
        #: Whether a computation has passed Pyro's full validation once (see
        #: ``full_validation``).
        self.validated = False
        self._observations_keyword: Tuple[Any, bool] = (None, False)
        self._owners = ParameterOwners()

    # ------------------------------------------------------------------ Pyro's ELBO interface

    def loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Tuple[float, float]:
        """
        The wake-theta and phi losses, without gradients.

        :returns: ``(wake_theta, phi)`` as floats (a plain tuple, as Pyro's
            ``ReweightedWakeSleep`` returns, so that ``SVI.evaluate_loss`` takes it).
        """
        with torch.no_grad():
            phases = self.phases(model, guide, args, kwargs)
        checks.check_support(phases.support)
        return (_item(phases.wake_theta), _item(phases.phi))

    def differentiable_loss(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        The scalar surrogate of one step: wake-theta plus phi, whose gradient is the
        wake-theta gradient on the model's parameters and the phi gradient on the guide's.
        """
        phases = self.phases(model, guide, args, kwargs)
        checks.check_support(phases.support)
        self.validated = True
        return phases.total

    def loss_and_grads(
        self, model: Callable, guide: Callable, *args: Any, **kwargs: Any
    ) -> Tuple[float, float]:
        """
        Compute the losses and back-propagate the surrogate: the wake-theta gradient lands on
        the model's parameters, the phi gradient on the guide's.

        :returns: ``(wake_theta, phi)`` as floats.
        """
        phases = self.phases(model, guide, args, kwargs)
        checks.check_support(phases.support)
        total = phases.total
        if isinstance(total, torch.Tensor) and total.requires_grad:
            total.backward()
        self.validated = True
        return (_item(phases.wake_theta), _item(phases.phi))

    def __call__(self, model: Callable, guide: Callable, **kwargs: Any) -> Any:
        """The loss of ``model`` and ``guide`` as an ``nn.Module`` (:class:`WakeSleepModule`),
        as ``ELBO.__call__`` gives an ``ELBOModule``.

        :param kwargs: as for :class:`WakeSleepModule` (``modules``).
        """
        from .module import WakeSleepModule

        return WakeSleepModule(model, guide, loss=self, **kwargs)

    def _get_trace(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Any:
        raise NotImplementedError("WakeSleepLoss builds its traces in phases()")

    # ------------------------------------------------------------------ the computation

    def trim_validation(self) -> bool:
        """Whether the next computation skips Pyro's per-distribution checks (see
        ``full_validation``)."""
        return dist_util.is_validation_enabled() and self.validated and not self.full_validation

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
        Build the losses of the requested phases (nothing is updated). ``phases.support``
        holds the observed values' support checks, to read with
        :func:`~pyro_wakesleep.checks.check_support` once the computation is done (reading a
        tensor's value here would stop a recording).

        :param args: the model's and guide's arguments.
        :param kwargs: their keyword arguments.
        :param wake: compute wake-theta (else its parameters get no gradient).
        :param sleep: compute phi.
        :param trim: skip Pyro's per-distribution checks and check the observed support
            instead; by default :meth:`trim_validation`.
        """
        trim = self.trim_validation() if trim is None else trim
        a = self.phi_objective
        wake_theta = phi = None
        theta: Dict[str, torch.Tensor] = {}
        phi_params: Dict[str, torch.Tensor] = {}
        all_traces: List[Trace] = []
        support: List[checks.SupportCheck] = []
        validating = dist_util.is_validation_enabled()
        # The first time, both programs are traced with gradients (samples detached), so that
        # which objective uses which parameter shows even in a step of one phase (ownership).
        graphs = not self.validated and torch.is_grad_enabled()
        model_graph = guide_graph = None

        def nesting(with_guide: bool) -> int:
            return self.plate_nesting(model, guide, args, kwargs, with_guide=with_guide)

        with dist_util.validation_enabled(validating and not trim):
            if wake or (sleep and a.uses_wake):
                grad_phi = sleep and a.uses_wake
                model_traces, guide_traces, vectorized = particles.wake_traces(
                    model,
                    guide,
                    args,
                    kwargs,
                    num_particles=self.num_particles,
                    vectorize=self.vectorize_particles,
                    nesting=nesting,
                    guide_grad=grad_phi or graphs,
                    defensive=self.defensive,
                )
                if self.num_particles > 1 and not vectorized:
                    self.vectorize_particles = False  # a fallback: stay sequential
                if trim:
                    for t in model_traces:
                        support += checks.observed_support(t)
                all_traces += model_traces + guide_traces
                if self.num_particles == 1:
                    wake_theta = objectives.classic_wake_theta_loss(model_traces[0])
                    if grad_phi:
                        phi = objectives.weighted(
                            a.wake, objectives.classic_wake_phi_loss(guide_traces[0])
                        )
                else:
                    found = (model_traces, guide_traces, self.max_plate_nesting, vectorized)
                    weights = objectives.log_weights(*found)
                    log_r = log_proposal(weights, self.defensive, *found)
                    wake_theta = objectives.wake_theta_loss(weights, log_r)
                    if grad_phi:
                        phi = objectives.weighted(a.wake, objectives.wake_phi_loss(weights, log_r))
                for t in model_traces:
                    theta.update(traces.params(t))
                for t in guide_traces:
                    phi_params.update(traces.params(t))
                if grad_phi:
                    checks.check_guide_density(guide_traces[0], "wake")
                if not self.validated and validating:
                    checks.check_model_guide_shapes(
                        model_traces[0], guide_traces[0], self.max_plate_nesting, vectorized
                    )
                model_graph = wake_theta
                guide_graph = phi if grad_phi else ownership.density(guide_traces, graphs)
                if not wake:
                    wake_theta = wake_theta.detach()
            if sleep and a.uses_sleep:
                if self._observations_keyword[0] is not guide:  # inspect once per guide
                    self._observations_keyword = (guide, takes_observations(guide))
                S = self.num_sleep_particles
                log_q, sleep_traces = particles.sleep_traces(
                    model,
                    guide,
                    args,
                    kwargs,
                    num_particles=S,
                    vectorize=self.vectorize_particles,
                    nesting=nesting,
                    with_observations=self._observations_keyword[1],
                    fantasy_args=self.fantasy_args,
                    first=graphs,
                )
                # sleep-phi: -1/S sum_s log q(z_s | x_s) over fantasies (z_s, x_s) ~ p
                sleep_phi = -log_q if S == 1 else -log_q / S
                all_traces += sleep_traces
                if model_graph is None:
                    model_graph = ownership.density(sleep_traces[0::2], graphs)
                for t in sleep_traces[0::2]:
                    theta.update(traces.params(t))
                for t in sleep_traces[1::2]:
                    phi_params.update(traces.params(t))
                sleep_phi = objectives.weighted(a.sleep, sleep_phi)
                phi = sleep_phi if phi is None else phi + sleep_phi
                guide_graph = phi
        theta, phi_params = self._owners.split(model_graph, guide_graph, theta, phi_params)
        checks.check_disjoint(theta, phi_params)
        return WakeSleepPhases(
            wake_theta,
            phi,
            theta if wake else {},
            phi_params if sleep else {},
            all_traces,
            support,
        )

    # ------------------------------------------------------------------ probes

    def plate_nesting(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, with_guide: bool = True
    ) -> int:
        """``max_plate_nesting``, guessed once from a probe run (which draws nothing from the
        random streams, so a resumed run draws what the uninterrupted run draws) when not
        given: of the guide and the model, or of the model alone (``with_guide=False``: the
        sleep phase, whose guide may need fantasies to run at all)."""
        if self.max_plate_nesting is None:
            if with_guide:
                found: Tuple[Trace, ...] = self.probe(model, guide, args, kwargs)
            else:
                found = (traces.probe_model(model, args, kwargs),)
            self.max_plate_nesting = traces.plate_nesting(*found)
        return self.max_plate_nesting

    def probe(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        handler: Optional[Messenger] = None,
    ) -> Tuple[Trace, Trace]:
        """One run of the guide and the model outside any step (see
        :func:`~pyro_wakesleep.traces.probe`)."""
        return traces.probe(model, guide, args, kwargs, handler)

    def params(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> Dict[str, torch.Tensor]:
        """The unconstrained parameters the model and guide touch, by name (one probe)."""
        found: Dict[str, torch.Tensor] = {}
        for trace in self.probe(model, guide, args, kwargs):
            found.update(traces.params(trace))
        return found

    def nonfinite_sites(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict
    ) -> List[str]:
        """The sites whose log-density is not finite, found by one more probe (the failure
        path: the step's own traces are let go before its backward pass). Parameters the
        probe creates are removed again."""
        store = pyro.get_param_store()
        known = set(store.keys())
        try:
            return checks.nonfinite_sites(list(self.probe(model, guide, args, kwargs)))
        except Exception:
            return []
        finally:
            for name in set(store.keys()) - known:
                del store[name]


def _item(loss: Optional[torch.Tensor]) -> float:
    return float("nan") if loss is None else loss.detach().item()
