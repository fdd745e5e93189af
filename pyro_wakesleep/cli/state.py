"""
The state of a run that its checkpoint holds under ``extra["run"]`` besides WakeSleep's own:
the configuration, the epoch, the data-order generator, the metrics and the training time
(with and without evaluations); written with the checkpoint (:func:`run_state`) and read back,
checked, with ``config.json`` checked against it (:func:`read_run`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, NamedTuple

import torch

from ..checkpoint import read
from .config import RESUME_OPTIONS, check_config, is_int, is_number
from .errors import CommandError
from .runs import CHECKPOINT, CONFIG, run_files

#: The columns of an evaluation in ``metrics.csv`` (empty in the epochs without one).
EVALUATION_FIELDS = ["test_log_likelihood", "test_stderr", "kl_bits"]
#: The columns of ``metrics.csv``, one row per epoch: ``seconds`` since the start, evaluations
#: and checkpoints included; ``train_seconds`` the same without evaluations and checkpoints;
#: ``steps_per_s`` the epoch's own training rate; ``count_accuracy`` (multi-digits with
#: ``--model air`` only) how often the guide counts the digits right. The last three came
#: later: the rows of a run saved before them lack them.
METRIC_FIELDS = [
    "step",
    "epoch",
    "seconds",
    "wake_theta",
    "phi",
    *EVALUATION_FIELDS,
    "train_seconds",
    "steps_per_s",
    "count_accuracy",
]
#: The version of the run state that a run's checkpoint holds under ``extra["run"]``.
RUN_STATE_VERSION = 1


class SavedRun(NamedTuple):
    """The state of a run as its checkpoint holds it (``extra["run"]``)."""

    config: Dict[str, Any]
    epoch: int
    data_rng: torch.Tensor
    metrics: List[Dict[str, Any]]
    seconds: float
    #: The training time without evaluations and checkpoints (``seconds`` for a run saved
    #: before it was kept).
    train_seconds: float


def run_state(
    config: Dict[str, Any],
    epoch: int,
    generator: torch.Generator,
    metrics: List[Dict[str, Any]],
    seconds: float,
    train_seconds: float,
) -> Dict[str, Any]:
    """The ``extra`` of a run's checkpoint: everything a resumed run needs besides WakeSleep's
    own state, saved in the same atomic write (so the two always agree)."""
    return {
        "run": {
            "version": RUN_STATE_VERSION,
            "config": config,
            "epoch": epoch,
            "data_rng": generator.get_state(),
            "metrics": metrics,
            "seconds": seconds,
            "train_seconds": train_seconds,
        }
    }


def jsonable(obj: Any) -> Any:
    """``obj`` as ``config.json`` would read back (tuples as lists, say)."""
    return json.loads(json.dumps(obj))


def _check_metrics(rows: Any, epoch: int, where: str) -> List[Dict[str, Any]]:
    ok = isinstance(rows, list) and len(rows) == epoch
    for i, row in enumerate(rows if ok else []):
        ok = (
            isinstance(row, dict)
            and set(row) <= set(METRIC_FIELDS)
            and row.get("epoch") == i + 1
            and is_int(row.get("step"), 0)
            and all(isinstance(v, (str, int, float)) for v in row.values())
        )
        if not ok:
            break
    if not ok:
        raise CommandError(f"{where}: the saved metrics are malformed (one row per epoch expected)")
    return rows


def read_run(folder: Path) -> SavedRun:
    """
    The run saved in ``folder``: its checkpoint's run state, checked, with ``config.json``
    checked against it.

    :raises CommandError: the folder holds no checkpoint, or a malformed one, or a
        ``config.json`` of another run.
    :raises CheckpointError: the checkpoint cannot be read safely.
    """
    folder = Path(folder)
    path = folder / CHECKPOINT
    if not folder.exists():
        raise CommandError(f"{folder}: no such run folder")
    if not folder.is_dir():
        raise CommandError(f"{folder}: not a folder")
    if not path.exists():
        present = run_files(folder)
        if present:
            raise CommandError(
                f"{folder} holds no {CHECKPOINT} (only {', '.join(present)}): the run stopped "
                f"before its first checkpoint; start it again with --output {folder} --overwrite"
            )
        raise CommandError(f"{path}: no checkpoint (is {folder} a pyro-wakesleep run folder?)")
    run = read(path)["extra"].get("run")
    if not isinstance(run, dict) or run.get("version") != RUN_STATE_VERSION:
        raise CommandError(
            f"{path}: a WakeSleep checkpoint without the state of a pyro-wakesleep train run "
            f"(version {RUN_STATE_VERSION})"
        )
    config = check_config(run.get("config"), str(path))
    epoch: Any = run.get("epoch")
    if not is_int(epoch, 1):
        raise CommandError(f"{path}: the saved epoch count {epoch!r} is not a positive integer")
    metrics = _check_metrics(run.get("metrics"), epoch, str(path))
    data_rng: Any = run.get("data_rng")
    try:
        torch.Generator().set_state(data_rng)
    except (TypeError, RuntimeError):
        raise CommandError(f"{path}: the saved data-order generator state is malformed") from None
    seconds: Any = run.get("seconds")
    if not (is_number(seconds) and seconds >= 0):
        raise CommandError(f"{path}: the saved training time {seconds!r} is malformed")
    train_seconds: Any = run.get("train_seconds", seconds)  # absent in older runs
    if not (is_number(train_seconds) and train_seconds >= 0):
        raise CommandError(f"{path}: the saved training time {train_seconds!r} is malformed")
    on_disk = folder / CONFIG
    if on_disk.exists():
        try:
            written = json.loads(on_disk.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise CommandError(
                f"{on_disk}: malformed JSON ({error}); the configuration is the one saved in "
                f"{CHECKPOINT}: delete {CONFIG} to have it written again"
            ) from None
        expected = jsonable(config)
        if not isinstance(written, dict):
            differ = ["the whole file"]
        else:
            differ = sorted(
                key
                for key in set(written) | set(expected)
                if key not in RESUME_OPTIONS and written.get(key) != expected.get(key)
            )
        if differ:
            raise CommandError(
                f"{on_disk} differs from the configuration saved in {CHECKPOINT} "
                f"({', '.join(differ)}): the folder mixes two runs, or {CONFIG} was edited; "
                f"delete {CONFIG} to continue with the checkpoint's configuration"
            )
    return SavedRun(config, epoch, data_rng, metrics, float(seconds), float(train_seconds))
