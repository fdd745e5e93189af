"""
What each phase updates, which parameters are found, which latents work, and what the public
methods return.
"""

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_store_equal, store_snapshot
from pyro.nn import PyroModule, PyroParam
from torch import nn

from pyro_wakesleep import WakeSleep, WakeSleepLosses

N, D = 6, 3


def _finite(losses):
    return all(math.isfinite(v) for v in losses)


def _model(x):
    loc = pyro.param("loc", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1), obs=x)


def _guide(x):
    w = pyro.param("w", torch.full((D,), 0.1))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ w, scale))


THETA, PHI = {"loc"}, {"w", "scale"}


def _changed(before):
    after = store_snapshot()
    return {name for name in before if not torch.equal(before[name], after[name])}


# ---------------------------------------------------------------- each phase, its own params

CONFIGS = {
    "classic": {},
    "rws_wake": {"num_particles": 3, "phi_objective": "wake"},
    "rws_mixed": {"num_particles": 3, "phi_objective": 0.5, "num_sleep_particles": 2},
    "k1_mixed": {"phi_objective": 0.5},
    "unvectorized": {"num_particles": 2, "vectorize_particles": False, "phi_objective": 0.3},
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_each_phase_changes_only_its_own_parameters(config):
    x = torch.randn(N, D) + 2.0
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(_model, _guide, optim, **CONFIGS[config])
    ws.step(x)  # create every parameter
    assert set(store_snapshot()) == THETA | PHI

    before = store_snapshot()
    ws.wake_step(x)
    assert _changed(before) == THETA

    before = store_snapshot()
    ws.sleep_step(x)
    assert _changed(before) == PHI

    before = store_snapshot()
    ws.step(x)
    assert _changed(before) == THETA | PHI
    assert ws.num_steps == 4


@pytest.mark.parametrize("phase", ["wake_step", "sleep_step"])
def test_single_phase_only_feeds_its_optimizer(phase):
    x = torch.randn(N, D)
    optim, guide_optim = pyro.optim.Adam({"lr": 0.1}), pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(_model, _guide, optim, guide_optim=guide_optim)
    getattr(ws, phase)(x)
    if phase == "wake_step":
        assert set(optim.get_state()) == THETA and guide_optim.get_state() == {}
    else:
        assert optim.get_state() == {} and set(guide_optim.get_state()) == PHI


@pytest.mark.parametrize("frozen", ["model", "guide"])
def test_guide_optim_is_used_for_the_guide(frozen):
    x = torch.randn(N, D) + 1.0
    fast, still = pyro.optim.Adam({"lr": 0.1}), pyro.optim.Adam({"lr": 0.0})
    optim, guide_optim = (still, fast) if frozen == "model" else (fast, still)
    ws = WakeSleep(_model, _guide, optim, guide_optim=guide_optim)
    ws.step(x)
    for _ in range(3):
        before = store_snapshot()
        ws.step(x)
        assert _changed(before) == (PHI if frozen == "model" else THETA)
    assert set(optim.get_state()) == THETA
    assert set(guide_optim.get_state()) == PHI


def test_one_optim_serves_both_by_default():
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(_model, _guide, optim)
    ws.step(torch.randn(N, D))
    assert ws.guide_optim is optim
    assert set(optim.get_state()) == THETA | PHI


# ---------------------------------------------------------------- parameter discovery


def _param_free_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) + torch.zeros(D), 1.0).to_event(1), obs=x)


def _param_free_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(0.5 * x.mean(-1), 1.0))


@pytest.mark.parametrize(
    "model, guide, expected",
    [
        (_param_free_model, _guide, PHI),
        (_model, _param_free_guide, THETA),
        (_param_free_model, _param_free_guide, set()),
    ],
    ids=["model_without_params", "guide_without_params", "neither"],
)
@pytest.mark.parametrize("config", ["classic", "rws_wake"])
def test_parameter_free_model_or_guide(model, guide, expected, config):
    x = torch.randn(N, D)
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(model, guide, optim, **CONFIGS[config])
    losses = ws.step(x)
    assert _finite(losses)
    assert math.isfinite(ws.wake_step(x)) and math.isfinite(ws.sleep_step(x))
    before = store_snapshot()
    assert set(before) == expected
    ws.step(x)
    assert _changed(before) == expected


class Decoder(PyroModule):
    def __init__(self):
        super().__init__(name="decoder")
        self.linear = PyroModule[nn.Linear](2, D)
        self.offset = PyroParam(torch.zeros(D))
        self.noise = PyroParam(torch.ones(()), constraint=dist.constraints.positive)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            loc = self.linear(z) + self.offset
            pyro.sample("x", dist.Normal(loc, self.noise).to_event(1), obs=x)


def test_pyro_param_module_and_pyro_module_are_discovered():
    decoder = Decoder()
    encoder = nn.Linear(D, 2)

    def guide(x):
        pyro.module("encoder", encoder)
        scale = pyro.param("guide_scale", torch.ones(2), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(encoder(x), scale).to_event(1))

    x = torch.randn(N, D)
    optim = pyro.optim.Adam({"lr": 0.05})
    ws = WakeSleep(decoder, guide, optim)
    ws.step(x)
    theta = {"decoder.linear.weight", "decoder.linear.bias", "decoder.offset", "decoder.noise"}
    phi = {"encoder$$$weight", "encoder$$$bias", "guide_scale"}
    assert set(store_snapshot()) == theta | phi
    assert set(optim.get_state()) == theta | phi

    before = store_snapshot()
    module_before = {k: v.detach().clone() for k, v in encoder.named_parameters()}
    ws.wake_step(x)
    assert _changed(before) == theta
    assert all(torch.equal(module_before[k], v) for k, v in encoder.named_parameters())

    before = store_snapshot()
    decoder_before = {k: v.detach().clone() for k, v in decoder.named_parameters()}
    ws.sleep_step(x)
    assert _changed(before) == phi
    assert not torch.equal(module_before["weight"], encoder.weight)  # the module itself moved
    assert all(torch.equal(decoder_before[k], v) for k, v in decoder.named_parameters())


# ---------------------------------------------------------------- kinds of latents


class NoRsampleNormal(dist.Normal):
    """A Normal without a reparameterized sampler: wake-sleep must never need one."""

    has_rsample = False

    def rsample(self, sample_shape=()):
        raise AssertionError("rsample called")

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NoRsampleNormal, _instance)
        return super().expand(batch_shape, _instance=new)


def _bernoulli_problem():
    def model(x):
        prior = pyro.param("prior_logit", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=prior))
            pyro.sample("x", dist.Normal(4.0 * z - 2.0, 1.0), obs=x)

    def guide(x):
        a, b = pyro.param("a", torch.tensor(0.0)), pyro.param("b", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=a + b * x))

    def check():
        store = pyro.get_param_store()
        q = torch.sigmoid(store["a"] + store["b"] * torch.tensor([-2.0, 2.0]))
        assert q[0] < 0.2 and q[1] > 0.8, q
        assert store["prior_logit"] > 0.3  # three quarters of the data come from z = 1

    z = (torch.rand(48) < 0.75).float()
    return model, guide, 4.0 * z - 2.0 + torch.randn(48), check


def _categorical_problem():
    def model(x):
        logits = pyro.param("prior_logits", torch.zeros(3))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Categorical(logits=logits))
            pyro.sample("x", dist.Normal(3.0 * z.float() - 3.0, 0.7), obs=x)

    def guide(x):
        a = pyro.param("a", torch.zeros(3))
        b = pyro.param("b", torch.zeros(3))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Categorical(logits=a + b * x.unsqueeze(-1)))

    def check():
        store = pyro.get_param_store()
        logits = store["a"] + store["b"] * torch.tensor([[-3.0], [0.0], [3.0]])
        assert logits.argmax(-1).tolist() == [0, 1, 2], logits

    z = torch.randint(0, 3, (48,))
    return model, guide, 3.0 * z.float() - 3.0 + 0.7 * torch.randn(48), check


def _normal_problem():
    # z ~ N(0, 1), x ~ N(z, 1/2): the posterior is N(0.8 x, 0.2).
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        a, c = pyro.param("a", torch.tensor(0.0)), pyro.param("c", torch.tensor(0.5))
        s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", NoRsampleNormal(a * x + c, s))

    def check():
        store = pyro.get_param_store()
        assert abs(store["a"] - 0.8) < 0.2, store["a"]
        assert abs(store["c"]) < 0.25, store["c"]

    return model, guide, 1.2 * torch.randn(48), check


def _mixed_problem():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            w = pyro.sample("w", dist.Normal(4.0 * z - 2.0, 0.5))
            pyro.sample("x", dist.Normal(w, 0.5), obs=x)

    def guide(x):
        a, b = pyro.param("a", torch.tensor(0.0)), pyro.param("b", torch.tensor(0.0))
        c = pyro.param("c", torch.tensor(0.0))
        d = pyro.param("d", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(logits=a + b * x))
            pyro.sample("w", NoRsampleNormal(c * x + d * (2 * z - 1), 1.0))

    def check():
        store = pyro.get_param_store()
        q = torch.sigmoid(store["a"] + store["b"] * torch.tensor([-2.0, 2.0]))
        assert q[0] < 0.2 and q[1] > 0.8, q
        assert store["c"] > 0.2

    z = (torch.rand(48) < 0.5).float()
    return model, guide, 4.0 * z - 2.0 + 0.7 * torch.randn(48), check


PROBLEMS = {
    "bernoulli": _bernoulli_problem,
    "categorical": _categorical_problem,
    "normal": _normal_problem,
    "mixed": _mixed_problem,
}


_SLEEP = {}
_RWS = {"num_particles": 4, "phi_objective": "wake"}
_RWS_UNVECTORIZED = {**_RWS, "vectorize_particles": False}


@pytest.mark.parametrize(
    "problem, config",
    [(p, _SLEEP) for p in PROBLEMS]
    + [(p, _RWS) for p in PROBLEMS]
    # unvectorized particles are slow: two problems suffice
    + [(p, _RWS_UNVECTORIZED) for p in ("categorical", "normal")],
    ids=[f"{p}-sleep" for p in PROBLEMS]
    + [f"{p}-rws_wake" for p in PROBLEMS]
    + ["categorical-rws_wake_unvectorized", "normal-rws_wake_unvectorized"],
)
def test_discrete_continuous_and_mixed_latents_train(problem, config):
    model, guide, x, check = PROBLEMS[problem]()
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.05}), **config)
    for _ in range(100):
        losses = ws.step(x)
        assert _finite(losses)
    check()


@pytest.mark.parametrize("phi_objective", ["sleep", "wake", 0.5])
@pytest.mark.parametrize("method", ["step", "wake_step", "sleep_step", "evaluate_loss"])
def test_vectorized_wake_particles_are_distinct_draws(method, phi_objective):
    """With vectorized particles the guide draws K different latents per data point in the
    wake phase (a K-particle bound over K copies of one draw is a one-particle bound)."""
    if method == "sleep_step" and phi_objective == "sleep":
        pytest.skip("no wake phase")
    K = 4
    drawn = []

    def guide(x):
        w = pyro.param("w", torch.full((D,), 0.1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x @ w, 1.0))
        drawn.append(z.detach().clone())

    x = torch.randn(N, D)
    ws = WakeSleep(
        _model,
        guide,
        pyro.optim.Adam({"lr": 0.1}),
        num_particles=K,
        phi_objective=phi_objective,
        max_plate_nesting=1,
    )
    getattr(ws, method)(x)
    z = drawn[0]  # the wake phase runs first
    assert z.shape == (K, N)
    for k in range(1, K):
        assert not torch.equal(z[0], z[k])


@pytest.mark.parametrize("phi_objective", ["sleep", "wake"])
def test_more_particles_change_the_bound(phi_objective):
    """Same seed, K = 2 vs K = 8 particles: different bounds (unless the particles collapse)."""
    x = torch.randn(N, D) * 2
    losses = []
    for K in (2, 8):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        ws = WakeSleep(
            _model,
            _guide,
            pyro.optim.Adam({"lr": 0.1}),
            num_particles=K,
            phi_objective=phi_objective,
        )
        losses.append(ws.evaluate_loss(x).wake_theta)
    assert losses[0] != pytest.approx(losses[1], rel=1e-4)


# ---------------------------------------------------------------- stochastic control flow

SIGMA = 0.5
X_OBS = 2.0
# z ~ Bernoulli(1/2); z = 1 adds a latent "extra" ~ N(0, 1) to the mean of x ~ N(., SIGMA):
# p(x | z = 1) = N(x; 0, sqrt(1 + SIGMA^2)) and p(x | z = 0) = N(x; 0, SIGMA).
_LOG_ODDS = (
    X_OBS**2 / (2 * SIGMA**2)
    - X_OBS**2 / (2 * (1 + SIGMA**2))
    + math.log(SIGMA / math.sqrt(1 + SIGMA**2))
)
TRUE_POSTERIOR = 1 / (1 + math.exp(-_LOG_ODDS))  # about 0.996


def _branching_model(x):
    z = pyro.sample("z", dist.Bernoulli(0.5))
    mean = torch.tensor(0.0)
    if z.item() == 1:
        mean = pyro.sample("extra", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(mean, SIGMA), obs=x)


def _branching_guide(x):
    # the true posterior log-odds are linear in x^2, so a + b x^2 can represent them
    a, b = pyro.param("a", torch.tensor(0.0)), pyro.param("b", torch.tensor(0.0))
    z = pyro.sample("z", dist.Bernoulli(logits=a + b * x**2))
    if z.item() == 1:
        m = pyro.param("m", torch.tensor(0.0))
        s = pyro.param("s", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample("extra", dist.Normal(m * x, s))


def _branch_probability():
    store = pyro.get_param_store()
    return torch.sigmoid(store["a"] + store["b"] * X_OBS**2).item()


@pytest.mark.parametrize("K, phi_objective", [(1, "sleep"), (3, "sleep"), (3, "wake")])
def test_stochastic_control_flow(K, phi_objective):
    assert TRUE_POSTERIOR > 0.99
    x = torch.tensor(X_OBS)
    ws = WakeSleep(
        _branching_model,
        _branching_guide,
        pyro.optim.Adam({"lr": 0.05}),
        num_particles=K,
        phi_objective=phi_objective,
        vectorize_particles=False,
    )
    extra_seen = False
    for _ in range(200):
        assert _finite(ws.step(x))
        extra_seen = extra_seen or "m" in pyro.get_param_store()
    assert extra_seen  # both branches were taken
    assert math.isfinite(ws.wake_step(x)) and math.isfinite(ws.sleep_step(x))
    assert _branch_probability() > 0.85, (_branch_probability(), TRUE_POSTERIOR)


def _geometric_model(x):
    n = 0
    while n < 6 and pyro.sample(f"stop_{n}", dist.Bernoulli(0.4)).item() == 0:
        n += 1
    pyro.sample("x", dist.Normal(float(n), 0.5), obs=x)


def _geometric_guide(x):
    a = pyro.param("a", torch.tensor(0.0))
    b = pyro.param("b", torch.tensor(0.0))
    n = 0
    while n < 6 and pyro.sample(f"stop_{n}", dist.Bernoulli(logits=a + b * (n - x))).item() == 0:
        n += 1


@pytest.mark.parametrize("K, phi_objective", [(1, "sleep"), (3, "sleep"), (3, "wake")])
def test_geometric_number_of_sites(K, phi_objective):
    x = torch.tensor(3.0)
    ws = WakeSleep(
        _geometric_model,
        _geometric_guide,
        pyro.optim.Adam({"lr": 0.05}),
        num_particles=K,
        phi_objective=phi_objective,
        vectorize_particles=False,
    )
    for _ in range(60):
        assert _finite(ws.step(x))
    if K == 3:
        # the guide learns to stop at n = x: stopping is likely at n = 3, unlikely before
        store = pyro.get_param_store()
        p_stop = torch.sigmoid(store["a"] + store["b"] * (torch.arange(6.0) - 3.0))
        assert p_stop[0] < 0.4 and p_stop[3] > p_stop[0], p_stop


# ---------------------------------------------------------------- plates


def _nested_model(x):
    with pyro.plate("outer", x.shape[0], dim=-2):
        with pyro.plate("inner", x.shape[1], dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x)


def _nested_guide(x):
    # the exact posterior N(x / (1 + s^2), s^2 / (1 + s^2))
    v = SIGMA**2 / (1 + SIGMA**2)
    with pyro.plate("outer", x.shape[0], dim=-2):
        with pyro.plate("inner", x.shape[1], dim=-1):
            pyro.sample("z", dist.Normal(x / (1 + SIGMA**2), math.sqrt(v)))


@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("max_plate_nesting", [None, 2, 3])
def test_nested_plates_closed_form(max_plate_nesting, vectorize):
    """With the exact posterior as guide every weight is p(x): the K-particle bound is
    -sum log p(x) exactly, whatever the particles."""
    x = torch.randn(3, 4) * 1.5
    ws = WakeSleep(
        _nested_model,
        _nested_guide,
        pyro.optim.Adam({"lr": 0.1}),
        num_particles=4,
        phi_objective="wake",
        max_plate_nesting=max_plate_nesting,
        vectorize_particles=vectorize,
    )
    expected = -dist.Normal(0.0, math.sqrt(1 + SIGMA**2)).log_prob(x).sum().item()
    for losses in (ws.evaluate_loss(x), ws.step(x)):
        assert losses.wake_theta == pytest.approx(expected, rel=1e-5)
        assert math.isfinite(losses.phi)
    if vectorize:
        assert ws.max_plate_nesting == (2 if max_plate_nesting is None else max_plate_nesting)


def _flat_model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0).expand(x.shape).to_event(2), obs=x)


def _flat_guide(x):
    pyro.sample("z", dist.Normal(x.mean(), 1.0))


@pytest.mark.parametrize(
    "model, guide, nesting",
    [
        (_nested_model, _nested_guide, 2),
        (_model, _guide, 1),
        (_flat_model, _flat_guide, 0),
    ],
    ids=["nested", "one_plate", "no_plate"],
)
def test_max_plate_nesting_is_guessed(model, guide, nesting):
    x = torch.randn(3, 4) if nesting == 2 else torch.randn(N, D)
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.1}), num_particles=3)
    assert ws.max_plate_nesting is None
    ws.step(x)
    assert ws.max_plate_nesting == nesting
    # the guess places the particle plate where the given value does: same losses, same seed
    given = WakeSleep(
        model, guide, pyro.optim.Adam({"lr": 0.1}), num_particles=3, max_plate_nesting=nesting
    )
    pyro.set_rng_seed(3)
    a = ws.evaluate_loss(x)
    pyro.set_rng_seed(3)
    b = given.evaluate_loss(x)
    assert a == b


def test_automatic_plate_dims_and_sleep_particles():
    """Plates without explicit dims, vectorized wake and sleep particles."""

    def model(x):
        # plates without dims: "cols" gets dim -1, "rows" inside it dim -2
        with pyro.plate("cols", x.shape[-1]):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            with pyro.plate("rows", x.shape[-2]):
                z = pyro.sample("z", dist.Normal(u, 1.0))
                pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x, observations=None):
        x = x if observations is None else observations["x"]
        w = pyro.param("w", torch.tensor(0.3))
        with pyro.plate("cols", x.shape[-1]):
            pyro.sample("u", dist.Normal(w * x.mean(-2), 1.0))
            with pyro.plate("rows", x.shape[-2]):
                pyro.sample("z", dist.Normal(w * x, 1.0))

    x = torch.randn(3, 4)
    ws = WakeSleep(
        model,
        guide,
        pyro.optim.Adam({"lr": 0.1}),
        num_particles=3,
        num_sleep_particles=2,
        phi_objective=0.5,
    )
    for _ in range(3):
        assert _finite(ws.step(x))
    assert ws.max_plate_nesting == 2


# ---------------------------------------------------------------- evaluate_loss, return values


@pytest.mark.parametrize("config", ["classic", "rws_wake", "rws_mixed"])
def test_evaluate_loss_changes_nothing(config):
    x = torch.randn(N, D)
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(_model, _guide, optim, **CONFIGS[config])
    for _ in range(3):
        ws.step(x)
    before, state = store_snapshot(), copy.deepcopy(optim.get_state())
    losses = ws.evaluate_loss(x)
    assert isinstance(losses, WakeSleepLosses) and _finite(losses)
    assert_store_equal(before)
    assert ws.num_steps == 3
    for name, p in pyro.get_param_store().named_parameters():
        assert p.grad is None, name
    after = optim.get_state()
    assert state.keys() == after.keys()
    for name in state:
        assert state[name]["param_groups"] == after[name]["param_groups"]
        for key, value in state[name]["state"].items():
            for k, v in value.items():
                assert torch.equal(v, after[name]["state"][key][k]), (name, k)


def test_evaluate_loss_matches_step_losses():
    """Same seed, same parameters: evaluate_loss returns what step reports."""
    x = torch.randn(N, D)
    ws = WakeSleep(_model, _guide, pyro.optim.Adam({"lr": 0.1}), num_particles=3, phi_objective=0.5)
    ws.step(x)
    pyro.set_rng_seed(7)
    evaluated = ws.evaluate_loss(x)
    pyro.set_rng_seed(7)
    stepped = ws.step(x)
    assert evaluated.wake_theta == pytest.approx(stepped.wake_theta, rel=1e-6)
    assert evaluated.phi == pytest.approx(stepped.phi, rel=1e-6)


def test_step_returns_named_tuple_of_floats():
    x = torch.randn(N, D)
    ws = WakeSleep(_model, _guide, pyro.optim.Adam({"lr": 0.1}))
    losses = ws.step(x)
    assert isinstance(losses, WakeSleepLosses) and isinstance(losses, tuple)
    assert WakeSleepLosses._fields == ("wake_theta", "phi")
    assert type(losses.wake_theta) is float and type(losses.phi) is float
    assert losses == (losses[0], losses[1]) and _finite(losses)
    wake, sleep = ws.wake_step(x), ws.sleep_step(x)
    assert type(wake) is float and type(sleep) is float
    evaluated = ws.evaluate_loss(x)
    assert isinstance(evaluated, WakeSleepLosses)
    assert type(evaluated.wake_theta) is float and type(evaluated.phi) is float


@pytest.mark.parametrize("phi_objective", ["sleep", 0.5])
def test_classic_wake_theta_is_minus_log_joint(phi_objective):
    """K = 1: the wake-theta loss is -log p(x, z) at the guide's sample, whatever the guide's
    objective (the gradient is the same either way; the reported value should be too)."""
    seen = []

    def model(x):
        loc = pyro.param("loc", torch.zeros(D))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1), obs=x)
        seen.append(z.detach().clone())

    x = torch.randn(N, D)
    ws = WakeSleep(model, _guide, pyro.optim.Adam({"lr": 0.1}), phi_objective=phi_objective)
    ws.step(x)
    seen.clear()
    losses = ws.evaluate_loss(x)
    z = seen[0]  # the wake phase runs the model first, on the guide's sample
    loc = pyro.param("loc").detach()
    log_joint = (
        dist.Normal(0.0, 1.0).log_prob(z).sum()
        + dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1).log_prob(x).sum()
    )
    assert losses.wake_theta == pytest.approx(-log_joint.item(), rel=1e-5)


# ---------------------------------------------------------------- CUDA


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("config", ["classic", "rws_mixed"])
def test_cuda(config):
    def model(x):
        loc = pyro.param("loc", torch.zeros(D, device=x.device))
        with pyro.plate("data", x.shape[0], device=x.device):
            z = pyro.sample("z", dist.Normal(torch.zeros((), device=x.device), 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1), obs=x)

    def guide(x):
        w = pyro.param("w", torch.full((D,), 0.1, device=x.device))
        with pyro.plate("data", x.shape[0], device=x.device):
            pyro.sample("z", dist.Normal(x @ w, 1.0))

    x = torch.randn(N, D, device="cuda")
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.1}), **CONFIGS[config])
    before = None
    for _ in range(3):
        assert _finite(ws.step(x))
        if before is None:
            before = store_snapshot()
    assert _changed(before) == {"loc", "w"}
    for name, p in pyro.get_param_store().named_parameters():
        assert p.is_cuda, name
    assert _finite(ws.evaluate_loss(x))
