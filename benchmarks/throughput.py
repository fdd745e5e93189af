"""
Steps per second of WakeSleep against a hand-written PyTorch loop of the same math, Pyro's
ReweightedWakeSleep and SVI, in one process, with the contenders interleaved so that machine
drift hits all alike.

    python benchmarks/throughput.py [--repeats 5] [--steps 50] [--json out.json] [--quick]
                                    [--configs SUBSTRING] [--device cuda] [--no-memory]

The contenders: ``wakesleep`` (eager), ``wakesleep_jit`` (``WakeSleep(jit=True)``: the step
recorded once and replayed), ``handwritten``, ``pyro_rws`` (K > 1) and SVI with Trace_ELBO and
TraceGraph_ELBO (on the stochastic-control-flow model of ``control_flow_model.py``: wakesleep,
pyro_rws and TraceGraph_ELBO, particles one at a time). Each configuration builds one fresh
model per contender from the same seed. A repeat runs ``--steps`` steps of every contender in
turn (after ``--warmup`` steps each); the table shows the median steps/s over repeats with the
spread (min-max), and the ratios WakeSleep / hand-written, / Pyro RWS (and / TraceGraph_ELBO
with control flow). The hand-written loop is the floor: the same estimator (classic wake-sleep
for K = 1; reweighted wake-theta with wake-phi for K = 5) on the same networks, in plain
PyTorch with one torch.optim.Adam.

Peak memory is the working memory of a step: after the timed repeats, each contender runs
``--memory-steps`` more steps while the peak of allocated bytes above the level before them is
tracked (parameters and optimizer state, alike for all, are already allocated). On CPU the
allocated bytes are glibc's ``mallinfo2`` count, read after every tensor operation of the
forward and backward passes through a ``TorchDispatchMode``; on CUDA it is
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import math
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import control_flow_model
import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, ReweightedWakeSleep, Trace_ELBO, TraceGraph_ELBO
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_wakesleep import WakeSleep
from pyro_wakesleep.datasets import load_digits
from pyro_wakesleep.models import GaussianHelmholtz, HelmholtzMachine
from pyro_wakesleep.models.gaussian import MIN_SCALE


def _log_bernoulli(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    logits, value = torch.broadcast_tensors(logits, value)
    return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


def _draw(probs: torch.Tensor) -> torch.Tensor:
    """Bernoulli units drawn as the package's BernoulliUnits draws them: uniform < probs."""
    return torch.rand_like(probs).lt_(probs)


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
            z = _draw(probs)
            if K > 1:
                log_q = log_q + _log_bernoulli(logits, z)
            zs.append(z)
            h = z
        lp = log_p(zs, x)
        if K == 1:
            loss = -lp.sum()
            # sleep: one fantasy per data point, then -log q at it
            with torch.no_grad():
                z = _draw(torch.sigmoid(gen.prior_logits).expand(x.shape[0], -1))
                fantasy = [z]
                for layer in range(net.num_layers - 1, -1, -1):
                    z = _draw(torch.sigmoid(gen.top_down[layer](z)))
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


def handwritten_gaussian(net: GaussianHelmholtz, lr: float) -> Callable:
    """Classic wake-sleep (K = 1, sleep-phi) for GaussianHelmholtz, by hand."""
    optim = torch.optim.Adam(net.parameters(), lr=lr)
    z_dim = net.z_dim

    def log_normal(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)

    def step(x: torch.Tensor) -> None:
        n = x.shape[0]
        # wake: z ~ q(z | x), no gradient through the sample; -log p(x, z)
        with torch.no_grad():
            loc, scale = net.encode(x)
            z = loc + scale * torch.randn_like(loc)
        log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        loss = -(log_prior + _log_bernoulli(net.generative(z), x)).sum()
        # sleep: a fantasy (z, x) from the model; -log q(z | x)
        with torch.no_grad():
            z = torch.randn(n, z_dim, dtype=x.dtype, device=x.device)
            fantasy = _draw(torch.sigmoid(net.generative(z)))
        out = net.recognition(fantasy)
        loc, scale = out[..., :z_dim], F.softplus(out[..., z_dim:]) + MIN_SCALE
        loss = loss - log_normal(z, loc, scale).sum()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def contenders(
    config: Dict, seed: int, device: str = "cpu", only: Optional[str] = None
) -> Dict[str, Callable]:
    if config["model"] == "objects":
        return control_flow_model.contenders(config, seed, device, only)
    K, lr = config["K"], 1e-3

    def fresh(name: str):
        # The same initial weights for all (one seed), each under its own name in the
        # parameter store: contenders that share a name would share one set of parameters.
        torch.manual_seed(seed)
        if config["model"] == "helmholtz":
            net = HelmholtzMachine(config["layers"], name=f"{name}_hm{seed}")
        else:
            net = GaussianHelmholtz(784, 20, 200, name=f"{name}_gh{seed}")
        return net.to(device)

    pyro.clear_param_store()
    runs: Dict[str, Callable] = {}
    nets = {}

    def make(name: str, build: Callable) -> None:
        if only is not None and name != only:
            return
        nets[name] = fresh(name)
        runs[name] = build(nets[name])

    phi = "sleep" if K == 1 else "wake"
    for name, jit in (("wakesleep", False), ("wakesleep_jit", True)):
        make(
            name,
            lambda n, jit=jit: (
                WakeSleep(
                    n.model,
                    n.guide,
                    pyro.optim.Adam({"lr": lr}),
                    num_particles=K,
                    phi_objective=phi,
                    max_plate_nesting=1,
                    jit=jit,
                ).step
            ),
        )
    if config["model"] == "helmholtz":
        make("handwritten", lambda n: handwritten(n, K, lr))
    elif K == 1:
        make("handwritten", lambda n: handwritten_gaussian(n, lr))
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
    control_flow_model.CONFIG,
]


def _batch(config: Dict, device: str) -> torch.Tensor:
    if config["model"] == "objects":
        return control_flow_model.batch(config, device)
    data = load_digits()["train"]
    reps = math.ceil(config["batch"] / len(data))
    return data.repeat(reps, 1)[: config["batch"]].to(device)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
        )
    ]


def _malloc_in_use() -> Callable[[], int]:
    """glibc's count of bytes handed out by malloc (heap plus mmap), or an error off glibc."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd

    return in_use


class _PeakMemory(TorchDispatchMode):
    """Track the peak of malloc'd bytes after every tensor operation (forward and backward)."""

    def __init__(self, in_use: Callable[[], int]) -> None:
        super().__init__()
        self.in_use = in_use
        self.base = in_use()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use() - self.base)
        return out


def peak_memory(step: Callable, x: torch.Tensor, steps: int) -> int:
    """
    The peak memory of ``steps`` further steps (bytes), above what was allocated before them:
    the working memory of a step (activations, traces, gradients), with the parameters and
    the optimizer state, which every contender holds alike, already in place.
    """
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            step(x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _PeakMemory(_malloc_in_use()) as tracker:
        for _ in range(steps):
            step(x)
    return tracker.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--configs", default=None, help="run only the configurations whose name contains this"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory runs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="2 repeats of 10 steps")
    parser.add_argument("--memory-steps", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.steps, args.warmup = 2, 10, 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    results = []
    for config in CONFIGS:
        if args.configs and args.configs not in config["name"]:
            continue
        x = _batch(config, args.device)
        runs = contenders(config, seed=0, device=args.device)
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        for step in runs.values():
            for _ in range(args.warmup):
                step(x)
        rates: Dict[str, List[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, step in runs.items():
                sync()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(x)
                sync()
                rates[name].append(args.steps / (time.perf_counter() - start))
        row: Dict = {
            "config": config["name"],
            "steps_per_second": {
                n: {"median": statistics.median(r), "min": min(r), "max": max(r)}
                for n, r in rates.items()
            },
        }
        if not args.no_memory:
            row["peak_memory_mb"] = {
                n: peak_memory(step, x, args.memory_steps) / 2**20 for n, step in runs.items()
            }
        med = {n: v["median"] for n, v in row["steps_per_second"].items()}
        mem = row.get("peak_memory_mb")
        for ours in [n for n in ("wakesleep", "wakesleep_jit") if n in med]:
            if "handwritten" in med:
                row[f"{ours}_over_handwritten"] = med[ours] / med["handwritten"]
                if mem is not None:
                    row[f"memory_{ours}_over_handwritten"] = mem[ours] / mem["handwritten"]
            for ref in ("pyro_rws", "svi_tracegraph_elbo" if config["model"] == "objects" else ""):
                if ref in med:
                    row[f"{ours}_over_{ref}"] = med[ours] / med[ref]
        results.append(row)
        print(f"\n{config['name']}")
        for n, v in row["steps_per_second"].items():
            memory = f"   peak {mem[n]:6.2f} MB" if mem is not None else ""
            print(f"  {n:22s} {v['median']:8.1f} steps/s  ({v['min']:.1f}-{v['max']:.1f}){memory}")
        for key, value in row.items():
            if key.startswith(("wakesleep", "memory_")):
                print(f"  {key:38s} {value:.2f}")
    meta = {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "device": (torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "steps": args.steps,
        "warmup": args.warmup,
        "validation": "pyro default (enabled)",
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
