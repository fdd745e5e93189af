"""
:class:`WakeSleep`, an inference class alongside Pyro's :class:`~pyro.infer.SVI` that fits a
model by wake-sleep (Hinton et al. 1995) or reweighted wake-sleep (Bornschein & Bengio 2015).

It is a thin driver, as SVI is: the objective and every trace belong to its loss,
:class:`~pyro_wakesleep.WakeSleepLoss`; the driver takes the update, atomically (a step that
fails changes nothing), with the optional layers each in its own module: step recording
(:mod:`pyro_wakesleep.jit`), data parallelism (:mod:`pyro_wakesleep.distributed`),
checkpoints (:mod:`pyro_wakesleep.checkpoint`), and the checks and their messages
(:mod:`pyro_wakesleep.checks`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, NamedTuple, Optional, Union

import pyro
import torch
from pyro.optim import PyroOptim

from . import checkpoint, checks
from .checks import NonFiniteLossError
from .distributed import ProcessGroupSync
from .fantasies import FantasyArgsFn
from .fused import FusedSteps
from .jit import StepRecorder
from .loss import WakeSleepLoss, WakeSleepPhases
from .optimizers import Made, drop_optimizers, make_optimizers

__all__ = ["NonFiniteLossError", "WakeSleep", "WakeSleepLosses"]


class WakeSleepLosses(NamedTuple):
    """The losses of one step: ``wake_theta`` (the model's) and ``phi`` (the guide's)."""

    wake_theta: float
    phi: float


class WakeSleep:
    r"""
    Wake-sleep and reweighted wake-sleep inference for a Pyro model and guide.

    Use it where you would use ``SVI(model, guide, optim, loss=Trace_ELBO())``::

        ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 1e-3}))
        for x in batches:
            losses = ws.step(x)   # WakeSleepLosses(wake_theta=..., phi=...)

    The model's parameters :math:`\theta` are fitted by *wake-theta* on real data with latents
    drawn from the guide, the guide's :math:`\phi` by *phi*: sleep-phi on fantasies drawn from
    the model, wake-phi on real data, or a mix (:mod:`pyro_wakesleep.objectives`). With
    :math:`K > 1` particles the importance weights are formed per data point. The objective is
    :attr:`loss`, a :class:`~pyro_wakesleep.WakeSleepLoss`; this class drives it, as
    :class:`~pyro.infer.SVI` drives an ELBO.

    :param model: the model, a callable containing Pyro primitives, with at least one
        observed site.
    :param guide: the guide (recognition model), a callable with the same arguments as the
        model that samples every latent site of the model and no observed site.
    :param optim: a :class:`pyro.optim.PyroOptim`, used for the model's parameters and, unless
        ``guide_optim`` is given, for the guide's. ``None`` for an estimator used only through
        :meth:`differentiable_loss` (with a torch optimizer, or :class:`WakeSleepModule`).
    :param guide_optim: an optional separate :class:`~pyro.optim.PyroOptim` for the guide.
    :param num_particles: :math:`K` (1: classic wake-sleep; more: reweighted wake-sleep),
        and likewise ``num_sleep_particles``, ``phi_objective`` (``"sleep"``, ``"wake"`` or a
        float :math:`a \in [0, 1]` mixing them), ``vectorize_particles``, ``max_plate_nesting``,
        ``fantasy_args``, ``full_validation`` and ``defensive`` (a wake proposal mixing in the
        prior): the estimator's options, which build :attr:`loss`; see
        :class:`~pyro_wakesleep.WakeSleepLoss`.
    :param bool skip_nonfinite: when a step's loss or gradient is NaN or infinite (or the data
        hold NaN), skip the step - no parameter or optimizer state changes - count it in
        :attr:`num_skipped_steps`, warn, and return NaN losses, instead of raising
        :class:`NonFiniteLossError` (the default).
    :param bool distributed: train data-parallel over ``torch.distributed``'s default process
        group (:mod:`pyro_wakesleep.distributed`): each process steps on its own shard of the
        data with its own draws (seed each process differently), rank 0's parameters are
        broadcast at the first step, every step averages the losses and gradients, and a
        failure on any process is raised on every process with nothing updated anywhere. A loss
        with a state of its own (a ``state_dict``, as
        :class:`~pyro_wakesleep.memoised.MemoisedWakeSleepLoss` has) is
        refused: each process would keep its own.
    :param bool jit: record a step's tensor operations once per signature of the arguments and
        replay them (:mod:`pyro_wakesleep.jit`): bitwise the eager step, without the fixed cost
        of Pyro's machinery. Only for models and guides of static structure, as for Pyro's JIT
        ELBOs (a program that reads a sampled value into Python runs eagerly, with a warning),
        that change with nothing but their arguments and Pyro's parameter store.
    :param loss: a :class:`~pyro_wakesleep.WakeSleepLoss` in place of the estimator's options
        (as :class:`~pyro.infer.SVI` takes one), or a subclass such as
        :class:`~pyro_wakesleep.memoised.MemoisedWakeSleepLoss`: a loss with a ``commit()``
        method (a state of its own) has it called after each successful update, and its
        ``state_dict()`` is saved with the checkpoint.
    :param bool fuse_optim: update the parameters of a :class:`~pyro.optim.PyroOptim` of Adam
        or AdamW with torch's fused kernel, one call for all of them, instead of Pyro's one
        optimizer step per parameter (:mod:`pyro_wakesleep.fused`): the same update up to
        floating-point rounding, several times faster on CPU, the optimizer state being
        Pyro's own. ``False`` steps as :class:`~pyro.infer.SVI` does, bitwise.

    A step computes both phases from the current parameters, checks that every loss and
    gradient is finite, and only then updates: a step that raises leaves the parameter store
    and the optimizers as they were. For a strictly alternating schedule call
    :meth:`wake_step` then :meth:`sleep_step`.

    References: Hinton, Dayan, Frey & Neal, *Science* 1995; Bornschein & Bengio, *ICLR* 2015;
    Le, Kosiorek, Siddharth, Teh & Wood, *UAI* 2019.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: Optional[PyroOptim],
        *,
        guide_optim: Optional[PyroOptim] = None,
        num_particles: int = 1,
        num_sleep_particles: int = 1,
        phi_objective: Union[str, float] = "sleep",
        vectorize_particles: bool = True,
        max_plate_nesting: Optional[int] = None,
        fantasy_args: Optional[FantasyArgsFn] = None,
        skip_nonfinite: bool = False,
        distributed: bool = False,
        full_validation: bool = False,
        jit: bool = False,
        loss: Optional[WakeSleepLoss] = None,
        defensive: float = 0.0,
        fuse_optim: bool = True,
    ) -> None:
        for name, opt in (("optim", optim), ("guide_optim", guide_optim)):
            if opt is not None and not isinstance(opt, PyroOptim):
                raise TypeError(
                    f"{name} must be a pyro.optim.PyroOptim such as pyro.optim.Adam({{'lr': "
                    f"1e-3}}), got {type(opt).__name__}"
                )
        options = (num_particles, num_sleep_particles, phi_objective, vectorize_particles,
                   max_plate_nesting, fantasy_args, full_validation, defensive)  # fmt: skip
        if loss is not None and options != (1, 1, "sleep", True, None, None, False, 0.0):
            raise ValueError("Give the estimator's options to WakeSleepLoss, not beside loss=.")
        #: The objective: ``loss``, or a :class:`WakeSleepLoss` of the estimator's options.
        self.loss = WakeSleepLoss(*options) if loss is None else loss
        self.model, self.guide = model, guide
        self.optim = optim
        self.guide_optim = guide_optim if guide_optim is not None else optim
        self.skip_nonfinite = bool(skip_nonfinite)
        if jit and not getattr(self.loss, "recordable", True):
            raise ValueError(f"jit=True cannot record a {type(self.loss).__name__}'s step.")
        #: The step recorder (``jit=True``), else ``None``.
        self.recorder = StepRecorder(self.loss) if jit else None
        #: The optimizer-step layer: fused Adam/AdamW updates (``fuse_optim=True``).
        self.optimizer_steps = FusedSteps(enabled=fuse_optim)
        #: The process-group sync (``distributed=True``), else ``None``.
        self.sync = ProcessGroupSync(self.loss) if distributed else None
        #: The number of updates taken (failed or skipped steps excluded).
        self.num_steps = 0
        #: The number of steps skipped for non-finite values (``skip_nonfinite=True``).
        self.num_skipped_steps = 0
        self._pending: Optional[checkpoint.PendingLoad] = None

    # The estimator's options, as attributes (they live in the loss).
    num_particles = property(lambda self: self.loss.num_particles)
    num_sleep_particles = property(lambda self: self.loss.num_sleep_particles)
    phi_objective = property(lambda self: self.loss.phi_objective)
    defensive = property(lambda self: self.loss.defensive)
    max_plate_nesting = property(lambda self: self.loss.max_plate_nesting)

    # ------------------------------------------------------------------ public API

    def step(self, *args: Any, **kwargs: Any) -> WakeSleepLosses:
        """
        Run one wake phase and one sleep phase from the current parameters, then update the
        model's parameters by the wake-theta gradient and the guide's by the phi gradient.

        Any args or kwargs are passed to the model and guide, as with SVI.

        :returns: the losses, as floats.
        :rtype: WakeSleepLosses
        """
        phases = self._run(args, kwargs, wake=True, sleep=True, update=True)
        if phases is None:
            return WakeSleepLosses(float("nan"), float("nan"))
        return WakeSleepLosses(_item(phases.wake_theta), _item(phases.phi))

    def wake_step(self, *args: Any, **kwargs: Any) -> float:
        """
        Run the wake phase alone: one update of the model's parameters by wake-theta.

        :returns: the wake-theta loss.
        """
        phases = self._run(args, kwargs, wake=True, sleep=False, update=True)
        return float("nan") if phases is None else _item(phases.wake_theta)

    def sleep_step(self, *args: Any, **kwargs: Any) -> float:
        """
        Run the guide's phase alone: one update of the guide's parameters by the phi objective
        (sleep-phi on fresh fantasies, plus wake-phi on guide samples of the real data where
        ``phi_objective`` asks for it).

        :returns: the phi loss.
        """
        phases = self._run(args, kwargs, wake=False, sleep=True, update=True)
        return float("nan") if phases is None else _item(phases.phi)

    def evaluate_loss(self, *args: Any, **kwargs: Any) -> WakeSleepLosses:
        """
        Compute both losses without gradients and without changing any parameter.

        :returns: the losses, as floats.
        :rtype: WakeSleepLosses
        """
        with torch.no_grad():
            phases = self._run(args, kwargs, wake=True, sleep=True, update=False)
        assert phases is not None
        return WakeSleepLosses(_item(phases.wake_theta), _item(phases.phi))

    def differentiable_loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """
        The scalar surrogate of one step: wake-theta plus phi, whose gradient is the
        wake-theta gradient on the model's parameters and the phi gradient on the guide's (no
        gradient crosses from one objective to the other's parameters). Use it with a torch
        optimizer, :class:`~torch.nn.parallel.DistributedDataParallel` or a training
        framework; :meth:`step` does the same and updates atomically.

        :returns: a scalar tensor.
        """
        self._finish_load(args, kwargs)
        trim = self.loss.trim_validation()
        phases = self._engine().phases(self.model, self.guide, args, kwargs, trim=trim)
        checks.check_support(phases.support)
        self.loss.validated = True
        _commit(self.loss)
        return phases.total

    def save(
        self, path: Union[str, os.PathLike[str]], extra: Optional[Dict[str, Any]] = None
    ) -> None:
        """
        Save a checkpoint (:mod:`pyro_wakesleep.checkpoint`): Pyro's parameter store, both
        optimizers' states, the step counts and the random generators' states, as plain data,
        written atomically (an interrupted write leaves the previous file intact).

        :param path: the checkpoint file.
        :param extra: optional plain data saved with it (tensors, numbers, strings, ``None``,
            lists, tuples, dicts), returned by :meth:`load`.
        :raises TypeError: naming an entry that is not plain data; nothing is written.
        :raises OSError: naming the file when it cannot be written (a full disk).
        """
        checkpoint.save(self, path, extra)

    def load(self, path: Union[str, os.PathLike[str]], *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """
        Resume from a checkpoint written by :meth:`save`, typically in a new process after
        building the modules afresh: the store, the optimizers' waiting states, the step counts
        and the random generators are restored, and each loaded value is copied into the
        tensor the model or guide registers under its name (``pyro.module`` keeps a module's
        own tensors), so the run continues bitwise as the uninterrupted one would. The file is
        read as plain data: a crafted file cannot run code.

        The checkpoint must fit: the same parameter names and shapes. Given model arguments
        (any batch) the model and guide run once now, drawing nothing from the random streams,
        and a misfit is refused with nothing changed; without, that run is the next step's,
        which (like every later one) refuses a misfit and changes nothing.

        :param path: the checkpoint file.
        :param args: optional model arguments for that immediate run (and ``kwargs``).
        :returns: the ``extra`` data saved with the checkpoint (an empty dict if none).
        :raises ~pyro_wakesleep.CheckpointError: the file is missing, unreadable, corrupt or
            unsafe, or does not fit the model and guide; nothing is changed.
        """
        extra, self._pending = checkpoint.load(self, path, args, kwargs)
        return extra

    # ------------------------------------------------------------------ the update

    def _run(
        self, args: tuple, kwargs: dict, *, wake: bool, sleep: bool, update: bool
    ) -> Optional[WakeSleepPhases]:
        """
        Compute the losses of the requested phases and, with ``update``, take the optimizer
        steps. Any failure leaves the parameter store, the gradients and the optimizers as they
        were (parameters first created by the failed call are removed again); with
        ``skip_nonfinite`` a non-finite step is skipped (returns ``None``).
        """
        if update and self.optim is None:
            raise ValueError(
                "This WakeSleep has no optimizer (optim=None): use differentiable_loss with a "
                "torch optimizer, or pass optim=pyro.optim.Adam({'lr': 1e-3}) to step."
            )
        self._finish_load(args, kwargs)
        store = pyro.get_param_store()
        known = set(store.keys())
        phases: Optional[WakeSleepPhases] = None
        made: Made = []
        synced = False
        try:
            if self.sync is not None and not self.sync.broadcast_done:
                # A probe creates the parameters (drawing nothing), then rank 0's values win.
                self.sync.broadcast(self.loss.params(self.model, self.guide, args, kwargs))
            phases = self._engine().phases(
                self.model, self.guide, args, kwargs, wake=wake, sleep=sleep,
                trim=self.loss.trim_validation(),
            )  # fmt: skip
            checks.check_support(phases.support)
            if update:
                # Let the traces go before the backward pass (a lower peak memory); the rare
                # failure path traces again to name the sites.
                phases = phases._replace(traces=[])
                total = phases.total
                if isinstance(total, torch.Tensor) and total.requires_grad:
                    total.backward()
                assert self.optim is not None and self.guide_optim is not None
                # A phase not asked for touched no parameter (its dict is empty).
                theta, phi = list(phases.theta.values()), list(phases.phi_params.values())
                updates = [(self.optim, theta), (self.guide_optim, phi)]
                # Before the sync, so that a failure is every process's; dropped again if
                # the step fails later.
                made = make_optimizers(updates)
                if self.sync is not None:
                    synced = True
                    phases = self.sync.average(phases, self.num_steps)
                losses = {"wake_theta": phases.wake_theta, "phi": phases.phi}
                problems = checks.nonfinite_problems(losses, {**phases.theta, **phases.phi_params})
                if problems:
                    raise NonFiniteLossError(self._nonfinite_message(problems, args, kwargs))
        except BaseException as error:
            drop_optimizers(made)
            if self.sync is not None and not synced:
                self.sync.tell_failure()
            for p in (
                [] if phases is None else [*phases.theta.values(), *phases.phi_params.values()]
            ):
                p.grad = None
            for name in set(store.keys()) - known:
                del store[name]
            if isinstance(error, Exception) and not isinstance(error, NonFiniteLossError):
                if checks.nonfinite_inputs(args, kwargs):
                    # Typically Pyro's validation refusing NaN data: say what and where.
                    cause, error = (
                        error,
                        NonFiniteLossError(self._nonfinite_message([], args, kwargs)),
                    )
                    error.__cause__ = cause
            if not isinstance(error, NonFiniteLossError) or not (self.skip_nonfinite and update):
                raise error
            self.num_skipped_steps += 1
            warnings.warn(f"Skipped a step (skip_nonfinite=True). {error}", RuntimeWarning, 3)
            return None
        self.loss.validated = True
        if update:
            if self.guide_optim is self.optim:
                # One update of all (each parameter's own, whichever way it is grouped).
                self.optimizer_steps(self.optim, theta + phi)  # type: ignore[arg-type]
            else:
                for optim, params in updates:
                    if params:
                        self.optimizer_steps(optim, params)  # type: ignore[arg-type]
            for p in theta + phi:
                p.grad = None
            self.num_steps += 1
            _commit(self.loss)
        return phases

    def _engine(self) -> Union[StepRecorder, WakeSleepLoss]:
        """What computes the losses: the recorder (``jit=True``, once the parameters are in
        sync) or the loss."""
        if self.recorder is not None and (self.sync is None or self.sync.broadcast_done):
            return self.recorder
        return self.loss

    def _finish_load(self, args: tuple, kwargs: dict) -> None:
        """After a :meth:`load` without arguments: check the checkpoint against the model and
        guide and give their tensors the loaded values (one probe run, drawing nothing)."""
        if self._pending is not None:
            self._pending.finish(
                lambda handler: self.loss.probe(self.model, self.guide, args, kwargs, handler)
            )
            self._pending = None

    def _nonfinite_message(self, problems: list, args: tuple, kwargs: dict) -> str:
        sites = self.loss.nonfinite_sites(self.model, self.guide, args, kwargs)
        inputs = checks.nonfinite_inputs(args, kwargs)
        return checks.nonfinite_message(self.num_steps, problems, sites, inputs)


def _commit(loss: WakeSleepLoss) -> None:
    """Let a loss with a state of its own (a memory) take up the step's, after a successful
    step."""
    commit = getattr(loss, "commit", None)
    if commit is not None:
        commit()


def _item(loss: Optional[torch.Tensor]) -> float:
    return float("nan") if loss is None else loss.detach().item()
