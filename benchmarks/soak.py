"""
Soak test: a long WakeSleep run that is killed (SIGKILL) again and again at random moments and
resumed each time from its last checkpoint, against the same run left alone. It reports
whether the loss curves and the final parameters match bitwise.

    python benchmarks/soak.py [--steps 20000] [--checkpoint-every 100] [--kills 10] [--quick]

Each training process builds the network afresh (so resuming goes through WakeSleep.load and
freshly built pyro.module modules, as a user's would), takes its batches in an order fixed by
the step number, appends each step's losses to ``losses.txt``, and saves a checkpoint every
``--checkpoint-every`` steps (the log is cut back to the checkpoint's step on resume: the
steps after it are taken again). The interrupted run lives in ``OUT/interrupted``, the
reference in ``OUT/uninterrupted``; a JSON summary goes to ``OUT/soak.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch


def child(folder: Path, args: argparse.Namespace) -> None:
    """One training process: resume from folder/checkpoint.pt if it exists, train to the end."""
    import pyro

    from pyro_wakesleep import WakeSleep
    from pyro_wakesleep.datasets import load_digits
    from pyro_wakesleep.models import HelmholtzMachine

    torch.set_num_threads(1)
    data = load_digits()["train"]
    torch.manual_seed(args.seed)
    net = HelmholtzMachine([784] + [int(s) for s in args.layers.split(",")])
    ws = WakeSleep(
        net.model,
        net.guide,
        pyro.optim.Adam({"lr": 1e-3}),
        num_particles=args.num_particles,
        phi_objective="sleep" if args.num_particles == 1 else 0.5,
        max_plate_nesting=1,
    )
    checkpoint, log = folder / "checkpoint.pt", folder / "losses.txt"
    lines: list = []  # a run killed before its first checkpoint starts over, log and all
    if checkpoint.exists():
        ws.load(checkpoint, data[:1])  # the fresh modules take the loaded values now
        lines = log.read_text().splitlines()[: ws.num_steps] if log.exists() else []
    # Keep the log's lines up to the checkpoint, replacing the file in one rename (a kill
    # during the rewrite leaves the old log, which the next start truncates again).
    partial = log.with_suffix(".tmp")
    partial.write_text("".join(line + "\n" for line in lines))
    os.replace(partial, log)
    batches_per_epoch = len(data) // args.batch_size
    with open(log, "a") as out:
        while ws.num_steps < args.steps:
            step = ws.num_steps
            epoch, index = divmod(step, batches_per_epoch)
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
            rows = order[index * args.batch_size : (index + 1) * args.batch_size]
            losses = ws.step(data[rows])
            out.write(f"{step} {losses.wake_theta!r} {losses.phi!r}\n")
            out.flush()
            if ws.num_steps % args.checkpoint_every == 0 or ws.num_steps == args.steps:
                ws.save(checkpoint)
    torch.save({n: p.detach() for n, p in net.named_parameters()}, folder / "final.pt")


def run(folder: Path, args: argparse.Namespace, kills: int, rng: random.Random) -> dict:
    """Train in folder, killing the process ``kills`` times at random moments."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--child", str(folder)] + args.passthrough
    killed, restarts, start = 0, 0, time.perf_counter()
    while True:
        process = subprocess.Popen(command)
        if killed < kills:
            delay = rng.uniform(args.min_delay, args.max_delay)
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                killed += 1
                restarts += 1
                continue
        if process.wait() != 0:
            raise RuntimeError(f"training process failed in {folder}")
        break
    return {"kills": killed, "restarts": restarts, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--min-delay", type=float, default=3.0, help="seconds before a kill")
    parser.add_argument("--max-delay", type=float, default=8.0)
    parser.add_argument("--layers", default="50")
    parser.add_argument("--num-particles", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/out/soak")
    parser.add_argument("--quick", action="store_true", help="400 steps, 3 kills")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.checkpoint_every, args.kills = 400, 25, 3
        args.min_delay, args.max_delay = 2.0, 3.5
    if args.child:
        child(Path(args.child), args)
        return
    args.passthrough = [
        f"--steps={args.steps}",
        f"--checkpoint-every={args.checkpoint_every}",
        f"--layers={args.layers}",
        f"--num-particles={args.num_particles}",
        f"--batch-size={args.batch_size}",
        f"--seed={args.seed}",
    ]
    out = Path(args.out)
    for name in ("interrupted", "uninterrupted"):
        for leftover in (out / name).glob("*") if (out / name).exists() else []:
            leftover.unlink()
    rng = random.Random(args.seed)
    interrupted = run(out / "interrupted", args, args.kills, rng)
    reference = run(out / "uninterrupted", args, 0, rng)
    curves = [
        (out / n / "losses.txt").read_text().splitlines() for n in ("interrupted", "uninterrupted")
    ]
    finals = [
        torch.load(out / n / "final.pt", weights_only=True)
        for n in ("interrupted", "uninterrupted")
    ]
    same_params = finals[0].keys() == finals[1].keys() and all(
        torch.equal(finals[0][k], finals[1][k]) for k in finals[0]
    )
    summary = {
        "steps": args.steps,
        "checkpoint_every": args.checkpoint_every,
        "interrupted": interrupted,
        "uninterrupted": reference,
        "loss_curve_steps": [len(c) for c in curves],
        "loss_curves_equal": curves[0] == curves[1],
        "final_parameters_equal": same_params,
    }
    (out / "soak.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if not (summary["loss_curves_equal"] and same_params and len(curves[0]) == args.steps):
        sys.exit(1)


if __name__ == "__main__":
    main()
