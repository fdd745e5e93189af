"""
Checkpoints of a :class:`~pyro_wakesleep.WakeSleep` run: :meth:`WakeSleep.save` and
:meth:`WakeSleep.load`.

A checkpoint holds Pyro's parameter store, the states of both optimizers, the step count and
the random number generator states (torch, CUDA, Python, NumPy), so that a resumed run draws
the same samples as an uninterrupted one. It is written atomically: to a temporary file in the
same folder, flushed to disk, then renamed over the target, so a process killed while writing
leaves the previous checkpoint intact.

Resuming the usual way - a new process that builds its ``nn.Module``s afresh and registers
them with ``pyro.module`` inside the model - has a trap: ``pyro.module`` (with its default
``update_module_params=False``) keeps the module's own fresh tensors and ignores values already
in the parameter store. :meth:`WakeSleep.load` therefore does not stop at filling the store:
at the next step it copies each loaded value into the tensor the model or guide registers
under that name, so that the module computes with the loaded values and the optimizer state
attaches to the tensor that is actually trained.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Union

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch.distributions import constraints

FORMAT = "pyro-wakesleep/wake-sleep-checkpoint"
VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a WakeSleep checkpoint."""


def atomic_save(obj: Any, path: PathLike) -> None:
    """
    :func:`torch.save` ``obj`` to ``path`` atomically: a temporary file in the same folder,
    flushed and synced, then renamed over ``path``.

    :param obj: what to save.
    :param path: the target file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_state() -> Dict[str, Any]:
    """The states of torch's (CPU and CUDA), Python's and NumPy's global generators."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def read(path: PathLike) -> Dict[str, Any]:
    """
    Read and check a checkpoint file.

    :raises CheckpointError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint; the file is truncated, corrupt or of "
            f"another format ({type(error).__name__}: {error})"
        ) from error
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
    return checkpoint


def _keys(obj: Any) -> str:
    return f" with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, dict) else ""


class AdoptLoadedParams(Messenger):
    """
    Reconcile loaded parameter values with freshly built modules: when the model or guide
    registers a tensor under a name whose loaded value sits in the parameter store as another
    tensor, copy the loaded value into the registered tensor and make that tensor the store's
    entry. Names are forgotten once reconciled; the handler is a no-op afterwards.

    :param names: the parameter names loaded from a checkpoint.
    """

    def __init__(self, names: set) -> None:
        super().__init__()
        self.pending = set(names)

    def _pyro_param(self, msg: dict) -> None:
        # pyro.param sends args (name, init_tensor) and kwargs {constraint, event_dim}.
        name = msg["name"]
        if name not in self.pending or len(msg["args"]) < 2:
            return
        self.pending.discard(name)
        init = msg["args"][1]
        store = pyro.get_param_store()
        if not isinstance(init, torch.Tensor) or name not in store:
            return
        if msg["kwargs"].get("constraint", constraints.real) is not constraints.real:
            return  # a constrained pyro.param: Pyro returns the stored value anyway
        unconstrained = store.get_param(name).unconstrained()
        if unconstrained is init or init.shape != unconstrained.shape:
            return
        with torch.no_grad():
            init.copy_(unconstrained)
        del store[name]
        store.setdefault(name, init)
