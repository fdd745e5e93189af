"""
Bad inputs: each raises an exception that names the site or argument and the fix, and a step
that raises leaves the parameter store and the optimizer state exactly as they were.
"""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_store_equal, store_snapshot
from pyro import poutine

from pyro_wakesleep import FantasyError, NonFiniteLossError, WakeSleep

N, D = 6, 3

# Observations that the model reads from a global instead of from its arguments.
_GLOBAL_X = torch.randn(N, D, generator=torch.Generator().manual_seed(1))


def _data():
    return torch.randn(N, D)


def good_model(x):
    loc = pyro.param("loc", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1), obs=x)


def good_guide(x):
    w = pyro.param("w", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ w, 1.0))


# ---------------------------------------------------------------- bad pairings
# Each bad model/guide also touches a parameter that does not exist yet, so a failing step
# must remove it again.


def model_without_observation(x):
    loc = pyro.param("loc", torch.zeros(D)) + pyro.param("new_theta", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1))


def guide_with_extra_site(x):
    w = pyro.param("w", torch.zeros(D))
    pyro.sample("bogus", dist.Normal(pyro.param("new_phi", torch.zeros(())), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ w, 1.0))


def model_with_unguided_latent(x):
    loc = pyro.param("loc", torch.zeros(D)) + pyro.param("new_theta", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal((z + u).unsqueeze(-1) + loc, 1.0).to_event(1), obs=x)


def guide_sampling_observed(x):
    w = pyro.param("w", torch.zeros(D))
    new = pyro.param("new_phi", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ w, 1.0))
        pyro.sample("x", dist.Normal(new, 1.0).to_event(1))


def model_sharing(x):
    loc = pyro.param("loc", torch.zeros(D)) + pyro.param("shared", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1), obs=x)


def guide_sharing(x):
    w = pyro.param("w", torch.zeros(D)) + pyro.param("shared", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ w, 1.0))


def model_reading_global(x):
    loc = pyro.param("loc", torch.zeros(D)) + pyro.param("new_theta", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1), obs=_GLOBAL_X)


PAIRING_ERRORS = {
    # name: (model, guide, exception, fragments the message must contain)
    "no_observed_site": (
        model_without_observation,
        good_guide,
        ValueError,
        ["no observed site", "obs="],
    ),
    "guide_site_missing_from_model": (
        good_model,
        guide_with_extra_site,
        ValueError,
        ["'bogus'", "model does not have", "remove it"],
    ),
    "model_latent_not_in_guide": (
        model_with_unguided_latent,
        good_guide,
        ValueError,
        ["'u'", "not sampled by the guide", "pyro.sample('u', ...)"],
    ),
    "guide_samples_observed_site": (
        good_model,
        guide_sampling_observed,
        ValueError,
        ["'x'", "observes", "remove 'x'"],
    ),
    "shared_parameter": (
        model_sharing,
        guide_sharing,
        ValueError,
        ["'shared'", "both the model and the guide", "own copy"],
    ),
}

CONFIGS = {
    "classic": {},
    "rws": {"num_particles": 3, "phi_objective": "wake"},
    "mixed_sleep": {"num_particles": 2, "num_sleep_particles": 2, "phi_objective": 0.5},
}


# ---------------------------------------------------------------- helpers


def _assert_state_equal(a, b, path="state"):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_state_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_state_equal(u, v, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    else:
        assert a == b, path


def assert_fails_atomically(call, exc, fragments, optims=(), ws=None):
    """Run ``call``, expect ``exc`` whose message holds every fragment, and check that the
    store, the optimizers, the gradients and the step counter are as they were."""
    before = store_snapshot()
    states = [copy.deepcopy(o.get_state()) for o in optims]
    steps = None if ws is None else ws.num_steps
    with pytest.raises(Exception) as info:
        call()
    # Whatever the exception, nothing may have changed ...
    assert_store_equal(before)
    for optim, state in zip(optims, states):
        _assert_state_equal(state, optim.get_state())
    for name, p in pyro.get_param_store().named_parameters():
        assert p.grad is None, name
    if ws is not None:
        assert ws.num_steps == steps
    # ... and it must be the expected one, with a message naming the problem and the fix.
    message = str(info.value)
    assert isinstance(info.value, exc), f"{type(info.value).__name__}: {message}"
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def _warm_up(optim, x, steps=3, **config):
    ws = WakeSleep(good_model, good_guide, optim, **config)
    for _ in range(steps):
        ws.step(x)
    assert set(optim.get_state()) == {"loc", "w"}
    return ws


# ---------------------------------------------------------------- constructor arguments


@pytest.mark.parametrize("name", ["num_particles", "num_sleep_particles"])
@pytest.mark.parametrize("value", [0, -1, 2.5, True, None, "2"])
def test_bad_particle_numbers(name, value):
    with pytest.raises(ValueError, match=name) as info:
        WakeSleep(good_model, good_guide, pyro.optim.Adam({"lr": 0.1}), **{name: value})
    assert ">= 1" in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [1.5, -0.1, "foo", "Sleep", True, None, float("nan")])
def test_bad_phi_objective(value):
    with pytest.raises(ValueError, match="phi_objective") as info:
        WakeSleep(good_model, good_guide, pyro.optim.Adam({"lr": 0.1}), phi_objective=value)
    message = str(info.value)
    assert "'sleep'" in message and "'wake'" in message and "[0, 1]" in message


@pytest.mark.parametrize(
    "optim",
    [
        {"lr": 0.1},
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1),
        "adam",
    ],
    ids=["dict", "torch_optimizer", "str"],
)
def test_optim_must_be_a_pyro_optim(optim):
    with pytest.raises(TypeError, match="optim") as info:
        WakeSleep(good_model, good_guide, optim)
    assert "PyroOptim" in str(info.value)


def test_without_an_optimizer_only_the_loss_is_available():
    """optim=None makes an estimator for differentiable_loss (torch optimizers, DDP); a step
    then says what to do, and changes nothing."""
    ws = WakeSleep(good_model, good_guide, None)
    x = _data()
    assert ws.differentiable_loss(x).requires_grad
    before = store_snapshot()
    for method in ("step", "wake_step", "sleep_step"):
        with pytest.raises(ValueError, match="no optimizer.*differentiable_loss"):
            getattr(ws, method)(x)
    assert_store_equal(before)


@pytest.mark.parametrize("optim", [{"lr": 0.1}, torch.optim.SGD, "adam"])
def test_guide_optim_must_be_a_pyro_optim(optim):
    with pytest.raises(TypeError, match="guide_optim") as info:
        WakeSleep(good_model, good_guide, pyro.optim.Adam({"lr": 0.1}), guide_optim=optim)
    assert "PyroOptim" in str(info.value)


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_bad_max_plate_nesting(value):
    with pytest.raises(ValueError, match="max_plate_nesting"):
        WakeSleep(good_model, good_guide, pyro.optim.Adam({"lr": 0.1}), max_plate_nesting=value)


def test_fantasy_args_must_be_callable():
    with pytest.raises(TypeError, match="fantasy_args"):
        WakeSleep(good_model, good_guide, pyro.optim.Adam({"lr": 0.1}), fantasy_args=(1, 2))


def test_constructor_errors_touch_nothing():
    x = _data()
    optim = pyro.optim.Adam({"lr": 0.1})
    _warm_up(optim, x)
    before, state = store_snapshot(), copy.deepcopy(optim.get_state())
    for kwargs in ({"num_particles": 0}, {"phi_objective": 2.0}, {"guide_optim": {}}):
        with pytest.raises((ValueError, TypeError)):
            WakeSleep(good_model, good_guide, optim, **kwargs)
    assert_store_equal(before)
    _assert_state_equal(state, optim.get_state())


# ---------------------------------------------------------------- model/guide pairing


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("method", ["step", "wake_step", "sleep_step"])
@pytest.mark.parametrize("case", list(PAIRING_ERRORS))
def test_pairing_error_on_first_step(case, method, config):
    model, guide, exc, fragments = PAIRING_ERRORS[case]
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(model, guide, optim, **CONFIGS[config])
    assert_fails_atomically(
        lambda: getattr(ws, method)(_data()), exc, fragments, optims=[optim], ws=ws
    )
    # Parameters that would have been created by the failing step are gone.
    assert list(pyro.get_param_store().keys()) == []
    assert optim.get_state() == {}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("method", ["step", "wake_step", "sleep_step"])
@pytest.mark.parametrize("case", list(PAIRING_ERRORS))
def test_pairing_error_after_good_steps(case, method, config):
    model, guide, exc, fragments = PAIRING_ERRORS[case]
    x = _data()
    optim = pyro.optim.Adam({"lr": 0.1})
    _warm_up(optim, x, **CONFIGS[config])
    ws = WakeSleep(model, guide, optim, **CONFIGS[config])
    assert_fails_atomically(lambda: getattr(ws, method)(x), exc, fragments, optims=[optim], ws=ws)
    assert set(pyro.get_param_store().keys()) == {"loc", "w"}


@pytest.mark.parametrize("method", ["step", "wake_step", "sleep_step"])
def test_shared_parameter_with_separate_guide_optim(method):
    x = _data()
    optim, guide_optim = pyro.optim.Adam({"lr": 0.1}), pyro.optim.Adam({"lr": 0.1})
    good = WakeSleep(good_model, good_guide, optim, guide_optim=guide_optim)
    for _ in range(2):
        good.step(x)
    ws = WakeSleep(model_sharing, guide_sharing, optim, guide_optim=guide_optim)
    assert_fails_atomically(
        lambda: getattr(ws, method)(x),
        ValueError,
        ["'shared'"],
        optims=[optim, guide_optim],
        ws=ws,
    )


@pytest.mark.parametrize("case", ["guide_site_missing_from_model", "shared_parameter"])
def test_failing_evaluate_loss_creates_no_parameters(case):
    """evaluate_loss changes nothing, even when it raises on a fresh parameter store."""
    model, guide, exc, fragments = PAIRING_ERRORS[case]
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.1}))
    assert_fails_atomically(lambda: ws.evaluate_loss(_data()), exc, fragments, ws=ws)
    assert list(pyro.get_param_store().keys()) == []


# ---------------------------------------------------------------- fantasies the guide can't see


@pytest.mark.parametrize("warm", [False, True])
@pytest.mark.parametrize("method", ["step", "sleep_step"])
def test_unseen_observation_raises_fantasy_error(method, warm):
    x = _data()
    optim = pyro.optim.Adam({"lr": 0.1})
    if warm:
        _warm_up(optim, x)
    ws = WakeSleep(model_reading_global, good_guide, optim)
    message = assert_fails_atomically(
        lambda: getattr(ws, method)(x),
        FantasyError,
        ["'x'", "fantasy_args", "observations"],
        optims=[optim],
        ws=ws,
    )
    assert "obs=" in message
    assert set(pyro.get_param_store().keys()) == ({"loc", "w"} if warm else set())


def test_unseen_observation_is_fine_without_sleep_phase():
    x = _data()
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(model_reading_global, good_guide, optim)
    before = store_snapshot()
    loss = ws.wake_step(x)  # the wake phase needs no fantasy
    assert isinstance(loss, float) and loss == loss
    assert set(store_snapshot()) == set(before) | {"loc", "new_theta", "w"}
    ws_wake = WakeSleep(
        model_reading_global, good_guide, optim, num_particles=2, phi_objective="wake"
    )
    losses = ws_wake.step(x)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)


def test_fantasy_error_from_guide_without_observations_with_vectorized_sleep_particles():
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(model_reading_global, good_guide, optim, num_sleep_particles=3)
    assert_fails_atomically(lambda: ws.step(_data()), FantasyError, ["'x'"], optims=[optim], ws=ws)


# ---------------------------------------------------------------- non-finite losses/gradients


@pytest.fixture(params=[True, False], ids=["validation_on", "validation_off"])
def validation(request):
    pyro.enable_validation(request.param)
    yield request.param
    pyro.enable_validation(True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("method", ["step", "wake_step"])
def test_non_finite_data_after_good_steps(method, bad, validation):
    x = _data()
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(good_model, good_guide, optim)
    for _ in range(3):
        ws.step(x)
    x_bad = x.clone()
    x_bad[2, 1] = bad
    message = assert_fails_atomically(
        lambda: getattr(ws, method)(x_bad),
        NonFiniteLossError,
        ["Step 3", "'x'", "argument 0", "No parameter or optimizer state was changed"],
        optims=[optim],
        ws=ws,
    )
    assert "Remove NaN/inf from the data" in message
    # The failed step did not poison later ones.
    losses = ws.step(x)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert ws.num_steps == 4


def test_non_finite_keyword_data_names_the_keyword(validation):
    def model(*, data):
        good_model(data)

    def guide(*, data):
        good_guide(data)

    x = _data()
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(model, guide, optim)
    ws.step(data=x)
    ws.step(data=x)
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    assert_fails_atomically(
        lambda: ws.step(data=x_bad),
        NonFiniteLossError,
        ["Step 2", "keyword argument 'data'", "'x'"],
        optims=[optim],
        ws=ws,
    )


def test_non_finite_data_on_first_step_creates_no_parameters(validation):
    x = _data()
    x[0, 0] = float("nan")
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(good_model, good_guide, optim)
    assert_fails_atomically(
        lambda: ws.step(x), NonFiniteLossError, ["Step 0", "'x'"], optims=[optim], ws=ws
    )
    assert list(pyro.get_param_store().keys()) == []


def test_non_finite_data_in_a_mini_batch_model():
    """NaN data with Pyro's mini-batch idiom obs=x[i] is reported as NaN data, not as a
    fantasy the guide cannot see."""
    pyro.enable_validation(False)
    try:

        def model(x):
            loc = pyro.param("loc", torch.zeros(D))
            with pyro.plate("data", x.shape[0], subsample_size=3) as i:
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
                pyro.sample("x", dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1), obs=x[i])

        def guide(x):
            w = pyro.param("w", torch.zeros(D))
            with pyro.plate("data", x.shape[0], subsample_size=3) as i:
                pyro.sample("z", dist.Normal(x[i] @ w, 1.0))

        x = _data()
        optim = pyro.optim.Adam({"lr": 0.1})
        ws = WakeSleep(model, guide, optim)
        ws.step(x)
        x_bad = torch.full_like(x, float("nan"))
        assert_fails_atomically(
            lambda: ws.step(x_bad),
            NonFiniteLossError,
            ["Step 1", "'x'", "argument 0"],
            optims=[optim],
            ws=ws,
        )
    finally:
        pyro.enable_validation(True)


def _sqrt_model(x, c):
    # sqrt(theta * c) is 0 at c = 0, with a 0/0 derivative in theta: finite loss, NaN gradient.
    theta = pyro.param("theta", torch.tensor(1.0), constraint=dist.constraints.positive)
    loc = torch.sqrt(theta * c)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1).expand(-1, D), 1.0).to_event(1), obs=x)


def _sqrt_guide(x, c):
    w = pyro.param("w", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ w, 1.0))


@pytest.mark.parametrize("method", ["step", "wake_step"])
def test_non_finite_gradient_with_finite_loss(method):
    x = _data()
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(_sqrt_model, _sqrt_guide, optim)
    for _ in range(3):
        ws.step(x, torch.tensor(1.0))
    c = torch.tensor(0.0)
    losses = ws.evaluate_loss(x, c)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses)  # the loss itself is finite
    message = assert_fails_atomically(
        lambda: getattr(ws, method)(x, c),
        NonFiniteLossError,
        ["Step 3", "gradient of parameter 'theta'"],
        optims=[optim],
        ws=ws,
    )
    assert "loss" not in message.split("gradient")[0]  # no loss is blamed
    assert "'w'" not in message


def test_non_finite_guide_gradient_in_sleep_step():
    """A NaN gradient of a guide parameter in the sleep phase is caught too."""

    def guide(x, c):
        w = pyro.param("w", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.sqrt(w * c), 1.0))

    def model(x, c):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1).expand(-1, D), 1.0).to_event(1), obs=x)

    x = _data()
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(model, guide, optim)
    ws.sleep_step(x, torch.tensor(1.0))
    ws.sleep_step(x, torch.tensor(1.0))
    assert_fails_atomically(
        lambda: ws.sleep_step(x, torch.tensor(0.0)),
        NonFiniteLossError,
        ["Step 2", "gradient of parameter 'w'"],
        optims=[optim],
        ws=ws,
    )


def test_model_guide_traces_are_not_left_blocked():
    """After a failing step, a plain trace of the model runs normally (no handler leaks)."""
    ws = WakeSleep(model_reading_global, good_guide, pyro.optim.Adam({"lr": 0.1}))
    with pytest.raises(FantasyError):
        ws.step(_data())
    trace = poutine.trace(good_model).get_trace(_data())
    assert {"z", "x", "loc"} <= set(trace.nodes)


def test_observation_shape_broadcast_by_the_model_is_named():
    """A likelihood whose shape is smaller than the data (obs broadcast against it) gives
    fantasies of another shape than the data: a clear error naming the site, nothing changed."""

    def model(x):
        loc = pyro.param("loc", torch.zeros(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1), obs=x)

    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(model, good_guide, optim)
    ws.wake_step(_data())  # the wake phase is fine: log_prob broadcasts
    assert_fails_atomically(lambda: ws.step(_data()), ValueError, ["'x'"], optims=[optim], ws=ws)


# ---------------------------------------------------------------- validation after step 0


def _bernoulli_model(x):
    logits = pyro.param("logits", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Bernoulli(logits=logits + z.unsqueeze(-1)).to_event(1), obs=x)


def _bernoulli_guide(x):
    w = pyro.param("w", torch.zeros(D))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Bernoulli(logits=x @ w))


@pytest.mark.parametrize("full_validation", [False, True])
def test_observed_value_outside_support_after_good_steps(full_validation):
    """Later steps run without Pyro's per-sample checks, but still refuse data outside the
    support (a Bernoulli observed at 2 has a finite log-density, so the finiteness check alone
    would not see it)."""
    x = torch.bernoulli(torch.full((N, D), 0.5))
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(_bernoulli_model, _bernoulli_guide, optim, full_validation=full_validation)
    ws.step(x)
    ws.step(x)
    x_bad = x.clone()
    x_bad[1, 2] = 2.0
    words = ["'x'"] if not full_validation else ["support"]
    assert_fails_atomically(lambda: ws.step(x_bad), ValueError, words, optims=[optim], ws=ws)
    # masked-out entries are not checked
    ws_masked = WakeSleep(
        poutine.mask(_bernoulli_model, mask=torch.arange(N) != 1), _bernoulli_guide, optim
    )
    ws_masked.step(x)
    ws_masked.step(x_bad)


def test_later_steps_skip_pyro_sample_validation_but_not_the_first():
    """Pyro's distribution validation runs on step 0 (and on every step with
    full_validation=True); later steps build the distributions without it."""
    seen = []

    def model(x):
        _bernoulli_model(x)
        seen.append(dist.Bernoulli(0.5)._validate_args)

    x = torch.bernoulli(torch.full((N, D), 0.5))
    for full, expected in ((False, [True, False, False]), (True, [True, True, True])):
        pyro.clear_param_store()
        seen.clear()
        ws = WakeSleep(model, _bernoulli_guide, pyro.optim.Adam({"lr": 0.1}), full_validation=full)
        for _ in range(3):
            ws.step(x)
        # the model runs twice per step (wake and sleep): one entry per step
        assert seen[-6:][::2] == expected
    assert dist.Bernoulli(0.5)._validate_args  # the global setting is restored


def test_invalid_distribution_argument_on_a_later_step_is_still_reported():
    """A parameter that leaves its constraint after step 0 gives a NaN log-density, which the
    finiteness check reports by site."""

    def model(x, scale):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = z.unsqueeze(-1) + pyro.param("loc", torch.zeros(D))
            pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x)

    def guide(x, scale):
        good_guide(x)

    x = _data()
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(model, guide, optim)
    ws.step(x, torch.tensor(1.0))
    assert_fails_atomically(
        lambda: ws.step(x, torch.tensor(-1.0)),
        NonFiniteLossError,
        ["Step 1", "'x'"],
        optims=[optim],
        ws=ws,
    )
