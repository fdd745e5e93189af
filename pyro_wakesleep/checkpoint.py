"""
Checkpoints of a :class:`~pyro_wakesleep.WakeSleep` run: :meth:`WakeSleep.save` and
:meth:`WakeSleep.load`.

A checkpoint holds Pyro's parameter store, the states of both optimizers, the step counts,
the random number generator states (torch, CUDA, Python, NumPy) and any plain data the caller
adds (``extra``: an epoch count, a data-order generator, a configuration), so that a resumed run
draws the same samples as an uninterrupted one.

**Plain data only.** A checkpoint holds tensors, numbers, strings, ``None`` and lists, tuples
and dicts of them, nothing else: a parameter's constraint is stored by name (``"positive"``,
``{"name": "interval", "lower_bound": 0.0, "upper_bound": 1.0}``), NumPy's generator state as a
tensor. It is read with ``torch.load(..., weights_only=True)``, whose unpickler builds no
other Python object and calls no function named in the file, so a crafted file can fail to load
but cannot run code. Version 1 files (pyro-wakesleep 0.1.0, which pickled constraint objects
and NumPy arrays) are refused for that reason.

Checkpoints are written atomically (:mod:`pyro_wakesleep.files`), and loaded into freshly
built modules once they are known to fit them (:mod:`pyro_wakesleep.adopt`).
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import pyro
import torch
from pyro.distributions import constraints

from .files import PathLike

FORMAT = "pyro-wakesleep/wake-sleep-checkpoint"
VERSION = 2
# The command's own checkpoint format in pyro-wakesleep 0.1.0, refused with its own message.
_COMMAND_FORMAT_1 = "pyro-wakesleep-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, truncated, corrupt, unsafe, not a WakeSleep
    checkpoint, or does not fit the model and guide it is loaded into."""


# ------------------------------------------------------------------------- plain data

_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def check_plain(obj: Any, where: str) -> None:
    """
    Raise ``TypeError`` unless ``obj`` is plain data that ``torch.load(weights_only=True)``
    reads back: tensors, numbers, strings, ``None``, and lists, tuples and dicts (with string
    or integer keys) of them.

    :param obj: the value.
    :param where: how to name it in the message.
    """
    if isinstance(obj, torch.Tensor) or isinstance(obj, _SCALARS) or isinstance(obj, torch.Size):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}: {key!r}")
            check_plain(value, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only "
        "tensors, numbers, strings, None and lists, tuples and dicts of them"
    )


# ------------------------------------------------------------------------- constraints

# Constraints with parameters, by their factory in pyro.distributions.constraints, and the
# attributes that rebuild them.
_PARAMETERIZED = {
    "interval": ("lower_bound", "upper_bound"),
    "half_open_interval": ("lower_bound", "upper_bound"),
    "integer_interval": ("lower_bound", "upper_bound"),
    "greater_than": ("lower_bound",),
    "greater_than_eq": ("lower_bound",),
    "less_than": ("upper_bound",),
    "multinomial": ("upper_bound",),
    "independent": ("base_constraint", "reinterpreted_batch_ndims"),
}


def _singletons() -> Dict[str, constraints.Constraint]:
    return {
        name: value
        for name in dir(constraints)
        if not name.startswith("_")
        and isinstance(value := getattr(constraints, name), constraints.Constraint)
    }


def encode_constraint(constraint: constraints.Constraint) -> Union[str, Dict[str, Any]]:
    """
    A constraint of :mod:`pyro.distributions.constraints` (or torch's) as plain data: its name
    (``"positive"``), or a dict of its factory's name and arguments.

    :raises TypeError: for a constraint defined elsewhere.
    """
    for name, value in _singletons().items():
        if constraint is value:
            return name
    for name, attributes in _PARAMETERIZED.items():
        if type(constraint) is getattr(constraints, name):
            spec: Dict[str, Any] = {"name": name}
            for attribute in attributes:
                value = getattr(constraint, attribute)
                if isinstance(value, constraints.Constraint):
                    value = encode_constraint(value)
                elif isinstance(value, torch.Tensor):
                    value = value.detach().cpu()
                spec[attribute] = value
            return spec
    if type(constraint) is type(constraints.real):  # Pyro's store treats these as real
        return "real"
    raise TypeError(
        f"cannot store the constraint {constraint!r}: a checkpoint stores the constraints of "
        "pyro.distributions.constraints (by name), not constraints defined elsewhere"
    )


def decode_constraint(spec: Any) -> constraints.Constraint:
    """The constraint that :func:`encode_constraint` encoded as ``spec``.

    :raises ValueError: for anything else."""
    if isinstance(spec, str):
        found = _singletons().get(spec)
        if found is None:
            raise ValueError(f"unknown constraint {spec!r}")
        return found
    if isinstance(spec, dict) and spec.get("name") in _PARAMETERIZED:
        name = spec["name"]
        args = []
        for attribute in _PARAMETERIZED[name]:
            if attribute not in spec:
                raise ValueError(f"constraint {name} without its {attribute}")
            value = spec[attribute]
            args.append(decode_constraint(value) if attribute == "base_constraint" else value)
        return getattr(constraints, name)(*args)
    raise ValueError(f"malformed constraint {spec!r}")


# ------------------------------------------------------------------------- generators


def rng_state() -> Dict[str, Any]:
    """The states of torch's (CPU and CUDA), Python's and NumPy's global generators, as plain
    data."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """
    Restore the generators saved by :func:`rng_state`: all of them, or (when an entry is
    malformed) none.

    :raises ValueError: naming the malformed entry.
    """
    before = rng_state()
    try:
        _set_rng_state(state)
    except Exception as error:
        _set_rng_state(before)
        raise ValueError(
            f"malformed random generator state ({type(error).__name__}: {error})"
        ) from error


def _set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"]), py["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["name"],
            numpy["keys"].numpy().astype(np.uint32),
            int(numpy["pos"]),
            int(numpy["has_gauss"]),
            float(numpy["cached_gaussian"]),
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        ``num_skipped_steps``, ``rng`` and ``extra``; constraints decoded, parameters as
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
    return {
        "params": values,
        "constraints": {name: decode_constraint(spec) for name, spec in specs.items()},
        "optim": _state_dicts(checkpoint["optim"], "optim"),
        "guide_optim": None if guide_optim is None else _state_dicts(guide_optim, "guide_optim"),
        "num_steps": _count(checkpoint["num_steps"], "num_steps"),
        "num_skipped_steps": _count(checkpoint["num_skipped_steps"], "num_skipped_steps"),
        "rng": rng,
        "extra": extra,
    }


def state(
    optim_state: Dict[str, Any],
    guide_optim_state: Optional[Dict[str, Any]],
    num_steps: int,
    num_skipped_steps: int,
    extra: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """
    The checkpoint of the current parameter store and generators with the given optimizer
    states and counts, as plain data.

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
    }
