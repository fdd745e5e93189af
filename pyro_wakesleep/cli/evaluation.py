"""
The ``evaluate`` command's work: re-estimating the test log-likelihood of a saved run, and
the record of an evaluation that ``final.json`` (``train``) and ``evaluation_<samples>.json``
(``evaluate``) hold.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import pyro

from ..evaluate import CHUNK_SIZE
from .build import build_model, build_wake_sleep, resolve_device
from .optimizers import lr_schedule
from .registry import load_task
from .runs import CHECKPOINT, evaluation_file, write_json
from .state import read_run
from .tasks import Task, evaluation_stream


def nonfinite_message(result: Dict[str, Any]) -> str:
    """What to say of an evaluation with non-finite estimates ('' when all are finite)."""
    if not result.get("nonfinite"):
        return ""
    return (
        f"{result['nonfinite']} of {result['count']} test points have a non-finite "
        "log-likelihood estimate (-inf or NaN): the model's parameters give them probability 0 "
        "or are not numbers (a diverged run?)"
    )


def evaluation_line(result: Dict[str, Any], exact: bool, samples: Optional[int] = None) -> str:
    """An evaluation in one line: the test log-likelihood and its standard error (or what is
    not finite), with how many ``samples`` when given, KL[data || model] when ``exact``, and
    the count accuracy when measured."""
    if result.get("nonfinite"):
        line = (
            f"test log-likelihood {result['test_log_likelihood']} nats: not finite for "
            f"{result['nonfinite']} of {result['count']} test points"
        )
    else:
        line = (
            f"test log-likelihood {result['test_log_likelihood']:.3f} nats"
            f" (± {result['test_stderr']:.3f})"
        )
    if samples is not None:
        line += f" with {samples} samples"
    if exact and not math.isnan(result["kl_bits"]):
        line += f", KL[data || model] {result['kl_bits']:.3f} bits"
    if "count_accuracy" in result:
        line += f", count accuracy {result['count_accuracy']:.3f}"
    return line


def _finite(value: float) -> Optional[float]:
    """``value``, or ``None`` (JSON's null) when it is not finite."""
    return float(value) if math.isfinite(value) else None


def evaluation_record(
    result: Dict[str, Any],
    task: Task,
    num_samples: int,
    config: Dict[str, Any],
    step: int,
    epoch: int,
) -> Dict[str, Any]:
    """
    An evaluation as ``final.json`` and ``evaluation_<samples>.json`` hold it: the test
    log-likelihood (nats, mean per test point), its standard error, KL[data || model] in bits
    (bars only), each ``null`` when not finite; whether it is ``exact`` (bars), the importance
    samples per test point (``null`` when exact), the count of test points, the
    ``--test-size`` (``null``: the whole test set), the count of non-finite estimates, and the
    checkpoint's step and epoch; and ``count_accuracy`` when the evaluation measured it.
    """
    extra = {}
    if "count_accuracy" in result:
        extra["count_accuracy"] = _finite(result["count_accuracy"])
    return {
        "test_log_likelihood": _finite(result["test_log_likelihood"]),
        "test_stderr": _finite(result["test_stderr"]),
        "kl_bits": _finite(result["kl_bits"]),
        "exact": task.exact,
        "num_samples": None if task.exact else num_samples,
        "test_points": result["count"],
        "test_size": None if task.exact else config.get("test_size"),
        "nonfinite": result["nonfinite"],
        "step": step,
        "epoch": epoch,
        **extra,
    }


def evaluate(
    folder: Path,
    num_samples: int,
    chunk_size: int = CHUNK_SIZE,
    batch_size: int = 100,
    test_size: Optional[int] = None,
    device: Optional[str] = None,
    progress: bool = False,
) -> Dict[str, Any]:
    """
    Re-estimate the test log-likelihood of the run saved in ``folder``, and save it there in
    ``evaluation_<num_samples>.json`` (``evaluation_<num_samples>_test<points>.json`` with
    ``test_size``, ``evaluation_exact.json`` for bars), atomically: never
    in the training's ``final.json``. A folder that cannot be written to gives a warning.

    :param folder: the run folder.
    :param num_samples: importance samples per test point.
    :param chunk_size: samples drawn at once.
    :param batch_size: test points evaluated at once.
    :param test_size: evaluate this many test points only, the same ones as ``train
        --test-size`` (see :func:`~pyro_wakesleep.cli.tasks.subset_indices`).
    :param device: the device (default: the run's).
    :param progress: show a progress bar.
    :returns: the evaluation (see :meth:`Task.evaluate <pyro_wakesleep.cli.tasks.Task.evaluate>`)
        and the file it was saved in (``file``, ``None`` when it could not be written).
    """
    folder = Path(folder)
    saved = read_run(folder)
    config = dict(saved.config)
    if device is not None:
        config["device"] = device
    if test_size is not None:
        config["test_size"] = test_size
    dev = resolve_device(config["device"])
    pyro.clear_param_store()
    task = load_task(config, dev)
    if task.exact and test_size is not None:
        warnings.warn(
            f"--test-size ignored: --dataset {task.name} is evaluated exactly, over its 30 images",
            UserWarning,
            stacklevel=2,
        )
    net = build_model(config).to(dev)
    total = config["epochs"] * task.batches_per_epoch(config["batch_size"])
    ws = build_wake_sleep(net, config, lr_schedule(config, total))
    ws.load(folder / CHECKPOINT, task.probe_batch())
    started = time.time()
    with evaluation_stream(config["seed"], ws.num_steps, dev):
        result = task.evaluate(net, num_samples, chunk_size, batch_size, progress)
    record = evaluation_record(result, task, num_samples, config, ws.num_steps, saved.epoch)
    record["evaluation_seconds"] = time.time() - started
    if task.exact:
        path = folder / evaluation_file(None)
    else:
        # Another --test-size is another evaluation: its own file, not the run's one.
        points = None if test_size is None else result["count"]
        path = folder / evaluation_file(num_samples, points)
    try:
        write_json(path, record)
    except OSError as error:
        warnings.warn(
            f"cannot save the evaluation in {path} ({error.strerror or error})",
            RuntimeWarning,
            stacklevel=2,
        )
        return {**result, "file": None}
    return {**result, "file": str(path)}
