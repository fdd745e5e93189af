"""
The entry point of ``pyro-wakesleep`` (:func:`main`): parses the command line, sets torch's
thread count (``--threads``), runs ``train`` or ``evaluate``, prints the result, and reports
every failure and warning on one line of stderr (exit status 2 for an error, 130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import warnings
from typing import Iterator, Optional, Sequence

import torch

from .. import CheckpointError
from ..datasets import DatasetError
from .config import CONFIG_KEYS, RESUME_OPTIONS
from .errors import CommandError
from .evaluation import evaluate, evaluation_line, nonfinite_message
from .parser import build_parser, given_options
from .runs import CONFIG, RunFolderError
from .training import train


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on one line each, as the command's errors are."""
    print(f"pyro-wakesleep: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _train_command(
    parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]
) -> None:
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
                "--device, --jit/--no-jit and --threads apply",
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
        if args.data_path is not None and args.dataset in ("digits", "bars", "multi-digits"):
            warnings.warn(
                f"--data-path ignored: --dataset {args.dataset} reads no file",
                UserWarning,
                stacklevel=2,
            )
        if args.test_size is not None and args.dataset == "bars":
            warnings.warn(
                "--test-size ignored: --dataset bars is evaluated exactly, over its 30 images",
                UserWarning,
                stacklevel=2,
            )
        config = {key: getattr(args, key) for key in CONFIG_KEYS}
        result = train(config, progress=not args.no_progress, overwrite=args.overwrite)
    line = evaluation_line(result, exact=not math.isnan(result["kl_bits"]))
    print(
        f"{line}; {result['steps']} steps in {result['seconds']:.0f} s "
        f"({result['train_seconds']:.0f} s training without evaluations, "
        f"{result['steps_per_s']:.1f} steps/s); run saved in {result['folder']}"
    )


def _evaluate_command(args: argparse.Namespace) -> None:
    result = evaluate(
        args.folder,
        args.num_samples,
        args.chunk_size,
        args.batch_size,
        args.test_size,
        args.device,
        progress=not args.no_progress,
    )
    if not math.isnan(result["kl_bits"]) and not result.get("nonfinite"):
        line = (
            f"exact test log-likelihood {result['test_log_likelihood']:.4f} nats, "
            f"KL[data || model] {result['kl_bits']:.4f} bits"
        )
    else:
        line = evaluation_line(result, exact=False, samples=args.num_samples)
    print(line + (f"; saved in {result['file']}" if result["file"] else ""))
    if nonfinite_message(result):
        raise CommandError(nonfinite_message(result))


def _out_of_memory(error: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", MemoryError)
    text = str(error)
    return isinstance(error, (MemoryError, oom)) or (
        isinstance(error, RuntimeError)
        and ("DefaultCPUAllocator" in text or "out of memory" in text)
    )


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` (0: left as it is) for the block, then
    set back (``main`` may be called inside a program)."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count:
            torch.set_num_threads(previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Run ``pyro-wakesleep`` with the command line ``argv`` (default: ``sys.argv[1:]``).

    :returns: the exit status: 0, 2 after an error, 130 after Ctrl-C.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings(), _threads(args.threads):
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
