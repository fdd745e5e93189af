"""
Valid and invalid model/guide structures, after the patterns of Pyro's own
``tests/infer/test_valid_models.py`` that apply to wake-sleep: each model here observes data,
passed as its argument as a wake-sleep model takes it (so that the sleep phase can hand the
guide its fantasy). WakeSleep runs the valid ones and refuses the invalid ones with a message
that names the site or plate, as Pyro's ELBOs do.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_wakesleep import WakeSleep

pytestmark = pytest.mark.usefixtures("one_thread")

OBS = torch.tensor(0.3)


def _step(model, guide, data, **options):
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 1e-3}), **options)
    losses = ws.step(data)
    assert all(math.isfinite(v) for v in losses), losses
    return ws


ESTIMATORS = [
    pytest.param({}, id="classic"),
    pytest.param({"num_particles": 3, "phi_objective": "wake"}, id="rws"),
    pytest.param({"num_particles": 3, "vectorize_particles": False}, id="sequential"),
]


def _p():
    return pyro.param("p", torch.tensor(0.4), constraint=dist.constraints.unit_interval)


# ---------------------------------------------------------------- valid structures


@pytest.mark.parametrize("options", ESTIMATORS)
def test_latent_free_model_with_empty_guide(options):
    def model(data):
        loc = pyro.param("loc", torch.zeros(2))
        pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=data)

    def guide(data):
        pass

    _step(model, guide, torch.ones(2), **options)


@pytest.mark.parametrize("subsample_size", [None, 2], ids=["full", "subsample"])
@pytest.mark.parametrize("options", ESTIMATORS)
def test_sequential_plate(options, subsample_size):
    def model(data):
        for i in pyro.plate("seq", 4, subsample_size):
            z = pyro.sample(f"z_{i}", dist.Bernoulli(0.5))
            pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=data[i])

    def guide(data):
        p = _p()
        for i in pyro.plate("seq", 4, subsample_size):
            pyro.sample(f"z_{i}", dist.Bernoulli(p * 0 + torch.sigmoid(data[i])))

    _step(model, guide, torch.tensor([0.0, 1.0, 1.0, 0.0]), **options)


@pytest.mark.parametrize("subsample_size", [None, 5], ids=["full", "subsample"])
@pytest.mark.parametrize("options", ESTIMATORS)
def test_vectorized_plate(options, subsample_size):
    def model(data):
        with pyro.plate("data", 10, subsample_size) as idx:
            z = pyro.sample("z", dist.Bernoulli(0.5).expand([len(idx)]))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])

    def guide(data):
        p = _p()
        with pyro.plate("data", 10, subsample_size) as idx:
            pyro.sample("z", dist.Bernoulli(p * torch.sigmoid(data[idx])))

    _step(model, guide, torch.arange(10.0) / 10, **options)


@pytest.mark.parametrize("options", ESTIMATORS)
def test_plate_without_a_size(options):
    def model(data):
        with pyro.plate("data"):
            z = pyro.sample("z", dist.Bernoulli(0.5).expand([6]))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    def guide(data):
        p = _p()
        with pyro.plate("data"):
            pyro.sample("z", dist.Bernoulli(p * torch.sigmoid(data)))

    _step(model, guide, torch.zeros(6), **options)


@pytest.mark.parametrize("options", ESTIMATORS)
def test_two_sequential_plates_iterated_in_either_order(options):
    def model(data):
        rows, cols = pyro.plate("rows", 2), pyro.plate("cols", 2)
        for i in rows:
            for j in cols:
                z = pyro.sample(f"z_{i}_{j}", dist.Bernoulli(0.5))
                pyro.sample(f"x_{i}_{j}", dist.Normal(z, 1.0), obs=data[i, j])

    def guide(data):
        p = _p()
        rows, cols = pyro.plate("rows", 2), pyro.plate("cols", 2)
        for j in cols:
            for i in rows:
                pyro.sample(f"z_{i}_{j}", dist.Bernoulli(p * torch.sigmoid(data[i, j])))

    _step(model, guide, torch.zeros(2, 2), **options)


@pytest.mark.parametrize("options", ESTIMATORS)
def test_nested_and_reused_plates(options):
    def model(data):
        p = torch.tensor(0.5)
        outer = pyro.plate("outer", 5, dim=-1)
        inner = pyro.plate("inner", 6, dim=-2)
        with outer:
            a = pyro.sample("a", dist.Bernoulli(p).expand([5]))
        with inner:
            b = pyro.sample("b", dist.Bernoulli(p).expand([6, 1]))
        with outer, inner:
            pyro.sample("obs", dist.Normal(a + b, 1.0), obs=data)

    def guide(data):
        p = _p()
        outer = pyro.plate("outer", 5, dim=-1)
        inner = pyro.plate("inner", 6, dim=-2)
        with outer:
            pyro.sample("a", dist.Bernoulli(p * torch.sigmoid(data.mean(-2))))
        with inner:
            pyro.sample("b", dist.Bernoulli(p * torch.sigmoid(data.mean(-1, keepdim=True))))

    _step(model, guide, torch.zeros(6, 5), **options)


@pytest.mark.parametrize("options", ESTIMATORS)
def test_sequential_plate_inside_a_vectorized_one(options):
    def model(data):
        with pyro.plate("data", 3):
            for i in pyro.plate("seq", 2):
                z = pyro.sample(f"z_{i}", dist.Bernoulli(0.5).expand([3]))
                pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=data[i])

    def guide(data):
        p = _p()
        with pyro.plate("data", 3):
            for i in pyro.plate("seq", 2):
                pyro.sample(f"z_{i}", dist.Bernoulli(p * torch.sigmoid(data[i])))

    _step(model, guide, torch.zeros(2, 3), **options)


# ---------------------------------------------------------------- invalid structures


def _refused(model, guide, match, **options):
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 1e-3}), **options)
    with pytest.raises((ValueError, RuntimeError, NotImplementedError), match=match):
        ws.step(OBS)


@pytest.mark.parametrize("options", ESTIMATORS)
def test_two_sites_of_one_name_are_refused(options):
    def model(data):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    def guide(data):
        pyro.sample("z", dist.Bernoulli(_p()))

    _refused(model, guide, "Multiple sample sites named 'z'", **options)
    _refused(
        guide_side_clash_model, guide_side_clash_guide, "Multiple sample sites named", **options
    )


def guide_side_clash_model(data):
    z = pyro.sample("z", dist.Bernoulli(0.5))
    pyro.sample("x", dist.Normal(z, 1.0), obs=data)


def guide_side_clash_guide(data):
    pyro.sample("z", dist.Bernoulli(_p()))
    pyro.sample("z", dist.Bernoulli(_p()))


@pytest.mark.parametrize("options", ESTIMATORS)
def test_event_dims_that_disagree_are_refused(options):
    def model(data):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=data)

    def guide(data):
        loc = pyro.param("loc", torch.zeros(2, 1))
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(2))

    _refused(model, guide, """site ["']z["']""", **options)


@pytest.mark.parametrize("options", ESTIMATORS)
def test_shapes_that_disagree_are_refused(options):
    def model(data):
        z = pyro.sample("z", dist.Normal(torch.zeros(1, 2), 1.0).to_event(2))
        pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=data)

    def guide(data):
        loc = pyro.param("loc", torch.zeros(2, 1))
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(2))

    _refused(model, guide, "shapes disagree at site 'z'", **options)


@pytest.mark.parametrize("options", ESTIMATORS)
def test_a_plate_in_the_guide_but_not_the_model_is_warned_about(options):
    def model(data):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    def guide(data):
        for _ in pyro.plate("only_in_guide", 3):
            pass
        pyro.sample("z", dist.Bernoulli(_p()))

    # Pyro's ELBOs warn (its own test suite turns the warning into an error).
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 1e-3}), **options)
    with pytest.warns(UserWarning, match="plate statements in guide but not model"):
        ws.step(OBS)


@pytest.mark.parametrize("options", ESTIMATORS)
def test_a_site_that_breaks_its_plate_is_refused(options):
    def model(data):
        with pyro.plate("data", 10, 5):
            z = pyro.sample("z", dist.Bernoulli(0.5).expand([2]))
            pyro.sample("x", dist.Normal(z, 1.0).expand([5]), obs=data.expand(5))

    def guide(data):
        with pyro.plate("data", 10, 5):
            pyro.sample("z", dist.Bernoulli(_p()).expand([2]))

    _refused(model, guide, "Shape mismatch inside plate", **options)
