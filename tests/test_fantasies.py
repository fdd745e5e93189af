"""
The sleep phase hands the model's fantasies to the guide: through an ``observations`` keyword,
by replacing the model argument passed as ``obs=`` (or a view/reshape of it), or through a
``fantasy_args`` callable; otherwise it raises FantasyError naming the site.
"""

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_store_equal, store_snapshot
from pyro import poutine

from pyro_wakesleep import (
    FantasyError,
    WakeSleep,
    draw_fantasy,
    fantasy_observations,
    guide_arguments,
)

N, D = 5, 3
REAL = -5.0  # the real data sit far from any fantasy (which centre on +3)


def _real(shape=(N, D)):
    return torch.full(shape, REAL) + 0.01 * torch.randn(shape)


def _optim():
    return pyro.optim.Adam({"lr": 0.05})


# ---------------------------------------------------------------- (a) observations keyword


def _observations_pair(calls):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = z.unsqueeze(-1) + 3.0 + torch.zeros(D)
            pixels = pyro.sample("pixels", dist.Normal(loc, 0.5).to_event(1), obs=x)
        calls.append(("model", pixels.detach().clone(), z.detach().clone()))

    def guide(x, observations=None):
        w = pyro.param("w", torch.full((D,), 0.1))
        seen = x if observations is None else observations["pixels"]
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(seen @ w, 1.0))
        calls.append(("guide", x, observations, z.detach().clone()))

    return model, guide


@pytest.mark.parametrize(
    "num_sleep_particles, vectorize, max_plate_nesting",
    [(1, True, None), (3, True, None), (3, True, 1), (3, False, None)],
)
def test_observations_keyword_receives_the_fantasy(
    num_sleep_particles, vectorize, max_plate_nesting
):
    calls = []
    model, guide = _observations_pair(calls)
    x = _real()
    ws = WakeSleep(
        model,
        guide,
        _optim(),
        num_sleep_particles=num_sleep_particles,
        vectorize_particles=vectorize,
        max_plate_nesting=max_plate_nesting,
    )
    loss = ws.sleep_step(x)
    assert math.isfinite(loss)
    sleep_guides = [c for c in calls if c[0] == "guide" and c[2] is not None]
    n = 1 if vectorize else num_sleep_particles
    assert len(sleep_guides) == n
    # the fantasy of each guide call is drawn by the model call just before it
    models = [c for c in calls if c[0] == "model"][-n:]
    for (_, fantasy_x, fantasy_z), (_, guide_x, observations, guide_z) in zip(models, sleep_guides):
        assert set(observations) == {"pixels"}
        seen = observations["pixels"]
        assert torch.equal(seen, fantasy_x)
        assert torch.equal(guide_z, fantasy_z)  # the guide is scored at the fantasy latent
        assert guide_x is x  # the data argument itself is passed through untouched
        assert (seen - x).abs().min() > 0.5  # ... but the guide reads a fantasy, not x
        if vectorize and num_sleep_particles > 1:
            assert seen.shape == (num_sleep_particles, N, D)
            for s in range(1, num_sleep_particles):
                assert not torch.equal(seen[0], seen[s])
        else:
            assert seen.shape == (N, D)
    if not vectorize and num_sleep_particles > 1:
        fantasies = [obs["pixels"] for _, _, obs, _ in sleep_guides]
        assert not torch.equal(fantasies[0], fantasies[1])


def test_observations_keyword_during_step_and_wake():
    """In the wake phase the guide gets the real data (observations left at its default)."""
    calls = []
    model, guide = _observations_pair(calls)
    x = _real()
    ws = WakeSleep(model, guide, _optim())
    ws.wake_step(x)
    guides = [c for c in calls if c[0] == "guide"]
    assert len(guides) == 1 and guides[0][2] is None and guides[0][1] is x
    calls.clear()
    ws.step(x)
    guides = [c for c in calls if c[0] == "guide"]
    assert [c[2] is None for c in guides] == [True, False]


# ---------------------------------------------------------------- (b) the argument passed as obs=


def _argument_pair(calls, make_obs, keyword):
    """A model whose observation is ``make_obs(argument)``; the guide reads the argument."""

    def body(x, k):
        flat = make_obs(x)
        with pyro.plate("data", flat.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = z.unsqueeze(-1) + k + torch.zeros(flat.shape[-1])
            pixels = pyro.sample("pixels", dist.Normal(loc, 0.5).to_event(1), obs=flat)
        calls.append(("model", pixels.detach().clone()))

    def guide_body(x, k):
        w = pyro.param("w", torch.tensor(0.1))
        calls.append(("guide", x, k))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(w * x.reshape(x.shape[0], -1).mean(-1), 1.0))

    if keyword:

        def model(k, *, data):
            body(data, k)

        def guide(k, *, data):
            guide_body(data, k)

    else:

        def model(x, k):
            body(x, k)

        def guide(x, k):
            guide_body(x, k)

    return model, guide


ARGUMENT_CASES = {
    "positional": (lambda x: x, (N, D), False),
    "keyword": (lambda x: x, (N, D), True),
    "reshape": (lambda x: x.reshape(-1, 16), (N, 4, 4), False),
    "view": (lambda x: x.view(x.shape[0], 16), (N, 4, 4), False),
    "keyword_reshape": (lambda x: x.reshape(-1, 16), (N, 4, 4), True),
    "flatten": (lambda x: x.flatten(1), (N, 2, 2, 2), False),
}


@pytest.mark.parametrize("num_sleep_particles", [1, 2])
@pytest.mark.parametrize("case", list(ARGUMENT_CASES))
def test_argument_passed_as_obs_is_replaced_by_the_fantasy(case, num_sleep_particles):
    make_obs, shape, keyword = ARGUMENT_CASES[case]
    calls = []
    model, guide = _argument_pair(calls, make_obs, keyword)
    x, k = _real(shape), torch.tensor(3.0)
    ws = WakeSleep(model, guide, _optim(), num_sleep_particles=num_sleep_particles)
    args, kwargs = ((k,), {"data": x}) if keyword else ((x, k), {})
    loss = ws.sleep_step(*args, **kwargs)
    assert math.isfinite(loss)
    assert [c[0] for c in calls] == ["model", "guide"] * num_sleep_particles
    for (_, fantasy), (_, seen, seen_k) in zip(calls[0::2], calls[1::2]):
        assert seen.shape == x.shape and seen.dtype == x.dtype
        assert torch.equal(seen.reshape(fantasy.shape), fantasy)
        assert (seen - x).abs().min() > 0.5
        assert seen_k is k  # other arguments pass through untouched
    assert torch.equal(x, calls[1][1]) is False
    # step() uses the same route
    calls.clear()
    ws.step(*args, **kwargs)
    guides = [c for c in calls if c[0] == "guide"]
    assert guides[0][1] is x  # wake: the real data
    assert all(c[1] is not x for c in guides[1:])  # sleep: fantasies


def test_integer_argument_gets_an_integer_fantasy():
    calls = []

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5))
            probs = (0.1 + 0.8 * z).unsqueeze(-1).expand(-1, D)
            pixels = pyro.sample("pixels", dist.Bernoulli(probs).to_event(1), obs=x)
        calls.append(pixels)

    def guide(x):
        calls.append(x)
        logit = pyro.param("a", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logit * x.sum(-1)))

    # Bernoulli accepts an integer obs; the guide gets the fantasy in the argument's dtype.
    x = torch.zeros(N, D, dtype=torch.long)
    pyro.enable_validation(False)
    try:
        ws = WakeSleep(model, guide, _optim())
        ws.sleep_step(x)
    finally:
        pyro.enable_validation(True)
    fantasy, seen = calls
    assert seen.dtype == torch.long and seen.shape == x.shape
    assert torch.equal(seen, fantasy.long())


def test_mini_batch_idiom_fills_only_the_subsampled_rows():
    """obs=x[i] inside pyro.plate(..., subsample_size=B) as i: the guide gets an array like x
    with the fantasy in rows i and zeros elsewhere: none of the real data."""
    calls = []
    B = 3

    def model(x):
        with pyro.plate("data", x.shape[0], subsample_size=B) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = z.unsqueeze(-1) + 3.0 + torch.zeros(D)
            pixels = pyro.sample("pixels", dist.Normal(loc, 0.5).to_event(1), obs=x[i])
        calls.append(("model", i.clone(), pixels.detach().clone()))

    def guide(x):
        w = pyro.param("w", torch.full((D,), 0.1))
        calls.append(("guide", x))
        with pyro.plate("data", x.shape[0], subsample_size=B) as i:
            pyro.sample("z", dist.Normal(x[i] @ w, 1.0))

    x = _real((8, D))
    ws = WakeSleep(model, guide, _optim())
    ws.sleep_step(x)
    (_, i, fantasy), (_, seen) = calls
    assert seen.shape == x.shape
    assert torch.equal(seen[i], fantasy)
    rest = torch.ones(8, dtype=torch.bool)
    rest[i] = False
    assert torch.equal(seen[rest], torch.zeros(8 - B, D))
    assert (seen - x).abs().min() > 0.5


# ---------------------------------------------------------------- (c) fantasy_args


def _doubled_pair(calls):
    """The model observes 2 * x, which is not a view of any argument."""

    def model(x, offset=0.0):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = z.unsqueeze(-1) + 3.0 + offset + torch.zeros(D)
            pixels = pyro.sample("pixels", dist.Normal(loc, 0.5).to_event(1), obs=2 * x)
        calls.append(("model", pixels.detach().clone()))

    def guide(x, offset=0.0):
        w = pyro.param("w", torch.full((D,), 0.1))
        calls.append(("guide", x, offset))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(2 * x @ w, 1.0))

    return model, guide


@pytest.mark.parametrize("num_sleep_particles", [1, 3])
def test_fantasy_args_builds_the_guide_arguments(num_sleep_particles):
    calls, received = [], []
    model, guide = _doubled_pair(calls)

    def fantasy_args(observations, x, offset=0.0):
        received.append((observations, x, offset))
        return (observations["pixels"] / 2,), {"offset": offset}

    x = _real()
    ws = WakeSleep(
        model,
        guide,
        _optim(),
        fantasy_args=fantasy_args,
        num_sleep_particles=num_sleep_particles,
    )
    ws.sleep_step(x, offset=1.0)
    assert len(received) == num_sleep_particles
    models = [c for c in calls if c[0] == "model"]
    guides = [c for c in calls if c[0] == "guide"]
    for (observations, real_x, offset), (_, fantasy), (_, seen, seen_offset) in zip(
        received, models, guides
    ):
        assert set(observations) == {"pixels"}
        assert torch.equal(observations["pixels"], fantasy)
        assert real_x is x and offset == 1.0
        assert torch.equal(seen, fantasy / 2) and seen_offset == 1.0


def test_fantasy_args_not_called_when_the_argument_is_found():
    def fantasy_args(observations, *args, **kwargs):
        raise AssertionError("fantasy_args should not be needed")

    calls = []
    model, guide = _argument_pair(calls, lambda x: x, keyword=False)
    ws = WakeSleep(model, guide, _optim(), fantasy_args=fantasy_args)
    losses = ws.step(_real(), torch.tensor(3.0))
    assert math.isfinite(losses.phi)


@pytest.mark.parametrize("bad", [None, ((), {}, 1), [(), {}], "x"])
def test_fantasy_args_bad_return_value(bad):
    model, guide = _doubled_pair([])
    ws = WakeSleep(model, guide, _optim(), fantasy_args=lambda observations, *a, **k: bad)
    with pytest.raises(FantasyError, match=r"fantasy_args must return a pair \(args, kwargs\)"):
        ws.step(_real())
    assert list(pyro.get_param_store().keys()) == []


# ---------------------------------------------------------------- obs the guide cannot see

_GLOBAL = torch.full((N, D), REAL)


def _unseen_model(make_obs, in_plate, bernoulli=False):
    def model(x):
        obs = make_obs(x)
        if in_plate:
            with pyro.plate("data", obs.shape[0]):
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
                _likelihood(z.reshape(z.shape + (1,) * (obs.dim() - 1)), obs, 1, bernoulli)
        else:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            _likelihood(z, obs, 0, bernoulli)

    return model


def _likelihood(z, obs, batch_dims, bernoulli):
    shape = obs.shape[batch_dims:]
    if bernoulli:
        fn = dist.Bernoulli(logits=z + torch.zeros(shape))
    else:
        fn = dist.Normal(z + torch.zeros(shape), 1.0)
    pyro.sample("pixels", fn.to_event(len(shape)), obs=obs)


def _unseen_guide(in_plate):
    def guide(x):
        w = pyro.param("w", torch.tensor(0.1))
        if in_plate:
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(w * x.float().sum(-1), 1.0))
        else:
            pyro.sample("z", dist.Normal(w * x.float().sum(), 1.0))

    return guide


UNSEEN_CASES = {
    # name: (make_obs, data, bernoulli likelihood)
    "times_one": (lambda x: x * 1.0, lambda: _real(), False),
    "slice": (lambda x: x[..., :2], lambda: _real(), False),
    "float_of_int": (lambda x: x.float(), lambda: torch.ones(N, D, dtype=torch.long), True),
    "global": (lambda x: _GLOBAL, lambda: _real(), False),
    "flip": (lambda x: x.flip(0), lambda: _real(), False),
}


@pytest.mark.parametrize("in_plate", [False, True], ids=["no_plate", "plate"])
@pytest.mark.parametrize("case", list(UNSEEN_CASES))
def test_observation_not_an_argument_raises(case, in_plate):
    if case == "times_one" and in_plate:
        # Inside a plate, obs equal row for row to x[indices] is Pyro's indexing idiom
        # (obs=x[i]); test_value_equal_observation_in_a_plate_gets_the_fantasy covers it.
        return
    make_obs, data, bernoulli = UNSEEN_CASES[case]
    model = _unseen_model(make_obs, in_plate, bernoulli)
    guide = _unseen_guide(in_plate)
    x = data()
    for method in ("step", "sleep_step"):
        ws = WakeSleep(model, guide, _optim())
        before = store_snapshot()
        with pytest.raises(FantasyError) as info:
            getattr(ws, method)(x)
        message = str(info.value)
        assert "observed site 'pixels'" in message
        assert "fantasy_args" in message and "observations" in message
        assert_store_equal(before)
    # the wake phase alone is fine, and so is the same model with fantasy_args
    WakeSleep(model, guide, _optim()).wake_step(x)
    ws = WakeSleep(model, guide, _optim(), fantasy_args=lambda obs, x: ((obs["pixels"],), {}))
    assert math.isfinite(ws.sleep_step(x))


def test_value_equal_observation_in_a_plate_gets_the_fantasy():
    model = _unseen_model(lambda x: x * 1.0, in_plate=True)
    x = _real()
    trace = draw_fantasy(model, x)
    args, _ = guide_arguments(trace, (x,), {}, use_observations_keyword=False)
    assert torch.equal(args[0], trace.nodes["pixels"]["value"])
    assert not torch.equal(args[0], x)
    assert math.isfinite(WakeSleep(model, _unseen_guide(True), _optim()).sleep_step(x))


# ---------------------------------------------------------------- S fantasies are averaged


def _bernoulli_pair(record, with_observations, a=0.3, b=-0.2, constant_guide=False):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.3))
            pyro.sample("pixels", dist.Normal(4.0 * z, 1.0), obs=x)

    def body(x, observations):
        seen = x if observations is None else observations["pixels"]
        with pyro.plate("data", x.shape[0]):
            if constant_guide:
                fn = dist.Bernoulli(0.5)
            else:
                logits = pyro.param("a", torch.tensor(a)) + pyro.param("b", torch.tensor(b)) * seen
                fn = dist.Bernoulli(logits=logits)
            z = pyro.sample("z", fn)
        record.append(fn.log_prob(z).detach().sum(-1))  # one sum per fantasy

    if with_observations:

        def guide(x, observations=None):
            body(x, observations)

    else:

        def guide(x):
            body(x, None)

    return model, guide


@pytest.mark.parametrize("with_observations", [True, False])
@pytest.mark.parametrize("vectorize", [True, False])
@pytest.mark.parametrize("S", [1, 4])
def test_sleep_loss_is_the_mean_over_fantasies_closed_form(S, vectorize, with_observations):
    """With q(z | x) = Bernoulli(1/2), log q = -N log 2 at every fantasy: the sleep loss is
    N log 2 whatever the number of fantasies S (a sum would give S N log 2)."""
    model, guide = _bernoulli_pair([], with_observations, constant_guide=True)
    x = torch.randn(N)
    ws = WakeSleep(model, guide, _optim(), num_sleep_particles=S, vectorize_particles=vectorize)
    expected = N * math.log(2.0)
    assert ws.sleep_step(x) == pytest.approx(expected, rel=1e-6)
    assert ws.evaluate_loss(x).phi == pytest.approx(expected, rel=1e-6)
    assert ws.step(x).phi == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("with_observations", [True, False])
@pytest.mark.parametrize("vectorize", [True, False])
def test_sleep_loss_is_the_mean_over_fantasies_recorded(vectorize, with_observations):
    S = 6
    record = []
    model, guide = _bernoulli_pair(record, with_observations)
    x = torch.randn(N)
    ws = WakeSleep(
        model,
        guide,
        _optim(),
        num_sleep_particles=S,
        vectorize_particles=vectorize,
        max_plate_nesting=1,
    )
    loss = ws.sleep_step(x)
    per_fantasy = torch.cat([r.reshape(-1) for r in record])
    assert per_fantasy.shape == (S,)
    assert len(set(per_fantasy.tolist())) > 1  # the S fantasies differ
    assert loss == pytest.approx(-per_fantasy.mean().item(), rel=1e-5)


# ---------------------------------------------------------------- public functions


def _public_model(x):
    loc = pyro.param("loc", torch.tensor(3.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("pixels", dist.Normal(z.unsqueeze(-1) + torch.zeros(D), 0.5).to_event(1), obs=x)


def test_draw_fantasy():
    x = _real()
    trace = draw_fantasy(_public_model, x)
    site = trace.nodes["pixels"]
    assert site["infer"]["was_observed"] is True
    assert site["infer"]["obs"] is x
    assert not site["is_observed"]
    assert site["value"].shape == x.shape
    assert (site["value"] - x).abs().min() > 0.5
    assert not site["value"].requires_grad  # drawn without gradients
    z = trace.nodes["z"]
    assert not z["infer"].get("was_observed") and not z["value"].requires_grad
    # the model itself is untouched: a plain trace still observes x
    plain = poutine.trace(_public_model).get_trace(x)
    assert plain.nodes["pixels"]["is_observed"] and plain.nodes["pixels"]["value"] is x


def test_fantasy_observations():
    x = _real()
    trace = draw_fantasy(_public_model, x)
    observations = fantasy_observations(trace)
    assert set(observations) == {"pixels"}
    assert observations["pixels"] is trace.nodes["pixels"]["value"]


def _factor_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("pixels", dist.Normal(z, 1.0), obs=x)
        pyro.factor("penalty", -(z**2))


def _factor_guide(x):
    w = pyro.param("w", torch.tensor(0.1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(w * x, 1.0))


def test_factor_has_no_fantasy():
    x = torch.randn(N)
    trace = draw_fantasy(_factor_model, x)
    with pytest.raises(FantasyError, match="'penalty'") as info:
        fantasy_observations(trace)
    assert "phi_objective='wake'" in str(info.value)
    ws = WakeSleep(_factor_model, _factor_guide, _optim())
    with pytest.raises(FantasyError, match="'penalty'"):
        ws.step(x)
    assert list(pyro.get_param_store().keys()) == []
    ws = WakeSleep(_factor_model, _factor_guide, _optim(), phi_objective="wake", num_particles=2)
    assert all(math.isfinite(v) for v in ws.step(x))


def test_guide_arguments_observations_keyword():
    x, k = _real(), torch.tensor(1.0)
    trace = draw_fantasy(_public_model, x)
    kwargs = {"extra": 3}
    kwargs_copy = copy.copy(kwargs)
    args, new_kwargs = guide_arguments(trace, (x, k), kwargs, use_observations_keyword=True)
    assert args[0] is x and args[1] is k
    assert set(new_kwargs) == {"extra", "observations"} and new_kwargs["extra"] == 3
    assert new_kwargs["observations"]["pixels"] is trace.nodes["pixels"]["value"]
    assert kwargs == kwargs_copy  # the caller's dict is not modified


def test_guide_arguments_replaces_the_argument():
    x, k = _real(), torch.tensor(1.0)
    trace = draw_fantasy(_public_model, x)
    fantasy = trace.nodes["pixels"]["value"]
    args, kwargs = guide_arguments(trace, (x, k), {}, use_observations_keyword=False)
    assert torch.equal(args[0], fantasy) and args[1] is k and kwargs == {}

    def keyword_model(*, data):
        _public_model(data)

    trace = draw_fantasy(keyword_model, data=x)
    real_kwargs = {"data": x}
    args, kwargs = guide_arguments(trace, (), real_kwargs, use_observations_keyword=False)
    assert args == () and torch.equal(kwargs["data"], trace.nodes["pixels"]["value"])
    assert real_kwargs["data"] is x


def test_guide_arguments_fantasy_args_and_error():
    def model(x):
        _public_model(x * 2.0)

    x = _real()
    trace = draw_fantasy(model, x)
    with pytest.raises(FantasyError, match="observed site 'pixels'"):
        guide_arguments(trace, (x,), {}, use_observations_keyword=False)
    seen = []

    def fantasy_args(observations, *args, **kwargs):
        seen.append((observations, args, kwargs))
        return (observations["pixels"],), {"flag": True}

    args, kwargs = guide_arguments(
        trace, (x,), {}, use_observations_keyword=False, fantasy_args=fantasy_args
    )
    assert args[0] is trace.nodes["pixels"]["value"] and kwargs == {"flag": True}
    assert seen[0][1][0] is x
