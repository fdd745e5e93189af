"""
Tests of pyro_wakesleep.evaluate: exact log-likelihoods by enumeration against hand and closed
form computations, and the importance-sampled estimate, its standard error and its effective
sample size against closed forms.

Tolerances. Exact computations are compared at float rounding level. Every statistical check
states its tolerance in reported standard errors (se) of the estimator plus, where it is
biased, a bound on the bias: the importance-sampled log of a mean of weights is biased down by
about se^2 / 2 (second-order delta method), so "4 se + se^2" is used. All randomness is seeded
(tests/conftest.py seeds 0 before each test).
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_wakesleep.evaluate import (
    LogLikelihood,
    evaluate_dataset,
    exact_log_likelihood,
    importance_log_likelihood,
)
from pyro_wakesleep.models import GaussianMixture, HelmholtzMachine

# These tensors are tiny: intra-op threads only add overhead (10x on some machines).
pytestmark = pytest.mark.usefixtures("one_thread")


def all_binary(dim, dtype=torch.float):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=dim)), dtype=dtype)


def bernoulli_log_prob(x, logits):
    """log prod_j Bernoulli(x_j; sigmoid(logits_j)), written out."""
    return (x * torch.nn.functional.logsigmoid(logits)).sum(-1) + (
        (1 - x) * torch.nn.functional.logsigmoid(-logits)
    ).sum(-1)


def normal_log_prob(x, loc, scale):
    """log prod_j N(x_j; loc_j, scale_j^2), written out."""
    z = (x - loc) / scale
    return (-0.5 * z**2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)


# ------------------------------------------------------------------------------ exact: enumeration

# A sigmoid belief net with 2 hidden and 3 visible units and fixed weights.
SBN_PRIOR = torch.tensor([0.3, -1.2], dtype=torch.double)
SBN_WEIGHT = torch.tensor([[2.0, -1.0], [-0.5, 1.5], [1.0, 1.0]], dtype=torch.double)
SBN_BIAS = torch.tensor([-0.7, 0.2, -1.1], dtype=torch.double)


def sbn_model(x):
    with pyro.plate("data", x.shape[0]):
        h = pyro.sample("h", dist.Bernoulli(logits=SBN_PRIOR).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=h @ SBN_WEIGHT.T + SBN_BIAS).to_event(1), obs=x)


def test_exact_matches_hand_sum_for_tiny_sigmoid_belief_net():
    x = all_binary(3, torch.double)
    hand = []
    for xi in x:
        terms = []
        for h in ([0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]):
            h = torch.tensor(h, dtype=torch.double)
            log_joint = bernoulli_log_prob(h, SBN_PRIOR) + bernoulli_log_prob(
                xi, SBN_WEIGHT @ h + SBN_BIAS
            )
            terms.append(math.exp(log_joint))
        hand.append(math.log(sum(terms)))
    result = exact_log_likelihood(sbn_model, x)
    assert result.shape == (8,)
    assert torch.allclose(result, torch.tensor(hand, dtype=torch.double), atol=1e-12)
    # A distribution over the 2^3 visible vectors: it sums to one.
    assert result.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_exact_is_independent_of_chunk_size():
    x = all_binary(3, torch.double)
    reference = exact_log_likelihood(sbn_model, x)
    for chunk_size in (1, 3, 4, 100):
        assert torch.allclose(exact_log_likelihood(sbn_model, x, chunk_size=chunk_size), reference)


def test_exact_matches_closed_form_gaussian_mixture():
    """log p(x) = log sum_c pi_c N(x; mu_c, s_c^2) for a Categorical latent per data point."""
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.double)
    means = torch.tensor([[-2.0, 0.0], [1.0, 1.0], [3.0, -1.0]], dtype=torch.double)
    scales = torch.tensor([[0.5, 1.0], [1.5, 0.7], [1.0, 1.0]], dtype=torch.double)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(weights))
            pyro.sample("x", dist.Normal(means[c], scales[c]).to_event(1), obs=x)

    x = 2 * torch.randn(11, 2, dtype=torch.double)
    closed = torch.logsumexp(weights.log() + normal_log_prob(x[:, None, :], means, scales), dim=-1)
    assert torch.allclose(exact_log_likelihood(model, x), closed, atol=1e-12)


def test_exact_matches_closed_form_for_the_mixture_module():
    gm = GaussianMixture(4, 3)
    x = 2 * torch.randn(9, 3)
    with torch.no_grad():
        closed = torch.logsumexp(
            gm.weights.log() + normal_log_prob(x[:, None, :], gm.generative.means, gm.scales),
            dim=-1,
        )
        result = exact_log_likelihood(gm.model, x)
    assert torch.allclose(result, closed, atol=1e-5)


def test_exact_matches_analytic_marginal_of_two_layer_helmholtz_machine():
    """p(x) = sum_{z2} sum_{z1} p(z2) p(z1 | z2) p(x | z1), summed by hand for [3, 2, 1]."""
    hm = HelmholtzMachine([3, 2, 1]).double()
    gen = hm.generative
    x = all_binary(3, torch.double)
    with torch.no_grad():
        hand = torch.zeros(len(x), dtype=torch.double)
        for z2 in all_binary(1, torch.double):
            for z1 in all_binary(2, torch.double):
                log_joint = (
                    bernoulli_log_prob(z2, gen.prior_logits)
                    + bernoulli_log_prob(z1, gen.top_down[1](z2))
                    + bernoulli_log_prob(x, gen.top_down[0](z1))
                )
                hand += log_joint.exp()
        result = exact_log_likelihood(hm.model, x)
    assert torch.allclose(result, hand.log(), atol=1e-12)


@pytest.mark.parametrize(
    "layer_sizes, hidden", [([4, 3, 2], ()), ([5, 2, 2, 1], (3,)), ([6, 4], ())]
)
def test_exact_probabilities_of_all_data_vectors_sum_to_one(layer_sizes, hidden):
    hm = HelmholtzMachine(layer_sizes, hidden).double()
    with torch.no_grad():
        log_px = exact_log_likelihood(hm.model, all_binary(layer_sizes[0], torch.double))
    assert log_px.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_exact_with_a_global_latent_is_the_joint_of_the_batch():
    """A latent outside the data plate couples the batch: one entry, log p(x_1, ..., x_N)."""
    probs = torch.tensor(0.3, dtype=torch.double)
    emit = torch.tensor([0.1, 0.8], dtype=torch.double)

    def model(x):
        g = pyro.sample("g", dist.Bernoulli(probs))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Bernoulli(emit[g.long()]), obs=x)

    x = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.double)
    hand = sum(
        p_g * math.prod(float(e if xi else 1 - e) for xi in x)
        for p_g, e in ((1 - probs, emit[0]), (probs, emit[1]))
    )
    result = exact_log_likelihood(model, x)
    assert result.shape == (1,)
    assert result.item() == pytest.approx(math.log(hand), abs=1e-12)


def test_exact_rejects_continuous_latents_and_too_many_configurations():
    def continuous(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z_cont", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match="'z_cont'"):
        exact_log_likelihood(continuous, torch.zeros(3))
    hm = HelmholtzMachine([4, 12, 10])
    with pytest.raises(ValueError, match="'z1'.*'z2'|'z2'.*'z1'"):
        exact_log_likelihood(hm.model, torch.zeros(2, 4), max_configurations=2**20)


# ------------------------------------------------------------------------ importance sampling

# Linear-Gaussian model: z ~ N(0, 1), x | z ~ N(a z + b, s^2), so that
#   p(x) = N(x; b, a^2 + s^2),  p(z | x) = N(z; v a (x - b) / s^2, v),  v = 1 / (1 + a^2 / s^2).
A, B, S = 1.5, -0.5, 0.8
POST_VAR = 1.0 / (1.0 + A**2 / S**2)


def lg_model(x, widen=None, shift=None):
    """The model; it takes (and ignores) the guide's keyword arguments."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(A * z + B, S), obs=x)


def lg_guide(x, widen=1.0, shift=0.0):
    """The exact posterior, or with widen > 1 / shift != 0 a (still valid) wider proposal."""
    loc = POST_VAR * A * (x - B) / S**2 + shift
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, widen * math.sqrt(POST_VAR)))


def lg_marginal(x):
    return dist.Normal(torch.tensor(B, dtype=x.dtype), math.sqrt(A**2 + S**2)).log_prob(x)


def test_importance_with_exact_posterior_is_exact():
    """With q = p(z | x) every weight equals p(x): no Monte Carlo error at all."""
    x = torch.linspace(-3, 3, 13, dtype=torch.double)
    for num_samples, chunk_size in ((1000, 1000), (100, 7)):
        result = importance_log_likelihood(
            lg_model, lg_guide, x, num_samples=num_samples, chunk_size=chunk_size
        )
        assert isinstance(result, LogLikelihood)
        assert result.log_px.shape == result.stderr.shape == result.ess.shape == (13,)
        assert torch.allclose(result.log_px, lg_marginal(x), atol=1e-10)
        assert torch.allclose(result.ess, torch.full_like(x, float(num_samples)), rtol=1e-9)
        assert result.stderr.max().item() < 1e-6


def test_importance_with_wider_guide_is_within_its_standard_errors():
    x = torch.linspace(-3, 3, 20, dtype=torch.double)
    result = importance_log_likelihood(
        lg_model, lg_guide, x, num_samples=2000, chunk_size=300, widen=2.0, shift=0.3
    )
    truth = lg_marginal(x)
    se = result.stderr
    assert (se > 0).all() and (result.ess < 2000).all() and (result.ess > 1).all()
    # 4 se + the bias bound se^2 (see the module docstring), per data point.
    assert ((result.log_px - truth).abs() <= 4 * se + se**2).all()
    # The batch helpers: total and mean, with their standard errors.
    assert result.total.item() == pytest.approx(result.log_px.sum().item())
    tolerance = 4 * result.mean_stderr() + (se**2).mean()
    assert (result.mean() - truth.mean()).abs() <= tolerance


def test_importance_reported_stderr_matches_spread_over_repeats():
    """
    Over R = 100 independent runs of S = 200 samples, the empirical standard deviation of the
    estimate agrees with the reported standard error (averaged over runs). The sample standard
    deviation of 100 draws has relative error about 1 / sqrt(2 * 99) = 7%, and the delta method
    is first order, so agreement is asked within a factor of 1.5.
    """
    x = torch.tensor([-2.0, 0.0, 1.0, 3.0], dtype=torch.double)
    runs = [
        importance_log_likelihood(
            lg_model, lg_guide, x, num_samples=200, chunk_size=200, widen=2.0, shift=0.5
        )
        for _ in range(100)
    ]
    estimates = torch.stack([r.log_px for r in runs])
    reported = torch.stack([r.stderr for r in runs]).mean(0)
    ratio = estimates.std(0) / reported
    assert ((ratio > 1 / 1.5) & (ratio < 1.5)).all(), ratio


def test_importance_chunking_agrees_with_one_chunk():
    """Chunks of 37 (an uneven last chunk) and one chunk of 3000 agree within their errors."""
    x = torch.linspace(-2, 2, 9, dtype=torch.double)
    kwargs = dict(num_samples=3000, widen=2.0, shift=0.3)
    one = importance_log_likelihood(lg_model, lg_guide, x, chunk_size=3000, **kwargs)
    many = importance_log_likelihood(lg_model, lg_guide, x, chunk_size=37, **kwargs)
    combined = (one.stderr**2 + many.stderr**2).sqrt()
    assert ((one.log_px - many.log_px).abs() <= 4 * combined).all()
    # The ESS of the same proposal agrees in distribution too (it is ~S / (1 + cv^2)).
    assert torch.allclose(one.ess, many.ess, rtol=0.25)


def test_importance_approaches_exact_on_helmholtz_machine():
    """On HelmholtzMachine([16, 8, 1]) (512 latent configurations) with a (poor) untrained
    guide, 20000 samples come within 4 se + se^2 of the exact log-likelihood."""
    hm = HelmholtzMachine([16, 8, 1])
    x = torch.bernoulli(torch.full((6, 16), 0.3))
    with torch.no_grad():
        exact = exact_log_likelihood(hm.model, x)
    result = importance_log_likelihood(hm.model, hm.guide, x, num_samples=20000, chunk_size=2500)
    se = result.stderr
    assert (se < 0.05).all()
    assert ((result.log_px - exact).abs() <= 4 * se + se**2).all(), (result, exact)


def test_evaluate_dataset_loops_over_batches():
    data = torch.linspace(-3, 3, 23, dtype=torch.double)
    result = evaluate_dataset(lg_model, lg_guide, data, batch_size=5, num_samples=50)
    assert result.log_px.shape == (23,)
    assert torch.allclose(result.log_px, lg_marginal(data), atol=1e-10)
    assert torch.allclose(result.ess, torch.full_like(data, 50.0), rtol=1e-9)
    # Keyword arguments reach the model and the guide.
    wide = evaluate_dataset(lg_model, lg_guide, data, batch_size=10, num_samples=50, widen=2.0)
    assert (wide.ess < 50).all()


def test_importance_rejects_guide_missing_a_latent():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", dist.Normal(0.0, 1.0))
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match="'w'"):
        importance_log_likelihood(model, lg_guide, torch.zeros(3), num_samples=10)
