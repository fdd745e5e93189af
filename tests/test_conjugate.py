"""
Conjugate models with a non-amortized guide, in the style of Pyro's own
``tests/infer/test_inference.py`` (NormalNormal, BernoulliBeta): the model has a global latent
and fixed hyperparameters and *no* parameters; only the guide is learned.

How the tolerances are derived
------------------------------
Every fit below is run with plain SGD at a constant step size and the iterates of the guide's
*unconstrained* parameters are averaged over the last ``M`` steps (Polyak-Ruppert averaging),
after a ClippedAdam burn-in (decaying learning rate) that brings the guide near the optimum and
a further SGD burn-in of several correlation times. For SGD on a loss whose gradient
estimate ``g`` has covariance ``C`` and whose expected gradient has Jacobian ``H`` at the fixed
point, the average of ``M`` iterates is asymptotically normal around the fixed point with
covariance ``H^-1 C H^-1 / M`` (Polyak & Juditsky 1992), whatever the (small, constant) step
size, provided ``M`` is much larger than the iterates' correlation time ``1 / (lr * eig(H))``.

* wake-phi with ``K`` particles and a guide family that contains the posterior: at ``q = p``
  all importance weights are equal, so the posterior is an exact fixed point for every ``K``.
  There ``g = -(1/K) sum_k score(z_k)`` with ``z_k ~ q``, so ``C = I / K`` (``I`` the Fisher
  information of ``q`` in the unconstrained coordinates), and linearizing the self-normalized
  weights gives ``H = (1 - 1/K) I``. Hence ``Cov = I^-1 / (K M (1 - 1/K)^2)``: the efficiency
  of a maximum-likelihood fit to ``K M`` posterior draws, inflated by ``K / (K - 1)``.
* sleep-phi with ``S`` fantasies per step: an exact stochastic gradient of
  ``E_p[-log q]``, so ``H = I`` and ``C = I / S``: ``Cov = I^-1 / (S M)``.

Each coordinate must lie within ``Z = 4`` of these standard errors (two-sided probability of a
false alarm ~6e-5 per coordinate under the normal approximation). Constant-step SGD leaves an
``O(lr)`` bias: the fluctuation of the location parameters widens the fitted scale, and the
log-scale's own gradient is curved. Each test bounds it (comments below) at <= 0.22 standard
errors, which moves the false-alarm probability to at most ~2e-4 per coordinate; the location
parameters are unbiased by symmetry. These standard errors and biases were checked against
30-70 independent seeds per test (z-scores with standard deviations 0.8-1.3, means within
+-0.35, max |z| < 3.0).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_store_equal, store_snapshot
from pyro import poutine
from torch.distributions import constraints

from pyro_wakesleep import WakeSleep

Z = 4.0  # standard errors allowed per coordinate (see the module docstring)

# ----------------------------------------------------------------------------- normal-normal

LOC0 = torch.tensor([0.5, -0.3])  # prior mean
LAM0 = torch.tensor([1.0, 2.0])  # prior precision
LAM = torch.tensor([1.0, 0.5])  # likelihood precision
DATA = torch.tensor([[-0.1, 0.3], [0.0, 0.4], [0.2, 0.5], [0.1, 0.7]])
N_DATA = DATA.shape[0]
LAM_N = LAM0 + N_DATA * LAM
LOC_N = (LAM0 * LOC0 + LAM * DATA.sum(0)) / LAM_N  # analytic posterior mean
SCALE_N = LAM_N.rsqrt()  # analytic posterior std


def normal_model(data):
    loc = pyro.sample("loc", dist.Normal(LOC0, LAM0.rsqrt()).to_event(1))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc, LAM.rsqrt()).to_event(1), obs=data)


def normal_guide(data):
    loc = pyro.param("loc_q", torch.zeros(2))
    scale = pyro.param("scale_q", torch.ones(2), constraint=constraints.positive)
    return pyro.sample("loc", dist.Normal(loc, scale).to_event(1))


def normal_log_marginal(data):
    """log p(data): per dimension, data[:, d] ~ MVN(loc0 1, I / lam + 1 1^T / lam0)."""
    total = 0.0
    n = data.shape[0]
    for d in range(data.shape[1]):
        cov = torch.eye(n) / LAM[d] + torch.ones(n, n) / LAM0[d]
        mvn = dist.MultivariateNormal(LOC0[d].expand(n).double(), cov.double())
        total += mvn.log_prob(data[:, d].double()).item()
    return total


# ----------------------------------------------------------------------------- beta-bernoulli

ALPHA0, BETA0 = torch.tensor(1.0), torch.tensor(1.0)
BERN_DATA = torch.tensor([0.0, 1.0, 1.0, 1.0])
ALPHA_N = ALPHA0 + BERN_DATA.sum()  # analytic posterior Beta(4, 2)
BETA_N = BETA0 + len(BERN_DATA) - BERN_DATA.sum()


def beta_model(data):
    p = pyro.sample("p", dist.Beta(ALPHA0, BETA0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Bernoulli(p), obs=data)


def beta_guide(data):
    """Beta(mean * conc, (1 - mean) * conc): better conditioned than (alpha, beta) for SGD."""
    mean = pyro.param("mean_q", torch.tensor(0.5), constraint=constraints.unit_interval)
    conc = pyro.param("conc_q", torch.tensor(3.0), constraint=constraints.positive)
    return pyro.sample("p", dist.Beta(mean * conc, (1 - mean) * conc))


def beta_fisher_logit_mean_log_conc(alpha, beta):
    """Fisher information of Beta(alpha, beta) in (logit mean, log concentration)."""
    alpha, beta = float(alpha), float(beta)
    t = torch.polygamma(1, torch.tensor(alpha + beta, dtype=torch.float64))
    ta = torch.polygamma(1, torch.tensor(alpha, dtype=torch.float64))
    tb = torch.polygamma(1, torch.tensor(beta, dtype=torch.float64))
    info = torch.stack([torch.stack([ta - t, -t]), torch.stack([-t, tb - t])])
    # d(alpha, beta) / d(logit m, log c) with alpha = m c, beta = (1 - m) c.
    c = alpha + beta
    m = alpha / c
    jac = torch.tensor([[m * (1 - m) * c, alpha], [-m * (1 - m) * c, beta]], dtype=torch.float64)
    return jac.T @ info @ jac


# ----------------------------------------------------------------------------- helpers


# These tensors are tiny: intra-op threads only add overhead (10x on some machines).
pytestmark = pytest.mark.usefixtures("one_thread")


def _unconstrained(names):
    store = pyro.get_param_store()
    return torch.cat([store._params[n].detach().reshape(-1) for n in names])


def fit_and_average(make_ws, args, names, *, burn_adam, burn_sgd, num_avg, lr_sgd):
    """
    Burn-in with ClippedAdam (learning rate decaying from 0.05 to 5e-4), then constant-step SGD
    whose unconstrained iterates are averaged over ``num_avg`` steps after ``burn_sgd`` more.
    ``make_ws(optim)`` builds the WakeSleep object; both share the parameter store.
    """
    lrd = 0.01 ** (1.0 / burn_adam)
    adam = make_ws(pyro.optim.ClippedAdam({"lr": 0.05, "lrd": lrd}))
    for _ in range(burn_adam):
        adam.step(*args)
    sgd = make_ws(pyro.optim.SGD({"lr": lr_sgd}))
    for _ in range(burn_sgd):
        sgd.step(*args)
    total = torch.zeros_like(_unconstrained(names))
    for _ in range(num_avg):
        sgd.step(*args)
        total += _unconstrained(names)
    return total / num_avg


def assert_within(estimate, target, se, what):
    z = (estimate - target) / se
    assert torch.all(z.abs() < Z), (
        f"{what}: estimate {estimate.tolist()} vs analytic {target.tolist()} "
        f"(standard errors {se.tolist()}, z-scores {z.tolist()})"
    )


# ----------------------------------------------------------------------------- wake-phi fits

# (vectorize_particles, K, averaged SGD steps). The sequential path costs ~K times more per
# step, so it gets fewer particles and steps (and a correspondingly wider standard error).
WAKE_CASES = [
    pytest.param(True, 50, 1200, id="vectorized-K50"),
    pytest.param(False, 5, 600, id="sequential-K5"),
]


@pytest.mark.parametrize("vectorize, K, num_avg", WAKE_CASES)
def test_normal_normal_wake_phi_reaches_posterior(vectorize, K, num_avg):
    def make_ws(optim):
        return WakeSleep(
            normal_model,
            normal_guide,
            optim,
            num_particles=K,
            phi_objective="wake",
            vectorize_particles=vectorize,
            max_plate_nesting=1,
        )

    # SGD step 0.01. Curvatures (1 - 1/K) / sigma^2 >= 0.8 * 3 for the means and
    # 2 (1 - 1/K) >= 1.6 for the log-scales: correlation times <= 63 steps, so the SGD
    # burn-in forgets the Adam phase and num_avg spans >= 10 correlation times.
    # Bias of the averaged log-scale from constant-step noise (the means' fluctuation, of
    # variance lr / (2K) per unit sigma^2, widens q; plus the log-scale's own curvature):
    # ~ lr (1/sigma^2 + 2) / (4K) <= 0.22 standard errors in both cases. The means are
    # unbiased: the dynamics is symmetric under reflection about the posterior mean.
    est = fit_and_average(
        make_ws,
        (DATA,),
        ["loc_q", "scale_q"],
        burn_adam=150,
        burn_sgd=200,
        num_avg=num_avg,
        lr_sgd=0.01,
    )
    inflate = K / (K - 1)
    # Normal in (loc, log scale): I^-1 = diag(sigma^2, 1/2).
    se_loc = SCALE_N * inflate / math.sqrt(K * num_avg)
    se_log_scale = torch.full((2,), inflate / math.sqrt(2 * K * num_avg))
    assert_within(est[:2], LOC_N, se_loc, "posterior mean")
    assert_within(est[2:], SCALE_N.log(), se_log_scale, "posterior log-std")


def test_beta_bernoulli_wake_phi_reaches_posterior():
    K, num_avg = 50, 1200

    def make_ws(optim):
        return WakeSleep(
            beta_model,
            beta_guide,
            optim,
            num_particles=K,
            phi_objective="wake",
            max_plate_nesting=1,
        )

    # Fisher eigenvalues in (logit mean, log concentration) are 0.55 and 1.69: with SGD step
    # 0.03 the correlation time is <= 1 / (0.03 * 0.98 * 0.55) = 62 steps, 4x shorter than
    # the SGD burn-in and 19x shorter than num_avg. The O(lr / K) bias of constant-step SGD
    # was checked empirically: over 30 seeds the z-scores had means 0.23 and -0.14 and standard
    # deviations 0.85 and 0.92, i.e. the standard errors are right and the bias is small.
    est = fit_and_average(
        make_ws,
        (BERN_DATA,),
        ["mean_q", "conc_q"],
        burn_adam=150,
        burn_sgd=250,
        num_avg=num_avg,
        lr_sgd=0.03,
    )
    fisher = beta_fisher_logit_mean_log_conc(ALPHA_N, BETA_N)
    inflate = K / (K - 1)
    se = torch.linalg.inv(fisher).diagonal().sqrt().float() * inflate / math.sqrt(K * num_avg)
    mean_n = ALPHA_N / (ALPHA_N + BETA_N)
    target = torch.stack([torch.logit(mean_n), (ALPHA_N + BETA_N).log()])
    assert_within(est, target, se, "posterior (logit mean, log concentration)")


def test_wake_phase_particles_are_independent_draws():
    """The K wake particles are K distinct guide draws, whatever the phi objective."""
    K = 6
    for phi_objective in ("sleep", "wake", 0.5):
        for vectorize in (True, False):
            seen = []

            def guide(data, seen=seen):
                seen.append(normal_guide(data).detach())

            ws = WakeSleep(
                normal_model,
                guide,
                pyro.optim.SGD({"lr": 0.0}),
                num_particles=K,
                phi_objective=phi_objective,
                vectorize_particles=vectorize,
                max_plate_nesting=1,
            )
            ws.step(DATA)
            seen = seen[: 1 if vectorize else K]  # the wake phase runs first
            particles = torch.cat([s.reshape(-1, 2) for s in seen])
            case = f"phi_objective={phi_objective!r}, vectorize_particles={vectorize}"
            assert particles.shape == (K, 2), f"{case}: particle values {seen[0].shape}"
            distinct = {tuple(row.tolist()) for row in particles}
            assert len(distinct) == K, f"{case}: only {len(distinct)} distinct particles"


# ----------------------------------------------------------------------------- sleep-phi fits

S_SLEEP = 50  # fantasies per step, drawn at once: the guides below take `observations`


def prior_guide(data, observations=None):
    """Non-amortized: ignores both the data and the fantasies."""
    return normal_guide(data)


def test_sleep_phi_non_amortized_guide_learns_the_prior():
    """
    Sleep-phi fits q to fantasies (z, x) ~ p. A guide that ignores x can only match the marginal
    p(z), the prior, not the posterior: the documented behaviour of sleep-phi, checked against
    the analytic prior.
    """

    def make_ws(optim):
        return WakeSleep(
            normal_model,
            prior_guide,
            optim,
            phi_objective="sleep",
            num_sleep_particles=S_SLEEP,
            max_plate_nesting=1,
        )

    num_avg = 1500
    # Curvatures 1/sigma0^2 in [1, 2] (means) and 2 (log-scales); SGD step 0.01: correlation
    # times <= 100 steps. Bias of the log-scales ~ lr (1/sigma0^2 + 2) / (4S) <= lr / S,
    # i.e. 0.01 sqrt(2 num_avg / S) = 0.08 standard errors.
    est = fit_and_average(
        make_ws,
        (DATA,),
        ["loc_q", "scale_q"],
        burn_adam=150,
        burn_sgd=300,
        num_avg=num_avg,
        lr_sgd=0.01,
    )
    prior_scale = LAM0.rsqrt()
    n_eff = S_SLEEP * num_avg
    assert_within(est[:2], LOC0, prior_scale / math.sqrt(n_eff), "prior mean")
    se_log_scale = torch.full((2,), 1 / math.sqrt(2 * n_eff))
    assert_within(est[2:], prior_scale.log(), se_log_scale, "prior log-std")


def _xbar(x):
    """mean(x) over the data dimension, shaped to sit in the guide's (particle) batch."""
    xbar = x.mean(-2)
    return xbar.unsqueeze(-2) if xbar.dim() > 1 else xbar


def linear_guide(data):
    """An amortized guide: q(loc | x) = Normal(a + b * mean(x), s), per dimension."""
    a = pyro.param("a", torch.zeros(2))
    b = pyro.param("b", torch.zeros(2))
    s = pyro.param("s", torch.ones(2), constraint=constraints.positive)
    pyro.sample("loc", dist.Normal(a + b * _xbar(data), s).to_event(1))


def linear_guide_obs(data, observations=None):
    """The same guide, taking the fantasies through an `observations` keyword."""
    linear_guide(data if observations is None else observations["obs"])


def _linear_guide_se(num_fantasies):
    """
    Standard errors of (a, b) for ``num_fantasies`` fantasies in all: the Fisher information
    of (a_d, b_d) is E[(1, xbar)^T (1, xbar)] / s^2 with xbar ~ N(loc0, 1/lam0 + 1/(n lam))
    under the prior predictive; that of log s is 2.
    """
    se_a, se_b = [], []
    for d in range(2):
        m, v = LOC0[d], 1 / LAM0[d] + 1 / (N_DATA * LAM[d])
        info = torch.tensor([[1.0, m], [m, m * m + v]]) * LAM_N[d]
        cov = torch.linalg.inv(info) / num_fantasies
        se_a.append(cov[0, 0].sqrt())
        se_b.append(cov[1, 1].sqrt())
    return torch.stack(se_a), torch.stack(se_b), torch.full((2,), 1 / math.sqrt(2 * num_fantasies))


A_TRUE = LAM0 * LOC0 / LAM_N
B_TRUE = N_DATA * LAM / LAM_N


def test_sleep_phi_amortized_linear_guide_reaches_posterior():
    """
    The posterior mean is linear in mean(x): lam0 loc0 / lam_n + (n lam / lam_n) mean(x), with
    std lam_n^-1/2. A linear-Gaussian guide fitted by sleep-phi on fantasies must find exactly
    these coefficients, which it can only do if the fantasy x (not the real data) reaches it.
    Fantasies here reach the guide through its `observations` keyword, S at a time.
    """

    def make_ws(optim):
        return WakeSleep(
            normal_model,
            linear_guide_obs,
            optim,
            phi_objective="sleep",
            num_sleep_particles=S_SLEEP,
            max_plate_nesting=1,
        )

    num_avg = 2000
    # Fisher eigenvalues >= 2.9 for (a_d, b_d) and 2 for log s: with SGD step 0.005 the
    # correlation times are <= 100 steps (4x shorter than the SGD burn-in). The fluctuation of
    # (a, b) (covariance lr / (2S) I) widens q: bias of log s ~ 3.6 lr / S, i.e.
    # 3.6 lr sqrt(2 num_avg / S) = 0.16 standard errors; (a, b) are unbiased by symmetry.
    est = fit_and_average(
        make_ws,
        (DATA,),
        ["a", "b", "s"],
        burn_adam=200,
        burn_sgd=400,
        num_avg=num_avg,
        lr_sgd=0.005,
    )
    se_a, se_b, se_log_s = _linear_guide_se(S_SLEEP * num_avg)
    assert_within(est[0:2], A_TRUE, se_a, "intercept")
    assert_within(est[2:4], B_TRUE, se_b, "slope")
    assert_within(est[4:6], SCALE_N.log(), se_log_s, "posterior log-std")


def test_sleep_phi_amortized_guide_gets_fantasy_in_place_of_argument():
    """
    The same fit with one fantasy per step handed to the guide in place of its data argument
    (obs=data is the argument). Only the coefficients are checked: they are unbiased for any
    step size (the dynamics is symmetric under reflecting (a, b) about the optimum together
    with the residual), whereas with S = 1 the averaged log s carries an O(lr) bias.
    """

    def make_ws(optim):
        return WakeSleep(
            normal_model, linear_guide, optim, phi_objective="sleep", max_plate_nesting=1
        )

    num_avg = 1000
    # SGD step 0.03: correlation times <= 1 / (0.03 * 2.9) = 12 steps for (a, b).
    est = fit_and_average(
        make_ws,
        (DATA,),
        ["a", "b", "s"],
        burn_adam=200,
        burn_sgd=100,
        num_avg=num_avg,
        lr_sgd=0.03,
    )
    se_a, se_b, _ = _linear_guide_se(num_avg)
    assert_within(est[0:2], A_TRUE, se_a, "intercept")
    assert_within(est[2:4], B_TRUE, se_b, "slope")


# ----------------------------------------------------------------------------- loss values


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("phi_objective", ["sleep", "wake"])
@pytest.mark.parametrize("K", [2, 10])
def test_wake_theta_at_exact_posterior_is_log_marginal(K, phi_objective, vectorize):
    """
    With q equal to the exact posterior every importance weight equals p(x), so for any K > 1
    -wake_theta = log p(x) exactly (up to float32 rounding): a deterministic check.
    """
    for model, guide, data, params, log_px in [
        (
            normal_model,
            normal_guide,
            DATA,
            {"loc_q": LOC_N, "scale_q": SCALE_N},
            normal_log_marginal(DATA),
        ),
        (
            beta_model,
            beta_guide,
            BERN_DATA,
            {"mean_q": ALPHA_N / (ALPHA_N + BETA_N), "conc_q": ALPHA_N + BETA_N},
            (torch.lgamma(ALPHA_N) + torch.lgamma(BETA_N) - torch.lgamma(ALPHA_N + BETA_N)).item()
            - (torch.lgamma(ALPHA0) + torch.lgamma(BETA0) - torch.lgamma(ALPHA0 + BETA0)).item(),
        ),
    ]:
        pyro.clear_param_store()
        guide(data)
        store = pyro.get_param_store()
        for name, value in params.items():
            store[name] = value.clone()
        ws = WakeSleep(
            model,
            guide,
            pyro.optim.Adam({"lr": 0.01}),
            num_particles=K,
            phi_objective=phi_objective,
            vectorize_particles=vectorize,
            max_plate_nesting=1,
        )
        for _ in range(3):
            loss = ws.evaluate_loss(data).wake_theta
            # float32 log-densities of magnitude ~10: rounding error ~1e-5.
            assert loss == pytest.approx(-log_px, abs=2e-4)


@pytest.mark.parametrize("phi_objective", ["sleep", 0.5])
def test_single_particle_wake_theta_is_negative_log_joint(phi_objective):
    """K = 1: wake_theta = -log p(x, z) at the guide's draw z (q plays no part in the value)."""
    seen = []

    def guide(data):
        seen.append(normal_guide(data).detach())

    normal_guide(DATA)  # create the parameters with their constraints, then set them
    pyro.get_param_store()["loc_q"] = torch.tensor([0.3, 0.1])
    pyro.get_param_store()["scale_q"] = torch.tensor([0.5, 0.8])
    ws = WakeSleep(
        normal_model,
        guide,
        pyro.optim.Adam({"lr": 0.01}),
        num_particles=1,
        phi_objective=phi_objective,
        max_plate_nesting=1,
    )
    for _ in range(3):
        seen.clear()
        loss = ws.evaluate_loss(DATA).wake_theta
        z = seen[0]  # the wake phase runs first
        log_joint = (
            dist.Normal(LOC0, LAM0.rsqrt()).log_prob(z).sum()
            + dist.Normal(z, LAM.rsqrt()).log_prob(DATA).sum()
        )
        assert loss == pytest.approx(-log_joint.item(), rel=1e-5, abs=1e-4)


# ----------------------------------------------------------------------------- no model parameters


def test_model_without_parameters_wake_phase_changes_nothing():
    ws = WakeSleep(
        normal_model,
        normal_guide,
        pyro.optim.Adam({"lr": 0.1}),
        num_particles=5,
        phi_objective="wake",
        max_plate_nesting=1,
    )
    normal_guide(DATA)
    before = store_snapshot()
    assert set(before) == {"loc_q", "scale_q"}
    for _ in range(5):
        loss = ws.wake_step(DATA)
        assert math.isfinite(loss)
    assert_store_equal(before)

    # A full step fits the guide only; the model still has no parameter.
    losses = ws.step(DATA)
    assert math.isfinite(losses.wake_theta) and math.isfinite(losses.phi)
    after = store_snapshot()
    assert set(after) == {"loc_q", "scale_q"}
    assert not torch.equal(before["loc_q"], after["loc_q"])
    assert not torch.equal(before["scale_q"], after["scale_q"])

    # Nor does the model acquire parameters under a scale or in the sleep phase.
    sleepy = WakeSleep(
        poutine.scale(normal_model, 2.0),
        poutine.scale(normal_guide, 2.0),
        pyro.optim.Adam({"lr": 0.1}),
        max_plate_nesting=1,
    )
    sleepy.step(DATA)
    assert set(store_snapshot()) == {"loc_q", "scale_q"}
