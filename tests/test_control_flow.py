"""
Stochastic control flow and sequential plates (``for i in pyro.plate(...)``): the model below
reads each sampled Bernoulli into Python (``b.item()``) to choose the mean of its observation,
so its particles cannot be vectorized. Each data point must still get its own importance
weights, in training and in evaluation, as the indices of a vectorized plate do.

Closed forms: with b_i ~ Bernoulli(P) and x_i | b_i ~ N(2 if b_i else -1, 1),
p(x_i) = P N(x_i; 2, 1) + (1 - P) N(x_i; -1, 1) and the posterior is Bernoulli(P N(x_i; 2, 1) /
p(x_i)). With the exact posterior as the guide every importance weight equals p(x_i), so the
estimates are exact whatever the draws.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_wakesleep import WakeSleepLoss, evaluate_dataset, importance_log_likelihood

P = 0.3
X = torch.tensor([2.5, -1.2, 0.4, 3.1, -0.3])


def model(x):
    for i in pyro.plate("data", len(x)):
        b = pyro.sample(f"b_{i}", dist.Bernoulli(torch.tensor(P)))
        loc = 2.0 if b.item() else -1.0  # stochastic control flow
        pyro.sample(f"x_{i}", dist.Normal(loc, 1.0), obs=x[i])


def joint_terms(x):
    """log P N(x; 2, 1) and log (1 - P) N(x; -1, 1), per data point."""
    one = math.log(P) + dist.Normal(2.0, 1.0).log_prob(x)
    zero = math.log(1 - P) + dist.Normal(-1.0, 1.0).log_prob(x)
    return one, zero


def log_marginal(x):
    return torch.logaddexp(*joint_terms(x))


def make_guide(prob_one):
    """A guide with q(b_i = 1 | x) = prob_one(x)[i]."""

    def guide(x):
        probs = prob_one(x)
        for i in pyro.plate("data", len(x)):
            pyro.sample(f"b_{i}", dist.Bernoulli(probs[i]))

    return guide


exact_guide = make_guide(lambda x: (joint_terms(x)[0] - log_marginal(x)).exp())
flat_guide = make_guide(lambda x: torch.full_like(x, 0.5))


# ---------------------------------------------------------------- evaluation


def test_sequential_plate_evaluates_each_data_point_exactly():
    result = importance_log_likelihood(
        model, exact_guide, X, num_samples=20, chunk_size=7, vectorize_particles=False
    )
    assert result.log_px.shape == (len(X),)
    # float32 densities of size ~5: rounding ~1e-6.
    assert torch.allclose(result.log_px, log_marginal(X), atol=1e-5)
    assert torch.allclose(result.ess, torch.full((len(X),), 20.0), rtol=1e-4)


def test_vectorized_evaluation_falls_back_with_a_warning():
    with pytest.warns(RuntimeWarning, match="one particle at a time"):
        result = evaluate_dataset(model, exact_guide, X, batch_size=2, num_samples=10)
    assert torch.allclose(result.log_px, log_marginal(X), atol=1e-5)


def test_a_batch_gives_per_point_estimates_not_a_joint_one():
    """Five points evaluated together equal the five evaluated one by one (same guide, each an
    unbiased-in-the-limit estimate of its own log p(x_i)), and not the joint log-mean of the
    product of weights. With the flat guide the weights vary, so this can fail: each estimate
    is checked against its closed form within 4 reported se plus the se^2 / 2 bias."""
    S = 400
    together = importance_log_likelihood(
        model, flat_guide, X, num_samples=S, vectorize_particles=False
    )
    alone = torch.cat(
        [
            importance_log_likelihood(
                model, flat_guide, X[i : i + 1], num_samples=S, vectorize_particles=False
            ).log_px
            for i in range(len(X))
        ]
    )
    truth = log_marginal(X)
    se = together.stderr
    assert torch.all((together.log_px - truth).abs() < 4 * se + se**2), (together, truth)
    assert torch.all((alone - truth).abs() < 4 * se + se**2), (alone, truth)


# ---------------------------------------------------------------- training


def _wake_theta_by_hand(traces, K, joint=False):
    """-sum_i log 1/K sum_k p(x_i, z_ik) / q(z_ik | x_i), from the K particle traces."""
    model_traces, guide_traces = traces[:K], traces[K : 2 * K]
    log_w = torch.zeros(K, len(X))
    for k in range(K):
        for i in range(len(X)):
            m, g = model_traces[k].nodes, guide_traces[k].nodes
            log_w[k, i] = (
                m[f"b_{i}"]["fn"].log_prob(m[f"b_{i}"]["value"])
                + m[f"x_{i}"]["fn"].log_prob(m[f"x_{i}"]["value"])
                - g[f"b_{i}"]["fn"].log_prob(g[f"b_{i}"]["value"])
            )
    if joint:
        return -(torch.logsumexp(log_w.sum(1), 0) - math.log(K))
    return -(torch.logsumexp(log_w, 0) - math.log(K)).sum()


def test_sequential_plate_weights_each_data_point_separately():
    K = 4
    loss = WakeSleepLoss(num_particles=K, phi_objective="wake", vectorize_particles=False)
    phases = loss.phases(model, flat_guide, (X,), {}, sleep=False)
    by_hand = _wake_theta_by_hand(phases.traces, K)
    assert phases.wake_theta.item() == pytest.approx(by_hand.item(), rel=1e-6)
    # ... which is not the batch-joint weight (Pyro's RWS): the draws make them differ.
    joint = _wake_theta_by_hand(phases.traces, K, joint=True)
    assert abs(joint.item() - by_hand.item()) > 1e-3


def test_exact_guide_gives_the_log_marginal_in_training():
    loss = WakeSleepLoss(num_particles=3, phi_objective="wake", vectorize_particles=False)
    wake_theta, _ = loss.loss(model, exact_guide, X)
    assert wake_theta == pytest.approx(-log_marginal(X).sum().item(), rel=1e-6)


def test_vectorized_training_falls_back_once_with_a_warning():
    loss = WakeSleepLoss(num_particles=3, phi_objective="wake")
    with pytest.warns(RuntimeWarning, match="one at a time from now on"):
        wake_theta, _ = loss.loss(model, exact_guide, X)
    assert wake_theta == pytest.approx(-log_marginal(X).sum().item(), rel=1e-6)
    assert loss.vectorize_particles is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss.loss(model, exact_guide, X)
