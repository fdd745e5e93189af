"""
Statistical and exact tests of WakeSleep against closed forms.

1. The binary Helmholtz machine (seed note 001): the autograd gradients of the K = 1 wake-theta
   loss and of the sleep-phi loss are exactly minus the note's delta rules, at the very samples
   the two phases drew; an SGD step is the delta rule.
2. A linear-Gaussian model, whose posterior and marginal likelihood are closed form:
   (a) sleep-only training of an amortized Gaussian guide reaches the exact posterior;
   (b) wake-theta training with the exact posterior as guide reaches the maximum-likelihood
   estimate of the model's offset and noise scale.
3. K > 1: the wake-theta loss is the per-data-point importance-weighted bound recomputed by hand
   from the same traces (vectorized and sequential particles; wake-phi and sleep-phi too); with
   the exact posterior as guide it is exactly -log p(x); with K large it approaches the exact
   log marginal likelihood at batch sizes 1, 10 and 100, where a batch-coupled estimator fails.
4. Vectorized and sequential particles agree exactly given the same (injected) particles and
   fantasies, and in distribution.

Every statistical tolerance below is a stated number of standard errors of the estimator
(analytic, or empirical and checked against the analytic value) plus, where the estimator is
biased, an explicit bound on the bias. All randomness is seeded (tests/conftest.py seeds 0).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import InjectSamples

from pyro_wakesleep import WakeSleep

# --------------------------------------------------------------------------------------------
# 1. The binary Helmholtz machine of seed note 001
# --------------------------------------------------------------------------------------------

NUM_VISIBLE, NUM_HIDDEN = 4, 3


def helmholtz_model(u):
    """Generative model: v ~ Bernoulli(f(g)), u ~ Bernoulli(f(h + G v)); f is the logistic."""
    g = pyro.param("g", lambda: torch.randn(NUM_HIDDEN))
    h = pyro.param("h", lambda: torch.randn(NUM_VISIBLE))
    G = pyro.param("G", lambda: torch.randn(NUM_VISIBLE, NUM_HIDDEN))
    v = pyro.sample("v", dist.Bernoulli(logits=g).to_event(1))
    pyro.sample("u", dist.Bernoulli(logits=h + G @ v).to_event(1), obs=u)


def helmholtz_guide(u):
    """Recognition model: v ~ Bernoulli(f(w + W u))."""
    w = pyro.param("w", lambda: torch.randn(NUM_HIDDEN))
    W = pyro.param("W", lambda: torch.randn(NUM_HIDDEN, NUM_VISIBLE))
    pyro.sample("v", dist.Bernoulli(logits=w + W @ u).to_event(1))


def _unconstrained(*names):
    return [pyro.param(name).unconstrained() for name in names]


def _delta_rules(wake_v, u, sleep_v, sleep_u):
    """The note's updates (without the learning rate), from the current parameter values."""
    f = torch.sigmoid
    with torch.no_grad():
        g, h, G, w, W = _unconstrained("g", "h", "G", "w", "W")
        err_u = u - f(h + G @ wake_v)
        err_v = sleep_v - f(w + W @ sleep_u)
        return {
            "g": wake_v - f(g),
            "h": err_u,
            "G": torch.outer(err_u, wake_v),
            "w": err_v,
            "W": torch.outer(err_v, sleep_u),
        }


def _helmholtz_samples(phases, u):
    """The wake sample v (guide, at the data u) and the fantasy (v, u), from one step's traces."""
    wake_model, wake_guide, sleep_model, sleep_guide = phases.traces
    wake_v = wake_guide.nodes["v"]["value"]
    assert torch.equal(wake_model.nodes["v"]["value"], wake_v)  # the model replayed the guide
    assert torch.equal(wake_model.nodes["u"]["value"], u)  # ... on the real data
    sleep_v = sleep_model.nodes["v"]["value"]
    sleep_u = sleep_model.nodes["u"]["value"]
    assert sleep_model.nodes["u"]["infer"].get("was_observed")
    # The guide was run on the fantasy u (its argument), and scored the fantasy v.
    assert torch.equal(sleep_guide.nodes["_INPUT"]["args"][0], sleep_u)
    assert torch.equal(sleep_guide.nodes["v"]["value"], sleep_v)
    return wake_v, sleep_v, sleep_u


def test_helmholtz_gradients_are_minus_the_delta_rules():
    ws = WakeSleep(helmholtz_model, helmholtz_guide, pyro.optim.SGD({"lr": 0.1}))
    data = torch.bernoulli(torch.full((5, NUM_VISIBLE), 0.5))
    wake_vs, sleep_us = set(), set()
    for u in data:  # a batch of one data point at a time, several draws each
        for _ in range(4):
            phases = ws.loss.phases(ws.model, ws.guide, (u,), {})
            wake_v, sleep_v, sleep_u = _helmholtz_samples(phases, u)
            wake_vs.add(tuple(wake_v.tolist()))
            sleep_us.add(tuple(sleep_u.tolist()))
            delta = _delta_rules(wake_v, u, sleep_v, sleep_u)
            theta = _unconstrained("g", "h", "G")
            phi = _unconstrained("w", "W")
            assert set(phases.theta) == {"g", "h", "G"}
            assert set(phases.phi_params) == {"w", "W"}

            # Wake-theta (K = 1) is -log p(u, v) at the guide's v: its gradient is -delta.
            grads = torch.autograd.grad(phases.wake_theta, theta + phi, allow_unused=True)
            for name, grad in zip(("g", "h", "G"), grads[:3]):
                torch.testing.assert_close(grad, -delta[name], rtol=0, atol=1e-6)
            assert all(grad is None for grad in grads[3:])  # no wake-theta gradient reaches phi

            # Sleep-phi is -log q(v | u) at the fantasy: its gradient is -delta.
            grads = torch.autograd.grad(phases.phi, phi + theta, allow_unused=True)
            for name, grad in zip(("w", "W"), grads[:2]):
                torch.testing.assert_close(grad, -delta[name], rtol=0, atol=1e-6)
            assert all(grad is None for grad in grads[2:])  # fantasies carry no gradient
    # The check ran over distinct samples, not one repeated draw.
    assert len(wake_vs) > 3 and len(sleep_us) > 3


def test_helmholtz_sgd_step_is_the_delta_rule():
    lr = 0.1
    ws = WakeSleep(helmholtz_model, helmholtz_guide, pyro.optim.SGD({"lr": lr}))
    data = torch.bernoulli(torch.full((3, NUM_VISIBLE), 0.5))
    names = ("g", "h", "G", "w", "W")
    ws.evaluate_loss(data[0])  # create the parameters (their initial draws use the RNG)
    for i, u in enumerate(data.repeat(2, 1)):
        # The same seed makes step() draw the samples that loss.phases() draws: read them first.
        pyro.set_rng_seed(100 + i)
        wake_v, sleep_v, sleep_u = _helmholtz_samples(
            ws.loss.phases(ws.model, ws.guide, (u,), {}), u
        )
        delta = _delta_rules(wake_v, u, sleep_v, sleep_u)
        before = {n: p.detach().clone() for n, p in zip(names, _unconstrained(*names))}
        pyro.set_rng_seed(100 + i)
        ws.step(u)
        for n, p in zip(names, _unconstrained(*names)):
            # param <- param + lr * delta (the note's rule with epsilon = lr)
            torch.testing.assert_close(p.detach(), before[n] + lr * delta[n], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 2. Linear-Gaussian model: z ~ N(0, 1), x | z ~ N(A z + B, S^2), one z per data point
# --------------------------------------------------------------------------------------------

A, B, S = 1.5, 0.5, 0.8
MARGINAL_VAR = A**2 + S**2  # x ~ N(B, A^2 + S^2)
POST_VAR = S**2 / MARGINAL_VAR  # z | x ~ N(A (x - B) / (A^2 + S^2), S^2 / (A^2 + S^2))


def posterior_mean(x, b=B):
    return A * (x - b) / MARGINAL_VAR


def log_marginal(x, b=B):
    """sum_i log p(x_i), the exact log-likelihood of a batch."""
    return dist.Normal(b, math.sqrt(MARGINAL_VAR)).log_prob(x).sum()


def fixed_model(x):
    """The linear-Gaussian model with constant parameters (no pyro.param)."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(A * z + B, S), obs=x)


def linear_guide(x):
    """Amortized q(z | x) = N(c x + d, exp(e)); e is the log-variance."""
    c = pyro.param("c", torch.tensor(0.0))
    d = pyro.param("d", torch.tensor(0.0))
    e = pyro.param("e", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(c * x + d, (0.5 * e).exp()))


def test_sleep_phase_learns_the_exact_posterior():
    # Sleep-phi minimizes E_{(z, x) ~ p}[-log q(z | x)]: maximum-likelihood regression of z on x
    # over the fantasies. With a linear-Gaussian q the minimizer is the exact posterior,
    # c* = A / (A^2 + S^2), d* = -A B / (A^2 + S^2), exp(e*) = S^2 / (A^2 + S^2).
    c_star, d_star, e_star = A / MARGINAL_VAR, -A * B / MARGINAL_VAR, math.log(POST_VAR)
    N, burn_in, T = 2000, 300, 500  # fantasies per step (the plate keeps the batch size)
    # SGD on the summed loss with per-data-point step sizes lr / N. The Hessian of the per-point
    # loss at the optimum has eigenvalues 14.7 and 4.0 for (c, d) and 0.5 for e, so with these
    # rates every coordinate relaxes within ~40 steps; the burn-in is ~7 relaxation times.
    lrs = {"c": 0.02, "d": 0.02, "e": 0.05}
    optim = pyro.optim.SGD(lambda name, param: {"lr": lrs[name] / N})
    ws = WakeSleep(fixed_model, linear_guide, optim, phi_objective="sleep")
    x = torch.zeros(N)  # only its shape matters: the sleep phase replaces it by fantasies
    total = torch.zeros(3)
    for t in range(burn_in + T):
        ws.sleep_step(x)
        if t >= burn_in:
            total += torch.stack([pyro.param(n) for n in "cde"]).detach()
    estimate = total / T
    # Standard errors. The Polyak-Ruppert average of T SGD iterates, each on N fresh fantasies,
    # has the asymptotic covariance of the maximum-likelihood estimate from n = N T samples
    # (Polyak & Juditsky 1992; Bach & Moulines 2013 for constant steps): the inverse Fisher
    # information / n. For the regression z = c x + d + eps, eps ~ N(0, v), x ~ N(B, A^2 + S^2):
    # Var(c) = v / (n Var x), Var(d) = v E[x^2] / (n Var x), Var(e) = 2 / n.
    # Constant-step SGD adds a bias O(lr / N) to the average: the stationary jitter of (c, d),
    # of variance lr_cd / (2 N) each, inflates the fitted variance, so to first order
    # e is biased by (lr_cd / 2N)(E[x^2] + 1) / v ~ 1e-4 ~ 0.07 SE(e) (c and d are unbiased to
    # first order). Over 30 seeds the z-scores had means 0.19, -0.20, 0.27 (each +- 0.18) and
    # sds 0.8-1.3, as expected; 5 SE is the tolerance.
    n = N * T
    var_x = MARGINAL_VAR
    se = torch.tensor(
        [
            math.sqrt(POST_VAR / (n * var_x)),
            math.sqrt(POST_VAR * (var_x + B**2) / (n * var_x)),
            math.sqrt(2.0 / n),
        ]
    )
    target = torch.tensor([c_star, d_star, e_star])
    z_scores = (estimate - target) / se
    assert z_scores.abs().max() < 5.0, (estimate, target, z_scores)
    # The initial guide (0, 0, 0) is hundreds of SEs away: the test has power.
    assert (target.abs() / se).min() > 100


NOISE_SCALE = 1.5  # the noise scale of the data in the maximum-likelihood test


def model_learned_noise(x):
    """The linear-Gaussian model with a learned offset b and noise scale s = exp(log_s)."""
    b = pyro.param("b", torch.tensor(0.0))
    log_s = pyro.param("log_s", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(A * z + b, log_s.exp()), obs=x)


def exact_posterior_guide(x):
    """
    q(z | x) = p(z | x) for the model's *current* b and s.

    The guide reads the values of b and log_s from the parameter store, detached, without a
    pyro.param statement: they belong to the model alone (a parameter touched by both raises),
    no gradient reaches them through the guide, and the guide is exact at every step. Then the
    wake-theta gradient is an unbiased estimate of -grad log p(x) (Fisher's identity), and
    wake-theta training is stochastic gradient ascent on the exact log-likelihood, whose
    maximizer is closed form. (A guide frozen at other parameters, or latents drawn from the
    prior, would converge elsewhere, e.g. s^2 -> mean (x_i - A z_i - b)^2 = Var x + A^2.)
    """
    store = pyro.get_param_store()
    b = store["b"].detach()
    s2 = (2 * store["log_s"].detach()).exp()
    marginal_var = A**2 + s2
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(A * (x - b) / marginal_var, (s2 / marginal_var).sqrt()))


@pytest.mark.parametrize("num_particles", [1, 5])
def test_wake_phase_reaches_the_maximum_likelihood_estimate(num_particles):
    N, K, burn_in, T = 200, num_particles, 200, 1500
    x = dist.Normal(B, math.sqrt(A**2 + NOISE_SCALE**2)).sample((N,))
    # Maximum likelihood for x_i ~ N(b, A^2 + s^2): b = mean x, s^2 = mean (x - mean x)^2 - A^2.
    b_ml = x.mean()
    s2 = ((x - b_ml) ** 2).mean() - A**2
    assert s2 > 0.5  # an interior maximum (s^2 ~ 2.25 +- 0.45 for these data)
    target = torch.stack([b_ml, 0.5 * s2.log()])  # (b, log s)
    # Standard errors. With the exact guide the expected loss is L = -sum_i log p(x_i), whose
    # Hessian at the maximum in (b, log s) is H = diag(N / V, 2 N s^4 / V^2), V = A^2 + s^2.
    # The gradient noise comes from z_ik ~ p(z | x_i) alone: with r_i = x_i - A z_i - b ~
    # N(mu_i, sigma^2), mu_i = (x_i - b) s^2 / V, sigma^2 = A^2 s^2 / V, the gradients are
    # g_b = -sum_i r_i / s^2 and g_log_s = N - sum_i r_i^2 / s^2, so (Gaussian moments)
    # Var g_b = N sigma^2 / s^4, Var g_log_s = sum_i (2 sigma^4 + 4 mu_i^2 sigma^2) / s^4,
    # Cov = sum_i 2 mu_i sigma^2 / s^4, all divided by K (with the exact guide every
    # self-normalized weight is 1 / K). The mean of T SGD iterates then has covariance
    # H^-1 Sigma H^-1 / T (Polyak & Juditsky 1992; for b the iterates are an exact AR(1)
    # process). The constant-step bias of the nonlinear log s coordinate is O(lr Var g) and
    # below 0.2 SE here (checked over 20 seeds); 5 SE is the tolerance. Steps of 0.1 / H per
    # coordinate relax in ~10 steps; the burn-in of 200 forgets the start (0, 0).
    V = A**2 + s2
    mu = (x - b_ml) * s2 / V
    sigma2 = A**2 * s2 / V
    hessian = torch.stack([N / V, 2 * N * s2**2 / V**2])
    cov_g = torch.stack(
        [
            torch.stack([N * sigma2, (2 * mu * sigma2).sum()]),
            torch.stack([(2 * mu * sigma2).sum(), (2 * sigma2**2 + 4 * mu**2 * sigma2).sum()]),
        ]
    ) / (s2**2 * K)
    cov = cov_g / torch.outer(hessian, hessian) / T
    se = cov.diagonal().sqrt()

    pyro.param("b", torch.tensor(0.0))  # the guide reads b and log_s before the model's first call
    pyro.param("log_s", torch.tensor(0.0))
    lrs = {"b": 0.1 / hessian[0].item(), "log_s": 0.1 / hessian[1].item()}
    ws = WakeSleep(
        model_learned_noise,
        exact_posterior_guide,
        pyro.optim.SGD(lambda name, param: {"lr": lrs[name]}),
        num_particles=K,
        max_plate_nesting=1,
    )
    total = torch.zeros(2)
    for t in range(burn_in + T):
        ws.wake_step(x)
        if t >= burn_in:
            total += torch.stack([pyro.param("b"), pyro.param("log_s")]).detach()
    z_scores = (total / T - target) / se
    assert z_scores.abs().max() < 5, (total / T, target, z_scores)
    # The data-generating values differ from the ML estimate by many SEs: the test can tell.
    truth = torch.tensor([B, math.log(NOISE_SCALE)])
    assert ((truth - target) / se).abs().max() > 10


# --------------------------------------------------------------------------------------------
# 3. K > 1: the per-data-point importance-weighted bound
# --------------------------------------------------------------------------------------------

LATENT, OBSERVED = 2, 3


def vector_model(x):
    """z ~ N(0, I_2), x | z ~ N(M z + b, s^2 I_3) per data point; M, b, log_s learned."""
    M = pyro.param("M", lambda: torch.randn(OBSERVED, LATENT))
    b = pyro.param("b", lambda: torch.randn(OBSERVED))
    log_s = pyro.param("log_s", torch.tensor(-0.3))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([LATENT]).to_event(1))
        pyro.sample("x", dist.Normal(z @ M.T + b, log_s.exp()).to_event(1), obs=x)


def vector_guide(x, observations=None):
    """Amortized mean-field q(z | x) = N(C x + d, diag(exp(log_sd))^2)."""
    x_obs = x if observations is None else observations["x"]
    C = pyro.param("C", lambda: 0.3 * torch.randn(LATENT, OBSERVED))
    d = pyro.param("d", lambda: 0.3 * torch.randn(LATENT))
    log_sd = pyro.param("log_sd", torch.tensor([-0.5, -0.2]))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x_obs @ C.T + d, log_sd.exp()).to_event(1))


def _hand_log_weights(z, x):
    """log p(x_i, z_ik) and log q(z_ik | x_i), shape (K, N), from the current parameters."""
    M, b, log_s, C, d, log_sd = (pyro.param(n) for n in ("M", "b", "log_s", "C", "d", "log_sd"))
    log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_lik = dist.Normal(z @ M.T + b, log_s.exp()).log_prob(x).sum(-1)
    log_q = dist.Normal(x @ C.T + d, log_sd.exp()).log_prob(z).sum(-1)
    return log_prior + log_lik, log_q


@pytest.mark.parametrize("phi_objective", ["sleep", "wake"])
@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "sequential"])
def test_losses_equal_the_per_point_bound_by_hand(vectorize, phi_objective):
    # The phi loss is checked too: wake-phi from the same particles (phi_objective="wake"), or
    # sleep-phi from S = 3 fantasies per data point, -(1/S) sum_s sum_i log q(z_si | x_si).
    K, N, S = 6, 4, 3
    x = torch.randn(N, OBSERVED)
    ws = WakeSleep(
        vector_model,
        vector_guide,
        pyro.optim.SGD({"lr": 0.1}),
        num_particles=K,
        num_sleep_particles=S,
        phi_objective=phi_objective,
        vectorize_particles=vectorize,
        max_plate_nesting=1,
    )
    phases = ws.loss.phases(ws.model, ws.guide, (x,), {})
    n = 1 if vectorize else K
    model_traces, guide_traces = phases.traces[:n], phases.traces[n : 2 * n]
    # The wake traces, then (sleep-phi only) a model and a guide trace per fantasy draw.
    sleep_traces = phases.traces[2 * n :]
    if phi_objective == "wake":
        assert not sleep_traces
    else:
        assert len(sleep_traces) == 2 * (1 if vectorize else S)
    if vectorize:
        z = guide_traces[0].nodes["z"]["value"]
    else:
        z = torch.stack([t.nodes["z"]["value"] for t in guide_traces])
    assert z.shape == (K, N, LATENT)
    for t in model_traces:  # the model scored the guide's particles on the real data
        assert torch.equal(t.nodes["x"]["value"], x)
    model_z = torch.cat([t.nodes["z"]["value"].reshape(-1, N, LATENT) for t in model_traces])
    assert torch.equal(model_z, z)

    log_p, log_q = _hand_log_weights(z, x)
    # Wake-theta: -sum_i log (1/K) sum_k p(x_i, z_ik) / q(z_ik | x_i), q held fixed.
    hand_theta = -(torch.logsumexp(log_p - log_q.detach(), 0) - math.log(K)).sum()
    # Wake-phi: -sum_i sum_k wbar_ik log q(z_ik | x_i), normalized weights held fixed.
    wbar = torch.softmax((log_p - log_q).detach(), 0)
    hand_phi = -(wbar * log_q).sum()
    torch.testing.assert_close(phases.wake_theta, hand_theta, rtol=1e-6, atol=1e-5)
    # A batch-coupled estimator (one weight per particle for the whole batch) differs here.
    coupled = -(torch.logsumexp((log_p - log_q).sum(1), 0) - math.log(K))
    assert (coupled - hand_theta).abs() > 1e-2

    theta = [pyro.param(n).unconstrained() for n in ("M", "b", "log_s")]
    phi = [pyro.param(n).unconstrained() for n in ("C", "d", "log_sd")]
    assert set(phases.theta) == {"M", "b", "log_s"}
    assert set(phases.phi_params) == {"C", "d", "log_sd"}
    got = torch.autograd.grad(phases.wake_theta, theta + phi, allow_unused=True)
    want = torch.autograd.grad(hand_theta, theta)
    for g, w in zip(got[:3], want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert all(g is None for g in got[3:])  # no wake-theta gradient reaches the guide
    if phi_objective == "sleep":
        # The fantasies (z, x) drawn from the model, and the guide scored on them.
        fz = torch.cat([t.nodes["z"]["value"].reshape(-1, N, LATENT) for t in sleep_traces[::2]])
        fx = torch.cat([t.nodes["x"]["value"].reshape(-1, N, OBSERVED) for t in sleep_traces[::2]])
        assert fz.shape == (S, N, LATENT) and fx.shape == (S, N, OBSERVED)
        guide_z = torch.cat(
            [t.nodes["z"]["value"].reshape(-1, N, LATENT) for t in sleep_traces[1::2]]
        )
        assert torch.equal(guide_z, fz)
        C, d, log_sd = (pyro.param(n) for n in ("C", "d", "log_sd"))
        hand_phi = -dist.Normal(fx @ C.T + d, log_sd.exp()).log_prob(fz).sum() / S
    torch.testing.assert_close(phases.phi, hand_phi, rtol=1e-6, atol=1e-5)
    got = torch.autograd.grad(phases.phi, phi + theta, allow_unused=True)
    want = torch.autograd.grad(hand_phi, phi)
    for g, w in zip(got[:3], want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert all(g is None for g in got[3:])


def exact_guide(x):
    """The exact posterior of fixed_model."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(posterior_mean(x), math.sqrt(POST_VAR)))


LAMBDA = 1.5  # the inflation of the posterior standard deviation in `wide_guide`


def wide_guide(x):
    """q(z | x) = N(m(x), LAMBDA^2 v): the posterior with a too-wide spread (an imperfect q)."""
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(posterior_mean(x), LAMBDA * math.sqrt(POST_VAR)))


@pytest.mark.parametrize("vectorize", [True, False], ids=["vectorized", "sequential"])
@pytest.mark.parametrize("N", [1, 10, 100])
def test_exact_guide_gives_the_exact_marginal_likelihood(N, vectorize):
    # With q = p(z | x) every weight equals p(x_i): the bound is log p(x_i) for any K, exactly.
    x = dist.Normal(B, math.sqrt(MARGINAL_VAR)).sample((N,))
    for K in (2, 17):
        ws = WakeSleep(
            fixed_model,
            exact_guide,
            pyro.optim.SGD({"lr": 0.1}),
            num_particles=K,
            vectorize_particles=vectorize,
            max_plate_nesting=1,
        )
        loss = ws.evaluate_loss(x).wake_theta
        assert loss == pytest.approx(-log_marginal(x).item(), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("N", [1, 10, 100])
def test_large_k_bound_approaches_the_log_marginal_likelihood(N):
    K, R = 2000, 20
    x = dist.Normal(B, math.sqrt(MARGINAL_VAR)).sample((N,))
    target = log_marginal(x).item()
    ws = WakeSleep(fixed_model, wide_guide, pyro.optim.SGD({"lr": 0.1}), num_particles=K)
    estimates = torch.tensor([-ws.evaluate_loss(x).wake_theta for _ in range(R)])
    # Per data point w_k / p(x_i) = p(z_k | x_i) / q(z_k | x_i) has mean 1 and relative variance
    # rho = E_q[(p/q)^2] - 1 = LAMBDA^2 / sqrt(2 LAMBDA^2 - 1) - 1 = 0.203 (Gaussians with equal
    # means), the same for every x_i. By the delta method, log (1/K) sum_k w_k has standard
    # deviation sqrt(rho / K) and bias -rho / (2 K) (+ O(K^-2)); the N per-point terms are
    # independent. Tolerance: 5 standard errors of the mean of R runs (the empirical SE, which
    # must agree with the analytic one) plus twice the first-order bias, N rho / K.
    rho = LAMBDA**2 / math.sqrt(2 * LAMBDA**2 - 1) - 1
    sd_analytic = math.sqrt(N * rho / K)
    sd = estimates.std().item()
    # The empirical sd of R = 20 runs is within a factor 0.6-1.4 of the truth with probability
    # > 0.99 (chi-square, 19 dof); a factor 2 band cannot be missed by chance.
    assert 0.5 * sd_analytic < sd < 2 * sd_analytic, (sd, sd_analytic)
    tolerance = 5 * sd / math.sqrt(R) + N * rho / K
    error = estimates.mean().item() - target
    assert abs(error) < tolerance, (error, tolerance)

    if N == 100:
        # Power: an estimator that weights the whole batch jointly (one log-sum-exp over the
        # particles of the batch's summed log-weights, as Pyro's ReweightedWakeSleep does) has
        # relative weight variance (1 + rho)^100 - 1 ~ 1e8 at N = 100. The same rule rejects it
        # twice over: its sd is far above the analytic per-point sd, and its mean lies below
        # log p(x) by more than the tolerance plus 3 of its own SEs (a bias of ~ -3 nats).
        # Shown with the same proposal by hand, and with Pyro's class.
        q = dist.Normal(posterior_mean(x), LAMBDA * math.sqrt(POST_VAR))
        rws = pyro.infer.ReweightedWakeSleep(num_particles=K, insomnia=1.0, max_plate_nesting=1)
        coupled, pyro_rws = [], []
        for _ in range(R):
            z = q.sample((K,))  # (K, N)
            log_w = (
                dist.Normal(0.0, 1.0).log_prob(z)
                + dist.Normal(A * z + B, S).log_prob(x)
                - q.log_prob(z)
            )
            coupled.append(torch.logsumexp(log_w.sum(1), 0).item() - math.log(K))
            pyro_rws.append(-rws.loss(fixed_model, wide_guide, x)[0].item())
        for other in (torch.tensor(coupled), torch.tensor(pyro_rws)):
            assert other.std().item() > 2 * sd_analytic
            other_error = other.mean().item() - target
            assert other_error + 3 * other.std().item() / math.sqrt(R) < -tolerance


# --------------------------------------------------------------------------------------------
# 4. Vectorized and sequential particles agree
# --------------------------------------------------------------------------------------------


def _injected_run(x, vectorize, wake_z, sleep_z, sleep_x, K, S):
    """
    One wake and one sleep phase with the given particles and fantasies.

    The wake particles go in through the guide (innermost, before the guide would draw); the
    fantasies through a handler around the whole computation (outermost, after the sleep
    phase's uncondition has cleared the observed value). Sites that are already set (replayed
    or observed) are left alone, so each queue feeds exactly the draws it is meant for.
    """
    if vectorize:
        wake_queue, sleep_queues = [wake_z], {"z": [sleep_z], "x": [sleep_x]}
    else:
        wake_queue = list(wake_z)
        sleep_queues = {"z": list(sleep_z), "x": list(sleep_x)}
    guide_handler = InjectSamples({"z": wake_queue})

    def guide(x, observations=None):
        with guide_handler:
            return vector_guide(x, observations=observations)

    ws = WakeSleep(
        vector_model,
        guide,
        pyro.optim.SGD({"lr": 0.1}),
        num_particles=K,
        num_sleep_particles=S,
        phi_objective=0.5,
        vectorize_particles=vectorize,
        max_plate_nesting=1,
    )
    with InjectSamples(sleep_queues):
        phases = ws.loss.phases(ws.model, ws.guide, (x,), {})
    assert not wake_queue and not sleep_queues["z"] and not sleep_queues["x"]
    theta = [phases.theta[n] for n in ("M", "b", "log_s")]
    phi = [phases.phi_params[n] for n in ("C", "d", "log_sd")]
    theta_grads = torch.autograd.grad(phases.wake_theta, theta)
    phi_grads = torch.autograd.grad(phases.phi, phi)
    # The particles and fantasies the losses were computed from, stacked along particles.
    n = 1 if vectorize else K
    stack = lambda traces, name, size: torch.cat(  # noqa: E731
        [t.nodes[name]["value"].reshape(-1, x.shape[0], size) for t in traces]
    )
    guide_traces, sleep_model_traces = phases.traces[n : 2 * n], phases.traces[2 * n :: 2]
    used = (
        stack(guide_traces, "z", LATENT),
        stack(sleep_model_traces, "z", LATENT),
        stack(sleep_model_traces, "x", OBSERVED),
    )
    return phases.wake_theta.detach(), phases.phi.detach(), theta_grads, phi_grads, used


def test_vectorized_and_sequential_particles_agree_exactly():
    K, S, N = 4, 3, 5
    x = torch.randn(N, OBSERVED)
    wake_z = torch.randn(K, N, LATENT)
    sleep_z = torch.randn(S, N, LATENT)
    sleep_x = torch.randn(S, N, OBSERVED)
    vec = _injected_run(x, True, wake_z, sleep_z, sleep_x, K, S)
    seq = _injected_run(x, False, wake_z, sleep_z, sleep_x, K, S)
    # The injected particles and fantasies were the ones scored, in both paths.
    for run in (vec, seq):
        for used, injected in zip(run[4], (wake_z, sleep_z, sleep_x)):
            assert torch.equal(used, injected)
    torch.testing.assert_close(vec[0], seq[0], rtol=1e-6, atol=1e-5)  # wake-theta
    torch.testing.assert_close(vec[1], seq[1], rtol=1e-6, atol=1e-5)  # 0.5 wake + 0.5 sleep phi
    for grads_vec, grads_seq in ((vec[2], seq[2]), (vec[3], seq[3])):
        for g_vec, g_seq in zip(grads_vec, grads_seq):
            torch.testing.assert_close(g_vec, g_seq, rtol=1e-5, atol=1e-5)
    # And both equal the losses by hand from the injected values: wake-theta as the per-point
    # bound, phi = 0.5 * wake-phi + 0.5 * sleep-phi.
    with torch.no_grad():
        log_p, log_q = _hand_log_weights(wake_z, x)
        wake_theta = -(torch.logsumexp(log_p - log_q, 0) - math.log(K)).sum()
        wake_phi = -(torch.softmax(log_p - log_q, 0) * log_q).sum()
        C, d, log_sd = (pyro.param(n) for n in ("C", "d", "log_sd"))
        sleep_phi = -dist.Normal(sleep_x @ C.T + d, log_sd.exp()).log_prob(sleep_z).sum() / S
    torch.testing.assert_close(vec[0], wake_theta, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(vec[1], 0.5 * wake_phi + 0.5 * sleep_phi, rtol=1e-6, atol=1e-5)
    # Different particles give different losses: the comparison is not vacuous.
    other = _injected_run(x, True, wake_z.flip(0) + 1, sleep_z + 1, sleep_x, K, S)
    assert (other[0] - vec[0]).abs() > 1e-2 and (other[1] - vec[1]).abs() > 1e-2


@pytest.mark.parametrize("phi_objective", ["sleep", 0.5])
def test_vectorized_and_sequential_particles_agree_in_distribution(phi_objective):
    K, S, N, R = 4, 3, 5, 150
    x = torch.randn(N, OBSERVED)
    losses = {}
    for vectorize in (True, False):
        pyro.set_rng_seed(1 if vectorize else 2)  # independent draws for the two paths
        ws = WakeSleep(
            vector_model,
            vector_guide,
            pyro.optim.SGD({"lr": 0.1}),
            num_particles=K,
            num_sleep_particles=S,
            phi_objective=phi_objective,
            vectorize_particles=vectorize,
            max_plate_nesting=1,
        )
        losses[vectorize] = torch.tensor([list(ws.evaluate_loss(x)) for _ in range(R)])
    # Two independent samples of R i.i.d. losses each: the difference of the means has SE
    # sqrt(s1^2 / R + s2^2 / R). Same estimator in both paths, so the difference is 0 in
    # expectation; 5 SE is the tolerance. (Both columns: wake-theta and phi.)
    vec, seq = losses[True], losses[False]
    se = (vec.var(0) / R + seq.var(0) / R).sqrt()
    assert ((vec.mean(0) - seq.mean(0)).abs() < 5 * se).all(), (vec.mean(0), seq.mean(0), se)
    # Power: a path that forgot the 1/K inside the log would be off by log K per data point,
    # N log K in all, more than twice the tolerance.
    assert (5 * se[0]).item() < N * math.log(K) / 2
