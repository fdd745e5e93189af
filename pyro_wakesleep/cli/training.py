"""
The ``train`` command's work: a new run in a folder of its own, or a saved run continued, by
one training loop for every data source (the task supplies the data and the evaluations).
Each epoch ends with one checkpoint (the run's state in its ``extra``), then ``config.json``
and ``metrics.csv`` rewritten to match it; the final evaluation is saved in ``final.json``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pyro
import torch

from .. import NonFiniteLossError, WakeSleep
from ..checkpoint import read
from ..datasets import DatasetError
from .build import build_model, build_wake_sleep, resolve_device, shrink_weights
from .config import apply_defaults, check_config
from .errors import CommandError, Interrupted
from .evaluation import evaluation_line, evaluation_record, nonfinite_message
from .figures import write_figures
from .optimizers import add_scheduler_states, lr_schedule, step_schedules
from .registry import load_task
from .runs import (
    CHECKPOINT,
    CONFIG,
    FINAL,
    METRICS,
    RunLock,
    claim,
    new_run_folder,
    point_latest,
    write_csv,
    write_json,
)
from .selection import select_candidate
from .state import EVALUATION_FIELDS, METRIC_FIELDS, SavedRun, jsonable, read_run, run_state
from .tasks import Task, evaluation_stream


def train(
    config: Dict[str, Any],
    resume: Optional[Path] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """
    Train as configured, in a folder of its own; or continue the run saved in ``resume``
    (then ``config`` holds only what may change: ``epochs``, the new total, ``device`` and
    ``jit``, each ``None`` to keep the run's own).

    :param config: the options (unset ones ``None``), or the changes of a resumed run.
    :param resume: the folder of the run to continue.
    :param progress: show a progress bar and the selection's rankings.
    :param overwrite: replace the run held in ``config["output"]``.
    :returns: the final evaluation, the folder, the step count, the time (``seconds``), the
        training time without evaluations and checkpoints (``train_seconds``) and the training
        steps per second of it (``steps_per_s``; candidate selection left out of both).
    :raises CommandError: with one line for the user (a refused folder, a malformed run,
        a diverged run, ...).
    """
    with contextlib.ExitStack() as stack:
        if resume is not None:
            folder = Path(resume)
            if not folder.is_dir():
                raise CommandError(f"{folder}: no such run folder")
            stack.enter_context(RunLock(folder))
            saved = read_run(folder)
            run_config = dict(saved.config)
            for key in ("epochs", "device", "jit"):
                if config.get(key) is not None:
                    run_config[key] = config[key]
            if run_config["epochs"] < saved.epoch:
                raise CommandError(
                    f"{folder} has trained {saved.epoch} epochs already: --epochs (the new "
                    f"total) must be at least {saved.epoch}"
                )
            return _train(folder, run_config, saved, progress, latest=False)
        config = check_config(apply_defaults(dict(config)), "")
        output = config["output"]
        if output is not None:
            folder = Path(output)
            stack.enter_context(RunLock(folder))
            claim(folder, overwrite)
            return _train(folder, config, None, progress, latest=False)
        task = load_task(config, resolve_device(config["device"]))  # before a folder is made for it
        folder = new_run_folder(Path("runs"))
        config["output"] = str(folder)
        stack.enter_context(RunLock(folder, created=True))
        return _train(folder, config, None, progress, latest=True, task=task)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C back until the block is done (a checkpoint, its config and metrics are
    written together); in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _first_sentences(error: Exception) -> str:
    """The finding of a NonFiniteLossError, without its generic advice."""
    text = str(error).split(" No parameter or optimizer state was changed")[0]
    return text.split(": ", 1)[-1].rstrip(".")


def _train(
    folder: Path,
    config: Dict[str, Any],
    saved: Optional[SavedRun],
    progress: bool,
    latest: bool,
    task: Optional[Task] = None,
) -> Dict[str, Any]:
    """The training loop, under the folder's lock."""
    from tqdm.auto import tqdm

    dev = resolve_device(config["device"])
    pyro.clear_param_store()
    pyro.set_rng_seed(config["seed"])
    if task is None:
        task = load_task(config, dev)
    log = print if progress else (lambda *a: None)
    saved_epoch = 0 if saved is None else saved.epoch
    epoch = saved_epoch
    ws: Optional[WakeSleep] = None

    def where() -> str:
        if saved_epoch:
            return f"the last checkpoint (epoch {saved_epoch}) is in {folder}"
        return "no checkpoint was written"

    try:
        batch_size = config["batch_size"]
        batches_per_epoch = task.batches_per_epoch(batch_size)
        total = config["epochs"] * batches_per_epoch
        schedule = lr_schedule(config, total)
        if saved is None and config["candidates"] > 1:
            net, ws = select_candidate(config, task, schedule, log)
        else:
            net = build_model(config).to(dev)
            ws = build_wake_sleep(net, config, schedule)
        generator = torch.Generator().manual_seed(config["seed"])
        metrics: List[Dict[str, Any]] = []
        seconds = train_seconds = 0.0
        written_config = None
        if saved is not None:
            ws.load(folder / CHECKPOINT, task.probe_batch())
            if schedule is not None:
                done = saved_epoch * batches_per_epoch
                add_scheduler_states(ws, read(folder / CHECKPOINT), config, schedule, done)
            generator.set_state(saved.data_rng)
            metrics, seconds = list(saved.metrics), saved.seconds
            train_seconds = saved.train_seconds
            # What the checkpoint holds, once each (a kill between the checkpoint and the
            # metrics file leaves the file behind or ahead).
            write_csv(folder / METRICS, METRIC_FIELDS, metrics)
            if jsonable(config) == jsonable(saved.config) and (folder / CONFIG).exists():
                written_config = jsonable(config)
        started = time.time() - seconds
        bar = tqdm(
            total=total,
            initial=saved_epoch * batches_per_epoch,
            disable=not progress,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        with bar:
            for epoch in range(saved_epoch, config["epochs"]):
                wake_sum = phi_sum = 0.0
                count = 0
                epoch_started = time.time()
                for x in task.epoch_batches(batch_size, generator):
                    losses = ws.step(x)
                    step_schedules(ws)
                    shrink_weights(net, ws, config)
                    wake_sum += losses.wake_theta
                    phi_sum += losses.phi
                    count += len(x)
                    bar.update(1)
                    bar.set_postfix(
                        wake_theta=f"{losses.wake_theta / len(x):.2f}",
                        phi=f"{losses.phi / len(x):.2f}",
                    )
                epoch_seconds = time.time() - epoch_started
                train_seconds += epoch_seconds
                row: Dict[str, Any] = {
                    "step": ws.num_steps,
                    "epoch": epoch + 1,
                    "seconds": f"{time.time() - started:.1f}",
                    "wake_theta": f"{wake_sum / count:.4f}",
                    "phi": f"{phi_sum / count:.4f}",
                    "train_seconds": f"{train_seconds:.1f}",
                    "steps_per_s": f"{batches_per_epoch / max(epoch_seconds, 1e-9):.1f}",
                }
                if (epoch + 1) % config["eval_every"] == 0 or epoch + 1 == config["epochs"]:
                    with evaluation_stream(config["seed"], ws.num_steps, dev):
                        evaluation = task.evaluate(net, config["eval_samples"], progress=progress)
                    if nonfinite_message(evaluation):
                        warnings.warn(
                            f"epoch {epoch + 1}: {nonfinite_message(evaluation)}", stacklevel=2
                        )
                    row.update({k: f"{evaluation[k]:.4f}" for k in EVALUATION_FIELDS})
                    if "count_accuracy" in evaluation:
                        row["count_accuracy"] = f"{evaluation['count_accuracy']:.4f}"
                    bar.write(f"epoch {epoch + 1}: {evaluation_line(evaluation, task.exact)}")
                with _uninterrupted():
                    metrics.append(row)
                    state = run_state(
                        config, epoch + 1, generator, metrics, time.time() - started, train_seconds
                    )
                    ws.save(folder / CHECKPOINT, extra=state)
                    saved_epoch = epoch + 1
                    # A resumed run's earlier final evaluation is of an earlier checkpoint.
                    (folder / FINAL).unlink(missing_ok=True)
                    if written_config != jsonable(config):
                        write_json(folder / CONFIG, config)
                        written_config = jsonable(config)
                    write_csv(folder / METRICS, METRIC_FIELDS, metrics)
                    if latest and saved_epoch == 1:
                        problem = point_latest(folder)
                        if problem:
                            warnings.warn(problem, RuntimeWarning, stacklevel=2)
    except NonFiniteLossError as error:
        lrs = f"--lr {config['lr']:g}" + (
            f", --guide-lr {config['guide_lr']:g}" if config["guide_lr"] else ""
        )
        raise CommandError(
            f"training diverged at step {ws.num_steps + 1 if ws else '?'} (epoch {epoch + 1}): "
            f"{_first_sentences(error)}; start again with a lower learning rate than {lrs}"
            + (" (--overwrite replaces this run)" if saved_epoch else "")
            + f"; {where()}"
        ) from None
    except ValueError as error:
        if ws is None or isinstance(error, DatasetError):
            raise
        raise CommandError(
            f"training failed at step {ws.num_steps + 1}: {' '.join(str(error).split())}; {where()}"
        ) from None
    except OSError as error:  # a file of the run cannot be written (a full disk)
        raise CommandError(f"{' '.join(str(error).split())}; {where()}") from None
    except KeyboardInterrupt:
        message = f"interrupted in epoch {epoch + 1}; {where()}"
        if saved_epoch:
            message += f": continue with pyro-wakesleep train --resume {folder}"
        raise Interrupted(message) from None
    evaluation_started = time.time()
    with evaluation_stream(config["seed"], ws.num_steps, dev):
        final = task.evaluate(net, config["final_samples"], progress=progress)
    if nonfinite_message(final):
        warnings.warn(f"final evaluation: {nonfinite_message(final)}", stacklevel=2)
    timing = {
        "seconds": time.time() - started,
        "train_seconds": train_seconds,
        # The steps of the training loop (a candidate selection's are not timed).
        "steps_per_s": config["epochs"] * batches_per_epoch / max(train_seconds, 1e-9),
    }
    record = evaluation_record(
        final, task, config["final_samples"], config, ws.num_steps, config["epochs"]
    )
    record.update(evaluation_seconds=time.time() - evaluation_started, **timing)
    write_json(folder / FINAL, record)
    write_figures(folder, net, task, metrics)
    timing["seconds"] = time.time() - started
    return {**final, "folder": str(folder), "steps": ws.num_steps, **timing}
