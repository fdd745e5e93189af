"""
The ``pyro-wakesleep`` command: train a Helmholtz machine by wake-sleep and evaluate it.

    pyro-wakesleep train                      # shipped digits, HelmholtzMachine [784, 200]
    pyro-wakesleep train --dataset bars       # the bars problem, 16-8-1, exact KL in bits
                                              # (its own recipe: RWS, 24 candidates, ...)
    pyro-wakesleep train --dataset binarized-mnist --data-path binarized_mnist.npz
    pyro-wakesleep train --resume runs/latest # continue the newest run
    pyro-wakesleep evaluate runs/latest --num-samples 5000

Each run has a folder of its own (:mod:`pyro_wakesleep.runs`): ``runs/<date>_<time>`` unless
``--output`` names one, with ``runs/latest`` pointing at the newest. It holds ``checkpoint.pt``
(a :meth:`WakeSleep.save` checkpoint whose ``extra`` holds the run's state: configuration,
epoch, data-order generator, metrics), ``config.json`` and ``metrics.csv`` (copies of what the
checkpoint holds, for reading), and the figures ``learning_curves.png``, ``fantasies.png`` and
``reconstructions.png``. Every failure is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import pyro
import torch

from .. import CheckpointError, NonFiniteLossError, WakeSleep
from ..checkpoint import read
from ..datasets import Bars, DatasetError, load_dataset
from ..evaluate import evaluate_dataset, exact_log_likelihood
from ..models import GaussianHelmholtz, HelmholtzMachine
from .runs import (
    CHECKPOINT,
    CONFIG,
    FIGURES,
    METRICS,
    RunFolderError,
    RunLock,
    claim,
    new_run_folder,
    point_latest,
    run_files,
    write_csv,
    write_figure,
    write_json,
)

METRIC_FIELDS = [
    "step",
    "epoch",
    "seconds",
    "wake_theta",
    "phi",
    "test_log_likelihood",
    "test_stderr",
    "kl_bits",
]
#: The version of the run state that a run's checkpoint holds under ``extra["run"]``.
RUN_STATE_VERSION = 1
MODELS = ("helmholtz", "gaussian")
DATASETS = ("digits", "bars", "binarized-mnist", "mnist-dynamic")
OPTIMIZERS = ("adam", "sgd", "clippedadam")
#: Seeds are those NumPy accepts (Pyro's set_rng_seed seeds NumPy too).
MAX_SEED = 2**32 - 1
#: The largest learning rate the optimizers' float32 arithmetic survives: Adam's first step
#: divides it by 1 - beta1 = 0.1.
MAX_LR = float(torch.finfo(torch.float32).max) / 10
#: Options that --resume takes; every other one is ignored, with a warning.
RESUME_OPTIONS = ("resume", "epochs", "device", "jit", "no_progress")


class CommandError(Exception):
    """A user error: reported on one line, with exit status 2."""

    exit_status = 2


class Interrupted(CommandError):
    """Ctrl-C: reported on one line (what was saved), exit status 130."""

    exit_status = 130


# ---------------------------------------------------------------------------- values


def _is_int(value: Any, low: int = 1, high: Optional[int] = None) -> bool:
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= low
        and (high is None or value <= high)
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_lr(value: Any) -> bool:
    return _is_number(value) and 0 < value <= MAX_LR


def _is_fraction(value: Any) -> bool:
    return _is_number(value) and 0 <= value < 1


def _is_phi_objective(value: Any) -> bool:
    return value in ("sleep", "wake") or (_is_number(value) and 0 <= value <= 1)


def _is_steps(value: Any) -> bool:
    return (
        isinstance(value, list)
        and all(_is_int(v) for v in value)
        and all(b > a for a, b in zip(value, value[1:]))
    )


def _is_sizes(value: Any, at_least: int) -> bool:
    return isinstance(value, list) and len(value) >= at_least and all(_is_int(v) for v in value)


# What each configuration entry must be: a predicate and its description. Checked for a new
# run's options and for the configuration a run's checkpoint holds.
CONFIG_CHECKS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: v in MODELS, "one of " + ", ".join(MODELS)),
    "layers": (lambda v: _is_sizes(v, 2), "at least two positive sizes"),
    "hidden": (lambda v: _is_sizes(v, 0), "a list of positive sizes"),
    "z_dim": (_is_int, "a positive integer"),
    "dataset": (lambda v: v in DATASETS, "one of " + ", ".join(DATASETS)),
    "data_path": (lambda v: v is None or isinstance(v, str), "a path or null"),
    "num_particles": (_is_int, "a positive integer"),
    "num_sleep_particles": (_is_int, "a positive integer"),
    "phi_objective": (_is_phi_objective, "'sleep', 'wake' or a number in [0, 1]"),
    "optimizer": (lambda v: v in OPTIMIZERS, "one of " + ", ".join(OPTIMIZERS)),
    "lr": (_is_lr, f"a positive number at most {MAX_LR:.3g}"),
    "guide_lr": (
        lambda v: v is None or _is_lr(v),
        f"null or a positive number at most {MAX_LR:.3g}",
    ),
    "init": (lambda v: v in ("default", "sparse"), "default or sparse"),
    "candidates": (_is_int, "a positive integer"),
    "selection_steps": (_is_steps, "increasing positive step counts"),
    "shrink": (_is_fraction, "a number in [0, 1)"),
    "shrink_steps": (lambda v: _is_int(v, 0), "a non-negative integer"),
    "lr_decay": (_is_fraction, "a number in [0, 1)"),
    "lr_final": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "batch_size": (_is_int, "a positive integer"),
    "epochs": (_is_int, "a positive integer"),
    "seed": (lambda v: _is_int(v, 0, MAX_SEED), f"an integer in [0, {MAX_SEED}]"),
    "device": (lambda v: isinstance(v, str), "a device name"),
    "jit": (lambda v: isinstance(v, bool), "true or false"),
    "output": (lambda v: v is None or isinstance(v, str), "a path or null"),
    "eval_every": (_is_int, "a positive integer"),
    "eval_samples": (_is_int, "a positive integer"),
    "final_samples": (_is_int, "a positive integer"),
    "test_size": (lambda v: v is None or _is_int(v), "null or a positive integer"),
}


def check_config(config: Any, source: str) -> Dict[str, Any]:
    """
    Check a complete configuration (every entry of :data:`CONFIG_CHECKS`, and how they fit
    together).

    :param source: where it comes from, to begin each message with.
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
    x_dim = 16 if config["dataset"] == "bars" else 784
    if config["model"] == "helmholtz" and config["layers"][0] != x_dim:
        raise fail(
            f"--layers must start with the data dimension {x_dim}, got {config['layers'][0]}"
        )
    if config["candidates"] > 1 and not config["selection_steps"]:
        raise fail("--candidates above 1 needs --selection-steps, such as 800,2500")
    if config["init"] == "sparse" and config["model"] != "helmholtz":
        raise fail("--init sparse is for --model helmholtz")
    if config["dataset"] in ("binarized-mnist", "mnist-dynamic") and config["data_path"] is None:
        raise fail(f"--dataset {config['dataset']} needs --data-path FILE")
    return config


# ---------------------------------------------------------------------------- arguments


def _argument(parse: Callable[[str], Any], ok: Callable[[Any], bool], what: str):
    """An argparse type: ``parse`` the text, then check it with ``ok``."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except (ValueError, OverflowError):
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return convert


def _int_list(text: str) -> List[int]:
    return [int(s) for s in text.split(",")]


def _phi_text(text: str) -> Any:
    return text if text in ("sleep", "wake") else float(text)


_positive_int = _argument(int, _is_int, "a positive integer")
_nonnegative_int = _argument(int, lambda v: _is_int(v, 0), "a non-negative integer")
_positive_float = _argument(float, lambda v: _is_number(v) and v > 0, "a positive number")
_learning_rate = _argument(float, _is_lr, f"a positive number at most {MAX_LR:.3g}")
_fraction = _argument(float, _is_fraction, "a number in [0, 1)")
_seed = _argument(int, lambda v: _is_int(v, 0, MAX_SEED), f"an integer in [0, {MAX_SEED}]")
_layers = _argument(
    _int_list,
    lambda v: _is_sizes(v, 2),
    "at least two comma-separated positive sizes, such as 784,200,200",
)
_steps = _argument(
    _int_list,
    lambda v: _is_steps(v) and v != [],
    "increasing positive step counts such as 800,2500",
)
_phi_objective = _argument(_phi_text, _is_phi_objective, "'sleep', 'wake' or a number in [0, 1]")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command's parser. ``parser.train_options`` maps each option of ``train`` to its
    destination (to tell which options a command line gave)."""
    parser = _Parser(
        prog="pyro-wakesleep",
        description="Train and evaluate Helmholtz machines by wake-sleep (pyro-wakesleep).",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model (defaults: shipped digits)")
    options: Dict[str, str] = {}

    def add(*names: str, **kwargs: Any) -> None:
        action = train.add_argument(*names, **kwargs)
        options.update({name: action.dest for name in action.option_strings})

    add(
        "--resume",
        type=Path,
        metavar="FOLDER",
        help="continue the run saved in FOLDER (runs/latest: the newest); it keeps its own "
        "configuration: only --epochs (the new total), --device and --jit/--no-jit apply",
    )
    add(
        "--output",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="the run's folder (default: a new runs/<date>_<time>, with runs/latest pointing "
        "at the newest); a folder holding another run is refused unless --overwrite",
    )
    add(
        "--overwrite",
        action="store_true",
        help="replace the run held in --output (its files) by the new run",
    )
    add("--model", choices=MODELS, default="helmholtz")
    add(
        "--layers",
        type=_layers,
        default=None,
        help="HelmholtzMachine layer sizes, data first (default 784,200; 16,8,1 for bars)",
    )
    add(
        "--hidden",
        type=_positive_int,
        nargs="*",
        default=None,
        help="deterministic hidden layer sizes inside each conditional "
        "(helmholtz) or of the networks (gaussian; default 200)",
    )
    add("--z-dim", type=_positive_int, default=20, help="latent dimension of the gaussian model")
    add("--dataset", default="digits", choices=DATASETS)
    add(
        "--data-path",
        type=Path,
        default=None,
        help="data file for binarized-mnist (.npz or folder of .amat) or mnist-dynamic (mnist.npz)",
    )
    add(
        "--num-particles",
        type=_positive_int,
        default=None,
        help="K; 1 is classic wake-sleep, K > 1 reweighted wake-sleep (default 1; 5 for bars)",
    )
    add("--num-sleep-particles", type=_positive_int, default=1)
    add(
        "--phi-objective",
        type=_phi_objective,
        default=None,
        help="'sleep', 'wake', or a in [0, 1] mixing wake-phi and sleep-phi "
        "(default sleep; wake for bars)",
    )
    add("--optimizer", choices=OPTIMIZERS, default="adam")
    add(
        "--lr",
        type=_learning_rate,
        default=None,
        help="learning rate (default 1e-3; 0.1 for bars)",
    )
    add(
        "--guide-lr",
        type=_learning_rate,
        default=None,
        help="learning rate of the guide (default: --lr; 0.3 for bars)",
    )
    add(
        "--init",
        choices=["default", "sparse"],
        default=None,
        help="initial weights: torch's defaults, or HelmholtzMachine.sparse_init_ "
        "(default: sparse for bars)",
    )
    add(
        "--candidates",
        type=_positive_int,
        default=None,
        help="train this many networks from different seeds and keep the best by successive "
        "selection on held-in training data (default 1; 24 for bars)",
    )
    add(
        "--selection-steps",
        type=_steps,
        default=None,
        help="with --candidates: step counts at which candidates are ranked; a third survive "
        "each ranking and one the last (default 800,2500 for bars)",
    )
    add(
        "--shrink",
        type=_fraction,
        default=None,
        help="multiply the weight matrices by 1 - SHRINK after each of the first "
        "--shrink-steps steps (default 0; 3e-3 for bars)",
    )
    add("--shrink-steps", type=_nonnegative_int, default=None)
    add(
        "--lr-decay",
        type=_fraction,
        default=None,
        help="decay the learning rates geometrically over this final fraction of the run "
        "(default 0; 0.6 for bars)",
    )
    add(
        "--lr-final",
        type=_positive_float,
        default=0.01,
        help="learning rate factor reached at the end of --lr-decay",
    )
    add("--batch-size", type=_positive_int, default=100)
    add(
        "--epochs",
        type=_positive_int,
        default=None,
        help="passes over the training data (default 100; bars: 60 epochs of 100 fresh batches "
        "after the candidate selection); with --resume, the new total",
    )
    add("--seed", type=_seed, default=0)
    add("--device", default="cpu", help="cpu, cuda or cuda:N")
    add(
        "--jit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="record each step once and replay it (WakeSleep(jit=True)): bitwise the same "
        "results as --no-jit, less time per step (default: on)",
    )
    add(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="epochs between test evaluations (default: 10 evaluations a run)",
    )
    add(
        "--eval-samples",
        type=_positive_int,
        default=100,
        help="importance samples per test point in periodic evaluations",
    )
    add(
        "--final-samples",
        type=_positive_int,
        default=1000,
        help="importance samples per test point in the final evaluation",
    )
    add(
        "--test-size",
        type=_positive_int,
        default=None,
        help="evaluate on the first N test points only",
    )
    add("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("evaluate", help="re-estimate a run's test log-likelihood")
    evaluate.add_argument("folder", type=Path, help="a run folder (runs/latest: the newest)")
    evaluate.add_argument("--num-samples", type=_positive_int, default=5000)
    evaluate.add_argument("--chunk-size", type=_positive_int, default=500)
    evaluate.add_argument("--batch-size", type=_positive_int, default=100)
    evaluate.add_argument("--test-size", type=_positive_int, default=None)
    evaluate.add_argument("--device", default=None)
    parser.train_options = options  # type: ignore[attr-defined]
    return parser


def given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Dict[str, str]:
    """The ``train`` options that ``argv`` gives, as ``{destination: option as written}``
    (argparse's unambiguous abbreviations resolved)."""
    options: Dict[str, str] = getattr(parser, "train_options", {})
    given: Dict[str, str] = {}
    for token in argv:
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        matches = [name] if name in options else [o for o in options if o.startswith(name)]
        if len(matches) == 1:
            given.setdefault(options[matches[0]], matches[0])
    return given


# ---------------------------------------------------------------------------- pieces


def _device(name: str) -> torch.device:
    """The device ``name``, once a tensor could be made on it."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise CommandError(f"--device {name!r} is not a device: {error}") from None
    if device.type == "meta":
        raise CommandError("--device meta holds no values: choose cpu, cuda or cuda:N")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {name} was asked for, but no MPS device is available")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name} was asked for, but no CUDA device is available")
    try:
        torch.zeros(1, device=device)
    except Exception as error:  # not compiled in, no such device index, no driver, ...
        reason = (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0]
        raise CommandError(f"--device {name} is not available here ({reason})") from None
    return device


def _defaults(config: Dict[str, Any]) -> Dict[str, Any]:
    bars = config["dataset"] == "bars"
    if config["layers"] is None:
        config["layers"] = [16, 8, 1] if bars else [784, 200]
    # The bars recipe (measured in the README): reweighted wake-sleep from a sparse start,
    # weight shrinkage early on, the best of 24 candidates, and a decaying learning rate.
    recipe = {
        "lr": (0.1, 1e-3),
        "guide_lr": (0.3, None),
        "epochs": (60, 100),
        "num_particles": (5, 1),
        "phi_objective": ("wake", "sleep"),
        "init": ("sparse", "default"),
        "candidates": (24, 1),
        "selection_steps": ([800, 2500], []),
        "shrink": (3e-3, 0.0),
        "shrink_steps": (2000, 0),
        "lr_decay": (0.6, 0.0),
    }
    for key, (for_bars, otherwise) in recipe.items():
        if config.get(key) is None:
            config[key] = for_bars if bars else otherwise
    config.setdefault("lr_final", 0.01)
    if config["hidden"] is None:
        config["hidden"] = [] if config["model"] == "helmholtz" else [200]
    if config["eval_every"] is None:
        config["eval_every"] = max(1, config["epochs"] // 10)
    if config["data_path"] is not None:
        # Absolute, so that --resume and evaluate find it from any folder.
        config["data_path"] = str(Path(config["data_path"]).expanduser().resolve())
    config["output"] = None if config.get("output") is None else str(config["output"])
    return config


def _load_data(config: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    if config["dataset"] == "bars":
        return {"bars": Bars()}
    path = None
    if config["dataset"] in ("binarized-mnist", "mnist-dynamic"):
        path = Path(config["data_path"])
    if path is not None and not path.exists():
        raise CommandError(f"--data-path {path}: no such file or folder")
    generator = torch.Generator().manual_seed(config["seed"])
    data = load_dataset(config["dataset"], path, generator=generator)
    test = data["test"]
    if config.get("test_size"):
        test = test[: config["test_size"]]
    return {
        "train": data["train"].to(device),
        "test": test.to(device),
        "dynamic": data.get("dynamic"),
    }


def _build_model(config: Dict[str, Any], name: Optional[str] = None) -> torch.nn.Module:
    x_dim = 16 if config["dataset"] == "bars" else 784
    if config["model"] == "helmholtz":
        layers = list(config["layers"])
        net = HelmholtzMachine(layers, hidden=tuple(config["hidden"]), name=name or "helmholtz")
        if config.get("init") == "sparse":
            net.sparse_init_()
        return net
    return GaussianHelmholtz(
        x_dim, config["z_dim"], list(config["hidden"]) or [200], name=name or "gaussian_helmholtz"
    )


def _after_step(net: torch.nn.Module, ws: WakeSleep, config: Dict[str, Any]) -> None:
    """Early weight shrinkage: weights times (1 - shrink) after each of the first steps."""
    if config.get("shrink") and ws.num_steps <= config.get("shrink_steps", 0):
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("weight"):
                    p.mul_(1.0 - config["shrink"])


def _set_lr_factor(ws: WakeSleep, config: Dict[str, Any], factor: float) -> None:
    """Scale both optimizers' learning rates to ``factor`` times the configured ones."""
    for optim, base in ((ws.optim, config["lr"]), (ws.guide_optim, config["guide_lr"])):
        for torch_optim in optim.optim_objs.values():
            torch_optim = getattr(torch_optim, "optimizer", torch_optim)  # an LR scheduler
            for group in torch_optim.param_groups:
                group["lr"] = (base or config["lr"]) * factor


def _lr_factor(config: Dict[str, Any], done: int, total: int) -> float:
    """1 until the last ``lr_decay`` fraction of the run, then geometric down to lr_final."""
    decay = config.get("lr_decay", 0.0)
    start = 1.0 - decay
    fraction = done / max(total, 1)
    if not decay or fraction < start:
        return 1.0
    return config["lr_final"] ** ((fraction - start) / decay)


def _draw_batch(data: Dict[str, Any], config: Dict[str, Any], generator, device) -> torch.Tensor:
    if "bars" in data:
        return data["bars"].sample(config["batch_size"], generator).to(device)
    train_x = data["train"]
    rows = torch.randint(len(train_x), (config["batch_size"],), generator=generator)
    return train_x[rows.to(train_x.device)]


def _selection_score(net: torch.nn.Module, data: Dict[str, Any], held_in: torch.Tensor) -> float:
    """Mean log-likelihood of held-in training data: exact for bars, else 10 samples."""
    with torch.no_grad():
        if "bars" in data:
            return float(exact_log_likelihood(net.model, held_in, max_plate_nesting=1).mean())
        result = evaluate_dataset(
            net.model, net.guide, held_in, batch_size=100, num_samples=10, chunk_size=10
        )
        return float(result.log_px.mean())


def _select_candidate(
    config: Dict[str, Any], data: Dict[str, Any], device: torch.device, log: Callable
) -> Tuple[torch.nn.Module, WakeSleep]:
    """
    Train ``candidates`` networks from different seeds, ranking them at each of
    ``selection_steps`` by the mean log-likelihood of a fixed held-in sample of training data
    (never the test data): a third survive each ranking, one the last. Returns the winner
    rebuilt under the run's parameter names, with its optimizer states and step count.
    """
    seed = config["seed"]
    if "bars" in data:
        held_in = data["bars"].sample(20_000, torch.Generator().manual_seed(10_000 + seed))
        held_in = held_in.to(device)
    else:
        held_in = data["train"][:500]
    candidates = []
    for r in range(config["candidates"]):
        torch.manual_seed(seed * 1000 + r)
        net = _build_model(config, name=f"candidate{r}").to(device)
        ws = _wake_sleep(net, config)
        candidates.append((r, net, ws, torch.Generator().manual_seed(seed * 1000 + r + 7)))
    done = 0
    rounds = config["selection_steps"]
    for i, upto in enumerate(rounds):
        for _, net, ws, generator in candidates:
            for _ in range(upto - done):
                ws.step(_draw_batch(data, config, generator, device))
                _after_step(net, ws, config)
        done = upto
        scores = {c[0]: _selection_score(c[1], data, held_in) for c in candidates}
        scored = sorted(candidates, key=lambda c: -scores[c[0]])
        keep = 1 if i == len(rounds) - 1 else max(1, math.ceil(len(candidates) / 3))
        candidates = scored[:keep]
        log(
            f"selection after {upto} steps: kept candidate(s) "
            + ", ".join(str(c[0]) for c in candidates)
            + f" (best held-in log-likelihood {scores[scored[0][0]]:.4f})"
        )
    _, best_net, best_ws, _ = candidates[0]
    # Continue under the run's own parameter names (so a checkpoint resumes like any run).
    prefix = f"{best_net.name}_"
    net = _build_model(config).to(device)
    net.load_state_dict(best_net.state_dict())
    ws = _wake_sleep(net, config)
    for mine, theirs in ((ws.optim, best_ws.optim), (ws.guide_optim, best_ws.guide_optim)):
        mine.set_state(
            {f"{net.name}_" + k[len(prefix) :]: v for k, v in theirs.get_state().items()}
        )
    ws.num_steps = best_ws.num_steps
    pyro.clear_param_store()
    return net, ws


def _optimizer(name: str, lr: float) -> pyro.optim.PyroOptim:
    if name == "adam":
        return pyro.optim.Adam({"lr": lr})
    if name == "clippedadam":
        return pyro.optim.ClippedAdam({"lr": lr, "clip_norm": 10.0})
    return pyro.optim.SGD({"lr": lr, "momentum": 0.9})


def _wake_sleep(net: torch.nn.Module, config: Dict[str, Any]) -> WakeSleep:
    guide_lr = config["guide_lr"] or config["lr"]
    return WakeSleep(
        net.model,
        net.guide,
        _optimizer(config["optimizer"], config["lr"]),
        guide_optim=_optimizer(config["optimizer"], guide_lr),
        num_particles=config["num_particles"],
        num_sleep_particles=config["num_sleep_particles"],
        phi_objective=config["phi_objective"],
        max_plate_nesting=1,
        jit=bool(config.get("jit", False)),
    )


def _net_device(net: torch.nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    return torch.device("cpu")


def _evaluate(
    net,
    data: Dict[str, Any],
    config: Dict[str, Any],
    num_samples: int,
    chunk_size: int = 500,
    batch_size: int = 100,
) -> Dict[str, Any]:
    """The test log-likelihood (exact for bars), its standard error and the count of test
    points whose estimate is not finite. Pyro's validation is off: parameters gone NaN give
    NaN estimates, counted, instead of an error from a distribution's argument check."""
    with pyro.validation_enabled(False):
        return _evaluate_unchecked(net, data, config, num_samples, chunk_size, batch_size)


def _evaluate_unchecked(
    net,
    data: Dict[str, Any],
    config: Dict[str, Any],
    num_samples: int,
    chunk_size: int,
    batch_size: int,
) -> Dict[str, Any]:
    if "bars" in data:
        images, probs = data["bars"].distribution()
        with torch.no_grad():
            log_p = exact_log_likelihood(
                net.model, images.to(_net_device(net)), max_plate_nesting=1
            ).cpu()
        return {
            "test_log_likelihood": float((probs * log_p).sum()),
            "test_stderr": 0.0,
            "kl_bits": float(data["bars"].kl_bits(log_p)),
            "nonfinite": int((~torch.isfinite(log_p)).sum()),
            "count": len(log_p),
        }
    result = evaluate_dataset(
        net.model,
        net.guide,
        data["test"],
        batch_size=batch_size,
        num_samples=num_samples,
        chunk_size=min(chunk_size, num_samples),
    )
    n = result.log_px.numel()
    return {
        "test_log_likelihood": float(result.log_px.mean()),
        # The mean over test points: its standard error combines the per-point errors.
        "test_stderr": float(result.stderr.pow(2).sum().sqrt() / n),
        "kl_bits": float("nan"),
        "nonfinite": int((~torch.isfinite(result.log_px)).sum()),
        "count": n,
    }


# ---------------------------------------------------------------------------- figures


def _image_grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    n, d = images.shape
    side = int(round(math.sqrt(d)))
    rows = math.ceil(n / columns)
    grid = torch.full((rows * (side + 1) + 1, columns * (side + 1) + 1), 0.5)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[
            r * (side + 1) + 1 : (r + 1) * (side + 1), c * (side + 1) + 1 : (c + 1) * (side + 1)
        ] = images[i].reshape(side, side)
    return grid


def write_figures(folder: Path, net, data: Dict[str, Any], metrics: List[Dict[str, Any]]) -> None:
    """Learning curves, a grid of fantasies, and data beside reconstructions, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [m["step"] for m in metrics]
    for key, label in (("wake_theta", "wake-theta loss"), ("phi", "phi loss")):
        values = [float(m[key]) for m in metrics]
        axes[0].plot(steps, values, label=label)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss per data point (nats)")
    axes[0].set_yscale("symlog")
    axes[0].legend()
    evals = [m for m in metrics if m.get("test_log_likelihood") not in (None, "")]
    key = "kl_bits" if "bars" in data else "test_log_likelihood"
    axes[1].plot([m["step"] for m in evals], [float(m[key]) for m in evals], "o-")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(
        "KL[data || model] (bits)" if key == "kl_bits" else "test log-likelihood (nats)"
    )
    if key == "kl_bits":
        axes[1].axhline(0.10, color="gray", linestyle="--", label="Hinton et al. 1995")
        axes[1].legend()
    fig.tight_layout()
    write_figure(folder / FIGURES[0], fig)
    plt.close(fig)

    with torch.no_grad():
        fantasies = net.sample(64).cpu().float()
        real = (
            data["bars"].sample(16, torch.Generator().manual_seed(0))
            if "bars" in data
            else data["test"][:: max(1, len(data["test"]) // 16)][:16].cpu()
        ).to(_net_device(net))
        recon = net.reconstruct(real).cpu().float()
    for name, images, columns, title in (
        (FIGURES[1], fantasies, 8, "fantasies x ~ p(x)"),
        (
            FIGURES[2],
            torch.cat([real.cpu(), recon]),
            16,
            "data (top) and reconstructions (bottom)",
        ),
    ):
        fig, ax = plt.subplots(figsize=(columns * 0.6, (len(images) // columns) * 0.6 + 0.4))
        ax.imshow(_image_grid(images, columns).numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        fig.tight_layout()
        write_figure(folder / name, fig)
        plt.close(fig)


# ---------------------------------------------------------------------------- commands


class SavedRun(NamedTuple):
    """The state of a run as its checkpoint holds it (``extra["run"]``)."""

    config: Dict[str, Any]
    epoch: int
    data_rng: torch.Tensor
    metrics: List[Dict[str, Any]]
    seconds: float


def _run_state(
    config: Dict[str, Any],
    epoch: int,
    generator: torch.Generator,
    metrics: List[Dict[str, Any]],
    seconds: float,
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
        }
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _check_metrics(rows: Any, epoch: int, where: str) -> List[Dict[str, Any]]:
    ok = isinstance(rows, list) and len(rows) == epoch
    for i, row in enumerate(rows if ok else []):
        ok = (
            isinstance(row, dict)
            and set(row) <= set(METRIC_FIELDS)
            and row.get("epoch") == i + 1
            and _is_int(row.get("step"), 0)
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
    epoch = run.get("epoch")
    if not _is_int(epoch, 1):
        raise CommandError(f"{path}: the saved epoch count {epoch!r} is not a positive integer")
    metrics = _check_metrics(run.get("metrics"), epoch, str(path))
    data_rng = run.get("data_rng")
    try:
        torch.Generator().set_state(data_rng)
    except (TypeError, RuntimeError):
        raise CommandError(f"{path}: the saved data-order generator state is malformed") from None
    seconds = run.get("seconds")
    if not (_is_number(seconds) and seconds >= 0):
        raise CommandError(f"{path}: the saved training time {seconds!r} is malformed")
    on_disk = folder / CONFIG
    if on_disk.exists():
        try:
            written = json.loads(on_disk.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise CommandError(
                f"{on_disk}: malformed JSON ({error}); the configuration is the one saved in "
                f"{CHECKPOINT}: delete {CONFIG} to have it written again"
            ) from None
        expected = _jsonable(config)
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
    return SavedRun(config, epoch, data_rng, metrics, float(seconds))


def _probe_batch(data: Dict[str, Any], device: torch.device) -> torch.Tensor:
    """One data point, for WakeSleep.load's check of a checkpoint against the model."""
    if "bars" in data:
        return data["bars"].sample(1, torch.Generator().manual_seed(0)).to(device)
    return data["train"][:1]


@contextlib.contextmanager
def _uninterrupted():
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

    :returns: the final evaluation, the folder, the step count and the training time.
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
        config = check_config(_defaults(dict(config)), "")
        output = config["output"]
        if output is not None:
            folder = Path(output)
            stack.enter_context(RunLock(folder))
            claim(folder, overwrite)
            return _train(folder, config, None, progress, latest=False)
        device = _device(config["device"])
        data = _load_data(config, device)  # before a folder is made for the run
        folder = new_run_folder(Path("runs"))
        config["output"] = str(folder)
        stack.enter_context(RunLock(folder, created=True))
        return _train(folder, config, None, progress, latest=True, data=data)


def _train(
    folder: Path,
    config: Dict[str, Any],
    saved: Optional[SavedRun],
    progress: bool,
    latest: bool,
    data: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The training loop, under the folder's lock: each epoch ends with one checkpoint (run
    state included), then ``config.json`` and ``metrics.csv`` rewritten to match it."""
    from tqdm.auto import tqdm

    device = _device(config["device"])
    pyro.clear_param_store()
    pyro.set_rng_seed(config["seed"])
    if data is None:
        data = _load_data(config, device)
    log = print if progress else (lambda *a: None)
    saved_epoch = 0 if saved is None else saved.epoch
    epoch = saved_epoch
    ws: Optional[WakeSleep] = None

    def where() -> str:
        if saved_epoch:
            return f"the last checkpoint (epoch {saved_epoch}) is in {folder}"
        return "no checkpoint was written"

    try:
        if saved is None and config["candidates"] > 1:
            net, ws = _select_candidate(config, data, device, log)
        else:
            net = _build_model(config).to(device)
            ws = _wake_sleep(net, config)
        generator = torch.Generator().manual_seed(config["seed"])
        metrics: List[Dict[str, Any]] = []
        seconds = 0.0
        written_config = None
        if saved is not None:
            ws.load(folder / CHECKPOINT, _probe_batch(data, device))
            generator.set_state(saved.data_rng)
            metrics, seconds = list(saved.metrics), saved.seconds
            # What the checkpoint holds, once each (a kill between the checkpoint and the
            # metrics file leaves the file behind or ahead).
            write_csv(folder / METRICS, METRIC_FIELDS, metrics)
            if _jsonable(config) == _jsonable(saved.config) and (folder / CONFIG).exists():
                written_config = _jsonable(config)
        batch_size = config["batch_size"]
        if "bars" in data:
            batches_per_epoch = 100
        else:
            batches_per_epoch = math.ceil(len(data["train"]) / batch_size)
        started = time.time() - seconds
        total = config["epochs"] * batches_per_epoch
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
                for b, x in enumerate(_epoch_batches(data, config, generator, device)):
                    done = epoch * batches_per_epoch + b
                    if config["lr_decay"]:
                        _set_lr_factor(ws, config, _lr_factor(config, done, total))
                    losses = ws.step(x)
                    _after_step(net, ws, config)
                    wake_sum += losses.wake_theta
                    phi_sum += losses.phi
                    count += len(x)
                    bar.update(1)
                    bar.set_postfix(
                        wake_theta=f"{losses.wake_theta / len(x):.2f}",
                        phi=f"{losses.phi / len(x):.2f}",
                    )
                row: Dict[str, Any] = {
                    "step": ws.num_steps,
                    "epoch": epoch + 1,
                    "seconds": f"{time.time() - started:.1f}",
                    "wake_theta": f"{wake_sum / count:.4f}",
                    "phi": f"{phi_sum / count:.4f}",
                }
                if (epoch + 1) % config["eval_every"] == 0 or epoch + 1 == config["epochs"]:
                    evaluation = _evaluate(net, data, config, config["eval_samples"])
                    if _nonfinite(evaluation):
                        warnings.warn(f"epoch {epoch + 1}: {_nonfinite(evaluation)}", stacklevel=2)
                    row.update({k: f"{evaluation[k]:.4f}" for k in METRIC_FIELDS[5:]})
                    bar.write(
                        f"epoch {epoch + 1}: test log-likelihood "
                        f"{evaluation['test_log_likelihood']:.3f}"
                        + (f", KL {evaluation['kl_bits']:.3f} bits" if "bars" in data else "")
                    )
                with _uninterrupted():
                    metrics.append(row)
                    state = _run_state(config, epoch + 1, generator, metrics, time.time() - started)
                    ws.save(folder / CHECKPOINT, extra=state)
                    saved_epoch = epoch + 1
                    if written_config != _jsonable(config):
                        write_json(folder / CONFIG, config)
                        written_config = _jsonable(config)
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
    final = _evaluate(net, data, config, config["final_samples"])
    if _nonfinite(final):
        warnings.warn(f"final evaluation: {_nonfinite(final)}", stacklevel=2)
    write_figures(folder, net, data, metrics)
    return {**final, "folder": str(folder), "steps": ws.num_steps, "seconds": time.time() - started}


def _epoch_batches(
    data: Dict[str, Any], config: Dict[str, Any], generator: torch.Generator, device
) -> List[torch.Tensor]:
    """An epoch's batches: fresh bars images, or the training data in a new order (freshly
    binarized for mnist-dynamic)."""
    batch_size = config["batch_size"]
    if "bars" in data:
        return [data["bars"].sample(batch_size, generator).to(device) for _ in range(100)]
    train_x = data["train"]
    if data.get("dynamic") is not None:
        train_x = data["dynamic"](generator).to(device)
    order = torch.randperm(len(train_x), generator=generator).to(device)
    return [train_x[order[i : i + batch_size]] for i in range(0, len(train_x), batch_size)]


def evaluate(
    folder: Path,
    num_samples: int,
    chunk_size: int = 500,
    batch_size: int = 100,
    test_size: Optional[int] = None,
    device: Optional[str] = None,
) -> Dict[str, float]:
    """Re-estimate the test log-likelihood of the run saved in ``folder``."""
    folder = Path(folder)
    config = dict(read_run(folder).config)
    if device is not None:
        config["device"] = device
    if test_size is not None:
        config["test_size"] = test_size
    dev = _device(config["device"])
    pyro.clear_param_store()
    data = _load_data(config, dev)
    net = _build_model(config).to(dev)
    _wake_sleep(net, config).load(folder / CHECKPOINT, _probe_batch(data, dev))
    pyro.set_rng_seed(config["seed"])
    return _evaluate(net, data, config, num_samples, chunk_size, batch_size)


# ---------------------------------------------------------------------------- main


def _nonfinite(result: Dict[str, Any]) -> str:
    """What to say of an evaluation with non-finite estimates ('' when all are finite)."""
    if not result.get("nonfinite"):
        return ""
    return (
        f"{result['nonfinite']} of {result['count']} test points have a non-finite "
        "log-likelihood estimate (-inf or NaN): the model's parameters give them probability 0 "
        "or are not numbers (a diverged run?)"
    )


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on one line each, as the command's errors are."""
    print(f"pyro-wakesleep: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _result_line(result: Dict[str, Any]) -> str:
    if result.get("nonfinite"):
        return (
            f"test log-likelihood {result['test_log_likelihood']} nats: not finite for "
            f"{result['nonfinite']} of {result['count']} test points"
        )
    return (
        f"test log-likelihood {result['test_log_likelihood']:.3f} nats"
        f" (± {result['test_stderr']:.3f})"
    )


def _train_command(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> None:
    given = given_options(parser, argv)
    if args.resume is not None:
        if args.overwrite:
            raise CommandError("--overwrite starts a new run: it cannot go with --resume")
        if not args.resume.is_dir():
            raise CommandError(f"{args.resume}: no such run folder")
        ignored = [option for dest, option in given.items() if dest not in RESUME_OPTIONS]
        if ignored:
            warnings.warn(
                f"{', '.join(ignored)} ignored with --resume: the run continues with the "
                f"configuration it was started with ({args.resume / CONFIG}); only --epochs, "
                "--device and --jit/--no-jit apply",
                UserWarning,
                stacklevel=2,
            )
        overrides = {
            "epochs": args.epochs,
            "device": args.device if "device" in given else None,
            "jit": args.jit if "jit" in given else None,
        }
        result = train(overrides, resume=args.resume, progress=not args.no_progress)
    else:
        if args.data_path is not None and args.dataset in ("digits", "bars"):
            warnings.warn(
                f"--data-path ignored: --dataset {args.dataset} reads no file",
                UserWarning,
                stacklevel=2,
            )
        skip = ("command", "resume", "no_progress", "overwrite")
        config = {k: v for k, v in vars(args).items() if k not in skip}
        result = train(config, progress=not args.no_progress, overwrite=args.overwrite)
    line = _result_line(result)
    if not math.isnan(result["kl_bits"]):
        line += f", KL[data || model] {result['kl_bits']:.3f} bits"
    print(
        f"{line}; {result['steps']} steps in {result['seconds']:.0f} s; "
        f"run saved in {result['folder']}"
    )


def _evaluate_command(args: argparse.Namespace) -> None:
    result = evaluate(
        args.folder, args.num_samples, args.chunk_size, args.batch_size, args.test_size, args.device
    )
    if not math.isnan(result["kl_bits"]) and not result.get("nonfinite"):
        print(
            f"exact test log-likelihood {result['test_log_likelihood']:.4f} nats, "
            f"KL[data || model] {result['kl_bits']:.4f} bits"
        )
    else:
        print(f"{_result_line(result)} with {args.num_samples} samples")
    if _nonfinite(result):
        raise CommandError(_nonfinite(result))


def _out_of_memory(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", MemoryError)
    text = str(error)
    return isinstance(error, (MemoryError, oom)) or (
        isinstance(error, RuntimeError)
        and ("DefaultCPUAllocator" in text or "out of memory" in text)
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            if args.command == "train":
                _train_command(parser, args, argv)
            else:
                _evaluate_command(args)
        except (CommandError, RunFolderError, DatasetError, CheckpointError, OSError) as error:
            print(f"pyro-wakesleep: error: {' '.join(str(error).split())}", file=sys.stderr)
            return getattr(error, "exit_status", 2)
        except KeyboardInterrupt:
            print("pyro-wakesleep: interrupted", file=sys.stderr)
            return 130
        except Exception as error:
            if not _out_of_memory(error):
                raise
            print(
                f"pyro-wakesleep: error: out of memory ({str(error).splitlines()[0]}): lower "
                "--batch-size, --num-particles or the model's size",
                file=sys.stderr,
            )
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
