"""
Data-parallel wake-sleep over torch.distributed: each process trains on its own shard of every
batch and draws its own samples and fantasies; the gradients are averaged, so every process
takes the same update and the parameters stay identical.

    # one machine, 2 processes (gloo on CPU; nccl with --device cuda, one GPU per process)
    torchrun --nproc_per_node 2 examples/distributed.py --steps 300
    # several machines: the same command on each, with its --node_rank
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
        --nproc_per_node 2 examples/distributed.py
    # without torchrun, spawning local processes
    python examples/distributed.py --spawn 2

Two ways, chosen by --engine:
  wakesleep  WakeSleep(..., distributed=True): Pyro optimizers, atomic steps, finiteness checks
             and failures raised on every process;
  ddp        torch's DistributedDataParallel around WakeSleepModule, with a torch optimizer.
Both scale the model and guide by the number of processes (poutine.scale), so each process's
loss counts its shard as if it were the whole batch: the averaged gradient is then that of one
process on the whole batch (with the same random draws).
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Dict, Tuple

import pyro
import torch
import torch.distributed as dist
from pyro import poutine

from pyro_wakesleep import WakeSleep, WakeSleepModule
from pyro_wakesleep.datasets import load_digits
from pyro_wakesleep.models import HelmholtzMachine


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--engine", choices=["wakesleep", "ddp"], default="wakesleep")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=100, help="global batch size")
    parser.add_argument("--layers", default="784,200")
    parser.add_argument("--num-particles", type=int, default=1)
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jit", action="store_true", help="record the step once, then replay it")
    parser.add_argument("--spawn", type=int, default=0, help="spawn N local processes")
    parser.add_argument("--dump", default=None, help="save each rank's parameters to DUMP.rankR")
    return parser.parse_args(argv)


def build(args: argparse.Namespace, world: int) -> Tuple[HelmholtzMachine, object, object]:
    """The same initial network on every process, and its model and guide scaled by world."""
    torch.manual_seed(args.seed)
    net = HelmholtzMachine([int(s) for s in args.layers.split(",")]).to(args.device)
    model = poutine.scale(net.model, scale=float(world))
    guide = poutine.scale(net.guide, scale=float(world))
    return net, model, guide


def shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of a global batch."""
    per = x.shape[0] // world
    return x[rank * per : (rank + 1) * per]


def batches(args: argparse.Namespace, step: int) -> torch.Tensor:
    """The global batch of a step (the same on every process)."""
    data = load_digits()["train"]
    start = (step * args.batch_size) % (len(data) - args.batch_size + 1)
    return data[start : start + args.batch_size].to(args.device)


def train(rank: int, world: int, args: argparse.Namespace) -> Dict[str, torch.Tensor]:
    net, model, guide = build(args, world)
    # Each process draws its own samples and fantasies.
    torch.manual_seed(args.seed + 1 + rank)
    kw = dict(
        num_particles=args.num_particles,
        phi_objective="sleep" if args.num_particles == 1 else "wake",
        max_plate_nesting=1,
        jit=args.jit,
    )
    if args.engine == "wakesleep":
        optim_class = pyro.optim.Adam if args.optimizer == "adam" else pyro.optim.SGD
        ws = WakeSleep(model, guide, optim_class({"lr": args.lr}), distributed=True, **kw)
        for step in range(args.steps):
            losses = ws.step(shard(batches(args, step), rank, world))
            if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
                print(f"step {step}: wake-theta {losses.wake_theta:.1f}, phi {losses.phi:.1f}")
    else:
        objective = WakeSleepModule(model, guide, modules=[net], **kw)
        ddp = torch.nn.parallel.DistributedDataParallel(objective)
        optim_class = torch.optim.Adam if args.optimizer == "adam" else torch.optim.SGD
        optimizer = optim_class(ddp.parameters(), lr=args.lr)
        for step in range(args.steps):
            optimizer.zero_grad()
            loss = ddp(shard(batches(args, step), rank, world))
            loss.backward()
            optimizer.step()
            if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
                print(f"step {step}: loss {loss.item() / world:.1f} (this process's shard)")
    params = {n: p.detach().cpu().clone() for n, p in net.named_parameters()}
    if args.dump:
        torch.save(params, f"{args.dump}.rank{rank}")
    return params


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    if args.device.startswith("cuda"):
        args.device = f"cuda:{rank}"
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        train(rank, world, args)
    finally:
        shut_down()


def shut_down() -> None:
    """Meet the other processes, then close the group: a process that tears down its gloo
    connections while a peer is still using them can abort it."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    args = parse(argv)
    if args.spawn:
        torch.multiprocessing.spawn(
            _worker, args=(args.spawn, free_port(), args), nprocs=args.spawn, join=True
        )
        return
    # Launched by torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT are in the environment.
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    try:
        train(rank, world, args)
    finally:
        shut_down()


if __name__ == "__main__":
    main()
