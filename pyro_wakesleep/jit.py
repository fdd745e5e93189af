"""
Recorded steps: the tensor operations of a step, recorded once per argument signature and
replayed on later calls without running the Pyro programs again (``WakeSleep(jit=True)``).

A wake-sleep step runs four Pyro programs (guide and model in the wake phase, model and guide
in the sleep phase); their Python machinery (effect handlers, trace objects, distribution
objects) costs a fixed amount per step, whatever the size of the networks. For a model whose
structure does not depend on sampled values, the sequence of tensor operations of a step is
the same every time: only the values differ. :func:`record` runs the step once under
:func:`torch.fx.experimental.proxy_tensor.make_fx` (pre-dispatch, on the real tensors), which
returns the step's real results *and* a :class:`torch.fx.GraphModule` of the operations,
including the random draws and the switches of gradient mode; calling the graph then performs
exactly those operations on new inputs. Parameters enter the graph by reference (the very
tensors of Pyro's parameter store), so optimizer updates are seen; autograd records the
replayed operations as it records eager ones. The replay draws the same random numbers and
computes the same values as the eager step, bitwise.

The condition is the one of Pyro's JIT ELBOs: static structure. ``make_fx`` refuses a program
that reads a tensor's value into Python (``if z.sum() > 0``, ``.item()``, ``bool(t)``): that
is how stochastic control flow shows itself, and :class:`~pyro_wakesleep.WakeSleep` then runs
eagerly. What cannot be seen is Python state that changes between calls without going
through a tensor (a global flag, ``random.random()`` in the model, a module switched between
``train()`` and ``eval()``), nor a tensor read other than through the arguments or Pyro's
parameter store (a global data tensor, a closure): the recording holds such a tensor by
reference, which follows in-place updates (module buffers) but not a rebinding of the name to
another tensor. Such models must not use ``jit=True``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, List, NamedTuple, Optional, Tuple

import pyro
import torch
from pyro.distributions import util as dist_util
from pyro.poutine.runtime import am_i_wrapped
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from .checks import SupportCheck, brief, user_stacklevel
from .fantasies import UnrecordableMatch
from .loss import WakeSleepLoss, WakeSleepPhases

# The start of the reason a step of the obs=data[i] idiom's sleep phase is not recorded.
_MATCHING = "the step could not be recorded: "


class Signature(NamedTuple):
    """The tensors of a call's arguments, a key that is equal for two calls exactly when one
    recording serves both, and the flattened arguments (:meth:`rebuild` puts them back)."""

    tensors: List[torch.Tensor]
    key: Hashable
    leaves: list
    spec: Optional[pytree.TreeSpec]  # None: the call's arguments are the tensors, in order

    def rebuild(self, tensors: tuple) -> Tuple[tuple, dict]:
        """``(args, kwargs)`` with ``tensors`` in place of the call's tensors, in order."""
        if self.spec is None:
            return tuple(tensors), {}
        it = iter(tensors)
        leaves = [next(it) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves]
        return pytree.tree_unflatten(leaves, self.spec)


def signature(args: tuple, kwargs: dict) -> Optional[Signature]:
    """
    The :class:`Signature` of a call: tensors are keyed by shape, dtype, device, layout and
    ``requires_grad``; every other argument by its value; so are torch's default dtype and
    autocast states. ``None`` if an argument that is not a tensor is unhashable (it cannot be
    told apart from a changed one).
    """
    spec: Optional[pytree.TreeSpec] = None
    if kwargs or not all(isinstance(a, torch.Tensor) for a in args):
        leaves, spec = pytree.tree_flatten((args, kwargs))
    else:  # the common call, step(x): no tree to flatten (nor a TreeSpec to hash in the key)
        leaves = list(args)
    tensors: List[torch.Tensor] = []
    parts: List[Hashable] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            parts.append(("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.layout,
                          leaf.requires_grad))  # fmt: skip
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            parts.append((type(leaf), leaf))

    # Global settings that change the recorded operations.
    settings = (torch.get_default_dtype(), _autocast_states())
    return Signature(tensors, (spec, tuple(parts), settings), leaves, spec)


def _autocast_states() -> Tuple[bool, bool]:
    try:
        return torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled(), torch.is_autocast_enabled()


def _keeps(node: Node) -> bool:
    """Dead-code elimination keeps side effects and every random draw (so that the replay
    consumes the random streams as the eager step does)."""
    target = node.target
    seeded = torch.Tag.nondeterministic_seeded
    if isinstance(target, torch._ops.OpOverload) and seeded in target.tags:
        return True
    return node.is_impure()


def _shape_depends_on_values(node: Node) -> bool:
    """Whether an operation's output shape depends on tensor values (``nonzero``, boolean
    indexing, ...): a replay would reuse the recorded shapes downstream."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if torch.Tag.dynamic_output_shape not in target.tags:
        return False
    aten = torch.ops.aten
    if target.overloadpacket in (aten.index_put, aten.index_put_):
        return False  # the output has the input's shape
    if target.overloadpacket is aten.index:
        indices: Any = node.args[1] if len(node.args) > 1 else []
        return any(
            isinstance(i, Node)
            and isinstance(i.meta.get("val"), torch.Tensor)
            and i.meta["val"].dtype in (torch.bool, torch.uint8)
            for i in indices
        )
    return True


def _simplify(graph: torch.fx.Graph) -> None:
    """
    Drop what the recording holds that computes nothing, so that the replay (which calls each
    operation from Python, a few microseconds apiece) does not pay for it: copies of tensor
    constants detached in place and never read, and switches of gradient mode that the next
    switch overrides before any operation. Nothing that autograd records is touched: even a
    view that changes no value (``expand`` to a tensor's own shape) is a node of the
    autograd graph, and dropping it would change the order in which the backward pass sums
    gradients, and so their last bits.
    """
    aten = torch.ops.aten
    set_grad = torch._C._set_grad_enabled
    previous: Optional[Node] = None
    for node in list(graph.nodes):
        target = node.target
        if target is set_grad:
            if previous is not None:
                graph.erase_node(previous)
            previous = node
            continue
        if node.op == "call_function":
            previous = None  # an operation ran under the last switch
        if target is aten.detach_.default and not node.users:
            source = node.args[0]
            if (
                isinstance(source, Node)
                and source.target is aten.lift_fresh_copy.default
                and len(source.users) == 1
            ):
                graph.erase_node(node)
                graph.erase_node(source)


def record(
    fn: Callable[..., Tuple[Tuple[torch.Tensor, ...], Any]], tensors: List[torch.Tensor]
) -> Tuple[Tuple[torch.Tensor, ...], Any, GraphModule]:
    """
    Run ``fn(*tensors)`` once, for real, while recording its tensor operations.

    :param fn: returns ``(outputs, static)``: a tuple of tensors and any Python object
        describing them (it is computed at recording time only).
    :param tensors: the inputs.
    :returns: ``(outputs, static, graph)``: the real outputs of this run (with their autograd
        history), the static description, and the graph, whose call on new inputs returns
        the outputs of a new run.
    :raises RuntimeError: when the program reads a tensor value into Python (``make_fx``'s
        data-dependent error), has an operation whose output shape depends on tensor values,
        or cannot be recorded for another reason.
    """
    held: dict = {}

    def traced(*inputs: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outputs, static = fn(*inputs)
        held["outputs"], held["static"] = outputs, static
        return outputs

    graph = make_fx(traced, pre_dispatch=True)(*tensors)
    for node in graph.graph.nodes:
        if _shape_depends_on_values(node):
            raise RuntimeError(
                f"the output shape of {node.target} depends on tensor values, which a replay "
                "cannot follow"
            )
    _simplify(graph.graph)
    try:
        graph.graph.eliminate_dead_code(is_impure_node=_keeps)
    except TypeError:  # an older torch without is_impure_node: keep every node
        pass
    graph.recompile()
    return held["outputs"], held["static"], graph


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

    def phases(self, outputs: Tuple[torch.Tensor, ...]) -> WakeSleepPhases:
        it = iter(outputs)
        wake_theta = next(it) if self.has_wake_theta else None
        phi = next(it) if self.has_phi else None
        support = [SupportCheck(name, description, next(it)) for name, description in self.support]
        return WakeSleepPhases(wake_theta, phi, self.theta, self.phi_params, [], support)


def _rng_state(tensors: List[torch.Tensor]) -> tuple:
    """torch's random state on the CPU and on the CUDA devices of ``tensors``."""
    devices = list(dict.fromkeys(t.device for t in tensors if t.is_cuda))
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in devices]


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, value in cuda:
        torch.cuda.set_rng_state(value, device)


class StepRecorder:
    """
    The recording layer of ``WakeSleep(jit=True)``: computes a step's losses as
    :meth:`WakeSleepLoss.phases` does, by replaying the recording made for the arguments'
    signature, or by recording one (the recording run is that step's run).

    A step runs eagerly when it must compute what a recording would not: the first step (Pyro's
    full validation), ``full_validation``, a step without gradients or under an outer effect
    handler. A program that cannot be recorded (stochastic control flow, an output shape that
    depends on values) or a replay that fails runs eagerly, with the random streams and the
    parameter store as before, and turns the recorder off with a warning.

    :param loss: the loss whose phases are recorded.
    :param max_recordings: the number of signatures whose recordings are kept (least recently
        used first out).
    """

    def __init__(self, loss: WakeSleepLoss, max_recordings: int = 8) -> None:
        self.loss = loss
        self.max_recordings = max_recordings
        #: Why the recorder is off (a step could not be recorded or replayed), or ``None``.
        self.off_reason: Optional[str] = None
        #: The recordings by signature key: ``(graph, what its outputs are)``.
        self.recordings: OrderedDict = OrderedDict()

    @property
    def num_recordings(self) -> int:
        """The number of recordings kept."""
        return len(self.recordings)

    def clear(self) -> None:
        """Forget every recording (the next step records again)."""
        self.recordings.clear()

    def usable(self, trim: bool) -> bool:
        """Whether a step with this validation setting can be replayed: it must compute
        what an eager step after the first would (no full validation: it reads tensor
        values), with gradients on and no outer effect handler."""
        return (
            self.off_reason is None
            and self.loss.validated
            and (trim or not dist_util.is_validation_enabled())
            and torch.is_grad_enabled()
            and not am_i_wrapped()
        )

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
        """The phases of a step, as :meth:`WakeSleepLoss.phases` computes them: replayed,
        recorded, or (when it cannot be recorded) eager."""
        trim = self.loss.trim_validation() if trim is None else trim
        if not self.usable(trim):
            return self.loss.phases(model, guide, args, kwargs, wake=wake, sleep=sleep, trim=trim)
        result, failure = self._replay_or_record(model, guide, args, kwargs, wake, sleep, trim)
        if result is None:
            result = self.loss.phases(model, guide, args, kwargs, wake=wake, sleep=sleep, trim=trim)
        if failure is not None:
            # The step could be run but not recorded: run eagerly from now on.
            self.off_reason = failure
            self.recordings.clear()
            if failure.startswith(_MATCHING):
                hint = (
                    "Give the guide an 'observations' keyword (it then receives the fantasies "
                    "by site name, and the step can be recorded)"
                )
            else:
                hint = (
                    "Models whose structure depends on sampled values (stochastic control "
                    "flow) cannot be recorded"
                )
            warnings.warn(
                f"WakeSleep(jit=True) runs eagerly from now on: {failure}. {hint}; jit=False "
                "avoids this warning.",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        return result

    def _replay_or_record(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        wake: bool,
        sleep: bool,
        trim: bool,
    ) -> Tuple[Optional[WakeSleepPhases], Optional[str]]:
        """``(phases, None)``, or ``(None, reason)`` when the step cannot be recorded; the
        random streams and the parameter store are then as before."""
        sig = signature(args, kwargs)
        if sig is None:
            return None, "an argument is neither a tensor nor hashable"
        key = (sig.key, wake, sleep, trim)
        store = pyro.get_param_store()
        params = dict(store.named_parameters())
        recording = self.recordings.get(key)
        if recording is not None:
            graph, static = recording
            if all(params.get(name) is t for name, t in static.params()):
                self.recordings.move_to_end(key)
                rng = _rng_state(sig.tensors)
                try:
                    with torch.enable_grad():
                        return static.phases(graph(*sig.tensors)), None
                except Exception as error:
                    # New values the recording cannot follow; the eager step decides.
                    _set_rng_state(rng)
                    del self.recordings[key]
                    return None, f"a recorded step failed on new arguments ({brief(error)})"
            # The parameter store holds other tensors now (a load, a rebuilt model).
            del self.recordings[key]

        def step(*tensors: torch.Tensor) -> Tuple[Tuple[torch.Tensor, ...], _Recorded]:
            a, k = sig.rebuild(tensors)
            r = self.loss.phases(model, guide, a, k, wake=wake, sleep=sleep, trim=trim)
            losses = tuple(x for x in (r.wake_theta, r.phi) if x is not None)
            static = _Recorded(
                r.wake_theta is not None,
                r.phi is not None,
                r.theta,
                r.phi_params,
                [(check.site, check.description) for check in r.support],
            )
            return losses + tuple(check.ok for check in r.support), static

        known = set(store.keys())
        rng = _rng_state(sig.tensors)
        try:
            outputs, static, graph = record(step, sig.tensors)
        except Exception as error:
            _set_rng_state(rng)
            for name in set(store.keys()) - known:
                del store[name]
            if isinstance(error, UnrecordableMatch):
                return None, f"{_MATCHING}{error}"
            return None, f"the step could not be recorded ({brief(error)})"
        self.recordings[key] = (graph, static)
        while len(self.recordings) > self.max_recordings:
            self.recordings.popitem(last=False)
        return static.phases(outputs), None
