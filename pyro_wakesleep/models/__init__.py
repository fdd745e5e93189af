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

The first three also take a keyword ``idx``, the ids of a mini-batch's rows, when the
constructor was given ``num_data``, the data set's size :math:`N`:
``model(x[idx], idx=idx)`` and ``guide(x[idx], idx=idx)`` run the plate ``"data"`` as
``pyro.plate("data", num_data, subsample=idx)``, scaled by :math:`N / B` as any subsampled
plate, and estimators that keep a state per data point
(:class:`~pyro_wakesleep.MemoisedWakeSleepLoss`) read the ids from it. Without ``idx`` the
plate has the batch's size and no scale.

>>> import pyro
>>> from pyro_wakesleep import WakeSleep
>>> from pyro_wakesleep.models import HelmholtzMachine
>>> hm = HelmholtzMachine([16, 8, 1])
>>> ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 1e-2}))

On mini-batches of a data set of ``N`` rows, with memoised wake-sleep::

    from pyro_wakesleep import MemoisedWakeSleepLoss

    hm = HelmholtzMachine([16, 8, 1], num_data=N)
    ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 1e-2}),
                   loss=MemoisedWakeSleepLoss(memory_size=5, num_particles=5))
    for idx in torch.randperm(N).split(100):
        ws.step(x[idx], idx=idx)
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
