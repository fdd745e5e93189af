"""
VIMCO (Mnih & Rezende 2016) as a Pyro loss: its value is minus the K-sample bound per data
point, its gradient is unbiased for the bound's exact gradient (checked by enumerating every
K-tuple of particles), each data point has its own weights and baselines, and it trains under
Pyro's SVI.

Statistical checks use a fixed seed and a tolerance of four standard errors of the mean (from
the sample standard deviation of the independent draws): a correct estimator passes each
comparison with probability about 1 - 6e-5 for any seed, while a bias of a few standard errors
(a missing baseline correction, a reparameterized path, one weight for the whole batch) fails.
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import InjectSamples
from pyro.infer import SVI

from pyro_wakesleep import VIMCO
from pyro_wakesleep.datasets import Bars
from pyro_wakesleep.models import HelmholtzMachine

pytestmark = pytest.mark.usefixtures("one_thread")

PRIOR_LOGITS = torch.tensor([0.4, -0.3, 0.1])
LOCS = torch.tensor([-1.0, 0.5, 2.0])
PHI_B = torch.tensor([0.2, -0.5, 0.3])
PHI_W = torch.tensor([-0.8, 0.1, 0.6])


def model(x):
    """z ~ Categorical(3), x | z ~ Normal(loc[z], 1), with learnable locations theta."""
    locs = pyro.param("locs", LOCS.clone())
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Categorical(logits=PRIOR_LOGITS))
        loc = (torch.nn.functional.one_hot(z, 3) * locs).sum(-1)
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def guide(x):
    """q(z | x) = Categorical(logits = b + w x), with learnable b and w (phi)."""
    b = pyro.param("phi_b", PHI_B.clone())
    w = pyro.param("phi_w", PHI_W.clone())
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Categorical(logits=b + w * x[:, None]))


def injected(guide_fn, values):
    """``guide_fn`` drawing the given values of ``z``, in order (one per guide run)."""
    queue = list(values)

    def run(x):
        with InjectSamples({"z": queue}):
            guide_fn(x)

    return run


def hand_log_q(x, z, b=PHI_B, w=PHI_W):
    """log q(z | x) by hand, elementwise over particles z (K, N) of data points x (N,)."""
    table = torch.log_softmax(b + w * x[:, None], -1)  # (N, 3)
    return table[torch.arange(x.shape[0]), z]


def hand_log_weights(x, z, locs=LOCS, b=PHI_B, w=PHI_W):
    """log p(x, z) - log q(z | x) by hand, elementwise over z (K, N) and x (N,)."""
    log_prior = torch.log_softmax(PRIOR_LOGITS, -1)[z]
    log_lik = -0.5 * (x - locs[z]) ** 2 - 0.5 * math.log(2 * math.pi)
    return log_prior + log_lik - hand_log_q(x, z, b, w)


def exact_bound(x0, K):
    """The K-sample bound E[log (1/K) sum_k w_k] at one data point x0, a sum over all 3^K
    tuples of particles weighted by prod_k q(z_k | x0), and its gradient with respect to
    (locs, phi_b, phi_w) by autograd."""
    locs, b, w = (t.clone().requires_grad_() for t in (LOCS, PHI_B, PHI_W))
    z = torch.tensor(list(itertools.product(range(3), repeat=K))).T  # (K, 3^K): every tuple
    x = torch.full((z.shape[1],), x0)
    log_w = hand_log_weights(x, z, locs, b, w)
    prob = hand_log_q(x, z, b, w).sum(0).exp()
    bound = (prob * (torch.logsumexp(log_w, 0) - math.log(K))).sum()
    return bound.item(), torch.cat(torch.autograd.grad(bound, (locs, b, w)))


def store_params(*names):
    store = pyro.get_param_store()
    return [store.get_param(name).unconstrained() for name in names]


# ------------------------------------------------------------------------- the loss value


@pytest.mark.parametrize("vectorize", [True, False])
def test_loss_is_minus_the_k_sample_bound_per_data_point(vectorize):
    x = torch.tensor([0.3, -1.2, 2.5])
    z = torch.tensor([[0, 2, 1], [1, 1, 2], [2, 0, 2], [0, 0, 1]])  # (K, N) particles
    values = [z] if vectorize else list(z)
    vimco = VIMCO(num_particles=4, vectorize_particles=vectorize, max_plate_nesting=1)
    loss = vimco.loss(model, injected(guide, values), x)
    expected = -(torch.logsumexp(hand_log_weights(x, z), 0) - math.log(4)).sum()
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    surrogate = vimco.differentiable_loss(model, injected(guide, values), x)
    assert surrogate.item() == pytest.approx(loss, rel=1e-6)  # the surrogate's value is the loss


def test_one_particle_is_refused_naming_num_particles():
    for bad in (1, 0):
        with pytest.raises(ValueError, match="num_particles"):
            VIMCO(num_particles=bad)


# ------------------------------------------------------------------------- the gradient


def test_gradient_is_unbiased_against_enumerating_every_k_tuple():
    """K = 3 particles of a 3-valued z: the bound E[log mean w] is a sum over 27 triples,
    differentiated by autograd. N identical data points, each with its own copy of the
    parameters, give N independent VIMCO gradients from one call."""
    K, N, x0 = 3, 4000, 0.7
    _, exact = exact_bound(x0, K)

    def copied_model(x):
        locs = pyro.param("locs", LOCS.expand(N, 3).clone())
        with pyro.plate("data", N, dim=-1):
            z = pyro.sample("z", dist.Categorical(logits=PRIOR_LOGITS))
            pyro.sample(
                "x", dist.Normal((torch.nn.functional.one_hot(z, 3) * locs).sum(-1), 1.0), obs=x
            )

    def copied_guide(x):
        b = pyro.param("phi_b", PHI_B.expand(N, 3).clone())
        w = pyro.param("phi_w", PHI_W.expand(N, 3).clone())
        with pyro.plate("data", N, dim=-1):
            pyro.sample("z", dist.Categorical(logits=b + w * x[:, None]))

    surrogate = VIMCO(num_particles=K).differentiable_loss(
        copied_model, copied_guide, torch.full((N,), x0)
    )
    params = store_params("locs", "phi_b", "phi_w")
    draws = -torch.cat(torch.autograd.grad(surrogate, params), dim=1)  # (N, 9): gradients of L
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(N)
    # The logits are b + w x0 with one x0, so w's gradient is x0 times b's; and they have no
    # component along (1, 1, 1) (softmax invariance). Checked: the locations and two of b's.
    assert torch.allclose(draws[:, 6:], x0 * draws[:, 3:6], atol=1e-6)
    assert torch.allclose(draws[:, 3:6].sum(1), torch.zeros(N), atol=1e-5)
    checked = [0, 1, 2, 3, 4]
    z_scores = (mean - exact)[checked] / stderr[checked]
    assert z_scores.abs().max() < 4, (exact, mean, stderr)


def test_a_batch_gradient_is_the_sum_of_its_data_points_gradients():
    """Each data point has its own weights and baselines: with the same particles, the
    gradient for a batch of two is the sum of the gradients for each alone."""
    x = torch.tensor([0.3, -1.2])
    z = torch.tensor([[0, 2], [1, 1], [2, 2]])
    vimco = VIMCO(num_particles=3, max_plate_nesting=1)

    def gradient(xs, zs):
        surrogate = vimco.differentiable_loss(model, injected(guide, [zs]), xs)
        return torch.cat(torch.autograd.grad(surrogate, store_params("locs", "phi_b", "phi_w")))

    both = gradient(x, z)
    alone = gradient(x[:1], z[:, :1]) + gradient(x[1:], z[:, 1:])
    assert torch.allclose(both, alone, atol=1e-6)
    assert both.abs().min() > 0  # every parameter is reached


@pytest.mark.parametrize("vectorize", [True, False])
def test_reparameterizable_guide_sites_are_scored_not_reparameterized(vectorize):
    """A Normal guide can rsample, but VIMCO holds each particle fixed: the gradient on the
    guide's location is the score-function estimate, written out by hand from the particles
    the model saw."""
    K, x, seen = 4, torch.tensor(1.5), []

    def normal_model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        seen.append(z)
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def normal_guide(x):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.3)), 1.0))

    surrogate = VIMCO(K, vectorize_particles=vectorize).differentiable_loss(
        normal_model, normal_guide, x
    )
    (grad,) = torch.autograd.grad(surrogate, store_params("loc"))
    particles = seen[-1:] if vectorize else seen[-K:]  # one run with all K, or K runs
    assert not any(v.requires_grad for v in particles)
    loc, z = 0.3, torch.stack(particles).flatten().tolist()
    assert len(z) == K
    log_n = lambda v, m: -0.5 * (v - m) ** 2 - 0.5 * math.log(2 * math.pi)  # noqa: E731
    log_w = [log_n(v, 0.0) + log_n(float(x), v) - log_n(v, loc) for v in z]

    def bound(lw):
        top = max(lw)
        return top + math.log(sum(math.exp(v - top) for v in lw) / len(lw))

    total = bound(log_w)
    normalized = [math.exp(v - total) / K for v in log_w]
    expected = 0.0
    for k in range(K):
        others = log_w[:k] + log_w[k + 1 :]
        leave_one_out = bound(others + [sum(others) / (K - 1)])
        score = z[k] - loc  # d/dloc log q(z_k) at fixed z_k; d/dloc log w_k is its negative
        expected += normalized[k] * -score + (total - leave_one_out) * score
    assert grad.item() == pytest.approx(-expected, rel=1e-5, abs=1e-7)


# ------------------------------------------------------------------------- particles


def test_the_loss_is_unbiased_for_minus_the_exact_bound():
    """The loss per data point averages to minus the exact K-sample bound (enumerated): R
    calls on a batch of N identical data points, each call's loss / N one draw."""
    K, R, N, x0 = 3, 150, 20, 0.7
    exact, _ = exact_bound(x0, K)
    vimco = VIMCO(num_particles=K)
    draws = torch.tensor([vimco.loss(model, guide, torch.full((N,), x0)) / N for _ in range(R)])
    stderr = draws.std() / math.sqrt(R)
    assert abs(draws.mean() + exact) < 4 * stderr, (draws.mean(), -exact, stderr)


def test_sequential_particles_give_the_vectorized_loss_under_one_seed():
    """On this model the K particles drawn one run at a time are the ones drawn at once (torch
    draws a batch of categoricals row by row from one stream), so the losses and the
    gradients agree to rounding; the sequential path needs no plate nesting."""
    x = torch.tensor([0.3, -1.2, 2.5, 0.7])
    results = []
    for vectorize in (True, False):
        pyro.set_rng_seed(3)
        vimco = VIMCO(num_particles=4, vectorize_particles=vectorize)
        surrogate = vimco.differentiable_loss(model, guide, x)
        params = store_params("locs", "phi_b", "phi_w")
        results.append((surrogate.item(), torch.cat(torch.autograd.grad(surrogate, params))))
    (loss_v, grad_v), (loss_s, grad_s) = results
    assert loss_s == pytest.approx(loss_v, rel=1e-6)
    assert torch.allclose(grad_s, grad_v, atol=1e-5)


# ------------------------------------------------------------------------- under SVI


def test_svi_trains_a_helmholtz_machine_on_bars():
    data = Bars().sample(32, generator=torch.Generator().manual_seed(0))
    hm = HelmholtzMachine([16, 8, 1])
    svi = SVI(hm.model, hm.guide, pyro.optim.Adam({"lr": 1e-2}), loss=VIMCO(5))
    before = {name: p.detach().clone() for name, p in hm.named_parameters()}
    losses = [svi.step(data) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(p, before[name]) for name, p in hm.named_parameters())
    assert math.isfinite(svi.evaluate_loss(data))
