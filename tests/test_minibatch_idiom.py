"""Pyro's mini-batch idiom ``with pyro.plate(..., subsample_size=B) as i: obs=data[i]``."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_wakesleep import FantasyError, WakeSleep, draw_fantasy, guide_arguments

N, B = 40, 8


def make(record):
    def model(data):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(data), subsample_size=B) as i:
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data[i])

    def guide(data):
        w = pyro.param("w", torch.tensor(0.0))
        b = pyro.param("b", torch.tensor(0.0))
        with pyro.plate("data", len(data), subsample_size=B) as i:
            record.append((i, data))
            pyro.sample("z", dist.Normal(w * data[i] + b, 0.7))

    return model, guide


def test_guide_reads_the_fantasy_rows_and_nothing_real():
    record = []
    model, guide = make(record)
    data = torch.randn(N) + 10.0  # real data far from the fantasies' scale
    trace = draw_fantasy(model, data)
    args, kwargs = guide_arguments(trace, (data,), {}, use_observations_keyword=False)
    indices = trace.nodes["data"]["value"]
    fantasy = args[0]
    assert fantasy.shape == data.shape
    assert torch.equal(fantasy[indices], trace.nodes["x"]["value"])
    others = torch.ones(N, dtype=torch.bool)
    others[indices] = False
    assert torch.all(fantasy[others] == 0)
    # The sleep phase replays the same indices, so the guide reads exactly the fantasy rows.
    poutine.trace(poutine.replay(guide, trace=trace)).get_trace(*args, **kwargs)
    seen_indices, seen_data = record[-1]
    assert torch.equal(seen_indices, indices)
    assert torch.equal(seen_data[seen_indices], trace.nodes["x"]["value"])


def test_step_trains_with_subsample_indexing():
    record = []
    model, guide = make(record)
    data = torch.randn(N) + 3.0
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.05}))
    for _ in range(1000):
        ws.step(data)
    # Exact posterior of z given x is N((loc + x) / 2, 1/2): the sleep phase must drive w
    # (the guide's slope in x) towards 1/2. After 1000 Adam steps at lr 0.05 the iterate
    # fluctuates by about 0.05 around its target (Adam's step size), so 0.15 is 3 steps wide.
    assert abs(pyro.param("w").item() - 0.5) < 0.15


def test_computed_observation_is_refused():
    def model(data):
        with pyro.plate("data", len(data), subsample_size=B) as i:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data[i] * 2.0)

    def guide(data):
        with pyro.plate("data", len(data), subsample_size=B) as i:
            pyro.sample("z", dist.Normal(data[i], 1.0))

    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.05}))
    with pytest.raises(FantasyError, match="'x'"):
        ws.step(torch.randn(N))
