"""
Ready-made model/guide pairs for wake-sleep.

Each is an :class:`~torch.nn.Module` (a :class:`ModelGuidePair`) with Pyro methods
``model(x, observations=None)`` and ``guide(x, observations=None)``, usable unchanged with
:class:`~pyro_wakesleep.WakeSleep`, with :class:`pyro.infer.SVI` (``Trace_ELBO`` /
``TraceGraph_ELBO``) and with :class:`pyro.infer.ReweightedWakeSleep`, and with ``sample(num)``,
``reconstruct(x)``, ``x_dim`` and ``max_plate_nesting = 1``:

* :class:`HelmholtzMachine`: a layered sigmoid belief net with binary stochastic units;
* :class:`GaussianHelmholtz`: standard normal latents and a Bernoulli decoder;
* :class:`GaussianMixture`: a Gaussian mixture with an amortized categorical guide;
* :class:`MultiDigitAIR`: Attend-Infer-Repeat, a model with stochastic control flow (a random
  number of objects, each placed by a spatial transformer), for multi-digit canvases;
* :class:`BernoulliUnits`: ``Bernoulli(logits=...).to_event(1)`` with a leaner ``log_prob``,
  the binary units of the first two.

>>> import pyro
>>> from pyro_wakesleep import WakeSleep
>>> from pyro_wakesleep.models import HelmholtzMachine
>>> hm = HelmholtzMachine([16, 8, 1])
>>> ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 1e-2}))
"""

from .air import AIRLatents, MultiDigitAIR
from .base import BernoulliUnits, ModelGuidePair, mlp
from .gaussian import GaussianHelmholtz
from .helmholtz import HelmholtzMachine
from .mixture import GaussianMixture

__all__ = [
    "AIRLatents",
    "BernoulliUnits",
    "GaussianHelmholtz",
    "GaussianMixture",
    "HelmholtzMachine",
    "ModelGuidePair",
    "MultiDigitAIR",
    "mlp",
]
