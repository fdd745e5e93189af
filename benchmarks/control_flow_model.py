"""
A small model with stochastic control flow for ``throughput.py``: a geometric number of
objects per image (AIR-like, without attention), drawn one by one while a Bernoulli
``z_pres`` is 1, up to ``MAX_OBJECTS``. The number of objects is read into Python
(``.item()``), so neither the particles nor the data points can be vectorized: every data
point is an iteration of a sequential plate (``for i in pyro.plate("data", N)``).

Model, per data point ``i``: for ``t = 0, 1, ...`` draw ``z_pres_i_t ~ Bernoulli(rho)``
(``rho`` learned) and stop at the first 0; each present object has a 2-d latent
``z_what_i_t ~ N(0, I)``, decoded by a small MLP into 64 logits; the image's logits are a
learned background plus the sum over objects, and ``x_i ~ Bernoulli(logits)`` (64 pixels).

Guide, mirroring it: at each step a small MLP reads the image, the previous object's latent
and the step number, and gives ``q(z_pres_i_t)`` (0.6 at first, whatever the image) and the
Normal ``q(z_what_i_t)``.

The data: 8x8 binary images holding 0 to 3 2x2 squares at random places, a fixed set
drawn from its own seed.

The cost of a step grows with the number of objects the guide draws, which training changes
quickly (a guide that learns to find the squares draws three times as many objects within 160
steps), and each contender learns at its own pace. So the contenders step with a learning rate
of 0 (``LR``): every step does all its work, optimizer update included, at the same
parameters for all, and the steps/s compare the same work.

The contenders: ``wakesleep`` (K particles drawn one at a time, wake-phi),
``svi_tracegraph_elbo`` (``TraceGraph_ELBO``, K particles one at a time) and ``pyro_rws``
(``ReweightedWakeSleep``, wake-phi only, K particles one at a time), all on the same model
and guide.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, ReweightedWakeSleep, TraceGraph_ELBO
from torch import nn

from pyro_wakesleep import WakeSleep

PIXELS = 64
SIDE = 8
Z_DIM = 2
HIDDEN = 32
MAX_OBJECTS = 4
PRESENT_LOGIT = 0.405  # logit(0.6)

LR = 0.0  # see the module's docs

CONFIG = {"name": "geometric objects, batch 8, K=5", "model": "objects", "batch": 8, "K": 5}


class GeometricObjects(nn.Module):
    """The model and guide above; ``name`` prefixes their ``pyro.module`` names."""

    def __init__(self, name: str = "objects") -> None:
        super().__init__()
        self.name = name
        self.decoder = nn.Sequential(
            nn.Linear(Z_DIM, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, PIXELS)
        )
        self.background = nn.Parameter(torch.full((PIXELS,), -2.0))
        self.pres_logit = nn.Parameter(torch.zeros(()))
        self.encoder = nn.Sequential(
            nn.Linear(PIXELS + Z_DIM + 1, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, 1 + 2 * Z_DIM)
        )
        with torch.no_grad():  # q(z_pres = 1) = 0.6 at first: 1.3 objects per image on average
            self.encoder[-1].weight[0].zero_()
            self.encoder[-1].bias[0] = PRESENT_LOGIT

    def model(self, x: torch.Tensor) -> None:
        pyro.module(f"{self.name}_decoder", self.decoder)
        rho = pyro.param(f"{self.name}_pres_logit", self.pres_logit)
        background = pyro.param(f"{self.name}_background", self.background)
        zero, one = x.new_zeros(Z_DIM), x.new_ones(Z_DIM)
        for i in pyro.plate("data", x.shape[0]):
            logits = background
            for t in range(MAX_OBJECTS):
                present = pyro.sample(f"z_pres_{i}_{t}", dist.Bernoulli(logits=rho))
                if present.item() == 0:  # stochastic control flow
                    break
                z = pyro.sample(f"z_what_{i}_{t}", dist.Normal(zero, one).to_event(1))
                logits = logits + self.decoder(z)
            pyro.sample(f"x_{i}", dist.Bernoulli(logits=logits).to_event(1), obs=x[i])

    def guide(self, x: torch.Tensor) -> None:
        pyro.module(f"{self.name}_encoder", self.encoder)
        for i in pyro.plate("data", x.shape[0]):
            previous = x.new_zeros(Z_DIM)
            for t in range(MAX_OBJECTS):
                step = x.new_full((1,), t / MAX_OBJECTS)
                out = self.encoder(torch.cat([x[i], previous, step]))
                present = pyro.sample(f"z_pres_{i}_{t}", dist.Bernoulli(logits=out[0]))
                if present.item() == 0:
                    break
                loc, scale = out[1 : 1 + Z_DIM], nn.functional.softplus(out[1 + Z_DIM :]) + 1e-3
                previous = pyro.sample(f"z_what_{i}_{t}", dist.Normal(loc, scale).to_event(1))


def batch(config: Dict, device: str = "cpu", seed: int = 1) -> torch.Tensor:
    """``config["batch"]`` 8x8 images of 0 to 3 2x2 squares, flattened to 64 pixels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(config["batch"], SIDE, SIDE)
    counts = torch.randint(0, 4, (config["batch"],), generator=generator)
    for image, count in zip(images, counts.tolist()):
        for _ in range(count):
            row, col = torch.randint(0, SIDE - 1, (2,), generator=generator).tolist()
            image[row : row + 2, col : col + 2] = 1.0
    return images.reshape(-1, PIXELS).to(device)


def contenders(
    config: Dict, seed: int, device: str = "cpu", only: Optional[str] = None, lr: float = LR
) -> Dict[str, Callable]:
    """Each contender's step, on a fresh model built from ``seed``."""
    K = config["K"]
    builds: Dict[str, Callable] = {
        "wakesleep": lambda n: (
            WakeSleep(
                n.model,
                n.guide,
                pyro.optim.Adam({"lr": lr}),
                num_particles=K,
                phi_objective="wake",
                vectorize_particles=False,
            ).step
        ),
        "pyro_rws": lambda n: (
            SVI(
                n.model,
                n.guide,
                pyro.optim.Adam({"lr": lr}),
                ReweightedWakeSleep(num_particles=K, insomnia=1.0, vectorize_particles=False),
            ).step
        ),
        "svi_tracegraph_elbo": lambda n: (
            SVI(
                n.model,
                n.guide,
                pyro.optim.Adam({"lr": lr}),
                TraceGraph_ELBO(num_particles=K, vectorize_particles=False),
            ).step
        ),
    }
    runs: Dict[str, Callable] = {}
    for name, build in builds.items():
        if only is not None and name != only:
            continue
        pyro.clear_param_store()
        torch.manual_seed(seed)
        # A name of its own per contender: each trains its own parameters.
        runs[name] = build(GeometricObjects(name=f"objects{seed}_{name}").to(device))
    return runs
