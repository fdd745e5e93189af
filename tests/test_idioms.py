"""
Pyro as Pyro users write it, under WakeSleep: autoguides against the exact posterior of a
conjugate model, degenerate set-ups that are refused or warned about, and the idioms of Pyro's
tutorials and examples (pyro.deterministic, a model that registers the whole module, guide-side
subsampling, an nn.Module guide with an observations keyword, pyro.factor in the guide, a
CSIS-style sleep phase, model and guide shapes that disagree, enumeration).
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import config_enumerate
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoGuideList,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_value,
)
from torch import nn

from pyro_wakesleep import WakeSleep, WakeSleepLoss

pytestmark = pytest.mark.usefixtures("one_thread")

# A conjugate model: mu ~ N(0, 3^2 I) in 2 dimensions, x_i ~ N(mu, I), i = 1..n.
PRIOR_SD, N_DATA = 3.0, 8
X = torch.tensor([[1.0, -0.5], [1.5, 0.2], [0.4, -1.0], [1.2, 0.1]] * 2)
POST_PRECISION = 1 / PRIOR_SD**2 + N_DATA
POST_MEAN = X.sum(0) / POST_PRECISION
POST_SD = POST_PRECISION**-0.5


def conjugate_model(x):
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), PRIOR_SD).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)


def log_marginal(x):
    """log p(x): x_{:, d} ~ MVN(0, I + PRIOR_SD^2 1 1^T) for each dimension d."""
    n = x.shape[0]
    cov = torch.eye(n) + PRIOR_SD**2 * torch.ones(n, n)
    mvn = dist.MultivariateNormal(torch.zeros(n), covariance_matrix=cov)
    return mvn.log_prob(x.T).sum().item()


# ---------------------------------------------------------------- autoguides


def _autoguide(kind, at_posterior=False):
    options = {}
    if at_posterior:
        options = dict(init_loc_fn=init_to_value(values={"mu": POST_MEAN}), init_scale=POST_SD)
    if kind == "AutoNormal":
        return AutoNormal(conjugate_model, **options)
    if kind == "AutoDiagonalNormal":
        return AutoDiagonalNormal(conjugate_model, **options)
    if kind == "AutoMultivariateNormal":
        return AutoMultivariateNormal(conjugate_model, **options)
    guides = AutoGuideList(conjugate_model)
    guides.append(AutoNormal(pyro.poutine.block(conjugate_model, expose=["mu"]), **options))
    return guides


AUTOGUIDES = ["AutoNormal", "AutoDiagonalNormal", "AutoMultivariateNormal", "AutoGuideList"]


@pytest.mark.parametrize("kind", AUTOGUIDES)
def test_autoguides_at_the_exact_posterior_give_the_log_marginal(kind):
    """An autoguide's auxiliary sites are part of its density: with q the exact posterior every
    importance weight is p(x), so -wake_theta = log p(x) exactly, whatever the K particles."""
    guide = _autoguide(kind, at_posterior=True)
    ws = WakeSleep(
        conjugate_model, guide, pyro.optim.Adam({"lr": 0.01}), num_particles=7, phi_objective="wake"
    )
    for _ in range(3):
        losses = ws.evaluate_loss(X)
        # float32 log-densities of size ~30: rounding error ~1e-5 relative.
        assert losses.wake_theta == pytest.approx(-log_marginal(X), rel=1e-5)
        assert math.isfinite(losses.phi)


@pytest.mark.parametrize("kind", AUTOGUIDES)
def test_autoguides_learn_the_posterior_by_wake_phi(kind):
    """Started far off, wake-phi (K = 20) brings the autoguide to the posterior. The average of
    the last 200 SGD iterates has a Monte Carlo error of a few hundredths of a posterior sd
    (per-step gradient noise ~ 1/sqrt(K) in units of the sd, averaged over ~20 correlation
    times); the self-normalized bias at K = 20 is of the same order. Tolerances: 0.25 sd for
    the mean, 25% for the sd."""
    pyro.set_rng_seed(1)
    guide = _autoguide(kind)
    guide(X)
    ws = WakeSleep(
        conjugate_model,
        guide,
        pyro.optim.Adam({"lr": 0.05}),
        num_particles=20,
        phi_objective="wake",
    )
    for _ in range(600):
        ws.step(X)
    locs, sds = [], []
    sgd = WakeSleep(
        conjugate_model,
        guide,
        pyro.optim.SGD({"lr": 0.002}),
        num_particles=20,
        phi_objective="wake",
    )
    for _ in range(200):
        sgd.step(X)
        locs.append(guide.median(X)["mu"].detach())
        samples = torch.stack([guide(X)["mu"].detach() for _ in range(20)])
        sds.append(samples.std(0))
    loc, sd = torch.stack(locs).mean(0), torch.stack(sds).mean(0)
    assert torch.all((loc - POST_MEAN).abs() < 0.25 * POST_SD), (loc, POST_MEAN)
    assert torch.all((sd / POST_SD - 1).abs() < 0.25), (sd, POST_SD)


def test_autodelta_is_refused_with_the_reason():
    guide = AutoDelta(conjugate_model)
    ws = WakeSleep(
        conjugate_model, guide, pyro.optim.Adam({"lr": 0.01}), num_particles=3, phi_objective="wake"
    )
    with pytest.raises(ValueError, match="'mu' are point masses.*AutoNormal"):
        ws.step(X)


def test_autoguides_are_refused_by_the_sleep_phase():
    ws = WakeSleep(conjugate_model, AutoNormal(conjugate_model), pyro.optim.Adam({"lr": 0.01}))
    with pytest.raises(ValueError, match="auxiliary sites.*phi_objective='wake'"):
        ws.step(X)


# ---------------------------------------------------------------- degenerate set-ups


def test_wake_phi_with_one_particle_is_refused():
    with pytest.raises(ValueError, match="zero expected gradient.*num_particles > 1"):
        WakeSleep(conjugate_model, AutoNormal(conjugate_model), None, phi_objective="wake")
    with pytest.warns(RuntimeWarning, match="zero expected gradient") as caught:
        WakeSleepLoss(phi_objective=0.5)
    assert caught[0].filename == __file__


def global_guide(x):
    loc = pyro.param("loc", torch.zeros(2))
    scale = pyro.param("scale", torch.ones(2), constraint=dist.constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale).to_event(1))


def amortized_guide(x):
    w = pyro.param("w", torch.zeros(()))  # zero at first: the density still reads x
    scale = pyro.param("scale", torch.ones(2), constraint=dist.constraints.positive)
    pyro.sample("mu", dist.Normal(w * x.mean(0), scale).to_event(1))


def test_sleep_phi_with_a_guide_that_ignores_the_data_warns():
    ws = WakeSleep(conjugate_model, global_guide, pyro.optim.Adam({"lr": 0.01}))
    with pytest.warns(RuntimeWarning, match="'mu' do not depend on the data.*prior") as caught:
        ws.step(X)
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ws.step(X)  # said once
        # A guide that reads the data, even through weights that start at zero, is fine.
        WakeSleep(conjugate_model, amortized_guide, pyro.optim.Adam({"lr": 0.01})).step(X)


# ---------------------------------------------------------------- idioms


def test_pyro_deterministic_in_the_model():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), PRIOR_SD).to_event(1))
        pyro.deterministic("mu_norm", mu.norm(), event_dim=0)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    ws = WakeSleep(model, amortized_guide, pyro.optim.Adam({"lr": 0.01}))
    for _ in range(3):
        assert all(math.isfinite(v) for v in ws.step(X))


class WholeModuleVAE(nn.Module):
    """Pyro's semi-supervised VAE idiom: the model registers the whole module, encoder
    included; the guide uses the encoder without registering anything."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 2)
        self.decoder = nn.Linear(2, 4)

    def model(self, x):
        pyro.module("vae", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.encoder(x), 1.0).to_event(1))


def test_a_model_that_registers_the_guides_networks_too():
    """Parameters belong to the objective whose gradient reaches them, not to the trace that
    registered them: sleep_step trains the encoder, wake_step the decoder."""
    torch.manual_seed(0)
    vae = WholeModuleVAE()
    x = torch.randn(10, 4)
    ws = WakeSleep(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.1}))
    encoder = {n: p.detach().clone() for n, p in vae.encoder.named_parameters()}
    decoder = {n: p.detach().clone() for n, p in vae.decoder.named_parameters()}
    ws.sleep_step(x)
    assert all(not torch.equal(p, encoder[n]) for n, p in vae.encoder.named_parameters())
    assert all(torch.equal(p, decoder[n]) for n, p in vae.decoder.named_parameters())
    encoder = {n: p.detach().clone() for n, p in vae.encoder.named_parameters()}
    ws.wake_step(x)
    assert all(torch.equal(p, encoder[n]) for n, p in vae.encoder.named_parameters())
    assert all(not torch.equal(p, decoder[n]) for n, p in vae.decoder.named_parameters())


def test_guide_side_subsampling():
    """The guide's plate draws the indices and the model's plate takes them (Pyro's AIR
    example): in the wake phase by replay, in the sleep phase the other way round."""
    data = torch.randn(20, 2)
    seen = {}

    def model(data):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), PRIOR_SD).to_event(1))
        with pyro.plate("data", len(data), subsample_size=5) as idx:
            seen.setdefault("model", []).append(idx.clone())
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=data[idx])

    def guide(data):
        w = pyro.param("w", torch.zeros(()))
        with pyro.plate("data", len(data), subsample_size=5) as idx:
            seen.setdefault("guide", []).append(idx.clone())
        pyro.sample("mu", dist.Normal(w * data[idx].mean(0), 1.0).to_event(1))

    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.01}))
    for _ in range(3):
        seen.clear()
        assert all(math.isfinite(v) for v in ws.step(data))
        # wake: the guide draws and the model replays; sleep: the model draws, the guide replays
        assert torch.equal(seen["guide"][0], seen["model"][0])
        assert torch.equal(seen["model"][1], seen["guide"][1])


def test_a_delta_guide_is_refused_by_the_sleep_phase():
    def guide(x):
        loc = pyro.param("loc", torch.zeros(2))
        pyro.sample("mu", dist.Delta(loc).to_event(1))

    ws = WakeSleep(conjugate_model, guide, pyro.optim.Adam({"lr": 0.01}))
    with pytest.raises(ValueError, match="'mu' are point masses"):
        ws.step(X)


def test_an_observed_batch_dimension_without_a_plate_never_meets_the_particles():
    """x of shape (K,) observed without a plate under a scalar latent: the distribution
    broadcasts against the data. The plate-nesting guess counts the observation's dimension,
    so the K particles sit left of it even when K equals the data size, and the bound is the
    per-particle one computed by hand from the particles drawn."""
    K = 4
    x = torch.tensor([0.5, -0.2, 1.1, 0.3])
    drawn = []

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        mu = pyro.sample("mu", dist.Normal(pyro.param("loc", torch.tensor(0.2)), 1.0))
        drawn.append(mu.detach())

    # A step refuses it, naming the site and the fix (Pyro's shape check with one particle;
    # with several, the sleep phase: the distribution cannot generate the data's shape) ...
    for num_particles in (1, K):
        ws = WakeSleep(model, guide, None, num_particles=num_particles)
        with pytest.raises(ValueError, match="""site ["']x["']"""):
            ws.evaluate_loss(x)
    # ... and without validation the particles stay apart from the data (the wake phase; the
    # sleep phase refuses a distribution that cannot generate the data's shape).
    drawn.clear()
    ws = WakeSleep(model, guide, None, num_particles=K)
    with pyro.validation_enabled(False), torch.no_grad():
        wake_theta = ws.loss.phases(model, guide, (x,), {}, sleep=False).wake_theta.item()
    assert ws.max_plate_nesting == 1
    mu = drawn[-1].reshape(K)  # the wake phase's particles: one vectorized draw (after a probe)
    log_w = (
        dist.Normal(0.0, PRIOR_SD).log_prob(mu)
        + dist.Normal(mu.unsqueeze(-1), 1.0).log_prob(x).sum(-1)
        - dist.Normal(0.2, 1.0).log_prob(mu)
    )
    expected = -(torch.logsumexp(log_w, 0) - math.log(K)).item()
    assert wake_theta == pytest.approx(expected, rel=1e-5)


class ModuleGuide(nn.Module):
    """Pyro's CSIS test guide style: an nn.Module whose forward takes ``observations``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 2)

    def forward(self, x, observations=None):
        pyro.module("module_guide", self)
        x = x if observations is None else observations["x"]
        pyro.sample("mu", dist.Normal(self.net(x.mean(-2)), 1.0).to_event(1))


def test_an_nn_module_guide_with_an_observations_keyword():
    guide = ModuleGuide()
    ws = WakeSleep(conjugate_model, guide, pyro.optim.Adam({"lr": 0.01}), num_sleep_particles=3)
    for _ in range(3):
        assert all(math.isfinite(v) for v in ws.step(X))


def test_pyro_factor_in_the_guide_is_part_of_its_density():
    def guide(x):
        loc = pyro.param("loc", torch.zeros(2))
        mu = pyro.sample("mu", dist.Normal(loc + 0.1 * x.mean(0), 1.0).to_event(1))
        pyro.factor("penalty", -0.5 * mu.pow(2).sum(), has_rsample=False)

    def plain(x):
        loc = pyro.param("loc", torch.zeros(2))
        pyro.sample("mu", dist.Normal(loc + 0.1 * x.mean(0), 1.0).to_event(1))

    for phi_objective in ("sleep", "wake"):
        with_factor = WakeSleep(
            conjugate_model, guide, None, num_particles=3, phi_objective=phi_objective
        )
        without = WakeSleep(
            conjugate_model, plain, None, num_particles=3, phi_objective=phi_objective
        )
        pyro.set_rng_seed(4)
        a = with_factor.evaluate_loss(X)
        pyro.set_rng_seed(4)
        b = without.evaluate_loss(X)
        assert a != b and all(math.isfinite(v) for v in a)


def test_a_csis_style_guide_that_reads_only_its_fantasies():
    """A guide that reads nothing but ``observations`` (Pyro's CSIS style), trained by
    sleep_step with several fantasies at once: the plate nesting is guessed from the model
    alone, since the guide cannot run on the real arguments."""

    def guide(x, observations=None):
        w = pyro.param("w", torch.tensor(0.5))
        pyro.sample("mu", dist.Normal(w * observations["x"].mean(-2), 1.0).to_event(1))

    ws = WakeSleep(conjugate_model, guide, pyro.optim.Adam({"lr": 0.05}), num_sleep_particles=8)
    for _ in range(5):
        assert math.isfinite(ws.sleep_step(X))
    assert ws.max_plate_nesting == 1 and "w" in pyro.get_param_store()


def test_model_and_guide_shapes_that_disagree_are_refused():
    def model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(1, 2), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(torch.zeros(2, 1), 1.0).to_event(2))

    for K in (1, 3):
        ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.01}), num_particles=K)
        with pytest.raises(ValueError, match="'z'") as info:
            ws.step(torch.tensor(0.5))
        assert "_wake_sleep_particles" not in str(info.value)


def test_enumeration_is_refused():
    """Wake-sleep samples every latent: a guide marked for enumeration is refused, as the
    README says."""

    def model(x):
        c = pyro.sample("c", dist.Categorical(torch.ones(3) / 3))
        pyro.sample("x", dist.Normal(c.float(), 1.0), obs=x)

    @config_enumerate
    def guide(x):
        pyro.sample("c", dist.Categorical(logits=pyro.param("l", torch.zeros(3))))

    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.01}))
    with pytest.raises(ValueError, match="'c' is marked for enumeration"):
        ws.step(torch.tensor(1.0))
