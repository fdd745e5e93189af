"""
The types of the command's options (an argparse type per kind of value, checked as the
configuration's entries are, so that a bad value is refused on one line before anything runs)
and the options that ``train`` and ``evaluate`` share.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List

from .config import (
    MAX_LR,
    MAX_SEED,
    is_fraction,
    is_int,
    is_lr,
    is_number,
    is_phi_objective,
    is_sizes,
    is_steps,
)


def argument(parse: Callable[[str], Any], ok: Callable[[Any], bool], what: str):
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


positive_int = argument(int, is_int, "a positive integer")
nonnegative_int = argument(int, lambda v: is_int(v, 0), "a non-negative integer")
positive_float = argument(float, lambda v: is_number(v) and v > 0, "a positive number")
learning_rate = argument(float, is_lr, f"a positive number at most {MAX_LR:.3g}")
fraction = argument(float, is_fraction, "a number in [0, 1)")
seed = argument(int, lambda v: is_int(v, 0, MAX_SEED), f"an integer in [0, {MAX_SEED}]")
layers = argument(
    _int_list,
    lambda v: is_sizes(v, 2),
    "at least two comma-separated positive sizes, such as 784,200,200",
)
steps = argument(
    _int_list,
    lambda v: is_steps(v) and v != [],
    "increasing positive step counts such as 800,2500",
)
phi_objective = argument(_phi_text, is_phi_objective, "'sleep', 'wake' or a number in [0, 1]")


TEST_SIZE_HELP = (
    "evaluate on N test points only: a fixed random subset, the same for every run and for "
    "train and evaluate alike (the test sets are sorted by label); bars is evaluated exactly "
    "over its 30 images and ignores it (default: all test points)"
)
#: ``evaluate --test-size``: the run's own subset unless given.
EVALUATE_TEST_SIZE_HELP = (
    "evaluate on N test points only: a fixed random subset, the same for every run and for "
    "train and evaluate alike (the test sets are sorted by label; N at least the test set's "
    "size: all of them); bars is evaluated exactly over its 30 images and ignores it "
    "(default: the run's own --test-size, all test points if it had none)"
)
THREADS: Dict[str, Any] = {
    "type": nonnegative_int,
    "default": 1,
    "metavar": "N",
    "help": "CPU threads of torch (torch.set_num_threads); 0 keeps torch's own choice, one per "
    "core (default 1: the default model's small matrix products are no faster on more threads, "
    "and several threads on a busy machine make the run several times slower)",
}
NO_PROGRESS: Dict[str, Any] = {
    "action": "store_true",
    "help": "no progress bars (an evaluation's bar shows on a terminal only)",
}
