"""
Attend-Infer-Repeat on multi-digit canvases: count accuracy and test log p(x) against training
time, for WakeSleep (reweighted and classic), SVI with TraceGraph_ELBO and Pyro's
ReweightedWakeSleep, all on the same MultiDigitAIR from the same initialization.

    python benchmarks/air.py [--budget-seconds 480] [--evals 4] [--contenders ...]
        [--json air.json] [--figure air.png] [--quick]

The data are 28x28 canvases holding 0, 1 or 2 digits of 14x14 at random positions
(``pyro_wakesleep.datasets.load_multi_digits``: training canvases from the 3,000 shipped
training digits, test canvases from the 1,000 test digits). The contenders, one after another
in one process, each with ``torch.set_num_threads(1)``, the same mini-batches (``--batch-size``,
drawn with replacement from one seeded generator) and Adam (``--lr``):

- ``wakesleep-rws5``: ``WakeSleep``, K=5, ``phi_objective="wake"`` (reweighted wake-sleep,
  wake-phi; importance weights per canvas);
- ``wakesleep-classic``: ``WakeSleep``, K=1, sleep-phi (Hinton et al. 1995);
- ``svi-tracegraph``: ``SVI`` with ``TraceGraph_ELBO`` (score-function gradients for
  ``z_pres``, as Pyro's AIR example), with data-dependent baselines: a decaying average plus a
  network of its own (``MultiDigitAIR(baselines=True)``, the only contender with it);
- ``pyro-rws5``: ``SVI`` with Pyro's ``ReweightedWakeSleep(num_particles=5)`` (its default
  ``insomnia=1.0``: wake-phi, the estimator of ``wakesleep-rws5``, except that Pyro forms one
  importance weight per particle for the whole mini-batch).

Each contender gets ``--budget-seconds`` of training time. The clock (``--clock``) is by
default the CPU time of the training thread (``time.thread_time``): on a shared machine, other
processes then cannot take time from one contender and not another; ``--clock wall`` measures
wall-clock instead. Both are recorded. Before the timed runs each contender takes a few
untimed steps on a throwaway model (the process's one-off start-up costs).

At ``--evals`` checkpoints evenly spread over the budget, and at the start, the clock stops
and the guide is evaluated on the ``--num-test`` test canvases, from a random stream of its own:

- count accuracy: how often one draw of the guide's number of objects (the sum of its
  ``z_pres``) equals the true count, averaged over ``--count-samples`` draws per canvas (its
  standard error is over canvases);
- test log p(x) per canvas, by importance sampling with the guide as proposal
  (``pyro_wakesleep.evaluate_dataset``), ``--eval-samples`` samples per canvas
  (``--final-eval-samples`` at the last checkpoint), with its Monte Carlo standard error.

Output: a table on stdout, ``--json`` (arguments, versions and every checkpoint) and
``--figure`` (both metrics against training seconds). ``--quick`` is a smoke test of a few
seconds per contender, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pyro
import torch
from pyro.infer import SVI, ReweightedWakeSleep, TraceGraph_ELBO

from pyro_wakesleep import WakeSleep, evaluate_dataset
from pyro_wakesleep.datasets import load_multi_digits
from pyro_wakesleep.models import MultiDigitAIR

WARMUP_STEPS = 3

CONTENDERS: Dict[str, str] = {
    "wakesleep-rws5": "WakeSleep, K=5, wake-phi",
    "wakesleep-classic": "WakeSleep, K=1, sleep-phi",
    "svi-tracegraph": "SVI + TraceGraph_ELBO, data-dependent baselines",
    "pyro-rws5": "SVI + pyro.infer.ReweightedWakeSleep(K=5, insomnia=1)",
}


def make_air(contender: str, args: argparse.Namespace, name: str) -> MultiDigitAIR:
    return MultiDigitAIR(
        canvas_size=28,
        max_objects=args.max_objects,
        hidden=args.hidden,
        baselines=contender == "svi-tracegraph",
        name=name,
    )


def build(contender: str, air: MultiDigitAIR, lr: float) -> Callable[[torch.Tensor], Any]:
    """The training step of ``contender`` on ``air``, with a fresh Adam."""
    optim = pyro.optim.Adam({"lr": lr})
    nesting = air.max_plate_nesting
    if contender == "wakesleep-rws5":
        return WakeSleep(
            air.model, air.guide, optim, num_particles=5, phi_objective="wake",
            max_plate_nesting=nesting,
        ).step  # fmt: skip
    if contender == "wakesleep-classic":
        return WakeSleep(air.model, air.guide, optim, max_plate_nesting=nesting).step
    if contender == "svi-tracegraph":
        return SVI(air.model, air.guide, optim, TraceGraph_ELBO(max_plate_nesting=nesting)).step
    if contender == "pyro-rws5":
        loss = ReweightedWakeSleep(
            num_particles=5, insomnia=1.0, max_plate_nesting=nesting, vectorize_particles=True
        )
        return SVI(air.model, air.guide, optim, loss).step
    raise ValueError(f"unknown contender {contender!r}; choose from {', '.join(CONTENDERS)}")


def evaluate(
    air: MultiDigitAIR, data: Dict[str, torch.Tensor], samples: int, args: argparse.Namespace
) -> Dict[str, Any]:
    """Count accuracy and test log p(x), from a random stream of their own."""
    start = time.perf_counter()
    test, counts = data["test"], data["test_counts"]
    with torch.random.fork_rng():
        torch.manual_seed(args.seed + 1)
        hits = air.count_accuracy(test, counts, num_samples=args.count_samples)
        guess = air.infer(test).counts
        ll = evaluate_dataset(
            air.model, air.guide, test, batch_size=50, num_samples=samples,
            chunk_size=min(samples, 200), max_plate_nesting=air.max_plate_nesting,
        )  # fmt: skip
    confusion = torch.zeros(args.max_digits + 1, args.max_objects + 1, dtype=torch.long)
    confusion.index_put_((counts, guess), torch.ones_like(counts), accumulate=True)
    return {
        "count_accuracy": float(hits.mean()),
        "count_accuracy_stderr": float(hits.std() / len(hits) ** 0.5),
        "count_confusion": confusion.tolist(),
        "count_prior": air.count_prior().tolist(),
        "log_px": float(ll.mean()),
        "log_px_stderr": float(ll.mean_stderr()),
        "ess_mean": float(ll.ess.mean()),
        "eval_samples": samples,
        "eval_seconds": time.perf_counter() - start,
    }


def warm_up(data: Dict[str, torch.Tensor], args: argparse.Namespace) -> None:
    for contender in args.contenders:
        pyro.clear_param_store()
        air = make_air(contender, args, "air_warmup_" + contender.replace("-", "_"))
        step = build(contender, air, args.lr)
        for _ in range(WARMUP_STEPS):
            step(data["train"][: args.batch_size])
    pyro.clear_param_store()


def train(
    contender: str,
    initial: Dict[str, torch.Tensor],
    data: Dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> Dict[str, Any]:
    """Train one contender from the shared initialization; evaluate at the checkpoints."""
    pyro.clear_param_store()
    air = make_air(contender, args, "air_" + contender.replace("-", "_"))
    missing, unexpected = air.load_state_dict(initial, strict=False)
    assert not missing and all(k.startswith("baseline.") for k in unexpected), unexpected
    pyro.set_rng_seed(args.seed)
    step = build(contender, air, args.lr)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    marks = [args.budget_seconds * (i + 1) / args.evals for i in range(args.evals)]
    generator = torch.Generator().manual_seed(args.seed)
    train_x = data["train"]
    record: Dict[str, Any] = {"contender": contender, "description": CONTENDERS[contender]}
    points = record["points"] = []
    seconds = wall = 0.0
    steps = 0

    def checkpoint() -> None:
        final = not marks
        samples = args.final_eval_samples if final else args.eval_samples
        point = {"train_seconds": seconds, "wall_seconds": wall, "steps": steps}
        point.update(evaluate(air, data, samples, args))
        points.append(point)
        print(
            f"  {contender:18s} {seconds:7.1f} s {steps:6d} steps  count acc "
            f"{point['count_accuracy']:.3f} +- {point['count_accuracy_stderr']:.3f}  "
            f"log p(x) {point['log_px']:8.2f} +- {point['log_px_stderr']:.2f} "
            f"({samples} samples, eval {point['eval_seconds']:.0f} s)",
            flush=True,
        )

    checkpoint()
    while marks:
        batch = train_x[torch.randint(len(train_x), (args.batch_size,), generator=generator)]
        start, start_wall = clock(), time.perf_counter()
        try:
            losses = step(batch)
        except (ValueError, RuntimeError) as error:
            record["error"] = f"step {steps}: {type(error).__name__}: {error}"
            print(f"  {contender}: {record['error']}", file=sys.stderr)
            break
        seconds += clock() - start
        wall += time.perf_counter() - start_wall
        steps += 1
        if steps == 1:
            record["first_losses"] = list(losses) if isinstance(losses, tuple) else losses
        if seconds >= marks[0]:
            while marks and seconds >= marks[0]:
                marks.pop(0)
            checkpoint()
    return record


def plot(results: List[Dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    """Count accuracy and test log p(x) against training seconds, one line per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for record in results:
        pts = record["points"]
        x = [p["train_seconds"] for p in pts]
        for ax, key in zip(axes, ("count_accuracy", "log_px")):
            y = [p[key] for p in pts]
            err = [p[key + "_stderr"] for p in pts]
            ax.errorbar(x, y, yerr=err, marker="o", markersize=4, capsize=2,
                        label=record["description"])  # fmt: skip
    clock = "CPU s of the training thread" if args.clock == "cpu" else "wall-clock s"
    for ax, label in zip(axes, ("count accuracy (one guide draw)", "test log p(x) (nats)")):
        ax.set_xlabel(f"training time ({clock}), evaluation excluded")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(1 / (args.max_digits + 1), color="gray", linestyle=":", linewidth=1)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"AIR, 28x28 canvases of 0-{args.max_digits} digits, T={args.max_objects}, batch "
        f"{args.batch_size}, Adam lr {args.lr:g}, one thread each\n{args.num_test} test "
        f"canvases; log p(x) by importance sampling, {args.eval_samples} samples per canvas "
        f"({args.final_eval_samples} at the last point)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated")
    parser.add_argument("--budget-seconds", type=float, default=480.0, help="per contender")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--evals", type=int, default=4, help="checkpoints after the start")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-objects", type=int, default=3, help="T, the model's steps")
    parser.add_argument("--max-digits", type=int, default=2, help="digits per canvas, at most")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--num-train", type=int, default=10_000)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--count-samples", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--final-eval-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/out/air.json"))
    parser.add_argument("--figure", type=Path, default=Path("benchmarks/out/air.png"))
    parser.add_argument("--quick", action="store_true", help="smoke test, seconds per contender")
    args = parser.parse_args(argv)
    if args.quick:
        args.budget_seconds, args.evals, args.num_train, args.num_test = 2.0, 1, 200, 20
        args.count_samples, args.eval_samples, args.final_eval_samples = 2, 10, 20
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    data = load_multi_digits(args.num_train, args.num_test, max_digits=args.max_digits,
                             seed=args.seed)  # fmt: skip
    print(
        f"AIR: {len(data['train'])} training and {len(data['test'])} test canvases, "
        f"{args.budget_seconds:g} s ({args.clock}) per contender, 1 thread",
        flush=True,
    )
    torch.manual_seed(args.seed)
    initial = make_air("svi-tracegraph", args, "air_initial").state_dict()
    warm_up(data, args)
    results = [train(c, initial, data, args) for c in args.contenders]

    print(f"\n{'contender':18s} {'train s':>8s} {'steps':>7s} {'count acc':>14s} "
          f"{'log p(x)':>16s}")  # fmt: skip
    for record in results:
        for p in record["points"]:
            print(
                f"{record['contender']:18s} {p['train_seconds']:8.1f} {p['steps']:7d} "
                f"{p['count_accuracy']:7.3f} +- {p['count_accuracy_stderr']:.3f} "
                f"{p['log_px']:8.2f} +- {p['log_px_stderr']:.2f}"
            )
    meta = {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "warmup_steps": WARMUP_STEPS,
        "command": " ".join(sys.argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    for path in (args.json, args.figure):
        path.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, args, args.figure)
    print(f"\nwrote {args.json} and {args.figure}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
