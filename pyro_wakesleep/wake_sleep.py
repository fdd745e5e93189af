"""
:class:`WakeSleep`, an inference class alongside Pyro's :class:`~pyro.infer.SVI` that fits a
model by wake-sleep (Hinton et al. 1995) or reweighted wake-sleep (Bornschein & Bengio 2015).

The objectives themselves are written once, in :mod:`pyro_wakesleep.objectives`; fantasies in
:mod:`pyro_wakesleep.fantasies`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import OrderedDict
from numbers import Number
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import pyro
import torch
from pyro import poutine
from pyro.distributions import util as dist_util
from pyro.optim import PyroOptim
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import am_i_wrapped

from . import adopt, checkpoint, jit, objectives
from .fantasies import FantasyArgsFn, draw_fantasy, guide_arguments, takes_observations
from .files import atomic_save
from .objectives import PARTICLE_PLATE, sample_sites


class WakeSleepLosses(NamedTuple):
    """The losses of one step: ``wake_theta`` (the model's) and ``phi`` (the guide's)."""

    wake_theta: float
    phi: float


class NonFiniteLossError(RuntimeError):
    """A loss or gradient of a step is NaN or infinite; nothing was updated."""


class _DetachSamples(Messenger):
    """Draw each latent sample of the guide without a gradient path through the sample itself.

    Wake-phi differentiates :math:`\\log q_\\phi(z \\mid x)` at fixed :math:`z`; a
    reparameterized draw must not carry :math:`\\phi` into :math:`z` (nor into later guide
    sites computed from it).
    """

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"]:
            return
        if msg["value"] is None:
            msg["value"] = msg["fn"](*msg["args"], **msg["kwargs"])
        if isinstance(msg["value"], torch.Tensor):
            msg["value"] = msg["value"].detach()


def _particle_plate(fn: Callable, size: int, dim: int) -> Callable:
    def vectorized(*args: Any, **kwargs: Any) -> Any:
        with pyro.plate(PARTICLE_PLATE, size, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def _params(trace: Trace) -> Dict[str, torch.Tensor]:
    """The unconstrained parameters a trace touched, by name."""
    return {
        name: site["value"].unconstrained()
        for name, site in trace.nodes.items()
        if site["type"] == "param"
    }


def _check_sites(model_trace: Trace, guide_trace: Trace, phase: str) -> None:
    """Every model latent is sampled by the guide and the guide samples nothing else."""
    model_sites = {site["name"]: site for site in sample_sites(model_trace)}
    observed = {
        name
        for name, site in model_sites.items()
        if site["is_observed"] or site["infer"].get("was_observed")
    }
    if not observed:
        raise ValueError(
            "The model has no observed site: wake-sleep fits a model to data, so at least one "
            "pyro.sample(..., obs=data) statement is needed."
        )
    guide_names = {site["name"] for site in sample_sites(guide_trace)}
    for name in guide_names:
        if name in observed:
            raise ValueError(
                f"The guide samples site '{name}', which the model observes. The guide should "
                f"sample only latent sites; remove '{name}' from the guide."
            )
        if name not in model_sites:
            raise ValueError(
                f"The guide samples site '{name}', which the model does not have (in the "
                f"{phase} phase). Rename it to match a model latent, or remove it."
            )
    for name in model_sites:
        if name not in observed and name not in guide_names:
            raise ValueError(
                f"The model's latent site '{name}' is not sampled by the guide (in the {phase} "
                f"phase). Add pyro.sample('{name}', ...) to the guide: wake-sleep needs a "
                "proposal for every latent."
            )


def _observed_support(model_trace: Trace) -> List[Tuple[str, str, torch.Tensor]]:
    """
    Whether each observed value lies in its distribution's support (masked entries excepted),
    as ``(site name, description, scalar bool tensor)``; :func:`_check_support` reads them.
    This is the one check of Pyro's distribution validation that a wake-sleep step cannot
    replace by its finiteness check: a Bernoulli observed at 2 has a finite log-density.
    """
    found = []
    for site in sample_sites(model_trace):
        if not site["is_observed"]:
            continue
        fn, value, mask = site["fn"], site["value"], site["mask"]
        if mask is False:
            continue
        with torch.no_grad():
            ok = fn.support.check(value)
            if isinstance(mask, torch.Tensor):
                ok = ok | ~mask
            found.append(
                (site["name"], f"({fn.support}) of its distribution {type(fn).__name__}", ok.all())
            )
    return found


def _check_support(support: List[Tuple[str, str, torch.Tensor]]) -> None:
    """Raise, naming the site, if an observed value of :func:`_observed_support` is outside."""
    if not support or bool(torch.stack([ok for _, _, ok in support]).all()):
        return
    for name, description, ok in support:
        if not bool(ok):
            raise ValueError(
                f"The observed value of site '{name}' lies outside the support {description}. "
                f"Check the data passed as obs= at '{name}' (for example binary data for a "
                "Bernoulli)."
            )


def _nonfinite_sites(traces: List[Trace]) -> List[str]:
    names = []
    for trace in traces:
        for site in sample_sites(trace):
            with torch.no_grad():
                lp = objectives.site_log_prob(site)
            if isinstance(lp, torch.Tensor) and not torch.isfinite(lp).all():
                names.append(site["name"])
    return list(dict.fromkeys(names))


def _nonfinite_inputs(args: tuple, kwargs: dict) -> List[str]:
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + [
        (f"keyword argument '{k}'", v) for k, v in kwargs.items()
    ]
    return [
        name
        for name, value in named
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not torch.isfinite(value).all()
    ]


def _rng_state(tensors: List[torch.Tensor]) -> tuple:
    """torch's random state on the CPU and on the CUDA devices of ``tensors``."""
    devices = list(dict.fromkeys(t.device for t in tensors if t.is_cuda))
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, value in cuda:
        torch.cuda.set_rng_state(value, device)


def _brief(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _weighted(weight: float, loss: torch.Tensor) -> torch.Tensor:
    """``weight * loss``, without an operation when the weight is 1."""
    return loss if weight == 1 else weight * loss


def _item(loss: Optional[torch.Tensor]) -> float:
    return float("nan") if loss is None else loss.detach().item()


_Made = List[Tuple[PyroOptim, torch.Tensor, Optional[str], Any]]


def _make_optimizers(updates: List[Tuple[PyroOptim, List[torch.Tensor]]]) -> _Made:
    """
    Make the torch optimizers that an update is about to need, before any update: PyroOptim
    makes one per parameter the first time it steps it, so a constructor that raises (an
    invalid learning rate, say) or a loaded state written by another optimizer would otherwise
    fail half-way, after other parameters were updated. Made with the gradients set aside, so
    that nothing is stepped; on failure the optimizers made here are dropped again
    (:func:`_drop_optimizers`) and the loaded states they took up wait as before.

    :param updates: ``(optimizer, parameters)`` pairs.
    :returns: what was made, for :func:`_drop_optimizers` should the step fail later.
    :raises ValueError: naming the parameter whose loaded optimizer state does not fit.
    """
    made: _Made = []
    try:
        for optim, params in updates:
            new = [p for p in params if p not in optim.optim_objs]
            if not new:
                continue
            # The loaded states that PyroOptim.set_state left waiting for these parameters.
            waiting = getattr(optim, "_state_waiting_to_be_consumed", {})
            store = pyro.get_param_store()
            for p in new:
                name = store.param_name(p)
                pending = waiting.get(name)
                grad, p.grad = p.grad, None
                try:
                    optim([p])  # makes p's optimizer, takes up its loaded state; no gradient
                except Exception as error:
                    if pending is None:
                        raise
                    raise ValueError(
                        f"The optimizer state loaded for parameter '{name}' cannot be taken up "
                        f"({_brief(error)}): it was written by another kind of optimizer? Load "
                        "it with the optimizer it was saved with. No parameter or optimizer "
                        "state was changed."
                    ) from error
                finally:
                    p.grad = grad
                    if p in optim.optim_objs:
                        made.append((optim, p, name, pending))
                _check_optimizer_state(optim.optim_objs[p], name)
    except Exception:
        _drop_optimizers(made)
        raise
    return made


def _drop_optimizers(made: _Made) -> None:
    """Undo :func:`_make_optimizers`: the optimizers go, their loaded states wait again."""
    for optim, p, name, pending in made:
        optim.optim_objs.pop(p, None)
        optim.grad_clip.pop(p, None)
        if pending is not None:
            optim.set_state({name: pending})


def _check_optimizer_state(optimizer: Any, name: Optional[str]) -> None:
    """Refuse a torch optimizer whose parameter groups lack its own hyperparameters: the sign
    of a loaded state written by another kind of optimizer."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # an LR scheduler's
    defaults = getattr(optimizer, "defaults", {})
    for group in getattr(optimizer, "param_groups", []):
        missing = sorted(set(defaults) - set(group))
        if missing:
            raise ValueError(
                f"The optimizer state loaded for parameter '{name}' does not fit "
                f"{type(optimizer).__name__}: it lacks {', '.join(missing)}, so it was written by "
                "another kind of optimizer. Load it with the optimizer it was saved with. No "
                "parameter or optimizer state was changed."
            )


class _Phases(NamedTuple):
    wake_theta: Optional[torch.Tensor]
    phi: Optional[torch.Tensor]
    theta: Dict[str, torch.Tensor]
    phi_params: Dict[str, torch.Tensor]
    traces: List[Trace]
    support: List[Tuple[str, str, torch.Tensor]]


class _Recorded(NamedTuple):
    """What a recorded step's outputs are: the losses present, the parameters each objective
    touched (fixed for a recording), and the support checks that follow the losses."""

    has_wake_theta: bool
    has_phi: bool
    theta: Dict[str, torch.Tensor]
    phi_params: Dict[str, torch.Tensor]
    support: List[Tuple[str, str]]

    def params(self) -> List[Tuple[str, torch.Tensor]]:
        return list(self.theta.items()) + list(self.phi_params.items())

    def phases(self, outputs: Tuple[torch.Tensor, ...]) -> _Phases:
        it = iter(outputs)
        wake_theta = next(it) if self.has_wake_theta else None
        phi = next(it) if self.has_phi else None
        support = [(name, description, next(it)) for name, description in self.support]
        return _Phases(wake_theta, phi, self.theta, self.phi_params, [], support)


class WakeSleep:
    r"""
    Wake-sleep and reweighted wake-sleep inference for a Pyro model and guide.

    Use it where you would use ``SVI(model, guide, optim, loss=Trace_ELBO())``::

        ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 1e-3}))
        for x in batches:
            losses = ws.step(x)   # WakeSleepLosses(wake_theta=..., phi=...)

    The model's parameters :math:`\theta` (those its trace touches) are fitted by the
    *wake-theta* objective on real data with latents drawn from the guide; the guide's
    parameters :math:`\phi` (those its trace touches) by the *phi* objective, which mixes
    *sleep-phi* (maximize :math:`\log q_\phi(z \mid x)` on fantasies :math:`(z, x)` drawn from
    the model) and *wake-phi* (self-normalized importance-weighted :math:`\log q_\phi` on real
    data). The objectives are written out in :mod:`pyro_wakesleep.objectives`. No gradient is
    taken through a sample, so discrete latents and stochastic control flow need nothing special.

    Importance weights are formed per data point wherever the latents are local to a plate:
    a batch of :math:`N` gives :math:`N` independent :math:`K`-particle estimates (unlike
    Pyro's ``ReweightedWakeSleep``, which weights the whole batch jointly).

    :param model: the model, a callable containing Pyro primitives, with at least one
        observed site.
    :param guide: the guide (recognition model), a callable with the same arguments as the
        model that samples every latent site of the model and no observed site.
    :param optim: a :class:`pyro.optim.PyroOptim`, used for the model's parameters and, unless
        ``guide_optim`` is given, for the guide's. ``None`` for an estimator used only through
        :meth:`differentiable_loss` (with a torch optimizer, or :class:`WakeSleepModule`).
    :param guide_optim: an optional separate :class:`~pyro.optim.PyroOptim` for the guide.
    :param int num_particles: :math:`K`, the number of guide samples per data point in the wake
        phase. ``1`` is classic wake-sleep; ``K > 1`` is reweighted wake-sleep.
    :param int num_sleep_particles: the number of fantasies per data point in the sleep phase.
    :param phi_objective: ``"sleep"`` (sleep-phi, the classic choice), ``"wake"`` (wake-phi),
        or a float :math:`a \in [0, 1]` for :math:`a \cdot` wake-phi :math:`+ (1 - a) \cdot`
        sleep-phi.
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
    :param bool skip_nonfinite: when a step's loss or gradient is NaN or infinite (or the data
        hold NaN), skip the step - no parameter or optimizer state changes - count it in
        :attr:`num_skipped_steps`, warn, and return NaN losses, instead of raising
        :class:`NonFiniteLossError` (the default).
    :param bool distributed: train data-parallel over ``torch.distributed``'s default process
        group: each process steps on its own shard of the data and draws its own samples and
        fantasies (seed each process differently), the parameters are broadcast from rank 0
        at the first step, and every step averages the losses and the wake-theta and phi
        gradients over the processes (two collectives) before the identical updates. With a
        model that scales its likelihood to the data set (``pyro.plate(size=N,
        subsample=...)``), each process's loss estimates the full-data loss, and W processes
        on W shards of a batch take the step of one process on the whole batch. A failure on
        any process (bad data, non-finite values) is raised on every process, with nothing
        updated anywhere.
    :param bool full_validation: with Pyro's validation enabled (its default), run all of
        Pyro's distribution checks on every step. By default they run on the first step only;
        later steps check the support of every observed value and, as always, the finiteness
        of every loss and gradient, but do not re-check the arguments of each distribution nor
        the samples the model and guide drew themselves (which lie in their support by
        construction). That saves 5-10% of a step. ``pyro.enable_validation(False)`` turns
        every check off, as for SVI.
    :param bool jit: record the tensor operations of a step once per signature of the
        arguments (shapes, dtypes, devices; other arguments by value) and replay them on later
        steps, without running the Pyro programs (see :mod:`pyro_wakesleep.jit`). The replay
        computes what the eager step computes, bitwise, and saves the fixed cost of Pyro's
        machinery (about 2 ms a step). The first step, and any step with ``full_validation``,
        under an outer effect handler or without gradients (:meth:`evaluate_loss`), runs
        eagerly. Only for models and guides of static structure, as for Pyro's JIT ELBOs: a
        program that reads a sampled value into Python (stochastic control flow) cannot be
        recorded, and then runs eagerly with a warning; a program that changes with Python
        state outside its arguments (a global flag, ``random``, ``module.train()`` /
        ``eval()``, a global data tensor rebound to another batch) must not use it: tensors
        read other than through the arguments and Pyro's parameter store are held by
        reference (fine for buffers updated in place). A recording holds the parameter
        tensors it saw; when the
        parameter store holds other tensors (after :meth:`load`, or a rebuilt model) the step
        is recorded again.

    A step computes both phases from the current parameters, checks that every loss and
    gradient is finite, and only then updates :math:`\theta` and :math:`\phi`: a step that
    raises leaves the parameter store and the optimizers as they were. For a strictly
    alternating schedule (the sleep phase dreaming with the freshly updated model) call
    :meth:`wake_step` then :meth:`sleep_step`.

    References: Hinton, Dayan, Frey & Neal, *Science* 1995; Bornschein & Bengio, *ICLR* 2015;
    Le, Kosiorek, Siddharth, Teh & Wood, *UAI* 2019.
    """

    #: The number of argument signatures whose recordings ``jit=True`` keeps (least recently
    #: used first out).
    max_recordings = 8

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
    ) -> None:
        for name, opt in (("optim", optim), ("guide_optim", guide_optim)):
            if opt is not None and not isinstance(opt, PyroOptim):
                raise TypeError(
                    f"{name} must be a pyro.optim.PyroOptim such as pyro.optim.Adam({{'lr': "
                    f"1e-3}}), got {type(opt).__name__}"
                )
        for name, value in (
            ("num_particles", num_particles),
            ("num_sleep_particles", num_sleep_particles),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.insomnia = self._parse_phi_objective(phi_objective)
        if max_plate_nesting is not None and (
            isinstance(max_plate_nesting, bool)
            or not isinstance(max_plate_nesting, int)
            or max_plate_nesting < 0
        ):
            raise ValueError(
                f"max_plate_nesting must be a non-negative integer or None, got "
                f"{max_plate_nesting!r}"
            )
        if fantasy_args is not None and not callable(fantasy_args):
            raise TypeError("fantasy_args must be callable: fn(observations, *args, **kwargs)")
        self.model = model
        self.guide = guide
        self.optim = optim
        self.guide_optim = guide_optim if guide_optim is not None else optim
        self.num_particles = num_particles
        self.num_sleep_particles = num_sleep_particles
        self.phi_objective = phi_objective
        self.vectorize_particles = vectorize_particles
        self.max_plate_nesting = max_plate_nesting
        self.fantasy_args = fantasy_args
        self.full_validation = bool(full_validation)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.distributed = bool(distributed)
        self.jit = bool(jit)
        self._jit_off: Optional[str] = None
        self._recordings: OrderedDict = OrderedDict()
        if self.distributed and not torch.distributed.is_initialized():
            raise RuntimeError(
                "WakeSleep(distributed=True) needs torch.distributed's default process group: "
                "call torch.distributed.init_process_group(...) first (torchrun sets up the "
                "environment it reads)."
            )
        self._validated = False
        self._broadcast_done = False
        #: The number of updates taken (failed or skipped steps excluded).
        self.num_steps = 0
        #: The number of steps skipped for non-finite values (``skip_nonfinite=True``).
        self.num_skipped_steps = 0
        self._pending_load: Optional[tuple] = None
        self._guide_takes_observations = takes_observations(guide)

    @staticmethod
    def _parse_phi_objective(phi_objective: Union[str, float]) -> float:
        if phi_objective == "sleep":
            return 0.0
        if phi_objective == "wake":
            return 1.0
        if isinstance(phi_objective, Number) and not isinstance(phi_objective, bool):
            a = float(phi_objective)
            if 0.0 <= a <= 1.0:
                return a
        raise ValueError(
            "phi_objective must be 'sleep', 'wake' or a float a in [0, 1] (a * wake-phi + "
            f"(1 - a) * sleep-phi), got {phi_objective!r}"
        )

    # ------------------------------------------------------------------ public API

    def step(self, *args: Any, **kwargs: Any) -> WakeSleepLosses:
        """
        Run one wake phase and one sleep phase from the current parameters, then update the
        model's parameters by the wake-theta gradient and the guide's by the phi gradient.

        Any args or kwargs are passed to the model and guide, as with SVI.

        :returns: the losses, as floats.
        :rtype: WakeSleepLosses
        """
        self._require_optim()
        phases = self._run(args, kwargs, wake=True, sleep=True, update=True)
        if phases is None:
            return WakeSleepLosses(float("nan"), float("nan"))
        return WakeSleepLosses(_item(phases.wake_theta), _item(phases.phi))

    def wake_step(self, *args: Any, **kwargs: Any) -> float:
        """
        Run the wake phase alone: one update of the model's parameters by wake-theta.

        :returns: the wake-theta loss.
        """
        self._require_optim()
        phases = self._run(args, kwargs, wake=True, sleep=False, update=True)
        return float("nan") if phases is None else _item(phases.wake_theta)

    def sleep_step(self, *args: Any, **kwargs: Any) -> float:
        """
        Run the guide's phase alone: one update of the guide's parameters by the phi objective
        (sleep-phi on fresh fantasies, plus wake-phi on guide samples of the real data where
        ``phi_objective`` asks for it).

        :returns: the phi loss.
        """
        self._require_optim()
        phases = self._run(args, kwargs, wake=False, sleep=True, update=True)
        return float("nan") if phases is None else _item(phases.phi)

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
        result = self._phases(args, kwargs, wake=True, sleep=True, trim=self._trim_validation())
        self._validated = True
        return sum(x for x in (result.wake_theta, result.phi) if x is not None)

    def evaluate_loss(self, *args: Any, **kwargs: Any) -> WakeSleepLosses:
        """
        Compute both losses without gradients and without changing any parameter.

        :returns: the losses, as floats.
        :rtype: WakeSleepLosses
        """
        with torch.no_grad():
            phases = self._run(args, kwargs, wake=True, sleep=True, update=False)
        return WakeSleepLosses(_item(phases.wake_theta), _item(phases.phi))

    def save(
        self, path: Union[str, os.PathLike[str]], extra: Optional[Dict[str, Any]] = None
    ) -> None:
        """
        Save a checkpoint: Pyro's parameter store, both optimizers' states, the step counts
        and the random number generators' states, as plain data (no pickled Python objects),
        written atomically (a temporary file, then a rename), so that an interrupted write
        leaves the previous file intact.

        :param path: the checkpoint file.
        :param extra: optional plain data saved with it (tensors, numbers, strings, ``None``,
            lists, tuples and dicts of them: an epoch count, a data-order generator's state, a
            configuration) and returned by :meth:`load`.
        :raises TypeError: naming an entry that is not plain data (a constraint defined
            outside Pyro, say); nothing is written.
        :raises OSError: naming the file when it cannot be written (a full disk); the previous
            file is then unchanged.
        """
        optim_state = {} if self.optim is None else self.optim.get_state()
        guide_state = (
            None
            if self.guide_optim is self.optim or self.guide_optim is None
            else self.guide_optim.get_state()
        )
        state = checkpoint.state(
            optim_state, guide_state, self.num_steps, self.num_skipped_steps, extra
        )
        atomic_save(state, path)

    def load(self, path: Union[str, os.PathLike[str]], *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """
        Resume from a checkpoint written by :meth:`save`, typically in a new process, after
        building the model's and guide's modules afresh and before any step.

        The file is read as plain data (``torch.load(weights_only=True)``): a crafted file
        cannot run code. The loaded values fill Pyro's parameter store, the optimizers'
        states wait for their parameters, the step counts and random generators are
        restored. Modules registered with ``pyro.module`` (which by default keeps a module's
        own tensors over stored ones) receive the loaded values: each value is copied into
        the tensor the model or guide registers under its name. A run resumed this way
        continues bitwise as the uninterrupted run would have.

        The checkpoint must fit the model and guide: every saved parameter registered by
        them with the same shape, and every parameter they register saved. Given model
        arguments (any batch), the model and guide are run once at once, drawing nothing
        from the random streams: a checkpoint that does not fit is refused with nothing
        changed, and the modules hold the loaded values on return. Without arguments that
        run happens at the next step (or :meth:`evaluate_loss`, :meth:`differentiable_loss`),
        which refuses a checkpoint that does not fit, changing nothing, as every later step
        does until another checkpoint is loaded.

        :param path: the checkpoint file.
        :param args: optional model arguments for that immediate run.
        :param kwargs: optional model keyword arguments for it.
        :returns: the ``extra`` data saved with the checkpoint (an empty dict if none).
        :raises ~pyro_wakesleep.CheckpointError: if the file is missing, unreadable,
            truncated, corrupt, holds anything but plain data, is not a WakeSleep checkpoint,
            or does not fit the model and guide; nothing is changed.
        """
        state = checkpoint.read(path)
        loaded, loaded_constraints = state["params"], state["constraints"]
        store = pyro.get_param_store()
        # Parameters the store holds already (the model ran in this process) are checked now.
        now = store.get_state()["constraints"]
        present = {
            name: (store.get_param(name).detach(), now[name])
            for name in store.keys()
            if name in loaded
        }
        problems = adopt.misfits(loaded, loaded_constraints, present, complete=False)
        registered = None
        if not problems and (args or kwargs):
            registered = self._registered_params(args, kwargs, path, loaded, loaded_constraints)
        if problems:
            raise checkpoint.CheckpointError(adopt.misfit_message(path, problems))
        try:
            checkpoint.set_rng_state(state["rng"])
        except ValueError as error:
            raise checkpoint.CheckpointError(f"{path}: {error}") from error
        # Optimizers already made for these parameters would keep their own state: drop them,
        # so that the loaded states are taken up at the next update.
        for optim in {id(o): o for o in (self.optim, self.guide_optim) if o is not None}.values():
            for p in list(optim.optim_objs):
                if store.param_name(p) in loaded:
                    del optim.optim_objs[p]
                    optim.grad_clip.pop(p, None)
        store.set_state({"params": loaded, "constraints": loaded_constraints})
        if self.optim is not None:
            self.optim.set_state(state["optim"])
            if state["guide_optim"] is not None and self.guide_optim is not None:
                self.guide_optim.set_state(state["guide_optim"])
        self.num_steps = state["num_steps"]
        self.num_skipped_steps = state["num_skipped_steps"]
        self._recordings.clear()
        if registered is not None:
            adopt.adopt(loaded, registered)
            self._pending_load = None
        else:
            self._pending_load = (path, loaded, loaded_constraints)
        return state["extra"]

    # ------------------------------------------------------------------ internals

    def _phases(self, args: tuple, kwargs: dict, *, wake: bool, sleep: bool, trim: bool) -> _Phases:
        """
        The losses of the requested phases: replayed from a recording where ``jit`` allows,
        computed eagerly otherwise; the observed values' support is checked either way.
        """
        result, failure = None, None
        if self._jit_usable(trim):
            result, failure = self._jit_phases(args, kwargs, wake=wake, sleep=sleep, trim=trim)
        if result is None:
            result = self._eager_phases(args, kwargs, wake=wake, sleep=sleep, trim=trim)
            if failure is not None:
                # The step could be run but not recorded: run eagerly from now on.
                self._jit_disable(failure)
        _check_support(result.support)
        return result

    def _eager_phases(
        self, args: tuple, kwargs: dict, *, wake: bool, sleep: bool, trim: bool
    ) -> _Phases:
        """:meth:`_compute` with Pyro's validation trimmed or not (see ``full_validation``)."""
        with dist_util.validation_enabled(not trim):
            return self._compute(args, kwargs, wake=wake, sleep=sleep, check_support=trim)

    def _jit_usable(self, trim: bool) -> bool:
        """Replay only what an eager step after the first would compute: no full validation
        (it reads tensor values), gradients on, no outer effect handler, nothing pending."""
        return (
            self.jit
            and self._jit_off is None
            and self._validated
            and self._pending_load is None
            and (trim or not dist_util.is_validation_enabled())
            and torch.is_grad_enabled()
            and not am_i_wrapped()
            and not (self.distributed and not self._broadcast_done)
        )

    def _jit_disable(self, reason: str) -> None:
        self._jit_off = reason
        self._recordings.clear()
        warnings.warn(
            f"WakeSleep(jit=True) runs eagerly from now on: {reason}. Models whose structure "
            "depends on sampled values (stochastic control flow) cannot be recorded; "
            "jit=False avoids this warning.",
            RuntimeWarning,
            stacklevel=6,  # the caller of step (step, _run, _run_once, _phases, here)
        )

    def _jit_phases(
        self, args: tuple, kwargs: dict, *, wake: bool, sleep: bool, trim: bool
    ) -> Tuple[Optional[_Phases], Optional[str]]:
        """
        Replay the recording for these arguments' signature, or record one (the recording run
        is this step's run). Returns ``(phases, None)``, or ``(None, reason)`` when the step
        cannot be recorded; the random streams and the parameter store are then as before.
        """
        sig = jit.signature(args, kwargs)
        if sig is None:
            return None, "an argument is neither a tensor nor hashable"
        key = (sig.key, wake, sleep, trim)
        store = pyro.get_param_store()
        recording = self._recordings.get(key)
        if recording is not None:
            graph, static = recording
            if all(store._params.get(name) is t for name, t in static.params()):
                self._recordings.move_to_end(key)
                rng = _rng_state(sig.tensors)
                try:
                    with torch.enable_grad():
                        return static.phases(graph(*sig.tensors)), None
                except Exception as error:
                    # New values the recording cannot follow; the eager step decides.
                    _set_rng_state(rng)
                    del self._recordings[key]
                    return None, f"a recorded step failed on new arguments ({_brief(error)})"
            # The parameter store holds other tensors now (a load, a rebuilt model).
            del self._recordings[key]

        def step(*tensors: torch.Tensor) -> Tuple[Tuple[torch.Tensor, ...], _Recorded]:
            a, k = sig.rebuild(tensors)
            r = self._eager_phases(a, k, wake=wake, sleep=sleep, trim=trim)
            losses = tuple(x for x in (r.wake_theta, r.phi) if x is not None)
            static = _Recorded(
                r.wake_theta is not None,
                r.phi is not None,
                r.theta,
                r.phi_params,
                [(name, description) for name, description, _ in r.support],
            )
            return losses + tuple(ok for _, _, ok in r.support), static

        known = set(store.keys())
        rng = _rng_state(sig.tensors)
        try:
            outputs, static, graph = jit.record(step, sig.tensors)
        except Exception as error:
            _set_rng_state(rng)
            for name in set(store.keys()) - known:
                del store[name]
            return None, f"the step could not be recorded ({_brief(error)})"
        self._recordings[key] = (graph, static)
        while len(self._recordings) > self.max_recordings:
            self._recordings.popitem(last=False)
        return static.phases(outputs), None

    def _trim_validation(self) -> bool:
        """Whether this run skips Pyro's per-distribution checks (see ``full_validation``)."""
        return dist_util.is_validation_enabled() and self._validated and not self.full_validation

    def _probe(
        self, args: tuple, kwargs: dict, handler: Optional[Messenger] = None
    ) -> Tuple[Trace, Trace]:
        """
        Run the guide, then the model on the guide's sample, outside the step: without
        gradients or Pyro's validation, hidden from outer handlers (``handler``, if given,
        sees the run), and leaving the random streams as they were, so that a probe never
        changes what the training run draws.

        :returns: ``(model_trace, guide_trace)``.
        """
        devices = [a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda]
        with poutine.block(), torch.no_grad(), torch.random.fork_rng(devices):
            with dist_util.validation_enabled(False), handler or contextlib.nullcontext():
                guide_trace = poutine.trace(self.guide).get_trace(*args, **kwargs)
                model_trace = poutine.trace(
                    poutine.replay(self.model, trace=guide_trace)
                ).get_trace(*args, **kwargs)
        return model_trace, guide_trace

    def _registered_params(
        self,
        args: tuple,
        kwargs: dict,
        path: Any,
        loaded: Dict[str, torch.Tensor],
        loaded_constraints: Dict[str, Any],
    ) -> Dict[str, Any]:
        """
        One probe run recording the parameters the model and guide register, checked against
        a checkpoint's. Parameters the run creates are removed again.

        :returns: what was registered, by name (see :class:`adopt.RegisteredParams`).
        :raises CheckpointError: when the checkpoint does not fit.
        """
        store = pyro.get_param_store()
        known = set(store.keys())
        recorder = adopt.RegisteredParams()
        try:
            self._probe(args, kwargs, handler=recorder)
        except Exception as error:
            # A parameter of the wrong shape typically breaks the run itself.
            problems = adopt.misfits(
                loaded, loaded_constraints, recorder.registered, complete=False
            )
            if problems:
                raise checkpoint.CheckpointError(adopt.misfit_message(path, problems)) from error
            raise
        finally:
            for name in set(store.keys()) - known:
                del store[name]
        problems = adopt.misfits(loaded, loaded_constraints, recorder.registered)
        if problems:
            raise checkpoint.CheckpointError(adopt.misfit_message(path, problems))
        return recorder.registered

    def _finish_load(self, args: tuple, kwargs: dict) -> None:
        """After a :meth:`load` without arguments: check the checkpoint against the model and
        guide and give their tensors the loaded values (one probe run, drawing nothing)."""
        if self._pending_load is None:
            return
        path, loaded, loaded_constraints = self._pending_load
        registered = self._registered_params(args, kwargs, path, loaded, loaded_constraints)
        adopt.adopt(loaded, registered)
        self._pending_load = None

    def _probed_params(self, args: tuple, kwargs: dict) -> Dict[str, torch.Tensor]:
        """The unconstrained parameters the model and guide touch, by name (one probe)."""
        params: Dict[str, torch.Tensor] = {}
        for trace in self._probe(args, kwargs):
            params.update(_params(trace))
        return params

    def _require_optim(self) -> None:
        if self.optim is None:
            raise ValueError(
                "This WakeSleep has no optimizer (optim=None): use differentiable_loss with a "
                "torch optimizer, or pass optim=pyro.optim.Adam({'lr': 1e-3}) to step."
            )

    def _run(
        self, args: tuple, kwargs: dict, *, wake: bool, sleep: bool, update: bool
    ) -> Optional[_Phases]:
        """:meth:`_run_once`, after finishing a :meth:`load` made without arguments; with
        ``skip_nonfinite``, a non-finite step is skipped (returns None)."""
        self._finish_load(args, kwargs)
        try:
            return self._run_once(args, kwargs, wake=wake, sleep=sleep, update=update)
        except NonFiniteLossError as error:
            if not (self.skip_nonfinite and update):
                raise
            self.num_skipped_steps += 1
            warnings.warn(
                f"Skipped a step (skip_nonfinite=True). {error}", RuntimeWarning, stacklevel=3
            )
            return None

    def _run_once(
        self, args: tuple, kwargs: dict, *, wake: bool, sleep: bool, update: bool
    ) -> _Phases:
        """
        Compute the losses of the requested phases and, with ``update``, take the optimizer
        steps. Any failure leaves the parameter store, the gradients and the optimizers as they
        were (parameters first created by the failed call are removed again).
        """
        store = pyro.get_param_store()
        known = set(store.keys())
        result = None
        made: _Made = []
        trim = self._trim_validation()
        synced = False
        try:
            if self.distributed and not self._broadcast_done:
                self._broadcast_parameters(args, kwargs)
            result = self._phases(args, kwargs, wake=wake, sleep=sleep, trim=trim)
            if update:
                # Let the traces (their distributions, cached probabilities, fantasies) go
                # before the backward pass: that lowers the step's peak memory. The rare
                # failure path traces again to name the sites.
                result = result._replace(traces=[])
                loss = sum(x for x in (result.wake_theta, result.phi) if x is not None)
                if isinstance(loss, torch.Tensor) and loss.requires_grad:
                    loss.backward()
                updates = []
                if wake and result.theta:
                    updates.append((self.optim, list(result.theta.values())))
                if sleep and result.phi_params:
                    updates.append((self.guide_optim, list(result.phi_params.values())))
                # Before the sync, so that a failure is every process's; dropped again if
                # the step fails later.
                made = _make_optimizers(updates)
                if self.distributed:
                    synced = True
                    result = self._all_reduce(result, failed=False)
                self._check_finite(result, args, kwargs)
        except BaseException as error:
            _drop_optimizers(made)
            if self.distributed and not synced:
                synced = True
                try:
                    self._all_reduce(None, failed=True)  # tell the other processes
                except Exception:
                    pass
            if result is not None:
                for p in list(result.theta.values()) + list(result.phi_params.values()):
                    p.grad = None
            for name in set(store.keys()) - known:
                del store[name]
            inputs = _nonfinite_inputs(args, kwargs)
            if (
                inputs
                and isinstance(error, Exception)
                and not isinstance(error, NonFiniteLossError)
            ):
                # Typically Pyro's validation refusing NaN data: say what and where.
                raise NonFiniteLossError(
                    self._nonfinite_message(
                        [], self._retraced_nonfinite_sites(args, kwargs), inputs
                    )
                ) from error
            raise
        self._validated = True
        if not update:
            return result
        theta = list(result.theta.values())
        phi = list(result.phi_params.values())
        if wake and theta:
            self.optim(theta)
        if sleep and phi:
            self.guide_optim(phi)
        for p in theta + phi:
            p.grad = None
        self.num_steps += 1
        return result

    def _broadcast_parameters(self, args: tuple, kwargs: dict) -> None:
        """Create the parameters (a probe run that leaves the random streams as they were),
        then copy rank 0's values to every process."""
        params = self._probed_params(args, kwargs)
        for name in sorted(params):
            torch.distributed.broadcast(params[name].data, src=0)
        self._broadcast_done = True

    def _all_reduce(self, result: Optional[_Phases], failed: bool) -> Optional[_Phases]:
        """
        Average the losses and gradients over the processes. A first, small collective says
        whether any process failed (then every process raises and nothing is updated); the
        second sums the flattened gradients.
        """
        world = torch.distributed.get_world_size()
        status = torch.zeros(3, dtype=torch.float64)
        if failed or result is None:
            status[0] = 1.0
        else:
            status[1] = 0.0 if result.wake_theta is None else result.wake_theta.detach().double()
            status[2] = 0.0 if result.phi is None else result.phi.detach().double()
        torch.distributed.all_reduce(status)
        if failed or result is None:
            return None
        if status[0] > 0:
            raise NonFiniteLossError(
                f"Step {self.num_steps}: another process failed this step (see its error). "
                "No parameter or optimizer state was changed on any process."
            )
        params = [
            p
            for p in list(result.theta.values()) + list(result.phi_params.values())
            if p.grad is not None
        ]
        if params:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            torch.distributed.all_reduce(flat)
            flat /= world
            offset = 0
            for p in params:
                n = p.grad.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
        mean = status / world
        like = result.wake_theta if result.wake_theta is not None else result.phi
        wake_theta = None if result.wake_theta is None else mean[1].to(like)
        phi = None if result.phi is None else mean[2].to(like)
        return result._replace(wake_theta=wake_theta, phi=phi)

    def _retraced_nonfinite_sites(self, args: tuple, kwargs: dict) -> List[str]:
        """The sites whose log-density is not finite, found by tracing once more (failure path)."""
        store = pyro.get_param_store()
        known = set(store.keys())
        try:
            return _nonfinite_sites(list(self._probe(args, kwargs)))
        except Exception:
            return []
        finally:
            for name in set(store.keys()) - known:
                del store[name]

    def _nonfinite_message(self, problems: List[str], sites: List[str], inputs: List[str]) -> str:
        message = f"Step {self.num_steps}: non-finite "
        message += ", ".join(problems) if problems else "values"
        message += "."
        if sites:
            message += " Non-finite log-density at site(s) " + ", ".join(f"'{s}'" for s in sites)
            message += "."
        if inputs:
            message += " NaN or infinity in " + ", ".join(inputs) + "."
        return (
            message + " No parameter or optimizer state was changed. Remove NaN/inf from the "
            "data, and check the model and guide for parameters that leave their support."
        )

    def _check_finite(self, result: _Phases, args: tuple, kwargs: dict) -> None:
        losses = {"wake_theta": result.wake_theta, "phi": result.phi}
        params = {**result.theta, **result.phi_params}
        # One fused check on the hot path: a sum is NaN or infinite when any of its terms is
        # (a finite overflow would need entries near 1e38). The exact search below runs only
        # when this fails.
        totals = [x.detach().reshape(()) for x in losses.values() if x is not None]
        totals += [p.grad.sum() for p in params.values() if p.grad is not None]
        if not totals or bool(torch.isfinite(torch.stack(totals)).all()):
            return
        problems = [
            f"{name} loss"
            for name, x in losses.items()
            if x is not None and not torch.isfinite(x).all()
        ]
        problems += [
            f"gradient of parameter '{name}'"
            for name, p in params.items()
            if p.grad is not None and not torch.isfinite(p.grad).all()
        ]
        if not problems:  # the fused sum overflowed, but every entry is finite
            return
        # The traces were let go before the backward pass: trace again to name the sites.
        sites = self._retraced_nonfinite_sites(args, kwargs)
        raise NonFiniteLossError(
            self._nonfinite_message(problems, sites, _nonfinite_inputs(args, kwargs))
        )

    def _plate_nesting(self, args: tuple, kwargs: dict) -> int:
        if self.max_plate_nesting is None:
            # The probe draws nothing from the random streams: a run resumed from a
            # checkpoint (which probes again) draws what the uninterrupted run draws.
            model_trace, guide_trace = self._probe(args, kwargs)
            dims = [
                frame.dim
                for trace in (model_trace, guide_trace)
                for site in trace.nodes.values()
                if site["type"] == "sample"
                for frame in site["cond_indep_stack"]
                if frame.vectorized
            ]
            self.max_plate_nesting = -min(dims) if dims else 0
        return self.max_plate_nesting

    def _wake_traces(
        self, args: tuple, kwargs: dict, grad_phi: bool, check_support: bool = False
    ) -> Tuple[List[Trace], List[Trace], bool, list]:
        guide, model = self.guide, self.model
        K = self.num_particles
        vectorized = self.vectorize_particles and K > 1
        if vectorized:
            dim = -self._plate_nesting(args, kwargs) - 1
            guide = _particle_plate(guide, K, dim)
            model = _particle_plate(model, K, dim)
        if grad_phi:
            # Outside the particle plate, so that each sample is drawn after broadcasting.
            guide = _DetachSamples()(guide)
        guide_traces, model_traces, support = [], [], []
        for _ in range(1 if vectorized else K):
            with torch.set_grad_enabled(grad_phi and torch.is_grad_enabled()):
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
            _check_sites(model_trace, guide_trace, "wake")
            if check_support:
                support += _observed_support(model_trace)
            guide_traces.append(guide_trace)
            model_traces.append(model_trace)
        return model_traces, guide_traces, vectorized, support

    def _sleep_loss(self, args: tuple, kwargs: dict) -> Tuple[torch.Tensor, List[Trace]]:
        S = self.num_sleep_particles
        model, guide = self.model, self.guide
        vectorized = self.vectorize_particles and S > 1 and self._guide_takes_observations
        if vectorized:
            dim = -self._plate_nesting(args, kwargs) - 1
            model = _particle_plate(model, S, dim)
            guide = _particle_plate(guide, S, dim)
        log_q: Any = None
        traces = []
        for _ in range(1 if vectorized else S):
            model_trace = draw_fantasy(model, *args, **kwargs)
            guide_args, guide_kwargs = guide_arguments(
                model_trace,
                args,
                kwargs,
                use_observations_keyword=self._guide_takes_observations,
                fantasy_args=self.fantasy_args,
            )
            guide_trace = poutine.trace(poutine.replay(guide, trace=model_trace)).get_trace(
                *guide_args, **guide_kwargs
            )
            _check_sites(model_trace, guide_trace, "sleep")
            term = objectives.trace_log_prob_sum(guide_trace)
            log_q = term if log_q is None else log_q + term
            traces += [model_trace, guide_trace]
        return (-log_q if S == 1 else -log_q / S), traces

    def _compute(
        self, args: tuple, kwargs: dict, *, wake: bool, sleep: bool, check_support: bool = False
    ) -> _Phases:
        """
        Build the losses of the requested phases (no update). ``check_support``: collect the
        observed values' support checks (Pyro's distribution validation is off) for
        :func:`_check_support`; nothing here reads a tensor's value.
        """
        a = self.insomnia
        need_wake_traces = wake or (sleep and a > 0)
        wake_theta = phi = None
        theta: Dict[str, torch.Tensor] = {}
        phi_params: Dict[str, torch.Tensor] = {}
        traces: List[Trace] = []
        support: list = []
        if need_wake_traces:
            grad_phi = sleep and a > 0
            model_traces, guide_traces, vectorized, support = self._wake_traces(
                args, kwargs, grad_phi, check_support
            )
            traces += model_traces + guide_traces
            if self.num_particles == 1:
                wake_theta = objectives.classic_wake_theta_loss(model_traces[0])
                if grad_phi:
                    phi = _weighted(a, objectives.classic_wake_phi_loss(guide_traces[0]))
            else:
                weights = objectives.log_weights(
                    model_traces, guide_traces, self.max_plate_nesting, vectorized
                )
                wake_theta = objectives.wake_theta_loss(weights)
                if grad_phi:
                    phi = _weighted(a, objectives.wake_phi_loss(weights))
            for t in model_traces:
                theta.update(_params(t))
            for t in guide_traces:
                phi_params.update(_params(t))
            if not wake:
                wake_theta = wake_theta.detach()
        if sleep and a < 1:
            sleep_phi, sleep_traces = self._sleep_loss(args, kwargs)
            traces += sleep_traces
            for t in sleep_traces[0::2]:
                theta.update(_params(t))
            for t in sleep_traces[1::2]:
                phi_params.update(_params(t))
            sleep_phi = _weighted(1 - a, sleep_phi)
            phi = sleep_phi if phi is None else phi + sleep_phi
        shared = sorted(set(theta) & set(phi_params))
        if shared:
            raise ValueError(
                "Parameter(s) " + ", ".join(f"'{n}'" for n in shared) + " are used by both the "
                "model and the guide. Wake-sleep updates the model's parameters by the wake "
                "phase and the guide's by the sleep phase, so each parameter must belong to one "
                "of them: give the guide its own copy."
            )
        if not wake:
            theta = {}
        if not sleep:
            phi_params = {}
        return _Phases(wake_theta, phi, theta, phi_params, traces, support)
