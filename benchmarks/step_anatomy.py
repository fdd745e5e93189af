"""
Where the milliseconds of one WakeSleep step go, against the hand-written loop of
``throughput.py``: each part timed on its own, interleaved, in one process.

    python benchmarks/step_anatomy.py [--configs "784-200, batch 100, K=1"] [--repeats 7]
                                      [--steps 50] [--threads 1] [--profile] [--json out.json]

Parts (median milliseconds per step over ``--repeats`` runs of ``--steps`` steps, with the
spread):

- ``eager step``: ``WakeSleep.step`` (the default);
- ``recorded step``: ``WakeSleep(jit=True).step``, the same tensor operations replayed from
  a recording without running the Pyro programs;
- ``forward ops``: the recording alone, called on the batch (the step's tensor operations up
  to the losses: networks, draws, log-densities, the support check);
- ``forward + backward``: and ``backward()`` of the losses;
- ``forward + backward + update``: and the optimizer update (fused Adam) with the gradients
  cleared: everything a recorded step computes;
- ``hand-written step`` and ``hand-written Adam``: the hand loop, and its ``torch.optim.Adam``
  step alone on gradients of the same shapes.

The differences (each the median over repeats of the two parts' difference within a repeat)
are the answer: eager step - recorded step is what running the Pyro programs
costs (effect handlers, traces, distribution objects, parameter-store lookups); recorded
step - (forward + backward + update) is the driver (signature, checks, bookkeeping). That
difference compares parts run apart; ``inside the step`` times the driver's parts inside real
recorded steps run back to back (a clock read around each function the step calls), where a
small call costs more than in a loop of itself, right after the step's large operations. With
``--profile`` a cProfile run of the eager step splits the Pyro part by function.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from typing import Any, Callable, Dict, List

import pyro
import throughput
import torch

from pyro_wakesleep import WakeSleep, checks, fused, wake_sleep
from pyro_wakesleep.fused import FusedSteps
from pyro_wakesleep.models import HelmholtzMachine

#: cProfile entries reported with --profile: (label, file substring, function name).
PROFILED = [
    ("pyro.sample statements (effect-handler stack)", "pyro/primitives.py", "sample"),
    ("pyro.module (parameter-store registration)", "pyro/primitives.py", "module"),
    ("trace handlers (poutine.trace get_trace)", "trace_messenger.py", "get_trace"),
    ("distribution objects (constructors, expand)", "pyro/distributions/distribution.py",
     "__call__"),
    ("log-densities and their sums (objectives)", "pyro_wakesleep/objectives.py",
     "trace_log_prob_sum"),
    ("network forward passes (nn.Linear)", "torch/nn/modules/linear.py", "forward"),
    ("draws (BernoulliUnits.sample)", "pyro_wakesleep/models/base.py", "sample"),
    ("backward", "torch/autograd/__init__.py", "backward"),
    ("optimizer update (FusedSteps)", "pyro_wakesleep/fused.py", "__call__"),
    ("finiteness check of losses and gradients", "pyro_wakesleep/checks.py",
     "nonfinite_problems"),
]  # fmt: skip


def wakesleep(config: Dict, name: str, jit: bool) -> WakeSleep:
    """The benchmark's WakeSleep on fresh networks (seed 0) under Pyro name ``name``."""
    K = config["K"]
    torch.manual_seed(0)
    net = HelmholtzMachine(config["layers"], name=name)
    optim = pyro.optim.Adam({"lr": 1e-3})
    return WakeSleep(net.model, net.guide, optim, num_particles=K,
                     phi_objective="sleep" if K == 1 else "wake", max_plate_nesting=1,
                     jit=jit)  # fmt: skip


def build(config: Dict) -> Dict[str, Callable[[], None]]:
    """The timed parts, as closures over one batch."""
    K = config["K"]
    x = throughput._batch(config, "cpu")
    pyro.clear_param_store()
    eager, recorded = wakesleep(config, "eager", False), wakesleep(config, "recorded", True)
    for _ in range(3):
        eager.step(x)
        recorded.step(x)
    assert recorded.recorder is not None and recorded.recorder.num_recordings == 1
    ((graph, static),) = recorded.recorder.recordings.values()
    params = [p for _, p in static.params()]
    steps, optim = FusedSteps(), recorded.optim

    def forward() -> None:
        graph(x)

    def forward_backward() -> None:
        outputs = graph(x)
        sum(outputs[: int(static.has_wake_theta) + int(static.has_phi)]).backward()

    def everything() -> None:
        forward_backward()
        steps(optim, params)
        for p in params:
            p.grad = None

    torch.manual_seed(0)
    hand_net = HelmholtzMachine(config["layers"], name="hand")
    hand = throughput.handwritten(hand_net, K, 1e-3)
    adam_params = [p.detach().clone().requires_grad_() for p in hand_net.parameters()]
    for p in adam_params:
        p.grad = torch.randn_like(p)
    adam = torch.optim.Adam(adam_params, lr=1e-3)
    return {
        "eager step": lambda: eager.step(x),
        "recorded step": lambda: recorded.step(x),
        "forward ops": forward,
        "forward + backward": forward_backward,
        "forward + backward + update": everything,
        "hand-written step": lambda: hand(x),
        "hand-written Adam": adam.step,
    }


def inside_the_step(config: Dict, steps: int) -> Dict[str, float]:
    """
    The recorded step's parts timed inside real steps run back to back (a fresh
    ``WakeSleep(jit=True)``): a clock read around each part, by wrappers put in place of the
    functions the step calls (each wrapper adds about a microsecond). Median milliseconds per
    step of each part; ``driver`` is the step less the replay, the backward pass and the fused
    kernel.
    """
    x = throughput._batch(config, "cpu")
    ws = wakesleep(config, "inside", jit=True)
    for _ in range(3):
        ws.step(x)
    assert ws.recorder is not None
    ((graph, _),) = ws.recorder.recordings.values()
    spent: Dict[str, float] = {}

    def timed(label: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - start

        return wrapper

    # (owner, attribute, label); instance attributes shadow the class's for this run only.
    targets = [
        (graph, "forward", "replay of the recording"),
        (ws.recorder, "phases", "recorder.phases (look-up + replay)"),
        (checks, "check_support", "support check"),
        (checks, "nonfinite_problems", "finiteness check"),
        (wake_sleep, "make_optimizers", "optimizers made ready"),
        (ws, "optimizer_steps", "update (plan check + kernel)"),
        (fused._Kernel, "step", "fused kernel (step counts + kernel)"),
        (torch.Tensor, "backward", "backward"),
    ]
    saved = [(owner, name, owner.__dict__.get(name, _MISSING)) for owner, name, _ in targets]
    for owner, name, label in targets:
        setattr(owner, name, timed(label, getattr(owner, name)))
    rows: List[Dict[str, float]] = []
    try:
        for _ in range(steps):
            spent.clear()
            start = time.perf_counter()
            ws.step(x)
            row = dict(spent, step=time.perf_counter() - start)
            rows.append(row)
    finally:
        for owner, name, value in saved:
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
    out = {label: 1e3 * statistics.median(r.get(label, 0.0) for r in rows) for label in rows[0]}
    out["recorder around the replay"] = (
        out["recorder.phases (look-up + replay)"] - out["replay of the recording"]
    )
    out["update bookkeeping (plan check)"] = (
        out["update (plan check + kernel)"] - out["fused kernel (step counts + kernel)"]
    )
    out["driver (step - replay - backward - kernel)"] = 1e3 * statistics.median(
        r["step"] - r["replay of the recording"] - r["backward"]
        - r.get("fused kernel (step counts + kernel)", 0.0)
        for r in rows
    )  # fmt: skip
    return out


_MISSING = object()


def measure(parts: Dict[str, Callable[[], None]], repeats: int, steps: int) -> Dict:
    for part in parts.values():
        for _ in range(5):
            part()
    times: Dict[str, List[float]] = {name: [] for name in parts}
    for _ in range(repeats):
        for name, part in parts.items():
            start = time.perf_counter()
            for _ in range(steps):
                part()
            times[name].append(1e3 * (time.perf_counter() - start) / steps)
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t), "repeats": t}
        for name, t in times.items()
    }


def paired(ms: Dict, a: str, b: str) -> float:
    """The median over repeats of ``a - b``, each repeat's two parts timed back to back: the
    load of a shared machine drifts between repeats, and a difference of medians keeps it."""
    return statistics.median(x - y for x, y in zip(ms[a]["repeats"], ms[b]["repeats"]))


def profile(parts: Dict[str, Callable[[], None]], steps: int) -> Dict[str, float]:
    """Cumulative cProfile milliseconds per eager step of the PROFILED functions (inflated by
    the profiler's own cost: compare them with each other, not with wall-clock times)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        parts["eager step"]()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(v[3] for k, v in stats.items() if k[2] == "step" and "wake_sleep.py" in k[0])
    out = {"eager step (profiled)": 1e3 * total / steps}
    for label, path, function in PROFILED:
        cum = sum(v[3] for k, v in stats.items() if path in k[0] and k[2] == function)
        out[label] = 1e3 * cum / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--configs", default="784-200, batch 100, K=1")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 repeats of 5 steps")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps = 2, 5
    torch.set_num_threads(args.threads)
    report = []
    for config in throughput.CONFIGS:
        if config["model"] != "helmholtz" or args.configs not in config["name"]:
            continue
        parts = build(config)
        row: Dict = {"config": config["name"], "ms_per_step": measure(parts, args.repeats,
                                                                      args.steps)}  # fmt: skip
        ms = row["ms_per_step"]
        row["derived_ms"] = {
            "running the Pyro programs (eager - recorded)": paired(
                ms, "eager step", "recorded step"
            ),
            "driver (recorded - forward/backward/update)": paired(
                ms, "recorded step", "forward + backward + update"
            ),
            "backward": paired(ms, "forward + backward", "forward ops"),
            "update (fused Adam, grads cleared)": paired(
                ms, "forward + backward + update", "forward + backward"
            ),
            "hand-written forward + backward (step - Adam)": paired(
                ms, "hand-written step", "hand-written Adam"
            ),
        }
        row["inside_the_step_ms"] = inside_the_step(config, 10 * args.steps)
        if args.profile:
            row["profile_ms"] = profile(parts, max(args.steps, 20))
        report.append(row)
        print(f"\n{config['name']} (threads {args.threads}; median ms/step, min-max)")
        for name, v in row["ms_per_step"].items():
            print(f"  {name:48s} {v['median']:7.3f}  ({v['min']:.3f}-{v['max']:.3f})")
        for name, value in row["derived_ms"].items():
            print(f"  = {name:46s} {value:7.3f}")
        for name, value in row["inside_the_step_ms"].items():
            print(f"  inside the step: {name:33s} {value:7.3f}")
        for name, value in row.get("profile_ms", {}).items():
            print(f"  profiled: {name:40s} {value:7.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "results": report}, f, indent=2)


if __name__ == "__main__":
    main()
