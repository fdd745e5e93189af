"""
Plain data, what a checkpoint holds: tensors, numbers, strings, ``None`` and lists, tuples and
dicts of them, which ``torch.load(weights_only=True)`` reads back without building any other
Python object. Parameter constraints are stored by name (:func:`encode_constraint`), the
random generators' states as tensors and numbers (:func:`rng_state`).
"""

from __future__ import annotations

import random
from typing import Any, Dict, Union

import numpy as np
import torch
from pyro.distributions import constraints

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
    for name, known in _singletons().items():
        if constraint is known:
            return name
    for name, attributes in _PARAMETERIZED.items():
        if type(constraint) is getattr(constraints, name):
            spec: Dict[str, Any] = {"name": name}
            for attribute in attributes:
                value: Any = getattr(constraint, attribute)
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
