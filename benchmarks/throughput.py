"""
Steps per second of WakeSleep against a hand-written PyTorch loop of the same math, Pyro's
ReweightedWakeSleep and SVI, in one process, with the contenders interleaved so that machine
drift hits all alike.

    python benchmarks/throughput.py [--repeats 5] [--steps 50] [--json out.json] [--quick]

Each configuration builds one fresh model per contender from the same seed. A repeat runs
``--steps`` steps of every contender in turn (after ``--warmup`` steps each); the table shows the
median steps/s over repeats with the spread (min-max), and the ratios WakeSleep / hand-written
and WakeSleep / Pyro RWS. The hand-written loop is the floor: the same estimator (classic
wake-sleep for K = 1; reweighted wake-theta with wake-phi for K = 5) on the same networks, in
plain PyTorch with one torch.optim.Adam.

Peak memory is not measured yet (CPU tensors are invisible to tracemalloc; a per-contender
subprocess is needed).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from typing import Callable, Dict, List

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, ReweightedWakeSleep, Trace_ELBO, TraceGraph_ELBO

from pyro_wakesleep import WakeSleep
from pyro_wakesleep.models import GaussianHelmholtz, HelmholtzMachine


def _log_bernoulli(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    logits, value = torch.broadcast_tensors(logits, value)
    return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


def handwritten(net: HelmholtzMachine, num_particles: int, lr: float) -> Callable:
    """The same estimator as WakeSleep, written by hand on the same networks."""
    optim = torch.optim.Adam(net.parameters(), lr=lr)
    gen, rec, K = net.generative, net.recognition, num_particles

    def log_p(zs: List[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        total = _log_bernoulli(gen.prior_logits, zs[-1])
        for layer in range(net.num_layers - 1, 0, -1):
            total = total + _log_bernoulli(gen.top_down[layer](zs[layer]), zs[layer - 1])
        return total + _log_bernoulli(gen.top_down[0](zs[0]), x)

    def step(x: torch.Tensor) -> None:
        # wake: K samples per data point from the guide
        h, zs, log_q = x, [], 0.0
        for i, g in enumerate(rec):
            logits = g(h)
            probs = torch.sigmoid(logits.detach())
            if i == 0 and K > 1:
                probs = probs.expand((K,) + probs.shape)
            z = torch.bernoulli(probs)
            if K > 1:
                log_q = log_q + _log_bernoulli(logits, z)
            zs.append(z)
            h = z
        lp = log_p(zs, x)
        if K == 1:
            loss = -lp.sum()
            # sleep: one fantasy per data point, then -log q at it
            with torch.no_grad():
                z = torch.bernoulli(torch.sigmoid(gen.prior_logits).expand(x.shape[0], -1))
                fantasy = [z]
                for layer in range(net.num_layers - 1, -1, -1):
                    z = torch.bernoulli(torch.sigmoid(gen.top_down[layer](z)))
                    fantasy.insert(0, z)
            h = fantasy[0]
            for i, g in enumerate(rec):
                loss = loss - _log_bernoulli(g(h), fantasy[i + 1]).sum()
                h = fantasy[i + 1]
        else:
            log_w = lp - log_q.detach()
            loss = -(torch.logsumexp(log_w, 0) - math.log(K)).sum()
            weights = torch.softmax(log_w.detach(), 0)
            loss = loss - (weights * log_q).sum()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def contenders(config: Dict, seed: int) -> Dict[str, Callable]:
    K, lr = config["K"], 1e-3

    def fresh():
        pyro.clear_param_store()
        torch.manual_seed(seed)
        if config["model"] == "helmholtz":
            return HelmholtzMachine(config["layers"], name=f"hm{seed}")
        return GaussianHelmholtz(784, 20, 200, name=f"gh{seed}")

    runs: Dict[str, Callable] = {}
    nets = {}

    def make(name: str, build: Callable) -> None:
        nets[name] = fresh()
        runs[name] = build(nets[name])

    phi = "sleep" if K == 1 else "wake"
    make(
        "wakesleep",
        lambda n: (
            WakeSleep(
                n.model,
                n.guide,
                pyro.optim.Adam({"lr": lr}),
                num_particles=K,
                phi_objective=phi,
                max_plate_nesting=1,
            ).step
        ),
    )
    if config["model"] == "helmholtz":
        make("handwritten", lambda n: handwritten(n, K, lr))
    if K > 1:
        make(
            "pyro_rws",
            lambda n: (
                SVI(
                    n.model,
                    n.guide,
                    pyro.optim.Adam({"lr": lr}),
                    ReweightedWakeSleep(num_particles=K, insomnia=1.0, max_plate_nesting=1),
                ).step
            ),
        )
    for name, elbo in (("svi_trace_elbo", Trace_ELBO), ("svi_tracegraph_elbo", TraceGraph_ELBO)):
        loss = elbo(num_particles=K, max_plate_nesting=1, vectorize_particles=True)
        make(
            name, lambda n, loss=loss: SVI(n.model, n.guide, pyro.optim.Adam({"lr": lr}), loss).step
        )
    return runs


CONFIGS = [
    {
        "name": "helmholtz 784-200, batch 100, K=1",
        "model": "helmholtz",
        "layers": [784, 200],
        "batch": 100,
        "K": 1,
    },
    {
        "name": "helmholtz 784-200, batch 100, K=5",
        "model": "helmholtz",
        "layers": [784, 200],
        "batch": 100,
        "K": 5,
    },
    {
        "name": "helmholtz 784-200-200, batch 100, K=1",
        "model": "helmholtz",
        "layers": [784, 200, 200],
        "batch": 100,
        "K": 1,
    },
    {
        "name": "helmholtz 784-200-200, batch 100, K=5",
        "model": "helmholtz",
        "layers": [784, 200, 200],
        "batch": 100,
        "K": 5,
    },
    {"name": "gaussian 784-200-20, batch 100, K=1", "model": "gaussian", "batch": 100, "K": 1},
    {
        "name": "helmholtz 784-200, batch 1000, K=1",
        "model": "helmholtz",
        "layers": [784, 200],
        "batch": 1000,
        "K": 1,
    },
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="2 repeats of 10 steps")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 10, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from pyro_wakesleep.datasets import load_digits

    data = load_digits()["train"]
    results = []
    for config in CONFIGS:
        x = (
            data[: config["batch"]]
            if config["batch"] <= len(data)
            else data.repeat(math.ceil(config["batch"] / len(data)), 1)[: config["batch"]]
        )
        runs = contenders(config, seed=0)
        for step in runs.values():
            for _ in range(args.warmup):
                step(x)
        rates: Dict[str, List[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, step in runs.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(x)
                rates[name].append(args.steps / (time.perf_counter() - start))
        row = {
            "config": config["name"],
            "steps_per_second": {
                n: {"median": statistics.median(r), "min": min(r), "max": max(r)}
                for n, r in rates.items()
            },
        }
        med = {n: v["median"] for n, v in row["steps_per_second"].items()}
        if "handwritten" in med:
            row["wakesleep_over_handwritten"] = med["wakesleep"] / med["handwritten"]
        if "pyro_rws" in med:
            row["wakesleep_over_pyro_rws"] = med["wakesleep"] / med["pyro_rws"]
        results.append(row)
        print(f"\n{config['name']}")
        for n, v in row["steps_per_second"].items():
            print(f"  {n:22s} {v['median']:8.1f} steps/s  ({v['min']:.1f}-{v['max']:.1f})")
        for key in ("wakesleep_over_handwritten", "wakesleep_over_pyro_rws"):
            if key in row:
                print(f"  {key:22s} {row[key]:.2f}")
    meta = {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "steps": args.steps,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
