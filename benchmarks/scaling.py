"""
Data-parallel scaling on one machine: global batches per second of 1 and 2 processes on the
same global batch, for WakeSleep(distributed=True) and DistributedDataParallel around
WakeSleepModule, with the scaling efficiency and the all-reduce's share of a step.

    python benchmarks/scaling.py [--repeats 5] [--steps 40] [--warmup 10] [--batch-size 200]
                                 [--num-particles 5,1] [--json out.json] [--quick]
    python benchmarks/scaling.py --backend nccl --device cuda   # one GPU per process

Every measurement spawns ``world`` fresh processes (torch.multiprocessing, a process group whose
ranks meet through a file in a fresh temporary folder, so that no port is picked beforehand
for another program to take; one intra-op and one inter-op thread per process), world 1
included, so that both sizes run the same code path. Each rank builds the same network from
seed 0 (HelmholtzMachine of ``--layers``, model and guide scaled by the world size as in
examples/distributed.py), then draws from its own seed and trains on its contiguous
``B / world`` rows of one fixed global batch of B digits. For every K of ``--num-particles``
(K > 1 with wake-phi, K = 1 with sleep-phi) both engines run ``--warmup`` steps, then
``--steps`` timed steps between two barriers; steps/s is global batches per second. A repeat
runs world 1 and world 2 in turn (the order alternating between repeats, so that machine
drift hits both alike); the table shows the median over ``--repeats`` with the spread
(min-max). Scaling efficiency is throughput(2) / (2 throughput(1)), taken per repeat.

A third engine, ``local``, is the ceiling without communication: plain WakeSleep (no
``distributed``) in the same processes, each training alone on its shard (steps/s still
between the two barriers, so the slower process sets the time). Its efficiency is what the
machine allows (cores, caches, memory bandwidth, the per-step cost that does not shrink with
the shard); the gap between it and the other two is the synchronisation.

The all-reduce's share of a step, measured two ways on every rank (the table shows the mean
of the ranks, the JSON each rank):

* in the step: for ``wakesleep`` the sync's ``average`` is wrapped with a timer on the
  instance (``ws.sync.average``): the whole ProcessGroupSync averaging, i.e. its two
  collectives (failure flags and losses; the flattened gradients) and the flatten / copy
  back around them. For ``ddp`` a comm hook does what DDP's default all-reduce hook does
  (divide by the world size, an asynchronous all_reduce of the bucket) and records the
  launch and completion times of every bucket; a step's time is the window from the first
  launch to the last completion. DDP overlaps that window with the rest of the backward
  pass, so its share is an upper bound of the exposed communication. Both in-step times
  include waiting for the slower process: load imbalance counts as communication here.
* isolated: after the timed steps, one ``dist.all_reduce`` of a float32 tensor as large as
  all the gradients (the flattened tensor ProcessGroupSync reduces), after a barrier so that
  the ranks enter together; the median of ``--isolated-calls`` calls, divided by the step
  time. This is the cost of the transfer itself, without the imbalance.

On CUDA (``--device cuda``, one GPU per rank) the timers synchronize the device around what
they time. The process group is then "cpu:gloo,cuda:nccl", not plain "nccl": ProcessGroupSync
reduces its failure flags and losses as a CPU tensor, which a group with only the nccl
backend refuses ("No backend type associated with device type cpu"); the gradients go over
nccl.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable, Dict, List

import pyro
import torch
import torch.distributed as dist
from pyro import poutine
from torch.nn.parallel import DistributedDataParallel

from pyro_wakesleep import WakeSleep, WakeSleepModule
from pyro_wakesleep.datasets import load_digits
from pyro_wakesleep.models import HelmholtzMachine

ENGINES = ("wakesleep", "ddp", "local")
WORLDS = (1, 2)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=200, help="global batch size")
    parser.add_argument("--layers", default="784,200")
    parser.add_argument("--num-particles", default="5,1", help="comma-separated Ks")
    parser.add_argument("--isolated-calls", type=int, default=50)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="1 repeat of 3 steps, K=5")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup, args.isolated_calls = 1, 3, 1, 3
        args.num_particles = args.num_particles.split(",")[0]
    if not set(args.engines.split(",")) <= set(ENGINES):
        parser.error(f"--engines: choose among {', '.join(ENGINES)}")
    if args.batch_size % max(WORLDS):
        parser.error(f"--batch-size must be a multiple of {max(WORLDS)}")
    if (args.backend == "nccl") != (args.device == "cuda"):
        parser.error("--backend nccl goes with --device cuda, gloo with cpu")
    if args.device == "cuda" and torch.cuda.device_count() < max(WORLDS):
        parser.error(f"--device cuda: needs {max(WORLDS)} CUDA devices (one per process)")
    return args


class CommTimer:
    """Seconds of communication per step: a step's time is the window from the first
    ``start`` to the last ``end`` recorded during it."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.starts: List[float] = []
        self.ends: List[float] = []
        self.per_step: List[float] = []

    def close_step(self) -> None:
        if self.starts:
            self.per_step.append(max(self.ends) - min(self.starts))
        self.starts, self.ends = [], []


def wakesleep_step(model, guide, K: int, phi: str, timer: CommTimer) -> Callable:
    ws = WakeSleep(
        model,
        guide,
        pyro.optim.Adam({"lr": 1e-3}),
        distributed=True,
        num_particles=K,
        phi_objective=phi,
        max_plate_nesting=1,
    )
    average = ws.sync.average

    def timed_average(phases, step):
        timer.sync()
        timer.starts.append(time.perf_counter())
        out = average(phases, step)
        timer.sync()
        timer.ends.append(time.perf_counter())
        return out

    ws.sync.average = timed_average  # type: ignore[method-assign]
    return ws.step


def _timed_allreduce(timer: CommTimer, bucket):
    """DDP's default all-reduce hook (average over the processes), with launch and
    completion times recorded. (No return annotation: DDP compares it with the type
    ``Future[Tensor]``, and under ``from __future__ import annotations`` it is a string.)"""
    tensor = bucket.buffer().div_(dist.get_world_size())
    timer.sync()
    start = time.perf_counter()
    future = dist.all_reduce(tensor, async_op=True).get_future()

    def done(fut):
        timer.sync()
        timer.starts.append(start)
        timer.ends.append(time.perf_counter())
        return fut.value()[0]

    return future.then(done)


def ddp_step(net, model, guide, K: int, phi: str, timer: CommTimer, device) -> Callable:
    objective = WakeSleepModule(
        model, guide, modules=[net], num_particles=K, phi_objective=phi, max_plate_nesting=1
    )
    ids = [device] if device.type == "cuda" else None
    ddp = DistributedDataParallel(objective, device_ids=ids)
    ddp.register_comm_hook(timer, _timed_allreduce)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad()
        ddp(x).backward()
        optimizer.step()

    return step


def measure(engine: str, K: int, x: torch.Tensor, args, device, sync) -> Dict[str, float]:
    """One engine at one K on this rank: steps/s, in-step and isolated all-reduce times."""
    world = dist.get_world_size()
    torch.manual_seed(0)
    layers = [int(s) for s in args.layers.split(",")]
    net = HelmholtzMachine(layers, name=f"{engine}_k{K}").to(device)
    model = poutine.scale(net.model, scale=float(world))
    guide = poutine.scale(net.guide, scale=float(world))
    torch.manual_seed(1 + dist.get_rank())
    phi = "wake" if K > 1 else "sleep"
    timer = CommTimer(sync)
    if engine == "wakesleep":
        step = wakesleep_step(model, guide, K, phi, timer)
    elif engine == "local":  # no sync: each process trains alone on its shard
        kw = dict(num_particles=K, phi_objective=phi, max_plate_nesting=1)
        step = WakeSleep(model, guide, pyro.optim.Adam({"lr": 1e-3}), **kw).step
    else:
        step = ddp_step(net, model, guide, K, phi, timer, device)
    for _ in range(args.warmup):
        step(x)
        timer.close_step()
    timer.per_step = []
    sync()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(x)
        timer.close_step()
    sync()
    dist.barrier()
    elapsed = time.perf_counter() - start
    flat = torch.zeros(sum(p.numel() for p in net.parameters()), device=device)
    for _ in range(3):
        dist.all_reduce(flat)
    calls = []
    for _ in range(args.isolated_calls):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        sync()
        calls.append(time.perf_counter() - t0)
    return {
        "steps_per_second": args.steps / elapsed,
        "step_ms": 1e3 * elapsed / args.steps,
        "allreduce_in_step_ms": 1e3 * statistics.mean(timer.per_step or [0.0]),
        "allreduce_isolated_ms": 1e3 * statistics.median(calls),
        "gradient_numel": flat.numel(),
    }


def _worker(rank: int, world: int, args, out_dir: str) -> None:
    faulthandler.enable()  # a crash in C++ (gloo) still shows where Python was
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if args.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # see the module docs: the sync's status is on CPU
        sync = torch.cuda.synchronize
    else:
        device, backend = torch.device("cpu"), "gloo"

        def sync() -> None:
            pass

    dist.init_process_group(
        backend,
        init_method="file://" + os.path.join(out_dir, "rendezvous"),
        rank=rank,
        world_size=world,
    )
    try:
        data = load_digits()["train"]
        reps = -(-args.batch_size // len(data))
        batch = data.repeat(reps, 1)[: args.batch_size]
        per = args.batch_size // world
        x = batch[rank * per : (rank + 1) * per].to(device)
        record = {
            f"{engine} K={K}": measure(engine, K, x, args, device, sync)
            for K in _ks(args)
            for engine in args.engines.split(",")
        }
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    finally:
        # Meet before closing: a rank that tears down its connections early can abort a peer.
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _ks(args) -> List[int]:
    return [int(k) for k in args.num_particles.split(",")]


def run_world(world: int, args) -> List[Dict[str, Dict[str, float]]]:
    """Spawn ``world`` processes for one measurement; each rank's record."""
    with tempfile.TemporaryDirectory() as out_dir:
        torch.multiprocessing.spawn(_worker, args=(world, args, out_dir), nprocs=world, join=True)
        ranks = []
        for rank in range(world):
            with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
    return ranks


def _spread(values: List[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(raw: Dict[int, List[List[Dict]]], key: str) -> Dict:
    """One row (engine and K) from the per-repeat, per-rank records of every world size."""
    row: Dict = {"worlds": {}}
    for world, repeats in raw.items():
        rates, in_step, isolated = [], [], []
        for ranks in repeats:
            records = [r[key] for r in ranks]
            step_ms = records[0]["step_ms"]
            rates.append(records[0]["steps_per_second"])
            in_step.append(statistics.mean(r["allreduce_in_step_ms"] for r in records) / step_ms)
            isolated.append(statistics.mean(r["allreduce_isolated_ms"] for r in records) / step_ms)
        row["worlds"][str(world)] = {
            "steps_per_second": _spread(rates),
            "allreduce_share_in_step": _spread(in_step),
            "allreduce_share_isolated": _spread(isolated),
            "per_repeat_per_rank": [[r[key] for r in ranks] for ranks in repeats],
        }
    one, two = (
        [ranks[0][key]["steps_per_second"] for ranks in raw[w]] for w in (1, 2)
    )  # paired by repeat
    row["efficiency"] = _spread([b / (2 * a) for a, b in zip(one, two)])
    return row


def _fmt(spread: Dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    m, lo, hi = (scale * spread[k] for k in ("median", "min", "max"))
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def main(argv=None) -> None:
    args = parse(argv)
    load_start = os.getloadavg()
    raw: Dict[int, List[List[Dict]]] = {w: [] for w in WORLDS}
    for repeat in range(args.repeats):
        for world in WORLDS if repeat % 2 == 0 else WORLDS[::-1]:
            raw[world].append(run_world(world, args))
    load_end = os.getloadavg()
    results = []
    for K in _ks(args):
        print(
            f"\nhelmholtz {args.layers.replace(',', '-')}, global batch {args.batch_size}, "
            f"K={K} ({'wake' if K > 1 else 'sleep'}-phi), {args.backend}/{args.device}"
        )
        print(
            f"  {'engine':10s} {'world':>5s}  {'batches/s':>20s}  "
            f"{'all-reduce % in step':>22s}  {'isolated %':>20s}"
        )
        for engine in args.engines.split(","):
            row = {"engine": engine, "K": K, **summarize(raw, f"{engine} K={K}")}
            results.append(row)
            for world in WORLDS:
                stats = row["worlds"][str(world)]
                print(
                    f"  {engine:10s} {world:5d}  {_fmt(stats['steps_per_second']):>20s}  "
                    f"{_fmt(stats['allreduce_share_in_step'], 100):>22s}  "
                    f"{_fmt(stats['allreduce_share_isolated'], 100):>20s}"
                )
            print(f"  {engine:10s} efficiency {_fmt(row['efficiency'], digits=2)}")
    meta = {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "backend": args.backend,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "threads_per_process": 1,
        "layers": args.layers,
        "global_batch": args.batch_size,
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "isolated_calls": args.isolated_calls,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
    }
    print(f"\nload average (1, 5, 15 min): start {load_start}, end {load_end}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
