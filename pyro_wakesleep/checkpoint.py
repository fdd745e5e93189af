"""
Checkpoints of a :class:`~pyro_wakesleep.WakeSleep` run: the checkpoint layer behind
:meth:`WakeSleep.save` and :meth:`WakeSleep.load` (:func:`save`, :func:`load`, and the
:class:`PendingLoad` that a load without arguments leaves for the next step).

A checkpoint holds Pyro's parameter store, the states of both optimizers, the step counts,
the random number generator states (torch, CUDA, Python, NumPy), the loss's own state when it
has one (``loss.state_dict()``: the memory of
:class:`~pyro_wakesleep.memoised.MemoisedWakeSleepLoss`) and any plain data the caller
adds (``extra``: an epoch count, a data-order generator, a configuration), so that a resumed run
draws the same samples as an uninterrupted one.

**Plain data only** (:mod:`pyro_wakesleep.plain`). A checkpoint holds tensors, numbers,
strings, ``None`` and lists, tuples and dicts of them, nothing else: a parameter's constraint
is stored by name (``"positive"``, ``{"name": "interval", "lower_bound": 0.0, "upper_bound":
1.0}``), NumPy's generator state as a tensor. It is read with ``torch.load(...,
weights_only=True)``, whose unpickler builds no other Python object and calls no function named
in the file, so a crafted file can fail to load but cannot run code. Version 1 files
(pyro-wakesleep 0.1.0, which pickled constraint objects and NumPy arrays) are refused for that
reason.

Checkpoints are written atomically (:mod:`pyro_wakesleep.files`), and loaded into freshly
built modules once they are known to fit them (:mod:`pyro_wakesleep.adopt`).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import pyro
import torch

from . import adopt
from .files import PathLike, atomic_save
from .plain import check_plain, decode_constraint, encode_constraint, rng_state, set_rng_state

FORMAT = "pyro-wakesleep/wake-sleep-checkpoint"
VERSION = 2
# The command's own checkpoint format in pyro-wakesleep 0.1.0, refused with its own message.
_COMMAND_FORMAT_1 = "pyro-wakesleep-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, truncated, corrupt, unsafe, not a WakeSleep
    checkpoint, or does not fit the model and guide it is loaded into."""


def _unsafe_globals(path: Path) -> str:
    find = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        names = find(path) if find is not None else []
    except Exception:
        names = []
    return f" ({', '.join(names[:4])})" if names else ""


def read(path: PathLike) -> Dict[str, Any]:
    """
    Read and check a checkpoint file, without running anything it names.

    :returns: the checkpoint: ``params``, ``optim``, ``guide_optim``, ``num_steps``,
        ``num_skipped_steps``, ``rng``, ``extra`` and ``loss``; constraints decoded, parameters as
        tensors that require gradients.
    :raises CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        file = open(path, "rb")
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be read ({error.strerror or error})") from error
    try:
        with file:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" not in str(error).lower():
            raise CheckpointError(
                f"{path}: cannot be read as a checkpoint; the file is truncated or corrupt "
                f"(UnpicklingError: {str(error).splitlines()[0]})"
            ) from error
        raise CheckpointError(
            f"{path}: refused, it holds Python objects other than plain data"
            f"{_unsafe_globals(path)}, which could run code when loaded; nothing in it was run. "
            "A WakeSleep checkpoint holds tensors, numbers and strings only (files written by "
            "pyro-wakesleep 0.1.0, format 1, are refused this way too: save them again)"
        ) from error
    except Exception as error:
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint; the file is truncated, corrupt or of "
            f"another format ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error
    if isinstance(checkpoint, dict) and checkpoint.get("format") == _COMMAND_FORMAT_1:
        raise CheckpointError(
            f"{path}: written by the pyro-wakesleep 0.1.0 command in its own former format, "
            "which is no longer read (the command now saves WakeSleep checkpoints): train the "
            "run again"
        )
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a WakeSleep checkpoint (written by WakeSleep.save); it holds "
            f"{type(checkpoint).__name__}" + _keys(checkpoint)
        )
    if checkpoint.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: checkpoint version {checkpoint.get('version')!r}, this pyro-wakesleep "
            f"reads version {VERSION}"
        )
    try:
        return _checked(checkpoint)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(
            f"{path}: a WakeSleep checkpoint with missing or malformed entries "
            f"({type(error).__name__}: {error})"
        ) from error


def _keys(obj: Any) -> str:
    return f" with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else ""


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _state_dicts(value: Any, name: str) -> Dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise TypeError(f"{name} must map parameter names to optimizer states")
    for key, state in value.items():
        if not isinstance(state, dict):
            raise TypeError(f"{name}[{key!r}] is not an optimizer state")
    return value


def _checked(checkpoint: Dict[str, Any]) -> Dict[str, Any]:
    """The checkpoint's entries, type-checked, constraints decoded (nothing applied yet)."""
    store = checkpoint["params"]
    params, specs = store["params"], store["constraints"]
    if not isinstance(params, dict) or not isinstance(specs, dict) or set(params) != set(specs):
        raise ValueError("params must hold a value and a constraint for every parameter")
    values = {}
    for name, value in params.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"parameter {name!r} is not a named tensor")
        if not (value.is_floating_point() or value.is_complex()):
            raise TypeError(f"parameter {name!r} is a {value.dtype} tensor, not a real one")
        values[name] = value.detach().requires_grad_(True)
    guide_optim = checkpoint["guide_optim"]
    rng = checkpoint["rng"]
    if not isinstance(rng, dict) or not {"torch", "python", "numpy"} <= set(rng):
        raise ValueError("rng must hold the torch, python and numpy generator states")
    extra = checkpoint.get("extra", {})
    if not isinstance(extra, dict):
        raise TypeError("extra must be a dict")
    loss = checkpoint.get("loss", {})
    if not isinstance(loss, dict):
        raise TypeError("loss must be a dict (the loss's state)")
    return {
        "params": values,
        "constraints": {name: decode_constraint(spec) for name, spec in specs.items()},
        "optim": _state_dicts(checkpoint["optim"], "optim"),
        "guide_optim": None if guide_optim is None else _state_dicts(guide_optim, "guide_optim"),
        "num_steps": _count(checkpoint["num_steps"], "num_steps"),
        "num_skipped_steps": _count(checkpoint["num_skipped_steps"], "num_skipped_steps"),
        "rng": rng,
        "extra": extra,
        "loss": loss,
    }


def state(
    optim_state: Dict[str, Any],
    guide_optim_state: Optional[Dict[str, Any]],
    num_steps: int,
    num_skipped_steps: int,
    extra: Optional[Dict[str, Any]] = None,
    loss_state: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """
    The checkpoint of the current parameter store and generators with the given optimizer
    states and counts (and the loss's own state, if any), as plain data.

    :raises TypeError: naming the entry that is not plain data (a constraint defined outside
        Pyro, an optimizer holding Python objects, an ``extra`` value).
    """
    store = pyro.get_param_store().get_state()
    params, specs = {}, {}
    for name, value in store["params"].items():
        params[name] = value.detach()
        try:
            specs[name] = encode_constraint(store["constraints"][name])
        except TypeError as error:
            raise TypeError(f"parameter '{name}': {error}") from None
    extra = {} if extra is None else extra
    check_plain(optim_state, "the optimizer state")
    check_plain(guide_optim_state, "the guide optimizer state")
    check_plain(extra, "extra")
    check_plain(loss_state, "the loss state")
    loss = {"loss": loss_state} if loss_state else {}  # absent for a loss without a state
    return {
        "format": FORMAT,
        "version": VERSION,
        "params": {"params": params, "constraints": specs},
        "optim": optim_state,
        "guide_optim": guide_optim_state,
        "num_steps": num_steps,
        "num_skipped_steps": num_skipped_steps,
        "rng": rng_state(),
        "extra": extra,
        **loss,
    }


# ------------------------------------------------------------------------- a WakeSleep's


def save(ws: Any, path: PathLike, extra: Optional[Dict[str, Any]] = None) -> None:
    """:meth:`WakeSleep.save`: the store, both optimizers, the counts and the generators,
    written atomically."""
    optim_state = {} if ws.optim is None else ws.optim.get_state()
    guide_state = (
        None if ws.guide_optim is ws.optim or ws.guide_optim is None else ws.guide_optim.get_state()
    )
    loss = getattr(ws.loss, "state_dict", None)
    loss_state = None if loss is None else loss()
    counts = (ws.num_steps, ws.num_skipped_steps)
    atomic_save(state(optim_state, guide_state, *counts, extra, loss_state), path)


class PendingLoad:
    """
    A checkpoint loaded without model arguments: its values fill the parameter store, but
    whether they fit the model and guide, and the copy into the tensors these register, wait
    for the next run (:meth:`finish`).
    """

    def __init__(
        self, path: PathLike, loaded: Dict[str, torch.Tensor], loaded_constraints: Dict[str, Any]
    ) -> None:
        self.path = path
        self.loaded = loaded
        self.loaded_constraints = loaded_constraints

    def finish(self, probe: Any) -> None:
        """
        Check the checkpoint against one probe run and give the registered tensors the
        loaded values.

        :param probe: runs the model and guide once under a given handler.
        :raises CheckpointError: when the checkpoint does not fit; nothing is changed.
        """
        registered = _registered(probe, self.path, self.loaded, self.loaded_constraints)
        adopt.adopt(self.loaded, registered)


def _registered(
    probe: Any, path: PathLike, loaded: Dict[str, torch.Tensor], loaded_constraints: Dict
) -> Dict[str, Any]:
    """One probe run recording the parameters the model and guide register, checked against a
    checkpoint's; parameters the run creates are removed again."""
    store = pyro.get_param_store()
    known = set(store.keys())
    recorder = adopt.RegisteredParams()
    try:
        probe(recorder)
    except Exception as error:
        # A parameter of the wrong shape typically breaks the run itself.
        problems = adopt.misfits(loaded, loaded_constraints, recorder.registered, complete=False)
        if problems:
            raise CheckpointError(adopt.misfit_message(path, problems)) from error
        raise
    finally:
        for name in set(store.keys()) - known:
            del store[name]
    problems = adopt.misfits(loaded, loaded_constraints, recorder.registered)
    if problems:
        raise CheckpointError(adopt.misfit_message(path, problems))
    return recorder.registered


def load(
    ws: Any, path: PathLike, args: tuple, kwargs: dict
) -> Tuple[Dict[str, Any], Optional[PendingLoad]]:
    """
    :meth:`WakeSleep.load`: read ``path``, check it against the model and guide (at once when
    given arguments, else at the next step), then fill the store, the optimizers' waiting
    states, the counts and the generators.

    :returns: the checkpoint's ``extra`` and, for a load without arguments, the
        :class:`PendingLoad` for the next step.
    :raises CheckpointError: when the file cannot be read safely or does not fit; nothing is
        changed.
    """
    checkpoint = read(path)
    loaded, loaded_constraints = checkpoint["params"], checkpoint["constraints"]
    store = pyro.get_param_store()
    # Parameters the store holds already (the model ran in this process) are checked now.
    now = store.get_state()["constraints"]
    present = {
        name: (store.get_param(name).detach(), now[name]) for name in store.keys() if name in loaded
    }
    problems = adopt.misfits(loaded, loaded_constraints, present, complete=False)
    if problems:
        raise CheckpointError(adopt.misfit_message(path, problems))
    registered = None
    if args or kwargs:

        def probe(handler: Any) -> Any:
            return ws.loss.probe(ws.model, ws.guide, args, kwargs, handler)

        registered = _registered(probe, path, loaded, loaded_constraints)
    # The loss's state (a memory) is checked and taken as a whole, or not at all.
    load_loss = getattr(ws.loss, "load_state_dict", None)
    if load_loss is not None:
        previous = ws.loss.state_dict()
        try:
            load_loss(checkpoint["loss"])
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: the loss's state does not fit: {error}") from error
    elif checkpoint["loss"]:
        raise CheckpointError(f"{path}: holds a loss state, which {type(ws.loss).__name__} has not")
    try:
        set_rng_state(checkpoint["rng"])
    except ValueError as error:
        if load_loss is not None:
            load_loss(previous)
        raise CheckpointError(f"{path}: {error}") from error
    # Optimizers already made for these parameters would keep their own state: drop them, so
    # that the loaded states are taken up at the next update.
    for optim in {id(o): o for o in (ws.optim, ws.guide_optim) if o is not None}.values():
        for p in list(optim.optim_objs):
            if store.param_name(p) in loaded:
                del optim.optim_objs[p]
                optim.grad_clip.pop(p, None)
    store.set_state({"params": loaded, "constraints": loaded_constraints})
    if ws.optim is not None:
        ws.optim.set_state(checkpoint["optim"])
        if checkpoint["guide_optim"] is not None and ws.guide_optim is not None:
            ws.guide_optim.set_state(checkpoint["guide_optim"])
    ws.num_steps = checkpoint["num_steps"]
    ws.num_skipped_steps = checkpoint["num_skipped_steps"]
    if registered is None:
        return checkpoint["extra"], PendingLoad(path, loaded, loaded_constraints)
    adopt.adopt(loaded, registered)
    return checkpoint["extra"], None
