"""
Quickstart: fit a small sigmoid belief net (a binary Helmholtz machine) to the bars problem of
Hinton et al. (1995) with WakeSleep, then with reweighted wake-sleep.

    python examples/quickstart.py [--steps 2000] [--num-particles 1]

The model and guide are ordinary Pyro functions: the same pair runs under pyro.infer.SVI.
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_wakesleep import WakeSleep
from pyro_wakesleep.datasets import Bars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--num-particles", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pyro.set_rng_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    decoder = nn.Linear(args.hidden, 16)
    encoder = nn.Linear(16, args.hidden)

    def model(x):
        pyro.module("decoder", decoder)
        prior = pyro.param("prior_logits", torch.zeros(args.hidden))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=prior).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=encoder(x)).to_event(1))

    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.01}), num_particles=args.num_particles)
    bars = Bars()
    test = bars.sample(1000, generator)
    for step in range(args.steps + 1):
        losses = ws.step(bars.sample(args.batch_size, generator))
        if step % (args.steps // 5) == 0:
            print(
                f"step {step:5d}  wake-theta {losses.wake_theta / args.batch_size:7.3f}  "
                f"phi {losses.phi / args.batch_size:7.3f}  (nats per image)"
            )
    bound = WakeSleep(model, guide, pyro.optim.Adam({}), num_particles=1000).evaluate_loss(test)
    print(f"test log-likelihood estimate (K=1000): {-bound.wake_theta / len(test):.3f} nats/image")
    print(f"best possible (minus the data's entropy): {-bars.entropy():.3f} nats/image")


if __name__ == "__main__":
    main()
