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

from typing import Any, Callable, Hashable, List, NamedTuple, Optional, Tuple

import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree


class Signature(NamedTuple):
    """The tensors of a call's arguments, a key that is equal for two calls exactly when one
    recording serves both, and the flattened arguments (:meth:`rebuild` puts them back)."""

    tensors: List[torch.Tensor]
    key: Hashable
    leaves: list
    spec: pytree.TreeSpec

    def rebuild(self, tensors: tuple) -> Tuple[tuple, dict]:
        """``(args, kwargs)`` with ``tensors`` in place of the call's tensors, in order."""
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
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors: List[torch.Tensor] = []
    parts: List[Hashable] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            parts.append(
                (
                    "tensor",
                    tuple(leaf.shape),
                    leaf.dtype,
                    leaf.device,
                    leaf.layout,
                    leaf.requires_grad,
                )
            )
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
    if (
        isinstance(target, torch._ops.OpOverload)
        and torch.Tag.nondeterministic_seeded in target.tags
    ):
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
        indices = node.args[1] if len(node.args) > 1 else []
        return any(
            isinstance(i, Node)
            and isinstance(i.meta.get("val"), torch.Tensor)
            and i.meta["val"].dtype in (torch.bool, torch.uint8)
            for i in indices
        )
    return True


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
    try:
        graph.graph.eliminate_dead_code(is_impure_node=_keeps)
    except TypeError:  # an older torch without is_impure_node: keep every node
        pass
    graph.recompile()
    return held["outputs"], held["static"], graph
