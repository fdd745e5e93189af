"""
A run's configuration: what each entry must be (:data:`CONFIG_CHECKS`), how a new run's
unset entries are filled in (:func:`apply_defaults`, with the data source's recipe) and the
check of a complete configuration (:func:`check_config`), for a new run's options and for the
configuration a run's checkpoint holds alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..objectives import PhiObjective
from .errors import CommandError
from .registry import TASKS

MODELS = ("helmholtz", "gaussian", "air")
DATASETS = tuple(TASKS)
OPTIMIZERS = ("adam", "sgd", "clippedadam")
#: Seeds are those NumPy accepts (Pyro's set_rng_seed seeds NumPy too).
MAX_SEED = 2**32 - 1
#: The largest learning rate the optimizers' float32 arithmetic survives: Adam's first step
#: divides it by 1 - beta1 = 0.1.
MAX_LR = float(torch.finfo(torch.float32).max) / 10
#: Options that --resume takes; every other one is ignored, with a warning.
RESUME_OPTIONS = ("resume", "epochs", "device", "jit", "threads", "no_progress")
#: The entries of a new run's configuration, in the order ``config.json`` lists them.
CONFIG_KEYS = (
    "output",
    "model",
    "layers",
    "hidden",
    "z_dim",
    "dataset",
    "data_path",
    "num_particles",
    "num_sleep_particles",
    "phi_objective",
    "optimizer",
    "lr",
    "guide_lr",
    "init",
    "candidates",
    "selection_steps",
    "shrink",
    "shrink_steps",
    "lr_decay",
    "lr_final",
    "batch_size",
    "epochs",
    "seed",
    "device",
    "jit",
    "eval_every",
    "eval_samples",
    "final_samples",
    "test_size",
)


def is_int(value: Any, low: int = 1, high: Optional[int] = None) -> bool:
    """Whether ``value`` is an integer (not a bool) in ``[low, high]``."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )


def is_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_lr(value: Any) -> bool:
    """Whether ``value`` is a learning rate the optimizers survive."""
    return is_number(value) and 0 < value <= MAX_LR


def is_fraction(value: Any) -> bool:
    """Whether ``value`` is a number in ``[0, 1)``."""
    return is_number(value) and 0 <= value < 1


def is_phi_objective(value: Any) -> bool:
    """Whether ``value`` is ``'sleep'``, ``'wake'`` or a mixing weight in ``[0, 1]``."""
    return value in ("sleep", "wake") or (is_number(value) and 0 <= value <= 1)


def is_steps(value: Any) -> bool:
    """Whether ``value`` is a list of increasing positive step counts (maybe empty)."""
    return (
        isinstance(value, list)
        and all(is_int(v) for v in value)
        and all(b > a for a, b in zip(value, value[1:]))
    )


def is_sizes(value: Any, at_least: int) -> bool:
    """Whether ``value`` is a list of at least ``at_least`` positive sizes."""
    return isinstance(value, list) and len(value) >= at_least and all(is_int(v) for v in value)


# What each configuration entry must be: a predicate and its description.
CONFIG_CHECKS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: v in MODELS, "one of " + ", ".join(MODELS)),
    "layers": (lambda v: is_sizes(v, 2), "at least two positive sizes"),
    "hidden": (lambda v: is_sizes(v, 0), "a list of positive sizes"),
    "z_dim": (is_int, "a positive integer"),
    "dataset": (lambda v: v in DATASETS, "one of " + ", ".join(DATASETS)),
    "data_path": (lambda v: v is None or isinstance(v, str), "a path or null"),
    "num_particles": (is_int, "a positive integer"),
    "num_sleep_particles": (is_int, "a positive integer"),
    "phi_objective": (is_phi_objective, "'sleep', 'wake' or a number in [0, 1]"),
    "optimizer": (lambda v: v in OPTIMIZERS, "one of " + ", ".join(OPTIMIZERS)),
    "lr": (is_lr, f"a positive number at most {MAX_LR:.3g}"),
    "guide_lr": (
        lambda v: v is None or is_lr(v),
        f"null or a positive number at most {MAX_LR:.3g}",
    ),
    "init": (lambda v: v in ("default", "sparse"), "default or sparse"),
    "candidates": (is_int, "a positive integer"),
    "selection_steps": (is_steps, "increasing positive step counts"),
    "shrink": (is_fraction, "a number in [0, 1)"),
    "shrink_steps": (lambda v: is_int(v, 0), "a non-negative integer"),
    "lr_decay": (is_fraction, "a number in [0, 1)"),
    "lr_final": (lambda v: is_number(v) and v > 0, "a positive number"),
    "batch_size": (is_int, "a positive integer"),
    "epochs": (is_int, "a positive integer"),
    "seed": (lambda v: is_int(v, 0, MAX_SEED), f"an integer in [0, {MAX_SEED}]"),
    "device": (lambda v: isinstance(v, str), "a device name"),
    "jit": (lambda v: isinstance(v, bool), "true or false"),
    "output": (lambda v: v is None or isinstance(v, str), "a path or null"),
    "eval_every": (is_int, "a positive integer"),
    "eval_samples": (is_int, "a positive integer"),
    "final_samples": (is_int, "a positive integer"),
    "test_size": (lambda v: v is None or is_int(v), "null or a positive integer"),
}


def check_config(config: Any, source: str) -> Dict[str, Any]:
    """
    Check a complete configuration (every entry of :data:`CONFIG_CHECKS`, and how they fit
    together).

    :param config: the configuration.
    :param source: where it comes from, to begin each message with.
    :returns: ``config``.
    :raises CommandError: naming the first entry that is missing or wrong.
    """

    def fail(message: str) -> CommandError:
        return CommandError(f"{source}: {message}" if source else message)

    if not isinstance(config, dict):
        raise fail(f"the configuration is a {type(config).__name__}, not a JSON object")
    missing = [key for key in CONFIG_CHECKS if key not in config]
    if missing:
        raise fail(f"the configuration lacks {', '.join(missing)}")
    for key, (ok, what) in CONFIG_CHECKS.items():
        if not ok(config[key]):
            raise fail(f"the configuration's {key} must be {what}, got {config[key]!r}")
    task = TASKS[config["dataset"]]
    if config["model"] == "helmholtz" and config["layers"][0] != task.x_dim:
        raise fail(
            f"--layers must start with the data dimension {task.x_dim}, got {config['layers'][0]}"
        )
    phi = PhiObjective.parse(config["phi_objective"])
    if config["num_particles"] == 1 and not phi.uses_sleep:
        raise fail(
            "--phi-objective wake with --num-particles 1 does not train the guide (one "
            "particle's self-normalized weight is 1: zero expected gradient); use "
            "--num-particles 5, or --phi-objective sleep"
        )
    if config["model"] == "air":
        if task.x_dim != 784:
            raise fail(
                f"--model air draws digits on 28x28 canvases; --dataset {config['dataset']} "
                "is not of 28x28 images (use multi-digits, digits or an MNIST)"
            )
        if len(config["hidden"]) != 1:
            raise fail(
                f"--model air takes one --hidden size (the width of its networks), got "
                f"{len(config['hidden'])}: {config['hidden']}"
            )
    if config["candidates"] > 1 and not config["selection_steps"]:
        raise fail("--candidates above 1 needs --selection-steps, such as 800,2500")
    if config["init"] == "sparse" and config["model"] != "helmholtz":
        raise fail("--init sparse is for --model helmholtz")
    if task.needs_path and config["data_path"] is None:
        raise fail(f"--dataset {config['dataset']} needs --data-path FILE")
    return config


def apply_defaults(config: Dict[str, Any]) -> Dict[str, Any]:
    """
    Fill in the entries a new run's options left unset (``None``): the data source's recipe
    (:attr:`Task.recipe <pyro_wakesleep.cli.tasks.Task.recipe>`, the model included), the
    model's hidden sizes and latent dimension, ten evaluations a run; the data path made absolute.

    :param config: the options, changed in place.
    :returns: ``config``.
    """
    for key, value in TASKS[config["dataset"]].defaults().items():
        if config.get(key) is None:
            config[key] = value
    config.setdefault("lr_final", 0.01)
    if config["hidden"] is None:
        config["hidden"] = {"helmholtz": [], "air": [128]}.get(config["model"], [200])
    if config["z_dim"] is None:
        config["z_dim"] = 10 if config["model"] == "air" else 20
    if config["eval_every"] is None:
        config["eval_every"] = max(1, config["epochs"] // 10)
    if config["data_path"] is not None:
        # Absolute, so that --resume and evaluate find it from any folder.
        config["data_path"] = str(Path(config["data_path"]).expanduser().resolve())
    config["output"] = None if config.get("output") is None else str(config["output"])
    return config
