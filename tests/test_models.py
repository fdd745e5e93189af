"""
The ready-made model/guide pairs of pyro_wakesleep.models: they run unchanged under WakeSleep,
pyro.infer.SVI (Trace_ELBO / TraceGraph_ELBO) and pyro.infer.ReweightedWakeSleep; their model
and guide parameters are disjoint; sample/reconstruct have the documented shapes; and short
wake-sleep fits do what they should (the Helmholtz machine approaches the bars distribution in
exact KL, the mixture recovers well-separated cluster means).

All randomness is seeded (tests/conftest.py seeds 0 before each test; data use their own
generators).
"""

import itertools
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, ReweightedWakeSleep, Trace_ELBO, TraceGraph_ELBO

from pyro_wakesleep import WakeSleep
from pyro_wakesleep.evaluate import exact_log_likelihood
from pyro_wakesleep.models import GaussianHelmholtz, GaussianMixture, HelmholtzMachine
from pyro_wakesleep.objectives import sample_sites

N = 12


# These tensors are tiny: intra-op threads only add overhead (10x on some machines).
pytestmark = pytest.mark.usefixtures("one_thread")


def make(kind):
    """A small instance of each model and a batch of data for it."""
    gen = torch.Generator().manual_seed(7)
    binary = (torch.rand(N, 16, generator=gen) < 0.3).float()
    if kind == "helmholtz":
        return HelmholtzMachine([16, 6, 3]), binary
    if kind == "helmholtz_mlp":
        return HelmholtzMachine([16, 6, 3, 2], hidden=(8,)), binary
    if kind == "gaussian":
        return GaussianHelmholtz(16, 3, hidden=8), binary
    if kind == "mixture":
        return GaussianMixture(3, 4, hidden=8), torch.randn(N, 4, generator=gen)
    raise ValueError(kind)


KINDS = ["helmholtz", "helmholtz_mlp", "gaussian", "mixture"]


def snapshot():
    store = pyro.get_param_store()
    return {name: store._params[name].detach().clone() for name in store.keys()}


def changed_groups(before, net):
    """Which of the model's and the guide's parameter groups changed since ``before``."""
    after = snapshot()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    return (
        any(n.startswith(f"{net.name}_generative$$$") for n in changed),
        any(n.startswith(f"{net.name}_recognition$$$") for n in changed),
    )


def param_names(fn, *args, **kwargs):
    trace = poutine.trace(fn).get_trace(*args, **kwargs)
    return {name for name, site in trace.nodes.items() if site["type"] == "param"}


# ------------------------------------------------------------------------------ structure


@pytest.mark.parametrize("kind", KINDS)
def test_model_and_guide_parameters_are_disjoint_and_complete(kind):
    net, x = make(kind)
    model_params = param_names(net.model, x)
    guide_params = param_names(net.guide, x)
    assert model_params and guide_params and not model_params & guide_params
    gen = {f"{net.name}_generative$$${n}" for n, _ in net.generative.named_parameters()}
    rec = {f"{net.name}_recognition$$${n}" for n, _ in net.recognition.named_parameters()}
    assert model_params == gen and guide_params == rec
    assert net.max_plate_nesting == 1 and type(net).max_plate_nesting == 1


@pytest.mark.parametrize("kind", KINDS)
def test_sample_and_reconstruct_shapes(kind):
    net, x = make(kind)
    samples = net.sample(7)
    assert samples.shape == (7, net.x_dim) and not samples.requires_grad
    recon = net.reconstruct(x)
    assert recon.shape == x.shape and not recon.requires_grad
    if kind == "mixture":
        # The decoded mean is the mean of the component the guide chose.
        means = net.generative.means.detach()
        assert (recon[:, None, :] == means).all(-1).any(-1).all()
    else:
        assert set(samples.unique().tolist()) <= {0.0, 1.0}
        assert ((recon >= 0) & (recon <= 1)).all()
    # Nothing leaks to outer handlers.
    with poutine.trace() as tracer:
        net.sample(3)
        net.reconstruct(x)
    assert not sample_sites(tracer.trace)


@pytest.mark.parametrize("kind", KINDS)
def test_guide_reads_observations_with_leading_particle_dims(kind):
    net, x = make(kind)
    fantasy = net.sample(3 * N).reshape(3, N, net.x_dim)
    trace = poutine.trace(net.guide).get_trace(None, observations={"x": fantasy})
    latents = sample_sites(trace)
    assert latents and all(s["fn"].batch_shape == (3, N) for s in latents)


def test_helmholtz_sites_and_validation():
    hm = HelmholtzMachine([16, 4, 3, 2])
    trace = poutine.trace(hm.model).get_trace(torch.zeros(5, 16))
    assert {s["name"] for s in sample_sites(trace)} == {"x", "z1", "z2", "z3"}
    assert trace.nodes["z1"]["value"].shape == (5, 4)
    assert trace.nodes["z3"]["value"].shape == (5, 2)
    with pytest.raises(ValueError, match="layer_sizes"):
        HelmholtzMachine([16])


# ------------------------------------------------------------------------------ inference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "num_particles, phi_objective", [(1, "sleep"), (1, 0.5), (5, "sleep"), (5, "wake")]
)
def test_runs_under_wakesleep(kind, num_particles, phi_objective):
    net, x = make(kind)
    ws = WakeSleep(
        net.model,
        net.guide,
        pyro.optim.Adam({"lr": 0.01}),
        num_particles=num_particles,
        num_sleep_particles=num_particles,
        phi_objective=phi_objective,
        max_plate_nesting=net.max_plate_nesting,
    )
    ws.step(x)
    before = snapshot()
    losses = [ws.step(x) for _ in range(3)]
    assert all(math.isfinite(v) for step in losses for v in step)
    assert changed_groups(before, net) == (True, True)


@pytest.mark.parametrize("kind", KINDS)
def test_runs_under_svi(kind):
    net, x = make(kind)
    loss = Trace_ELBO() if kind == "gaussian" else TraceGraph_ELBO()
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
    svi.step(x)
    before = snapshot()
    assert all(math.isfinite(svi.step(x)) for _ in range(3))
    assert changed_groups(before, net) == (True, True)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("insomnia", [1.0, 0.0])
def test_runs_under_pyro_reweighted_wake_sleep(kind, insomnia):
    """Pyro's RWS: insomnia = 1 is wake-phi; insomnia = 0 is sleep-phi, which hands the guide
    observations={"x": fantasies} with a leading particle dimension."""
    net, x = make(kind)
    rws = ReweightedWakeSleep(
        num_particles=3, insomnia=insomnia, max_plate_nesting=net.max_plate_nesting
    )
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.01}), loss=rws)
    svi.step(x)
    before = snapshot()
    for _ in range(3):
        losses = svi.step(x)
        assert all(math.isfinite(v) for v in losses)
    assert changed_groups(before, net) == (True, True)


# ------------------------------------------------------------------------------ learning


def bars(num, generator):
    """4x4 images: vertical bars with probability 2/3, else horizontal; each bar on w.p. 0.2."""
    on = torch.rand(num, 4, generator=generator) < 0.2
    vertical = torch.rand(num, generator=generator) < 2 / 3
    images = torch.where(
        vertical[:, None, None], on[:, None, :].expand(-1, 4, 4), on[:, :, None].expand(-1, 4, 4)
    )
    return images.reshape(num, 16).float()


def bars_distribution():
    """The 30 distinct bars images and their exact probabilities (the blank and the full image
    arise from both orientations)."""
    probs = {}
    for vertical, p_orientation in ((True, 2 / 3), (False, 1 / 3)):
        for code in range(16):
            on = torch.tensor([(code >> i) & 1 for i in range(4)], dtype=torch.bool)
            grid = on[None, :].expand(4, 4) if vertical else on[:, None].expand(4, 4)
            p = p_orientation * 0.2 ** int(on.sum()) * 0.8 ** int(4 - on.sum())
            key = tuple(grid.reshape(-1).tolist())
            probs[key] = probs.get(key, 0.0) + p
    return torch.tensor(list(probs)).float(), torch.tensor(list(probs.values()))


def test_wakesleep_fits_bars_in_exact_kl():
    """
    KL(p_data || p_model) = sum_x p_data(x) (log p_data(x) - log p_model(x)) over the 30 bars
    images, with log p_model exact by enumeration (512 latent configurations): free of
    estimator noise. 300 classic wake-sleep steps take it from about 9 nats to about 3.
    """
    images, p_data = bars_distribution()
    assert len(images) == 30 and p_data.sum().item() == pytest.approx(1.0)
    hm = HelmholtzMachine([16, 8, 1])
    ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 0.03}), max_plate_nesting=1)

    def kl():
        with torch.no_grad():
            log_model = exact_log_likelihood(hm.model, images)
        return (p_data * (p_data.log() - log_model)).sum().item()

    generator = torch.Generator().manual_seed(0)
    kl_before = kl()
    for _ in range(300):
        ws.step(bars(100, generator))
    kl_after = kl()
    assert kl_after < kl_before - 3.0, (kl_before, kl_after)
    assert kl_after < 0.5 * kl_before


@pytest.mark.parametrize("num_particles, phi_objective", [(1, "sleep"), (5, "wake")])
def test_wakesleep_recovers_mixture_means(num_particles, phi_objective):
    """
    Three clusters 10 standard deviations apart, 100 points each, k-means++ seeding: the fitted
    means match the clusters' sample means (the maximum-likelihood estimate, to far below the
    tolerance, since the clusters do not overlap) up to a permutation, within 0.15 = 3 standard
    errors of a cluster's sample mean (0.5 / sqrt(100) = 0.05), which also absorbs the jitter of
    constant-step Adam; the weights are near 1/3 and the scales near 0.5.
    """
    true = torch.tensor([[-5.0, 0.0], [5.0, 0.0], [0.0, 6.0]])
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(100)
    data = true[labels] + 0.5 * torch.randn(300, 2, generator=generator)
    sample_means = torch.stack([data[labels == c].mean(0) for c in range(3)])

    gm = GaussianMixture(3, 2, hidden=16)
    gm.initialize(data, generator=generator)
    ws = WakeSleep(
        gm.model,
        gm.guide,
        pyro.optim.Adam({"lr": 0.05}),
        num_particles=num_particles,
        num_sleep_particles=num_particles,
        phi_objective=phi_objective,
    )
    for _ in range(300):
        ws.step(data)
    means = gm.generative.means.detach()
    perm = min(
        itertools.permutations(range(3)),
        key=lambda p: (means[list(p)] - sample_means).abs().max().item(),
    )
    assert (means[list(perm)] - sample_means).abs().max().item() < 0.15
    assert torch.allclose(gm.weights.detach(), torch.full((3,), 1 / 3), atol=0.05)
    assert torch.allclose(gm.scales.detach(), torch.full((3, 2), 0.5), atol=0.15)


def test_bernoulli_units_is_bernoulli_to_event_with_a_leaner_log_prob():
    """The same log-density and gradients as Bernoulli(logits).to_event(1), to the bit, with
    broadcasting values and after expand (Pyro's plates expand site distributions)."""
    import pyro.distributions as dist

    from pyro_wakesleep.models import BernoulliUnits

    torch.manual_seed(0)
    logits = torch.randn(3, 4, 5, requires_grad=True)
    value = torch.bernoulli(torch.full((4, 5), 0.5))
    ours, pyros = BernoulliUnits(logits), dist.Bernoulli(logits=logits).to_event(1)
    assert (ours.batch_shape, ours.event_shape) == (pyros.batch_shape, pyros.event_shape)
    a, b = ours.log_prob(value), pyros.log_prob(value)
    assert torch.equal(a, b)
    (ga,) = torch.autograd.grad(a.sum(), logits)
    (gb,) = torch.autograd.grad(b.sum(), logits)
    assert torch.equal(ga, gb)
    wide = ours.expand((2, 3, 4))
    assert isinstance(wide, BernoulliUnits) and wide.batch_shape == (2, 3, 4)
    assert torch.equal(wide.log_prob(value), pyros.expand((2, 3, 4)).log_prob(value))
    assert wide.sample().shape == (2, 3, 4, 5)
    assert torch.equal(ours.mean, torch.sigmoid(logits))
    with pytest.raises(ValueError):
        ours.log_prob(torch.full((4, 5), 2.0))  # validation of the support, as Pyro's
