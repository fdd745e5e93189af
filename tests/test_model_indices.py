"""
The ready-made models on mini-batches with data-point ids: ``model(x[idx], idx=idx)`` with
``num_data=N`` runs the plate ``"data"`` as ``pyro.plate("data", N, subsample=idx)`` (the ids in
the trace, every site scaled by N / B), the sleep phase hands fantasies to the guide with the
ids, memoised wake-sleep keeps its memory by those ids, and without ``idx`` nothing changes.
"""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, ReweightedWakeSleep

from pyro_wakesleep import MemoisedWakeSleepLoss, WakeSleep
from pyro_wakesleep.fantasies import draw_fantasy, guide_arguments
from pyro_wakesleep.models import GaussianHelmholtz, GaussianMixture, HelmholtzMachine
from pyro_wakesleep.objectives import sample_sites

pytestmark = pytest.mark.usefixtures("one_thread")

N, B = 30, 6
KINDS = ["helmholtz", "gaussian", "mixture"]


def make(kind, num_data=N):
    gen = torch.Generator().manual_seed(3)
    binary = (torch.rand(N, 16, generator=gen) < 0.3).float()
    if kind == "helmholtz":
        return HelmholtzMachine([16, 5, 2], num_data=num_data), binary
    if kind == "gaussian":
        return GaussianHelmholtz(16, 3, hidden=8, num_data=num_data), binary
    if kind == "mixture":
        return GaussianMixture(3, 4, hidden=8, num_data=num_data), torch.randn(N, 4, generator=gen)
    raise ValueError(kind)


IDX = torch.tensor([4, 0, 17, 29, 8, 21])


def bars(num, generator):
    """4x4 images of vertical (p = 2/3) or horizontal bars, each bar on with probability 0.2."""
    on = torch.rand(num, 4, generator=generator) < 0.2
    vertical = torch.rand(num, generator=generator) < 2 / 3
    grid = torch.where(
        vertical[:, None, None], on[:, None, :].expand(-1, 4, 4), on[:, :, None].expand(-1, 4, 4)
    )
    return grid.reshape(num, 16).float()


def snapshot():
    store = pyro.get_param_store()
    return {name: store._params[name].detach().clone() for name in store.keys()}


def changed(before, prefix):
    after = snapshot()
    return any(not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix + "$$$"))


# ------------------------------------------------------------------------------ the plate


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("program", ["model", "guide"])
def test_idx_subsamples_the_data_plate_with_scale_n_over_b(kind, program):
    net, x = make(kind)
    trace = poutine.trace(getattr(net, program)).get_trace(x[IDX], idx=IDX)
    plate = trace.nodes["data"]
    assert torch.equal(plate["value"], IDX) and plate["fn"].size == N
    sites = sample_sites(trace)
    assert sites
    for site in sites:
        (frame,) = site["cond_indep_stack"]
        assert (frame.name, frame.size, frame.full_size, frame.dim) == ("data", B, N, -1)
        assert site["scale"] == pytest.approx(N / B)
        assert site["fn"].batch_shape == (B,)


@pytest.mark.parametrize("kind", KINDS)
def test_idx_scales_the_log_density_by_n_over_b(kind):
    """The same latents, replayed: log p with idx is N / B times log p without."""
    net, x = make(kind)
    guide_trace = poutine.trace(net.guide).get_trace(x[IDX], idx=IDX)
    scaled = poutine.trace(poutine.replay(net.model, trace=guide_trace)).get_trace(x[IDX], idx=IDX)
    plain = poutine.trace(poutine.replay(net.model, trace=guide_trace)).get_trace(x[IDX])
    assert torch.allclose(scaled.log_prob_sum(), plain.log_prob_sum() * (N / B))


@pytest.mark.parametrize("kind", KINDS)
def test_without_idx_nothing_changes(kind):
    """num_data alone changes nothing: the same draws, values and densities, to the bit, as a
    model built without it (same weights, same seed), and a plate of the batch's size."""
    with_n, x = make(kind)
    without, _ = make(kind, num_data=None)
    without.load_state_dict(with_n.state_dict())
    for program in ("model", "guide"):
        traces = []
        for net in (with_n, without):
            pyro.set_rng_seed(5)
            trace = poutine.trace(getattr(net, program)).get_trace(x)
            trace.compute_log_prob()
            traces.append(trace)
        a, b = traces
        assert a.nodes["data"]["value"].tolist() == list(range(N))
        for site in sample_sites(a):
            other = b.nodes[site["name"]]
            assert torch.equal(site["value"], other["value"])
            assert torch.equal(site["log_prob"], other["log_prob"])
            assert site["scale"] == 1.0 and site["cond_indep_stack"][0].size == N
    # positionally, observations is still the second argument
    trace = poutine.trace(with_n.guide).get_trace(None, {"x": x[:4]})
    assert all(s["fn"].batch_shape == (4,) for s in sample_sites(trace))


# ------------------------------------------------------------------------------ fantasies


@pytest.mark.parametrize("kind", KINDS)
def test_fantasies_reach_the_guide_with_the_ids(kind):
    net, x = make(kind)
    args, kwargs = (x[IDX],), {"idx": IDX}
    fantasy = draw_fantasy(net.model, *args, **kwargs)
    assert torch.equal(fantasy.nodes["data"]["value"], IDX)
    guide_args, guide_kwargs = guide_arguments(fantasy, args, kwargs, use_observations_keyword=True)
    assert guide_kwargs["idx"] is IDX
    assert guide_kwargs["observations"]["x"] is fantasy.nodes["x"]["value"]
    trace = poutine.trace(net.guide).get_trace(*guide_args, **guide_kwargs)
    assert torch.equal(trace.nodes["data"]["value"], IDX)
    assert all(s["scale"] == pytest.approx(N / B) for s in sample_sites(trace))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_particles, phi_objective", [(1, "sleep"), (5, 0.5)])
def test_wakesleep_steps_with_idx(kind, num_particles, phi_objective):
    net, x = make(kind)
    ws = WakeSleep(
        net.model,
        net.guide,
        pyro.optim.Adam({"lr": 0.01}),
        num_particles=num_particles,
        num_sleep_particles=2,
        phi_objective=phi_objective,
        max_plate_nesting=net.max_plate_nesting,
    )
    ws.step(x[IDX], idx=IDX)
    before = snapshot()
    losses = [ws.step(x[IDX], idx=IDX) for _ in range(2)]
    assert all(math.isfinite(v) for step in losses for v in step)
    assert changed(before, f"{net.name}_generative") and changed(before, f"{net.name}_recognition")
    # a sleep step alone: the guide learns from fantasies drawn with the ids
    before = snapshot()
    ws.sleep_step(x[IDX], idx=IDX)
    assert changed(before, f"{net.name}_recognition")
    assert not changed(before, f"{net.name}_generative")


def test_pyro_reweighted_wake_sleep_with_idx():
    """Pyro's RWS (insomnia = 0: sleep-phi) passes idx on to the guide beside observations."""
    net, x = make("helmholtz")
    rws = ReweightedWakeSleep(num_particles=3, insomnia=0.0, max_plate_nesting=1)
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.01}), loss=rws)
    assert all(math.isfinite(v) for v in svi.step(x[IDX], idx=IDX))


# ------------------------------------------------------------------------------ memoised


def test_memoised_wakesleep_trains_helmholtz_machine_by_ids():
    """Memoised wake-sleep on bars through ws.step(x[idx], idx=idx): the memory is filled for
    the ids seen, best first, with binary values, and empty for the others."""
    num = 60
    generator = torch.Generator().manual_seed(0)
    data = bars(num, generator)
    hm = HelmholtzMachine([16, 8, 1], num_data=num)
    M, K = 3, 4
    loss = MemoisedWakeSleepLoss(memory_size=M, num_particles=K)
    ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 0.03}), loss=loss)
    assert loss.state_dict() == {}
    seen = torch.randperm(num, generator=generator)[:40]
    batches = seen.split(10)
    ws.step(data[batches[0]], idx=batches[0])  # creates the parameters
    before = snapshot()
    for batch in batches[1:]:
        losses = ws.step(data[batch], idx=batch)
        assert all(math.isfinite(v) for v in losses)
    assert changed(before, "helmholtz_generative") and changed(before, "helmholtz_recognition")
    state = loss.state_dict()
    scores, values = state["scores"], state["values"]
    assert scores.shape == (num, M)
    assert {k: tuple(v.shape) for k, v in values.items()} == {
        "z1": (num, M, 8),
        "z2": (num, M, 1),
    }
    unseen = torch.ones(num, dtype=torch.bool)
    unseen[seen] = False
    assert (scores[unseen] == -math.inf).all()
    filled = scores[seen]
    assert torch.isfinite(filled[:, 0]).all()  # each seen point holds at least one entry
    assert (filled[:, :-1] >= filled[:, 1:]).all()  # best first (-inf last)
    for v in values.values():
        assert set(v[seen].unique().tolist()) <= {0.0, 1.0}
    # the entries of a data point are distinct latent values
    keys = torch.cat([values["z1"], values["z2"]], -1)[seen]
    for row, row_scores in zip(keys, filled):
        kept = row[torch.isfinite(row_scores)]
        assert len(kept.unique(dim=0)) == len(kept)


def test_memoised_loss_refuses_a_model_built_for_another_num_data():
    hm = HelmholtzMachine([16, 8, 1], num_data=50)
    loss = MemoisedWakeSleepLoss(memory_size=2, num_particles=2, num_data=60)
    ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 0.01}), loss=loss)
    x = torch.zeros(5, 16)
    with pytest.raises(ValueError, match="num_data"):
        ws.step(x, idx=torch.arange(5))


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("program", ["model", "guide"])
def test_refusals(kind, program):
    net, x = make(kind, num_data=None)
    fn = getattr(net, program)
    with pytest.raises(ValueError, match="idx.*num_data"):
        fn(x[IDX], idx=IDX)
    net, x = make(kind)
    fn = getattr(net, program)
    with pytest.raises(ValueError, match=r"idx .*batch has 5 rows.*shape \(6,\)"):
        fn(x[:5], idx=IDX)
    with pytest.raises(ValueError, match="1-D"):
        fn(x[IDX], idx=IDX[None])
    with pytest.raises(TypeError, match="idx="):
        fn(x[IDX], IDX)  # the second positional argument is observations
    with pytest.raises(ValueError, match="num_data"):
        make(kind, num_data=0)
