"""
Memoised wake-sleep (MemoisedWakeSleepLoss, driven by WakeSleep) on a model whose posterior can
be enumerated: z holds 3 binary latents per data point (8 values), x | z is Gaussian around
z @ W. The memory must hold the exact top-M posterior values; with M = 8 (the whole support)
the model's parameters must reach the maximum-likelihood values; the memory survives a
checkpoint bitwise; bad data-point ids and failed steps leave the memory as it was.
"""

import itertools

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_store_equal, store_snapshot
from pyro.distributions import constraints
from pyro.infer import SVI

from pyro_wakesleep import (
    CheckpointError,
    MemoisedWakeSleepLoss,
    NonFiniteLossError,
    WakeSleep,
    WakeSleepLoss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

L, D = 3, 4  # binary latents and observed dimensions per data point
W = torch.tensor([[2.0, 0.0, -1.0, 1.0], [0.0, 1.5, 1.0, -1.0], [1.0, 1.0, 0.0, 2.0]])
CONFIGS = torch.tensor(list(itertools.product([0.0, 1.0], repeat=L)))  # (8, L)


def programs(num_data, learn=False, pi=0.3, sigma=0.7):
    """The model (prior probability pi and noise sigma fixed, or learned from 0.5 and 1.0) and
    an amortized guide whose logits start at zero (uniform over the 8 values)."""

    def model(x, idx):
        p, s = torch.tensor(pi), torch.tensor(sigma)
        if learn:
            p = pyro.param("pi", torch.tensor(0.5), constraint=constraints.unit_interval)
            s = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", num_data, subsample=idx):
            z = pyro.sample("z", dist.Bernoulli(p).expand([L]).to_event(1))
            pyro.sample("x", dist.Normal(z @ W, s).to_event(1), obs=x)

    def guide(x, idx):
        a = pyro.param("a", torch.zeros(D, L))
        c = pyro.param("c", torch.zeros(L))
        with pyro.plate("data", num_data, subsample=idx):
            pyro.sample("z", dist.Bernoulli(logits=x @ a + c).to_event(1))

    return model, guide


def data(num_data, pi=0.3, sigma=0.7, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.bernoulli(torch.full((num_data, L), pi), generator=g)
    return z @ W + sigma * torch.randn(num_data, D, generator=g)


def log_joint(x, pi, sigma):
    """Exact log p(x_n, z) for every data point and each of the 8 values of z: (N, 8)."""
    prior = dist.Bernoulli(pi).expand([L]).to_event(1).log_prob(CONFIGS)
    return prior + dist.Normal(CONFIGS @ W, sigma).to_event(1).log_prob(x[:, None, :])


def test_the_memory_holds_the_top_m_posterior_values():
    N, M = 6, 3
    x = data(N)
    model, guide = programs(N)
    loss = MemoisedWakeSleepLoss(memory_size=M, num_particles=4, num_data=N)
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    for _ in range(30):
        idx = torch.randperm(N)[:3]
        ws.step(x[idx], idx)
    memory = loss.state_dict()
    assert memory["scores"].shape == (N, M) and memory["values"]["z"].shape == (N, M, L)
    exact = log_joint(x, torch.tensor(0.3), torch.tensor(0.7)).sort(1, descending=True)
    # The same values, in the same order (best first; no ties: x is continuous).
    assert torch.equal(memory["values"]["z"], CONFIGS[exact.indices[:, :M]])
    # The scores are log p(x, z) of the fixed model, summed by Pyro in another order than
    # here: float32 rounding on terms of magnitude < 100 (a few 1e-6 relative).
    torch.testing.assert_close(memory["scores"], exact.values[:, :M], rtol=1e-5, atol=1e-4)


def test_the_model_reaches_the_maximum_likelihood_when_the_memory_covers_the_posterior():
    N = 20
    x = data(N)
    # The MLE of (pi, sigma) from the exact marginal likelihood, by L-BFGS on the enumeration.
    u = torch.zeros(2, requires_grad=True)
    lbfgs = torch.optim.LBFGS([u], max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        lbfgs.zero_grad()
        nll = -log_joint(x, torch.sigmoid(u[0]), u[1].exp()).logsumexp(1).sum()
        nll.backward()
        return nll

    lbfgs.step(closure)
    mle = torch.stack([torch.sigmoid(u[0]), u[1].exp()]).detach()
    model, guide = programs(N, learn=True)
    loss = MemoisedWakeSleepLoss(memory_size=8, num_particles=4)
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.03}), loss=loss)
    idx = torch.arange(N)
    for _ in range(300):
        losses = ws.step(x, idx)
    # The memory holds all 8 values of every data point (after fewer than 50 steps), so
    # wake-theta is the exact -log p(x), up to float32 rounding, and its gradient exact.
    assert torch.isfinite(loss.state_dict()["scores"]).all()
    fitted = torch.stack([pyro.param("pi"), pyro.param("sigma")]).detach()
    exact_nll = -log_joint(x, *fitted).logsumexp(1).sum()
    assert abs(losses.wake_theta - exact_nll.item()) < 1e-5 * abs(exact_nll.item())
    # From (0.5, 1.0) to the MLE, about (0.290, 0.679). Measured: within 1e-3 after 100
    # steps, 6e-8 after 300 (Adam on an exact gradient); 1e-5 leaves room for another
    # platform's rounding.
    assert (fitted - torch.tensor([0.5, 1.0])).abs().min() > 0.2
    torch.testing.assert_close(fitted, mle, rtol=0, atol=1e-5)


def _run(ws, x, steps):
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(x))[:4]
        losses.append(tuple(ws.step(x[idx], idx)))
    return losses


def _build(N):
    model, guide = programs(N, learn=True)
    loss = MemoisedWakeSleepLoss(memory_size=3, num_particles=2, num_data=N)
    return loss, WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)


def _assert_memory_equal(a, b):
    assert a.keys() == b.keys() and a["values"].keys() == b["values"].keys()
    assert torch.equal(a["scores"], b["scores"])
    for site in a["values"]:
        assert torch.equal(a["values"][site], b["values"][site])


def test_the_memory_survives_a_checkpoint_and_the_run_continues_identically(tmp_path):
    N = 8
    x = data(N)
    loss, ws = _build(N)
    _run(ws, x, 5)
    saved = loss.state_dict()
    ws.save(tmp_path / "ckpt.pt")
    on = _run(ws, x, 4)
    on_memory, on_params = loss.state_dict(), store_snapshot()
    # The file is plain data: the memory is there, read with weights_only=True.
    file = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    _assert_memory_equal(file["loss"], saved)

    pyro.clear_param_store()
    torch.manual_seed(123)  # the load restores the generators
    loss, ws = _build(N)
    ws.load(tmp_path / "ckpt.pt")
    _assert_memory_equal(loss.state_dict(), saved)
    assert _run(ws, x, 4) == on
    _assert_memory_equal(loss.state_dict(), on_memory)
    assert_store_equal(on_params)


def test_a_memory_that_does_not_fit_is_refused_by_the_load(tmp_path):
    N = 8
    x = data(N)
    loss, ws = _build(N)
    _run(ws, x, 2)
    ws.save(tmp_path / "ckpt.pt")
    params = store_snapshot()
    model, guide = programs(N, learn=True)
    others = [
        (MemoisedWakeSleepLoss(4, num_data=N), "does not fit: a memory of 8 data points x 3"),
        (WakeSleepLoss(), "holds a loss state, which WakeSleepLoss has not"),
    ]
    for other, message in others:
        ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=other)
        with pytest.raises(CheckpointError, match=message):
            ws.load(tmp_path / "ckpt.pt")
        assert_store_equal(params)
    assert others[0][0].state_dict() == {}


@pytest.mark.parametrize(
    "idx, message",
    [
        ([0, 8], r"subsample argument\) must lie in \[0, 8\), got \[8\]"),
        ([-1, 2], r"must lie in \[0, 8\), got \[-1\]"),
        ([[0], [1]], r"subsample argument\) must be a 1-D tensor .* shape \(2, 1\)"),
        ([0.0, 1.0], r"subsample argument\) must be integers"),
        ([3, 3], r"subsample argument\) must be distinct"),
    ],
)
def test_bad_indices_are_refused_and_change_nothing(idx, message):
    N = 8
    x = data(N)
    loss, ws = _build(N)
    _run(ws, x, 2)
    memory, params = loss.state_dict(), store_snapshot()
    with pytest.raises(ValueError, match=message):
        ws.step(x[:2], torch.tensor(idx))
    _assert_memory_equal(loss.state_dict(), memory)
    assert_store_equal(params)


def test_the_first_step_checks_the_indices_and_num_data():
    x = data(8)
    loss, ws = _build(8)
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
        ws.step(x[:2], torch.tensor([7, 9]))
    assert loss.state_dict() == {}
    model, guide = programs(8)
    ws = WakeSleep(model, guide, None, loss=MemoisedWakeSleepLoss(2, num_data=5))
    with pytest.raises(ValueError, match=r"pyro.plate\('data'\) has size 8, but num_data=5"):
        ws.differentiable_loss(x, torch.arange(8))


def test_a_failed_step_leaves_the_memory_as_it_was():
    """A step whose loss is NaN (NaN data, validation off) computes a new memory and then
    fails in WakeSleep's checks: nothing is committed."""
    N = 8
    x = data(N)
    loss, ws = _build(N)
    _run(ws, x, 3)
    memory, params = loss.state_dict(), store_snapshot()
    bad = x[:4].clone()
    bad[1, 0] = float("nan")
    with pyro.validation_enabled(False), pytest.raises(NonFiniteLossError):
        ws.step(bad, torch.arange(4))
    _assert_memory_equal(loss.state_dict(), memory)
    assert_store_equal(params)
    ws.evaluate_loss(x[:4], torch.arange(4))  # an evaluation changes no memory either
    _assert_memory_equal(loss.state_dict(), memory)


def test_svi_takes_the_memory_step_and_the_misuses_are_named():
    N = 6
    x = data(N)
    model, guide = programs(N)
    loss = MemoisedWakeSleepLoss(2, 3)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss=loss)
    svi.step(x, torch.arange(N))
    assert torch.isfinite(loss.state_dict()["scores"]).all()
    with pytest.raises(ValueError, match="jit=True cannot record a MemoisedWakeSleepLoss"):
        WakeSleep(model, guide, None, jit=True, loss=MemoisedWakeSleepLoss(2))
    # Each process would keep a memory of its own (and a checkpoint rank 0's only).
    with pytest.raises(ValueError, match="distributed=True cannot train a MemoisedWakeSleepLoss"):
        WakeSleep(model, guide, None, distributed=True, loss=MemoisedWakeSleepLoss(2))
    ws = WakeSleep(model, guide, None, loss=MemoisedWakeSleepLoss(2, plate="points"))
    with pytest.raises(ValueError, match=r"no pyro.plate\('points'\)"):
        ws.differentiable_loss(x, torch.arange(N))

    def branching(x, idx):
        with pyro.plate("data", N, subsample=idx):
            z = pyro.sample("z", dist.Bernoulli(0.3).expand([L]).to_event(1))
            loc = z @ W if z[0, 0] > 0 else torch.zeros(D)  # reads a sample into Python
            pyro.sample("x", dist.Normal(loc, 0.7).to_event(1), obs=x)

    ws = WakeSleep(branching, guide, None, loss=MemoisedWakeSleepLoss(2, 3))
    with pytest.raises(ValueError, match="must not read sampled values into Python"):
        ws.differentiable_loss(x, torch.arange(N))
    with pytest.raises(ValueError, match="memory_size must be an integer >= 1"):
        MemoisedWakeSleepLoss(0)
    with pytest.raises(ValueError, match="entries, for memory_size=3"):
        MemoisedWakeSleepLoss(3).load_state_dict(loss.state_dict())
