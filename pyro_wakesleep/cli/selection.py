"""
Candidate selection (``--candidates``): several networks trained from different seeds, the
best kept by successive ranking on held-in training data.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple

import pyro
import torch

from .. import WakeSleep
from .build import build_model, build_wake_sleep, shrink_weights
from .optimizers import Schedule
from .tasks import Task, evaluation_stream


def select_candidate(
    config: Dict[str, Any],
    task: Task,
    schedule: Optional[Schedule],
    log: Callable[[str], Any],
) -> Tuple[torch.nn.Module, WakeSleep]:
    """
    Train ``candidates`` networks from different seeds, ranking them at each of
    ``selection_steps`` by the mean log-likelihood of the task's held-in training data (never
    the test data): a third survive each ranking, one the last. The candidates' schedules are
    not stepped: their steps run at the configured learning rates.

    :param config: the run's configuration.
    :param task: the run's task.
    :param schedule: the run's learning-rate schedule, or ``None``.
    :param log: prints a line on each ranking.
    :returns: the winner rebuilt under the run's parameter names, with its optimizer states
        (schedulers included) and step count.
    """
    seed = config["seed"]
    held_in = task.held_in(seed)
    candidates = []
    for r in range(config["candidates"]):
        torch.manual_seed(seed * 1000 + r)
        net = build_model(config, name=f"candidate{r}").to(task.device)
        ws = build_wake_sleep(net, config, schedule)
        candidates.append((r, net, ws, torch.Generator().manual_seed(seed * 1000 + r + 7)))
    done = 0
    rounds = config["selection_steps"]
    for i, upto in enumerate(rounds):
        for _, net, ws, generator in candidates:
            for _ in range(upto - done):
                ws.step(task.draw_batch(config["batch_size"], generator))
                shrink_weights(net, ws, config)
        done = upto
        with evaluation_stream(seed, upto, task.device):
            scores = {c[0]: task.selection_score(c[1], held_in) for c in candidates}
        scored = sorted(candidates, key=lambda c: -scores[c[0]])
        keep = 1 if i == len(rounds) - 1 else max(1, math.ceil(len(candidates) / 3))
        candidates = scored[:keep]
        log(
            f"selection after {upto} steps: kept candidate(s) "
            + ", ".join(str(c[0]) for c in candidates)
            + f" (best held-in log-likelihood {scores[scored[0][0]]:.4f})"
        )
    _, best_net, best_ws, _ = candidates[0]
    # Continue under the run's own parameter names (so a checkpoint resumes like any run).
    prefix = f"{best_net.name}_"
    net = build_model(config).to(task.device)
    net.load_state_dict(best_net.state_dict())
    ws = build_wake_sleep(net, config, schedule)
    for mine, theirs in ((ws.optim, best_ws.optim), (ws.guide_optim, best_ws.guide_optim)):
        assert mine is not None and theirs is not None
        mine.set_state(
            {f"{net.name}_" + k[len(prefix) :]: v for k, v in theirs.get_state().items()}
        )
    ws.num_steps = best_ws.num_steps
    pyro.clear_param_store()
    return net, ws
