"""
Test log-likelihood on binarized MNIST against training wall-clock time, for wake-sleep, a
wake-sleep/RWS mix (plain and with a defensive wake proposal), memoised wake-sleep, Pyro's
ReweightedWakeSleep, SVI with VIMCO and SVI with TraceGraph_ELBO, all on the same sigmoid
belief net.

    python benchmarks/quality.py [--layers 784,200] [--budget-seconds 300 | --epochs 10]
        [--estimators wakesleep-classic,pyro-rws5] [--threads 2] [--quick]

Every estimator trains a fresh ``HelmholtzMachine`` (same seed, same initial weights, same
mini-batch order) with Adam on shuffled mini-batches of the 50,000 training rows of the standard
fixed binarization, for ``--budget-seconds`` of training wall-clock time or ``--epochs`` epochs
(the budget wins when both are given; 300 s when neither is). Before the timed runs every
estimator takes a few untimed steps on throwaway networks, so that the one-off start-up cost of
the process (about 2 s on the first step) falls on none of them. The estimators:

- ``wakesleep-classic``: ``WakeSleep``, one particle, sleep-phi (Hinton et al. 1995);
- ``wakesleep-rws5``: ``WakeSleep``, 5 particles, ``phi_objective=0.5`` (wake-phi and sleep-phi
  mixed equally);
- ``wakesleep-classic-jit``, ``wakesleep-rws5-jit``: the same with ``jit=True`` (the step
  recorded once and replayed: the same computation, less time per step);
- ``wakesleep-rws5-defensive``: ``wakesleep-rws5`` with ``defensive=0.2``: each wake particle
  drawn from the model's prior with probability 0.2 and from the guide otherwise, weighted
  against that mixture (``pyro_wakesleep.defensive``; the wake phase runs the programs twice);
- ``memoised``: ``WakeSleep`` with ``MemoisedWakeSleepLoss(memory_size=5, num_particles=5)``
  (Hewitt et al. 2020; ``phi_objective=0.5``, its default): a memory of the 5 best latent
  values of each of the 50,000 training rows, the model trained on the memory, the guide on the
  memory and on fantasies. The network is built with ``num_data=50000`` and stepped with the
  batch's row ids (``step(x[ids], idx=ids)``, the ids being the rows' positions in the training
  set), which the plate ``"data"`` carries to the memory; its sites are then scaled by
  ``50000 / 100``, a constant factor of every gradient that Adam's steps do not see (its
  ``eps`` aside). The memory holds the latents as the guide samples them, float32: 50,000 x 5
  x 200 units x 4 bytes = 200 MB for the SBN 784-200 (600 MB for 784-200-200-200), plus 1 MB
  of scores; it is allocated at the first step, inside the timed run;
- ``pyro-rws5``: ``SVI`` with Pyro's ``ReweightedWakeSleep(num_particles=5, insomnia=0.5)``;
- ``vimco5``: ``SVI`` with ``pyro_wakesleep.VIMCO(num_particles=5)`` (Mnih & Rezende 2016: the
  5-sample importance-weighted bound, score-function gradients with leave-one-out baselines);
- ``svi-tracegraph``: ``SVI`` with ``TraceGraph_ELBO`` (score-function gradients).

At ``--evals`` checkpoints evenly spread over the run the training clock stops and the average
test log-likelihood is estimated by importance sampling with the guide as proposal
(``pyro_wakesleep.evaluate_dataset``): ``--eval-samples-during`` samples per digit at the
intermediate checkpoints, ``--num-samples`` at the last one. The estimate is a stochastic lower
bound whose gap shrinks with the number of samples, so intermediate points are looser than the
final one. Evaluation draws from its own seeded random stream and does not count in the
training clock. The test rows are sorted by label, so ``--test-size`` below 10,000 takes a fixed
random subset (seeded by ``--seed``), the same for every estimator.

Output: a table on stdout, ``--json`` (arguments and versions in ``meta``, one entry per
estimator with every checkpoint) and ``--png`` (test log-likelihood against training seconds,
with the published RWS result as a dashed line when ``--layers 784,200,200,200``), both in
``--out`` (``benchmarks/out/`` by default).

``--quick`` is a smoke test of about a second per estimator, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pyro
import torch
from pyro.infer import SVI, ReweightedWakeSleep, TraceGraph_ELBO

from pyro_wakesleep import (
    VIMCO,
    MemoisedWakeSleepLoss,
    NonFiniteLossError,
    WakeSleep,
    evaluate_dataset,
)
from pyro_wakesleep.datasets import DatasetError, load_binarized_mnist
from pyro_wakesleep.evaluate import CHUNK_SIZE
from pyro_wakesleep.models import HelmholtzMachine

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared/data/binarized_mnist.npz"
DEFAULT_OUT = REPO / "benchmarks/out"
DEFAULT_BUDGET = 300.0
WARMUP_STEPS = 3

#: Bornschein & Bengio (2015), reweighted wake-sleep with K = 5 on an SBN 200-200-200.
PUBLISHED_LAYERS = [784, 200, 200, 200]
PUBLISHED_NLL = 93.5
PUBLISHED_LABEL = "RWS K=5, SBN 200-200-200 (Bornschein & Bengio 2015)"

ESTIMATORS: Dict[str, str] = {
    "wakesleep-classic": "WakeSleep, K=1, sleep-phi",
    "wakesleep-rws5": "WakeSleep, K=5, phi_objective=0.5",
    "wakesleep-classic-jit": "WakeSleep, K=1, sleep-phi, jit=True",
    "wakesleep-rws5-jit": "WakeSleep, K=5, phi_objective=0.5, jit=True",
    "wakesleep-rws5-defensive": "WakeSleep, K=5, phi_objective=0.5, defensive=0.2",
    "memoised": "WakeSleep + MemoisedWakeSleepLoss(memory_size=5, K=5)",
    "pyro-rws5": "SVI + pyro.infer.ReweightedWakeSleep(K=5, insomnia=0.5)",
    "vimco5": "SVI + pyro_wakesleep.VIMCO(K=5)",
    "svi-tracegraph": "SVI + pyro.infer.TraceGraph_ELBO",
}

#: The width of the estimators' names in the printed tables.
NAME_WIDTH = max(len(name) for name in ESTIMATORS)

#: A training step: the batch's rows and their ids (positions in the training set).
Step = Callable[[torch.Tensor, torch.Tensor], Any]


def build(estimator: str, net: HelmholtzMachine, lr: float) -> Step:
    """
    The training step of ``estimator`` on the networks of ``net``, with a fresh Adam: called
    with a batch and its rows' ids, which only ``memoised`` reads (``net`` must then have been
    built with ``num_data``).
    """
    optim = pyro.optim.Adam({"lr": lr})
    nesting = net.max_plate_nesting
    jit = estimator.endswith("-jit")
    step: Callable[[torch.Tensor], Any]
    if estimator in ("wakesleep-classic", "wakesleep-classic-jit"):
        step = WakeSleep(
            net.model, net.guide, optim, num_particles=1, max_plate_nesting=nesting, jit=jit
        ).step
    elif estimator in ("wakesleep-rws5", "wakesleep-rws5-jit", "wakesleep-rws5-defensive"):
        step = WakeSleep(
            net.model,
            net.guide,
            optim,
            num_particles=5,
            phi_objective=0.5,
            max_plate_nesting=nesting,
            jit=jit,
            defensive=0.2 if estimator.endswith("-defensive") else 0.0,
        ).step
    elif estimator == "memoised":
        if net.num_data is None:
            raise ValueError("memoised needs a network built with num_data")
        memoised = WakeSleep(
            net.model,
            net.guide,
            optim,
            loss=MemoisedWakeSleepLoss(
                memory_size=5, num_particles=5, num_data=net.num_data, max_plate_nesting=nesting
            ),
        )
        return lambda x, ids: memoised.step(x, idx=ids)
    elif estimator == "pyro-rws5":
        loss = ReweightedWakeSleep(
            num_particles=5, insomnia=0.5, max_plate_nesting=nesting, vectorize_particles=True
        )
        step = SVI(net.model, net.guide, optim, loss).step
    elif estimator == "vimco5":
        vimco = VIMCO(num_particles=5, max_plate_nesting=nesting)
        step = SVI(net.model, net.guide, optim, vimco).step
    elif estimator == "svi-tracegraph":
        step = SVI(net.model, net.guide, optim, TraceGraph_ELBO(max_plate_nesting=nesting)).step
    else:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    return lambda x, ids: step(x)


def warm_up(estimators: List[str], x: torch.Tensor, args: argparse.Namespace) -> None:
    """
    A few untimed steps of every estimator on throwaway networks, so that the one-off costs of
    a process (lazy initialization, about 2 s on the first step) fall on none of the timed runs.
    """
    ids = torch.arange(len(x))
    for estimator in estimators:
        pyro.clear_param_store()
        name = "quality_warmup_" + estimator.replace("-", "_")
        net = HelmholtzMachine(args.layers, name=name, num_data=len(x))
        step = build(estimator, net, args.lr)
        for _ in range(WARMUP_STEPS):
            step(x, ids)
    pyro.clear_param_store()


def evaluate(
    net: HelmholtzMachine, test: torch.Tensor, num_samples: int, seed: int
) -> Dict[str, float]:
    """Average test log-likelihood and its standard error, from a random stream of its own."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        result = evaluate_dataset(
            net.model,
            net.guide,
            test,
            batch_size=100,
            num_samples=num_samples,
            chunk_size=min(CHUNK_SIZE, num_samples),
            max_plate_nesting=net.max_plate_nesting,
        )
    finally:
        torch.set_rng_state(state)
    return {
        "test_ll": float(result.mean()),
        "test_ll_stderr": float(result.mean_stderr()),
        "num_samples": num_samples,
        "eval_seconds": time.perf_counter() - start,
    }


def train(
    estimator: str,
    train_x: torch.Tensor,
    test: torch.Tensor,
    args: argparse.Namespace,
) -> Dict[str, Any]:
    """
    Train one estimator from scratch; stop the clock and evaluate at ``args.evals`` checkpoints.

    :returns: ``{"estimator", "description", "points": [...]}``, one point per checkpoint, plus
        ``"error"`` when training failed.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    # num_data changes nothing for the estimators that are not given the ids
    name = "quality_" + estimator.replace("-", "_")
    net = HelmholtzMachine(args.layers, name=name, num_data=len(train_x))
    step = build(estimator, net, args.lr)
    batches_per_epoch = math.ceil(len(train_x) / args.batch_size)
    # checkpoints: training seconds in budget mode, steps in epoch mode
    if args.budget_seconds is not None:
        marks = [args.budget_seconds * (i + 1) / args.evals for i in range(args.evals)]
    else:
        total = max(1, round(args.epochs * batches_per_epoch))
        marks = sorted({max(1, round(total * (i + 1) / args.evals)) for i in range(args.evals)})
    generator = torch.Generator().manual_seed(args.seed)
    record: Dict[str, Any] = {
        "estimator": estimator,
        "description": ESTIMATORS[estimator],
        "points": [],
    }
    clock = 0.0
    steps = 0
    order = torch.empty(0, dtype=torch.long)
    position = len(order)
    while marks:
        start = time.perf_counter()
        try:
            if position >= len(order):
                order = torch.randperm(len(train_x), generator=generator)
                position = 0
            ids = order[position : position + args.batch_size]  # the rows' true ids
            position += args.batch_size
            step(train_x[ids], ids)
        except (NonFiniteLossError, ValueError, RuntimeError) as error:
            record["error"] = f"step {steps}: {type(error).__name__}: {error}"
            print(f"  {estimator}: {record['error']}", file=sys.stderr)
            break
        clock += time.perf_counter() - start
        steps += 1
        reached = clock if args.budget_seconds is not None else steps
        if reached < marks[0]:
            continue
        while marks and reached >= marks[0]:
            marks.pop(0)
        final = not marks
        samples = args.num_samples if final else args.eval_samples_during
        point = {
            "train_seconds": clock,
            "steps": steps,
            "epochs": steps / batches_per_epoch,
            **evaluate(net, test, samples, args.seed + 1),
        }
        record["points"].append(point)
        print(
            f"  {estimator:{NAME_WIDTH}s} {point['train_seconds']:8.1f} s {steps:7d} steps "
            f"{point['epochs']:7.2f} epochs  test LL {point['test_ll']:9.2f} "
            f"+- {point['test_ll_stderr']:.2f}  ({samples} samples, "
            f"eval {point['eval_seconds']:.1f} s)",
            flush=True,
        )
    return record


def plot(results: List[Dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """Test log-likelihood against training seconds, one line per estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for record in results:
        points = record["points"]
        if not points:
            continue
        seconds = [p["train_seconds"] for p in points]
        ll = [p["test_ll"] for p in points]
        err = [p["test_ll_stderr"] for p in points]
        (line,) = ax.plot(seconds, ll, marker="o", markersize=4, label=record["estimator"])
        ax.errorbar(seconds, ll, yerr=err, fmt="none", ecolor=line.get_color(), capsize=2)
        last = points[-1]
        ax.plot(
            last["train_seconds"],
            last["test_ll"],
            marker="s",
            markersize=7,
            color=line.get_color(),
        )
    if args.layers == PUBLISHED_LAYERS:
        ax.axhline(-PUBLISHED_NLL, color="gray", linestyle="--", linewidth=1)
        ax.annotate(
            f"{PUBLISHED_LABEL}: {-PUBLISHED_NLL:g} nats",
            xy=(0.01, -PUBLISHED_NLL),
            xycoords=("axes fraction", "data"),
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=8,
            color="gray",
        )
    layers = "-".join(str(s) for s in args.layers)
    ax.set_title(
        f"binarized MNIST, SBN {layers}, batch {args.batch_size}, Adam lr {args.lr:g}",
        fontsize=10,
    )
    ax.set_xlabel("training wall-clock (s), evaluation excluded")
    ax.set_ylabel("test log-likelihood (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.text(
        0.99,
        0.01,
        f"{args.eval_samples_during} importance samples per test digit at the circles, "
        f"{args.num_samples} at the last point (square); {args.test_size} test digits",
        ha="right",
        va="bottom",
        fontsize=7,
        color="dimgray",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="binarized_mnist.npz")
    parser.add_argument("--layers", default="784,200", help="layer sizes, data first")
    parser.add_argument("--estimators", default=",".join(ESTIMATORS), help="comma-separated subset")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--budget-seconds",
        type=float,
        default=None,
        help=f"training seconds per estimator (default {DEFAULT_BUDGET:g} if no --epochs)",
    )
    parser.add_argument("--epochs", type=float, default=None, help="epochs per estimator")
    parser.add_argument("--evals", type=int, default=5, help="checkpoints per estimator")
    parser.add_argument("--num-samples", type=int, default=5000, help="at the last checkpoint")
    parser.add_argument("--eval-samples-during", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--json", default="quality.json", help="relative to --out")
    parser.add_argument("--png", default="quality.png", help="relative to --out")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 s per estimator, 200 test digits, 50 samples, 2 checkpoints",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.budget_seconds, args.epochs = 1.0, None
        args.test_size, args.num_samples, args.evals = 200, 50, 2
        args.eval_samples_during = min(args.eval_samples_during, 10)
    if args.budget_seconds is None and args.epochs is None:
        args.budget_seconds = DEFAULT_BUDGET
    if args.budget_seconds is not None and args.epochs is not None:
        print("--budget-seconds and --epochs both given: the budget wins", file=sys.stderr)
        args.epochs = None
    try:
        args.layers = [int(s) for s in args.layers.split(",")]
    except ValueError:
        parser.error(f"--layers must be comma-separated integers, got {args.layers!r}")
    if len(args.layers) < 2 or min(args.layers) < 1:
        parser.error("--layers needs the data size and at least one positive layer size")
    args.estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    unknown = [e for e in args.estimators if e not in ESTIMATORS]
    if unknown:
        parser.error(f"unknown estimator(s) {unknown}; choose from {', '.join(ESTIMATORS)}")
    for name in ("batch_size", "evals", "num_samples", "eval_samples_during", "test_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("budget_seconds", "epochs"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = load_binarized_mnist(args.data)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train_x, test = data["train"], data["test"]
    if args.layers[0] != train_x.shape[1]:
        print(f"error: --layers must start with {train_x.shape[1]}", file=sys.stderr)
        return 2
    if args.test_size < len(test):
        # the test rows are sorted by label: take a fixed random subset, not the first rows
        subset = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))
        test = test[subset[: args.test_size].sort().values]
    args.test_size = len(test)
    limit = (
        f"{args.budget_seconds:g} s" if args.budget_seconds is not None else f"{args.epochs:g} ep"
    )
    print(
        f"SBN {'-'.join(map(str, args.layers))}, {len(train_x)} train rows, {len(test)} test "
        f"rows, {limit} per estimator, {torch.get_num_threads()} threads"
    )
    warm_up(args.estimators, train_x[: args.batch_size], args)
    results = [train(estimator, train_x, test, args) for estimator in args.estimators]

    print(
        f"\n{'estimator':{NAME_WIDTH}s} {'train s':>8s} {'steps':>7s} {'epochs':>7s} "
        f"{'test LL':>9s} {'stderr':>7s} {'samples':>7s}"
    )
    for record in results:
        if record["points"]:
            p = record["points"][-1]
            print(
                f"{record['estimator']:{NAME_WIDTH}s} {p['train_seconds']:8.1f} {p['steps']:7d} "
                f"{p['epochs']:7.2f} {p['test_ll']:9.2f} {p['test_ll_stderr']:7.3f} "
                f"{p['num_samples']:7d}"
            )
        if "error" in record:
            print(f"{record['estimator']:{NAME_WIDTH}s} failed: {record['error']}")
    if args.layers == PUBLISHED_LAYERS:
        print(f"{'published':{NAME_WIDTH}s} {PUBLISHED_LABEL}: {-PUBLISHED_NLL}")

    meta = {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "warmup_steps": WARMUP_STEPS,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / args.json, args.out / args.png
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    plot(results, args, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
