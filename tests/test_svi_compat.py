"""
The same model and guide run unchanged under Pyro's SVI (Trace_ELBO, TraceGraph_ELBO), under
Pyro's ReweightedWakeSleep and under WakeSleep.

Two small Helmholtz machines with nn.Module networks registered through pyro.module: a
sigmoid belief net (Bernoulli latents, whose exact likelihood is computed by enumerating the
2^DZ latent states) and one with Gaussian latents. Data are drawn from a fixed sigmoid belief
net.
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, ReweightedWakeSleep, Trace_ELBO, TraceGraph_ELBO
from torch import nn

from pyro_wakesleep import WakeSleep

DZ, DX, N = 3, 8, 64


def _true_data():
    gen = torch.Generator().manual_seed(2024)
    weight = 3.0 * torch.randn(DX, DZ, generator=gen)
    bias = -0.5 * weight.sum(-1)
    z = (torch.rand(N, DZ, generator=gen) < 0.5).float()
    probs = torch.sigmoid(z @ weight.T + bias)
    return (torch.rand(N, DX, generator=gen) < probs).float(), weight, bias


DATA, TRUE_WEIGHT, TRUE_BIAS = _true_data()


# These tensors are tiny: intra-op threads only add overhead (10x on some machines).
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- models


class Helmholtz:
    """A generative network (decoder) and a recognition network (encoder), with its model and
    guides. ``latent`` is "bernoulli" (a sigmoid belief net) or "normal"."""

    def __init__(self, latent):
        self.latent = latent
        self.decoder = nn.Linear(DZ, DX)
        out = DZ if latent == "bernoulli" else 2 * DZ
        self.encoder = nn.Sequential(nn.Linear(DX, 16), nn.Tanh(), nn.Linear(16, out))
        self.observations_seen = []

    def prior(self):
        if self.latent == "bernoulli":
            logits = pyro.param("prior_logits", torch.zeros(DZ))
            return dist.Bernoulli(logits=logits).to_event(1)
        return dist.Normal(torch.zeros(DZ), torch.ones(DZ)).to_event(1)

    def model(self, x, observations=None):
        pyro.module("decoder", self.decoder)
        prior = self.prior()
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        out = self.encoder(x)
        with pyro.plate("data", x.shape[0]):
            if self.latent == "bernoulli":
                pyro.sample("z", dist.Bernoulli(logits=out).to_event(1))
            else:
                loc, scale = out[..., :DZ], nn.functional.softplus(out[..., DZ:]) + 1e-3
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def guide_obs(self, x, observations=None):
        """The RWS / CSIS convention: fantasies arrive as observations={site: value}."""
        if observations is not None:
            self.observations_seen.append({k: v.clone() for k, v in observations.items()})
            x = observations["x"]
        self.guide(x)

    @torch.no_grad()
    def exact_log_likelihood(self, x):
        """sum_i log sum_z p(z) p(x_i | z), enumerating the 2^DZ latent states."""
        assert self.latent == "bernoulli"
        states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=DZ)))  # (2^DZ, DZ)
        log_pz = self.prior().log_prob(states)  # (2^DZ,)
        lik = dist.Bernoulli(logits=self.decoder(states).unsqueeze(1)).to_event(1)
        log_px_z = lik.log_prob(x)  # (2^DZ, N)
        return torch.logsumexp(log_pz.unsqueeze(-1) + log_px_z, 0).sum().item()

    def iwae(self, x, num_particles=200, repeats=8):
        """Mean and standard error of -wake_theta with many particles: an estimate of the
        importance-weighted bound on log p(x), via WakeSleep.evaluate_loss."""
        ws = WakeSleep(
            self.model,
            self.guide,
            pyro.optim.SGD({"lr": 0.0}),
            num_particles=num_particles,
            max_plate_nesting=1,
        )
        values = torch.tensor([-ws.evaluate_loss(x).wake_theta for _ in range(repeats)])
        return values.mean().item(), values.std().item() / math.sqrt(repeats)


def true_log_likelihood():
    """The exact log-likelihood of DATA under the sigmoid belief net that generated it."""
    net = Helmholtz("bernoulli")
    with torch.no_grad():
        net.decoder.weight.copy_(TRUE_WEIGHT)
        net.decoder.bias.copy_(TRUE_BIAS)
    with pyro.get_param_store().scope():  # prior_logits = 0: the uniform prior of the data
        return net.exact_log_likelihood(DATA)


def _snapshot():
    store = pyro.get_param_store()
    return {name: store._params[name].detach().clone() for name in store.keys()}


def _changed(before):
    after = _snapshot()
    return {name for name in before if not torch.equal(before[name], after[name])}


DECODER = {"decoder$$$weight", "decoder$$$bias"}
LL_STEPS = 300  # training steps for the likelihood tests
LL_GAIN = 0.5  # required gain in nats per data point


# ----------------------------------------------------------------------------- SVI and WakeSleep


@pytest.mark.parametrize("latent", ["bernoulli", "normal"])
def test_same_model_and_guide_run_under_svi_and_wakesleep(latent):
    net = Helmholtz(latent)
    elbos = [Trace_ELBO()] + ([TraceGraph_ELBO()] if latent == "bernoulli" else [])
    for elbo in elbos:
        svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.01}), loss=elbo)
        svi.step(DATA)  # create the parameters
        before = _snapshot()
        losses = [svi.step(DATA) for _ in range(10)]
        assert all(math.isfinite(v) for v in losses)
        changed = _changed(before)
        assert DECODER <= changed and any(n.startswith("encoder$$$") for n in changed)

    for phi_objective, K in [("sleep", 1), ("sleep", 5), ("wake", 5), (0.5, 5)]:
        ws = WakeSleep(
            net.model,
            net.guide,
            pyro.optim.Adam({"lr": 0.01}),
            num_particles=K,
            phi_objective=phi_objective,
        )
        before = _snapshot()
        losses = [ws.step(DATA) for _ in range(10)]
        assert all(math.isfinite(v) for step in losses for v in step)
        changed = _changed(before)
        # The wake phase fits the decoder (and the prior), the phi phase the encoder.
        assert DECODER <= changed and any(n.startswith("encoder$$$") for n in changed)


def test_wakesleep_improves_exact_likelihood_of_sigmoid_belief_net():
    """
    Wake-sleep training raises the exact log-likelihood (by enumeration, so free of estimator
    noise) well beyond its value at initialization, and the K-particle estimate
    -wake_theta from evaluate_loss never exceeds it by more than its noise: E[-wake_theta] is
    a lower bound on log p(x) (Jensen), and it tracks the improvement.
    """
    net = Helmholtz("bernoulli")
    ws = WakeSleep(net.model, net.guide, pyro.optim.Adam({"lr": 0.03}), num_particles=5)
    ws.step(DATA)  # create the parameters
    ll_before = net.exact_log_likelihood(DATA)
    iwae_before, se_before = net.iwae(DATA)
    for _ in range(LL_STEPS):
        ws.step(DATA)
    ll_after = net.exact_log_likelihood(DATA)
    iwae_after, se_after = net.iwae(DATA)

    # Bound: E[-wake_theta] <= log p(x); allow 4 standard errors of the repeat mean.
    assert iwae_before <= ll_before + 4 * se_before
    assert iwae_after <= ll_after + 4 * se_after
    # Improvement: LL_GAIN nats per data point in exact log-likelihood, up to (at most 0.1 nat
    # per point below) the likelihood of the parameters that generated the data, and an IWAE
    # gain far beyond the estimator's noise.
    assert ll_after - ll_before > LL_GAIN * N, (ll_before, ll_after)
    assert ll_after > true_log_likelihood() - 0.1 * N, (ll_after, true_log_likelihood())
    assert iwae_after - iwae_before > 4 * math.hypot(se_before, se_after)
    assert iwae_after - iwae_before > LL_GAIN * N


def test_wakesleep_improves_bound_of_gaussian_latent_model():
    """The importance-weighted bound (200 particles) rises far beyond its noise."""
    net = Helmholtz("normal")
    ws = WakeSleep(net.model, net.guide, pyro.optim.Adam({"lr": 0.03}), num_particles=5)
    ws.step(DATA)
    iwae_before, se_before = net.iwae(DATA)
    for _ in range(LL_STEPS):
        ws.step(DATA)
    iwae_after, se_after = net.iwae(DATA)
    assert iwae_after - iwae_before > 4 * math.hypot(se_before, se_after)
    assert iwae_after - iwae_before > LL_GAIN * N


# ----------------------------------------------------------------------------- Pyro's RWS


@pytest.mark.parametrize("insomnia", [0.0, 0.5])
def test_pyro_rws_and_wakesleep_run_the_same_observations_guide(insomnia):
    """
    A guide written for Pyro's ReweightedWakeSleep (fantasies through an `observations`
    keyword) runs under both; in the sleep phase both hand it observations={"x": fantasy}
    shaped like the data.
    """
    net = Helmholtz("bernoulli")
    rws = ReweightedWakeSleep(
        num_particles=5, insomnia=insomnia, num_sleep_particles=1, max_plate_nesting=1
    )
    svi = SVI(net.model, net.guide_obs, pyro.optim.Adam({"lr": 0.01}), loss=rws)
    svi.step(DATA)
    before = _snapshot()
    for _ in range(5):
        losses = svi.step(DATA)
        assert all(math.isfinite(v) for v in losses)
    assert DECODER <= _changed(before)
    pyro_seen = list(net.observations_seen)

    net.observations_seen.clear()
    ws = WakeSleep(
        net.model,
        net.guide_obs,
        pyro.optim.Adam({"lr": 0.01}),
        num_particles=5,
        phi_objective=insomnia,
    )
    before = _snapshot()
    for _ in range(5):
        losses = ws.step(DATA)
        assert all(math.isfinite(v) for v in losses)
    changed = _changed(before)
    assert DECODER <= changed and any(n.startswith("encoder$$$") for n in changed)
    ours_seen = list(net.observations_seen)

    assert len(pyro_seen) == 6 and len(ours_seen) == 5  # one sleep phase per step
    for theirs, ours in zip(pyro_seen, ours_seen):
        assert theirs.keys() == ours.keys() == {"x"}
        assert theirs["x"].shape == ours["x"].shape == DATA.shape
        assert not torch.equal(ours["x"], DATA)  # a fantasy, not the data


@pytest.mark.parametrize("num_data", [1, N])
def test_losses_agree_with_pyro_rws_on_the_same_draws(num_data):
    """
    With the same seed both draw the same particles and then the same fantasy, so sleep-phi
    agrees exactly, and wake-theta too for a single data point. (For a batch, Pyro weights the
    whole batch jointly while WakeSleep forms one K-particle estimate per data point, so
    their wake-theta differ by design.)
    """
    net = Helmholtz("bernoulli")
    x = DATA[:num_data]
    K = 4
    rws = ReweightedWakeSleep(
        num_particles=K, insomnia=0.0, num_sleep_particles=1, max_plate_nesting=1
    )
    ws = WakeSleep(
        net.model,
        net.guide_obs,
        pyro.optim.SGD({"lr": 0.0}),
        num_particles=K,
        max_plate_nesting=1,
    )
    net.model(x)
    net.guide_obs(x)
    pyro.set_rng_seed(11)
    theirs = rws.loss(net.model, net.guide_obs, x)
    pyro.set_rng_seed(11)
    ours = ws.evaluate_loss(x)
    assert ours.phi == pytest.approx(theirs[1].item(), rel=1e-5)
    if num_data == 1:
        assert ours.wake_theta == pytest.approx(theirs[0].item(), rel=1e-5)
