"""
A run's pieces, built from its configuration: the device, the network (model and guide), the
:class:`~pyro_wakesleep.WakeSleep` that trains it, and the early weight shrinkage applied
after each step.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .. import WakeSleep
from ..models import GaussianHelmholtz, HelmholtzMachine, ModelGuidePair, MultiDigitAIR
from .errors import CommandError
from .optimizers import Schedule, make_optimizer
from .registry import TASKS

#: The steps (most objects) of ``--model air``: one more than the multi-digit canvases hold.
AIR_MAX_OBJECTS = 3


def resolve_device(name: str) -> torch.device:
    """
    The device ``name``, once a tensor could be made on it.

    :raises CommandError: ``name`` is no device, or one not available here.
    """
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as error:
        raise CommandError(f"--device {name!r} is not a device: {error}") from None
    if dev.type == "meta":
        raise CommandError("--device meta holds no values: choose cpu, cuda or cuda:N")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {name} was asked for, but no MPS device is available")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name} was asked for, but no CUDA device is available")
    try:
        torch.zeros(1, device=dev)
    except Exception as error:  # not compiled in, no such device index, no driver, ...
        reason = (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0]
        raise CommandError(f"--device {name} is not available here ({reason})") from None
    return dev


def build_model(config: Dict[str, Any], name: Optional[str] = None) -> ModelGuidePair:
    """
    The configured network, freshly initialized from torch's random stream.

    :param config: the run's configuration.
    :param name: its Pyro name (default: the model's own), which prefixes its parameters.
    """
    if config["model"] == "helmholtz":
        layers = list(config["layers"])
        net = HelmholtzMachine(layers, hidden=tuple(config["hidden"]), name=name or "helmholtz")
        if config.get("init") == "sparse":
            net.sparse_init_()
        return net
    if config["model"] == "air":
        return MultiDigitAIR(
            canvas_size=28,
            max_objects=AIR_MAX_OBJECTS,
            z_what_dim=config["z_dim"],
            hidden=config["hidden"][0],
            name=name or "air",
        )
    return GaussianHelmholtz(
        TASKS[config["dataset"]].x_dim,
        config["z_dim"],
        list(config["hidden"]) or [200],
        name=name or "gaussian_helmholtz",
    )


def build_wake_sleep(
    net: ModelGuidePair, config: Dict[str, Any], schedule: Optional[Schedule] = None
) -> WakeSleep:
    """
    The WakeSleep that trains ``net`` as configured: the model's and the guide's optimizers
    (scheduled by ``schedule`` when given), the estimator and ``jit``.
    """
    guide_lr = config["guide_lr"] or config["lr"]
    return WakeSleep(
        net.model,
        net.guide,
        make_optimizer(config["optimizer"], config["lr"], schedule),
        guide_optim=make_optimizer(config["optimizer"], guide_lr, schedule),
        num_particles=config["num_particles"],
        num_sleep_particles=config["num_sleep_particles"],
        phi_objective=config["phi_objective"],
        max_plate_nesting=getattr(net, "max_plate_nesting", 1),
        jit=bool(config.get("jit", False)),
    )


def shrink_weights(net: torch.nn.Module, ws: WakeSleep, config: Dict[str, Any]) -> None:
    """Early weight shrinkage: weights times (1 - shrink) after each of the first
    ``shrink_steps`` steps."""
    if config.get("shrink") and ws.num_steps <= config.get("shrink_steps", 0):
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("weight"):
                    p.mul_(1.0 - config["shrink"])
