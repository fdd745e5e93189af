"""
The command line of ``pyro-wakesleep``: its parser (:func:`build_parser`), whose errors are one
line, with the options of ``train`` in argument groups, and :func:`given_options`, which tells
the options a command line gave.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Sequence

from .. import __version__
from ..evaluate import CHUNK_SIZE
from .arguments import (
    EVALUATE_TEST_SIZE_HELP,
    NO_PROGRESS,
    TEST_SIZE_HELP,
    THREADS,
    fraction,
    layers,
    learning_rate,
    nonnegative_int,
    phi_objective,
    positive_float,
    positive_int,
    seed,
    steps,
)
from .config import DATASETS, MODELS, OPTIMIZERS


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
        "configuration: only --epochs (the new total), --device, --jit/--no-jit, --threads and "
        "--no-progress apply",
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
    add(
        model,
        "--model",
        choices=MODELS,
        default=None,
        help="helmholtz: a sigmoid belief net with its recognition net (HelmholtzMachine); "
        "gaussian: Gaussian latents (GaussianHelmholtz); air: Attend-Infer-Repeat, a random "
        "number of digits placed by a spatial transformer (MultiDigitAIR, 28x28 images) "
        "(default air for multi-digits, helmholtz otherwise)",
    )
    add(
        model,
        "--layers",
        type=layers,
        default=None,
        help="HelmholtzMachine layer sizes, data first (default 784,200; 16,8,1 for bars)",
    )
    add(
        model,
        "--hidden",
        type=positive_int,
        nargs="*",
        default=None,
        help="deterministic hidden layer sizes inside each conditional "
        "(helmholtz) or of the networks (gaussian; default 200); air: one size, the width of "
        "all its networks (default 128)",
    )
    add(
        model,
        "--z-dim",
        type=positive_int,
        default=None,
        help="latent dimension of the gaussian model (default 20), or of each object's "
        "appearance z_what in the air model (default 10)",
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
    add(
        data,
        "--dataset",
        default="digits",
        choices=DATASETS,
        help="digits: the shipped digits; bars: the bars problem, with its own recipe; "
        "multi-digits: canvases of 0-2 shrunk digits, with the air recipe (K=5, wake-phi); "
        "binarized-mnist and mnist-dynamic: read from --data-path (default digits)",
    )
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
        type=positive_int,
        default=None,
        help="K; 1 is classic wake-sleep, K > 1 reweighted wake-sleep (default 1; 5 for bars)",
    )
    add(
        estimator,
        "--num-sleep-particles",
        type=positive_int,
        default=1,
        help="fantasies (dreams) per data point in the sleep phase (default 1)",
    )
    add(
        estimator,
        "--phi-objective",
        type=phi_objective,
        default=None,
        help="'sleep', 'wake', or a in [0, 1] mixing wake-phi and sleep-phi "
        "(default sleep; wake for bars)",
    )

    schedule = group("optimizer and schedule")
    add(
        schedule,
        "--optimizer",
        choices=OPTIMIZERS,
        default="adam",
        help="Pyro's optimizer of the model and of the guide (default adam)",
    )
    add(
        schedule,
        "--lr",
        type=learning_rate,
        default=None,
        help="learning rate (default 1e-3; 0.1 for bars)",
    )
    add(
        schedule,
        "--guide-lr",
        type=learning_rate,
        default=None,
        help="learning rate of the guide (default: --lr; 0.3 for bars)",
    )
    add(
        schedule,
        "--candidates",
        type=positive_int,
        default=None,
        help="train this many networks from different seeds and keep the best by successive "
        "selection on held-in training data (default 1; 24 for bars)",
    )
    add(
        schedule,
        "--selection-steps",
        type=steps,
        default=None,
        help="with --candidates: step counts at which candidates are ranked; a third survive "
        "each ranking and one the last (default 800,2500 for bars)",
    )
    add(
        schedule,
        "--shrink",
        type=fraction,
        default=None,
        help="multiply the weight matrices by 1 - SHRINK after each of the first "
        "--shrink-steps steps (default 0; 3e-3 for bars)",
    )
    add(
        schedule,
        "--shrink-steps",
        type=nonnegative_int,
        default=None,
        help="the steps that --shrink applies to (default 0; 2000 for bars)",
    )
    add(
        schedule,
        "--lr-decay",
        type=fraction,
        default=None,
        help="decay the learning rates geometrically over this final fraction of the run "
        "(default 0; 0.6 for bars)",
    )
    add(
        schedule,
        "--lr-final",
        type=positive_float,
        default=0.01,
        help="learning rate factor reached at the end of --lr-decay",
    )
    add(
        schedule,
        "--batch-size",
        type=positive_int,
        default=100,
        help="data points per training step (default 100)",
    )
    add(
        schedule,
        "--epochs",
        type=positive_int,
        default=None,
        help="passes over the training data (default 100; bars: 60 epochs of 100 fresh batches "
        "after the candidate selection); with --resume, the new total",
    )

    running = group("running")
    add(
        running,
        "--seed",
        type=seed,
        default=0,
        help="seed of the initial weights, the data order and the samples (default 0)",
    )
    add(running, "--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add(
        running,
        "--jit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="record each step once and replay it (WakeSleep(jit=True)): bitwise the same "
        "results as --no-jit, less time per step (default: on)",
    )
    add(running, "--threads", **THREADS)
    add(running, "--no-progress", **NO_PROGRESS)

    evaluation = group("evaluation")
    add(
        evaluation,
        "--eval-every",
        type=positive_int,
        default=None,
        help="epochs between test evaluations (default: 10 evaluations a run)",
    )
    add(
        evaluation,
        "--eval-samples",
        type=positive_int,
        default=100,
        help="importance samples per test point in periodic evaluations (default 100)",
    )
    add(
        evaluation,
        "--final-samples",
        type=positive_int,
        default=1000,
        help="importance samples per test point in the final evaluation, saved in the run's "
        "final.json (default 1000)",
    )
    add(
        evaluation,
        "--test-size",
        type=positive_int,
        default=None,
        help=TEST_SIZE_HELP,
    )
    return options


def build_parser() -> argparse.ArgumentParser:
    """The command's parser. ``parser.train_options`` maps each option of ``train`` to its
    destination (to tell which options a command line gave)."""
    parser = _Parser(
        prog="pyro-wakesleep",
        description="Train and evaluate Helmholtz machines by wake-sleep (pyro-wakesleep).",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {__version__}",
        help="print the version and exit",
    )
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=_Parser,
        metavar="COMMAND",
        help="train or evaluate",
    )

    train = commands.add_parser("train", help="train a model (defaults: shipped digits)")
    options = _add_train_options(train)

    evaluate = commands.add_parser(
        "evaluate",
        help="re-estimate a run's test log-likelihood",
        description="Re-estimate the test log-likelihood of a saved run and save it in the run's "
        "folder, in evaluation_<num-samples>.json (evaluation_<num-samples>_test<points>.json "
        "with --test-size, evaluation_exact.json for bars); the "
        "training's own final evaluation, final.json, is left as it is.",
    )
    add = evaluate.add_argument
    add("folder", type=Path, help="a run folder (runs/latest: the newest)")
    add(
        "--num-samples",
        type=positive_int,
        default=5000,
        help="importance samples per test point (default 5000; bars is exact and ignores it)",
    )
    add(
        "--chunk-size",
        type=positive_int,
        default=CHUNK_SIZE,
        help=f"samples drawn at once: memory grows with it; it orders the random draws "
        f"(default {CHUNK_SIZE})",
    )
    add(
        "--batch-size",
        type=positive_int,
        default=100,
        help="test points evaluated at once: memory grows with it (default 100)",
    )
    add("--test-size", type=positive_int, default=None, help=EVALUATE_TEST_SIZE_HELP)
    add("--device", default=None, help="cpu, cuda or cuda:N (default: the run's)")
    add("--threads", **THREADS)
    add("--no-progress", **NO_PROGRESS)
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
