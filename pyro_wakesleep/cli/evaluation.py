"""The ``evaluate`` command's work: re-estimating the test log-likelihood of a saved run."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import pyro

from .build import build_model, build_wake_sleep, resolve_device
from .optimizers import lr_schedule
from .runs import CHECKPOINT
from .state import read_run
from .tasks import load_task


def nonfinite_message(result: Dict[str, Any]) -> str:
    """What to say of an evaluation with non-finite estimates ('' when all are finite)."""
    if not result.get("nonfinite"):
        return ""
    return (
        f"{result['nonfinite']} of {result['count']} test points have a non-finite "
        "log-likelihood estimate (-inf or NaN): the model's parameters give them probability 0 "
        "or are not numbers (a diverged run?)"
    )


def evaluate(
    folder: Path,
    num_samples: int,
    chunk_size: int = 500,
    batch_size: int = 100,
    test_size: Optional[int] = None,
    device: Optional[str] = None,
) -> Dict[str, Any]:
    """
    Re-estimate the test log-likelihood of the run saved in ``folder``.

    :param folder: the run folder.
    :param num_samples: importance samples per test point.
    :param chunk_size: samples drawn at once.
    :param batch_size: test points evaluated at once.
    :param test_size: evaluate the first ``test_size`` test points only.
    :param device: the device (default: the run's).
    :returns: the evaluation (see :meth:`Task.evaluate <pyro_wakesleep.cli.tasks.Task.evaluate>`).
    """
    folder = Path(folder)
    config = dict(read_run(folder).config)
    if device is not None:
        config["device"] = device
    if test_size is not None:
        config["test_size"] = test_size
    dev = resolve_device(config["device"])
    pyro.clear_param_store()
    task = load_task(config, dev)
    net = build_model(config).to(dev)
    total = config["epochs"] * task.batches_per_epoch(config["batch_size"])
    ws = build_wake_sleep(net, config, lr_schedule(config, total))
    ws.load(folder / CHECKPOINT, task.probe_batch())
    pyro.set_rng_seed(config["seed"])
    return task.evaluate(net, num_samples, chunk_size, batch_size)
