"""
The command line of ``pyro-wakesleep``: its parser (:func:`build_parser`), whose errors are one
line, with the options of ``train`` in argument groups, and :func:`given_options`, which tells
the options a command line gave.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from .config import (
    DATASETS,
    MAX_LR,
    MAX_SEED,
    MODELS,
    OPTIMIZERS,
    is_fraction,
    is_int,
    is_lr,
    is_number,
    is_phi_objective,
    is_sizes,
    is_steps,
)


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


_positive_int = _argument(int, is_int, "a positive integer")
_nonnegative_int = _argument(int, lambda v: is_int(v, 0), "a non-negative integer")
_positive_float = _argument(float, lambda v: is_number(v) and v > 0, "a positive number")
_learning_rate = _argument(float, is_lr, f"a positive number at most {MAX_LR:.3g}")
_fraction = _argument(float, is_fraction, "a number in [0, 1)")
_seed = _argument(int, lambda v: is_int(v, 0, MAX_SEED), f"an integer in [0, {MAX_SEED}]")
_layers = _argument(
    _int_list,
    lambda v: is_sizes(v, 2),
    "at least two comma-separated positive sizes, such as 784,200,200",
)
_steps = _argument(
    _int_list,
    lambda v: is_steps(v) and v != [],
    "increasing positive step counts such as 800,2500",
)
_phi_objective = _argument(_phi_text, is_phi_objective, "'sleep', 'wake' or a number in [0, 1]")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_train_options(train: argparse.ArgumentParser) -> Dict[str, str]:
    """Add the options of ``train``, in groups; returns each option's destination."""
    options: Dict[str, str] = {}
    group = train.add_argument_group

    def add(into: Any, *names: str, **kwargs: Any) -> None:
        action = into.add_argument(*names, **kwargs)
        options.update({name: action.dest for name in action.option_strings})

    folder = group("run folder")
    add(
        folder,
        "--resume",
        type=Path,
        metavar="FOLDER",
        help="continue the run saved in FOLDER (runs/latest: the newest); it keeps its own "
        "configuration: only --epochs (the new total), --device and --jit/--no-jit apply",
    )
    add(
        folder,
        "--output",
        type=Path,
        default=None,
        metavar="FOLDER",
        help="the run's folder (default: a new runs/<date>_<time>, with runs/latest pointing "
        "at the newest); a folder holding another run is refused unless --overwrite",
    )
    add(
        folder,
        "--overwrite",
        action="store_true",
        help="replace the run held in --output (its files) by the new run",
    )

    model = group("model")
    add(model, "--model", choices=MODELS, default="helmholtz")
    add(
        model,
        "--layers",
        type=_layers,
        default=None,
        help="HelmholtzMachine layer sizes, data first (default 784,200; 16,8,1 for bars)",
    )
    add(
        model,
        "--hidden",
        type=_positive_int,
        nargs="*",
        default=None,
        help="deterministic hidden layer sizes inside each conditional "
        "(helmholtz) or of the networks (gaussian; default 200)",
    )
    add(
        model,
        "--z-dim",
        type=_positive_int,
        default=20,
        help="latent dimension of the gaussian model",
    )
    add(
        model,
        "--init",
        choices=["default", "sparse"],
        default=None,
        help="initial weights: torch's defaults, or HelmholtzMachine.sparse_init_ "
        "(default: sparse for bars)",
    )

    data = group("data")
    add(data, "--dataset", default="digits", choices=DATASETS)
    add(
        data,
        "--data-path",
        type=Path,
        default=None,
        help="data file for binarized-mnist (.npz or folder of .amat) or mnist-dynamic (mnist.npz)",
    )

    estimator = group("estimator")
    add(
        estimator,
        "--num-particles",
        type=_positive_int,
        default=None,
        help="K; 1 is classic wake-sleep, K > 1 reweighted wake-sleep (default 1; 5 for bars)",
    )
    add(estimator, "--num-sleep-particles", type=_positive_int, default=1)
    add(
        estimator,
        "--phi-objective",
        type=_phi_objective,
        default=None,
        help="'sleep', 'wake', or a in [0, 1] mixing wake-phi and sleep-phi "
        "(default sleep; wake for bars)",
    )

    schedule = group("optimizer and schedule")
    add(schedule, "--optimizer", choices=OPTIMIZERS, default="adam")
    add(
        schedule,
        "--lr",
        type=_learning_rate,
        default=None,
        help="learning rate (default 1e-3; 0.1 for bars)",
    )
    add(
        schedule,
        "--guide-lr",
        type=_learning_rate,
        default=None,
        help="learning rate of the guide (default: --lr; 0.3 for bars)",
    )
    add(
        schedule,
        "--candidates",
        type=_positive_int,
        default=None,
        help="train this many networks from different seeds and keep the best by successive "
        "selection on held-in training data (default 1; 24 for bars)",
    )
    add(
        schedule,
        "--selection-steps",
        type=_steps,
        default=None,
        help="with --candidates: step counts at which candidates are ranked; a third survive "
        "each ranking and one the last (default 800,2500 for bars)",
    )
    add(
        schedule,
        "--shrink",
        type=_fraction,
        default=None,
        help="multiply the weight matrices by 1 - SHRINK after each of the first "
        "--shrink-steps steps (default 0; 3e-3 for bars)",
    )
    add(schedule, "--shrink-steps", type=_nonnegative_int, default=None)
    add(
        schedule,
        "--lr-decay",
        type=_fraction,
        default=None,
        help="decay the learning rates geometrically over this final fraction of the run "
        "(default 0; 0.6 for bars)",
    )
    add(
        schedule,
        "--lr-final",
        type=_positive_float,
        default=0.01,
        help="learning rate factor reached at the end of --lr-decay",
    )
    add(schedule, "--batch-size", type=_positive_int, default=100)
    add(
        schedule,
        "--epochs",
        type=_positive_int,
        default=None,
        help="passes over the training data (default 100; bars: 60 epochs of 100 fresh batches "
        "after the candidate selection); with --resume, the new total",
    )

    running = group("running")
    add(running, "--seed", type=_seed, default=0)
    add(running, "--device", default="cpu", help="cpu, cuda or cuda:N")
    add(
        running,
        "--jit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="record each step once and replay it (WakeSleep(jit=True)): bitwise the same "
        "results as --no-jit, less time per step (default: on)",
    )
    add(running, "--no-progress", action="store_true", help="no progress bar")

    evaluation = group("evaluation")
    add(
        evaluation,
        "--eval-every",
        type=_positive_int,
        default=None,
        help="epochs between test evaluations (default: 10 evaluations a run)",
    )
    add(
        evaluation,
        "--eval-samples",
        type=_positive_int,
        default=100,
        help="importance samples per test point in periodic evaluations",
    )
    add(
        evaluation,
        "--final-samples",
        type=_positive_int,
        default=1000,
        help="importance samples per test point in the final evaluation",
    )
    add(
        evaluation,
        "--test-size",
        type=_positive_int,
        default=None,
        help="evaluate on the first N test points only",
    )
    return options


def build_parser() -> argparse.ArgumentParser:
    """The command's parser. ``parser.train_options`` maps each option of ``train`` to its
    destination (to tell which options a command line gave)."""
    parser = _Parser(
        prog="pyro-wakesleep",
        description="Train and evaluate Helmholtz machines by wake-sleep (pyro-wakesleep).",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model (defaults: shipped digits)")
    options = _add_train_options(train)

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
    """
    The ``train`` options that ``argv`` gives, as ``{destination: option as written}``
    (argparse's unambiguous abbreviations resolved).

    :param parser: a parser from :func:`build_parser`.
    :param argv: the command line, without the program's name.
    """
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
