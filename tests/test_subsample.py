"""
Mini-batch subsampling: the losses of a subsampled batch are the full-data losses' unbiased
estimates, scaled by N / B per data point (outside the log-mean-exp over particles).

The model has local latents only, all inside ``pyro.plate("data", N, ...)``:
``z_i ~ Normal(0, 1)``, ``x_i ~ Normal(w z_i, SIGMA_X)``; the guide is
``z_i ~ Normal(a x_i + c, s)``. Four ways of writing the subsampled model are tested, each of
which should let the sleep phase hand the fantasy to the guide:

* ``A``: the mini-batch itself is the argument: ``model(x_batch, idx)`` with
  ``pyro.plate("data", N, subsample=idx)`` and ``obs=x_batch``;
* ``B``: the data come in a dict, ``model(data, idx)`` with ``obs=data["x"][idx]``, which the
  package cannot trace back to an argument: a ``fantasy_args`` callable writes the fantasy
  into a copy of the dict;
* ``C``: the guide has an ``observations`` keyword; the plate draws its own indices
  (``subsample_size=B``) or takes given ones;
* ``D``: Pyro's mini-batch idiom, ``model(x)`` with
  ``pyro.plate("data", N, subsample_size=B) as i`` and ``obs=x[i]``, recognized by the package.

Most checks are deterministic: the guide's particles are injected as
``a x_i + c + s * EPS[k, i]`` with a fixed ``EPS``, so every loss can be written out by hand.
"""

import math
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch.distributions import constraints

from pyro_wakesleep import WakeSleep

N, B = 40, 8
SIGMA_X = 0.5
_gen = torch.Generator().manual_seed(1234)
# Heterogeneous data, so that per-point losses differ and subsampling has real variance.
X = 0.5 + 1.5 * torch.randn(N, generator=_gen)
K_MAX = 6
EPS = torch.randn(K_MAX, N, generator=_gen)  # injected standard-normal particle noise
PARTITION = torch.randperm(N, generator=_gen).reshape(N // B, B)  # disjoint mini-batches

RECORD = {"model": [], "guide": [], "fantasy_args": []}


@pytest.fixture(autouse=True)
def _clear_record():
    for calls in RECORD.values():
        calls.clear()


# These tensors are tiny: intra-op threads only add overhead (10x on some machines).
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- model pieces


def _model_param():
    return pyro.param("w", torch.tensor(1.5))


def _guide_params():
    a = pyro.param("a", torch.tensor(0.3))
    c = pyro.param("c", torch.tensor(-0.2))
    s = pyro.param("s", torch.tensor(0.9), constraint=constraints.positive)
    return a, c, s


def _local_model(w, x_obs):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    x = pyro.sample("x", dist.Normal(w * z, SIGMA_X), obs=x_obs)
    RECORD["model"].append((z.detach(), x.detach()))


def _local_guide(x_batch):
    a, c, s = _guide_params()
    z = pyro.sample("z", dist.Normal(a * x_batch + c, s))
    RECORD["guide"].append((x_batch.detach(), z.detach()))


def model_a(x_batch, idx):
    w = _model_param()
    with pyro.plate("data", N, subsample=idx):
        _local_model(w, x_batch)


def guide_a(x_batch, idx):
    with pyro.plate("data", N, subsample=idx):
        _local_guide(x_batch)


def model_b(data, idx):
    w = _model_param()
    with pyro.plate("data", N, subsample=idx) as ind:
        _local_model(w, data["x"][ind])


def guide_b(data, idx):
    with pyro.plate("data", N, subsample=idx) as ind:
        _local_guide(data["x"][ind])


def fantasy_args_b(observations, data, idx):
    RECORD["fantasy_args"].append(observations["x"].clone())
    x = data["x"].clone()
    x[idx] = observations["x"]
    return ({**data, "x": x}, idx), {}


def model_c(x, idx=None, batch_size=None, observations=None):
    w = _model_param()
    with pyro.plate("data", N, subsample_size=batch_size, subsample=idx) as ind:
        _local_model(w, x[ind])


def guide_c(x, idx=None, batch_size=None, observations=None):
    with pyro.plate("data", N, subsample_size=batch_size, subsample=idx) as ind:
        _local_guide(x[ind] if observations is None else observations["x"])


def model_d(x, idx=None, batch_size=None):
    w = _model_param()
    with pyro.plate("data", N, subsample_size=batch_size, subsample=idx) as ind:
        _local_model(w, x[ind])


def guide_d(x, idx=None, batch_size=None):
    with pyro.plate("data", N, subsample_size=batch_size, subsample=idx) as ind:
        _local_guide(x[ind])


class Pattern(NamedTuple):
    model: object
    guide: object
    options: dict

    def args(self, idx):
        """(args, kwargs) for the batch with indices ``idx``."""
        if self.model is model_a:
            return (X[idx], idx), {}
        if self.model is model_b:
            return ({"x": X}, idx), {}
        return (X, idx), {}

    @property
    def draws_own_indices(self):
        return self.model in (model_c, model_d)


PATTERNS = {
    "A-batch-argument": Pattern(model_a, guide_a, {}),
    "B-fantasy_args": Pattern(model_b, guide_b, {"fantasy_args": fantasy_args_b}),
    "C-observations-keyword": Pattern(model_c, guide_c, {}),
    "D-indexing-idiom": Pattern(model_d, guide_d, {}),
}


# ----------------------------------------------------------------------------- fixed particles


class _FixedParticles(Messenger):
    """Set the guide's draw of ``z`` to loc + scale * eps (eps of shape (K, B) or (B,))."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def _pyro_sample(self, msg):
        if msg["name"] == "z" and not msg["is_observed"] and msg["value"] is None:
            fn = msg["fn"]
            msg["value"] = (fn.loc + fn.scale * self.eps).detach()


def with_fixed_particles(guide, K, vectorized):
    """
    The guide with particle k of data point i fixed to a x_i + c + s EPS[k, i]. The data
    indices are the guide's second argument. Sequential particles are numbered by call.
    """
    calls = [0]

    def fixed_guide(*args, **kwargs):
        idx = args[1]
        if vectorized:
            eps = EPS[:K, idx]
        else:
            eps = EPS[calls[0] % K, idx]
            calls[0] += 1
        with _FixedParticles(eps):
            return guide(*args, **kwargs)

    return fixed_guide


def hand_losses(idx, K):
    """wake-theta (K = 1: -s sum log p; K > 1: -s sum log mean w) and wake-phi, s = N / len."""
    store = pyro.get_param_store()
    w, a, c, s = (store[n].detach() for n in ("w", "a", "c", "s"))
    x = X[idx]
    loc = a * x + c
    z = loc + s * EPS[:K, idx]  # (K, b)
    log_p = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(w * z, SIGMA_X).log_prob(x)
    log_q = dist.Normal(loc, s).log_prob(z)
    scale = N / len(idx)
    if K == 1:
        wake_theta = -scale * log_p.sum()
    else:
        log_w = log_p - log_q
        wake_theta = -scale * (torch.logsumexp(log_w, 0) - math.log(K)).sum()
    wake_phi = -scale * (torch.softmax(log_p - log_q, 0) * log_q).sum()
    return wake_theta.item(), wake_phi.item()


def _init_params(pattern):
    """Create the model's and guide's parameters (with their constraints)."""
    args, kwargs = pattern.args(PARTITION[0])
    with poutine.block():
        pattern.model(*args, **kwargs)
        pattern.guide(*args, **kwargs)
    for calls in RECORD.values():
        calls.clear()


def _losses(pattern, idx, K, vectorize):
    """(wake_theta, phi) of WakeSleep on batch ``idx`` with the fixed particles."""
    guide = with_fixed_particles(pattern.guide, K, vectorize and K > 1)
    options = dict(pattern.options, max_plate_nesting=1, vectorize_particles=vectorize)
    args, kwargs = pattern.args(idx)
    if K == 1:
        # Classic wake-theta comes from the wake phase alone (phi_objective="sleep"); the
        # one-particle wake-phi term from phi_objective="wake" with the particle count set to 1
        # after construction (WakeSleep refuses that pair, whose expected gradient is zero, but
        # the term is part of any mixed objective with K = 1). SGD with lr 0 changes nothing.
        ws = WakeSleep(pattern.model, guide, pyro.optim.SGD({"lr": 0.0}), **options)
        wake_theta = ws.wake_step(*args, **kwargs)
        guide = with_fixed_particles(pattern.guide, K, False)
        ws = WakeSleep(
            pattern.model,
            guide,
            pyro.optim.SGD({"lr": 0.0}),
            num_particles=2,
            phi_objective="wake",
            **options,
        )
        ws.loss.num_particles = 1
        return wake_theta, ws.evaluate_loss(*args, **kwargs).phi
    ws = WakeSleep(
        pattern.model,
        guide,
        pyro.optim.SGD({"lr": 0.0}),
        num_particles=K,
        phi_objective="wake",
        **options,
    )
    return tuple(ws.evaluate_loss(*args, **kwargs))


# ----------------------------------------------------------------------------- deterministic


@pytest.mark.parametrize(
    "K, vectorize", [(1, True), (4, True), (4, False)], ids=["K1", "K4-vectorized", "K4-seq"]
)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_subsampled_losses_are_scaled_per_data_point(name, K, vectorize):
    """
    With fixed particles each loss is a deterministic function of the batch: it must equal
    (N/B) times the sum of per-data-point terms written out by hand, so the mini-batch losses
    over a partition of the data average to the full-data loss exactly. Forgetting N/B, or
    raising the weights to the power N/B inside the log-mean-exp, changes these values.
    """
    pattern = PATTERNS[name]
    _init_params(pattern)
    full_idx = torch.arange(N)
    full = _losses(pattern, full_idx, K, vectorize)
    assert full == pytest.approx(hand_losses(full_idx, K), rel=1e-5)

    batch_losses = []
    for idx in PARTITION:
        losses = _losses(pattern, idx, K, vectorize)
        assert losses == pytest.approx(hand_losses(idx, K), rel=1e-5)
        batch_losses.append(losses)
    # A uniformly drawn block of the partition is an unbiased estimate of the full loss.
    mean = torch.tensor(batch_losses, dtype=torch.float64).mean(0)
    assert mean.tolist() == pytest.approx(list(full), rel=1e-5)


# ----------------------------------------------------------------------------- statistical

NUM_REPEATS = 300


@pytest.mark.parametrize("K", [1, 5])
@pytest.mark.parametrize("name", ["A-batch-argument", "C-observations-keyword", "D-indexing-idiom"])
def test_subsampled_losses_are_unbiased(name, K):
    """
    With real random particles (and real random fantasies for sleep-phi), the mean of
    NUM_REPEATS subsampled losses matches the mean of NUM_REPEATS full-data losses within
    4 standard errors of their difference (each SE from the sample standard deviations of
    the independent repeats). Patterns C and D let the plate draw its own subsample_size=B
    indices; for pattern A the indices are drawn uniformly without replacement here. The
    full-data reference is computed with pattern A (all patterns define the same model).
    Scaling by 1 instead of N/B is off by a factor 5, which the last assertion shows to be far
    beyond the SE; raising the weights to the power N/B would be off by much more than the SE
    for K > 1 (the log-weights have a spread of order 1 here).
    """
    pattern = PATTERNS[name]
    _init_params(pattern)

    def make_ws(p):
        return WakeSleep(
            p.model,
            p.guide,
            pyro.optim.SGD({"lr": 0.0}),
            num_particles=K,
            max_plate_nesting=1,
            **p.options,
        )

    ws, reference = make_ws(pattern), make_ws(PATTERNS["A-batch-argument"])
    full_args, full_kwargs = PATTERNS["A-batch-argument"].args(torch.arange(N))
    full, sub = [], []
    for _ in range(NUM_REPEATS):
        full.append(reference.evaluate_loss(*full_args, **full_kwargs))
        if pattern.draws_own_indices:
            sub.append(ws.evaluate_loss(X, batch_size=B))
        else:
            args, kwargs = pattern.args(torch.randperm(N)[:B])
            sub.append(ws.evaluate_loss(*args, **kwargs))
    full = torch.tensor(full, dtype=torch.float64)
    sub = torch.tensor(sub, dtype=torch.float64)
    se = (full.var(0) / NUM_REPEATS + sub.var(0) / NUM_REPEATS).sqrt()
    z = (sub.mean(0) - full.mean(0)) / se
    assert torch.all(z.abs() < 4), (
        f"subsampled means {sub.mean(0).tolist()} vs full {full.mean(0).tolist()}, z {z.tolist()}"
    )
    # The test has power: the full-data loss is far from B/N of itself in SE units.
    assert torch.all(full.mean(0).abs() * (1 - B / N) > 10 * se)


# ----------------------------------------------------------------------------- sleep phase


def _check_sleep_step(ws, args, kwargs, batch_size, num_sleep, real_x):
    """
    One sleep_step: only the sleep phase runs (one model run and one guide run per fantasy, or
    one vectorized run of each for a guide with an `observations` keyword). The guide must see
    the fantasy x of the (subsampled) data points, not the real data, and the sleep-phi loss is
    -(N/b) sum_i log q(z_i | x_i) averaged over the fantasies.
    """
    for calls in RECORD.values():
        calls.clear()
    loss = ws.sleep_step(*args, **kwargs)
    assert len(RECORD["model"]) == len(RECORD["guide"]) >= 1
    store = pyro.get_param_store()
    a, c, s = (store[n].detach() for n in ("a", "c", "s"))
    total = 0.0
    for (z_fantasy, x_fantasy), (x_seen, z_seen) in zip(RECORD["model"], RECORD["guide"]):
        assert x_fantasy.shape[-1] == batch_size
        assert torch.equal(x_seen, x_fantasy)
        assert torch.equal(z_seen, z_fantasy)
        if real_x is not None:
            assert not torch.isclose(x_seen, real_x).any()
        total = total + dist.Normal(a * x_fantasy + c, s).log_prob(z_fantasy).sum()
    expected = -(N / batch_size) * total / num_sleep
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def _sleep_ws(pattern, num_sleep):
    return WakeSleep(
        pattern.model,
        pattern.guide,
        pyro.optim.SGD({"lr": 0.0}),
        num_sleep_particles=num_sleep,
        max_plate_nesting=1,
        **pattern.options,
    )


@pytest.mark.parametrize("num_sleep", [1, 3])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_sleep_phase_guide_sees_the_subsampled_fantasy(name, num_sleep):
    """The sleep phase on a mini-batch, with given indices and (C, D) plate-drawn ones."""
    pattern = PATTERNS[name]
    _init_params(pattern)
    ws = _sleep_ws(pattern, num_sleep)
    idx = PARTITION[1]
    args, kwargs = pattern.args(idx)
    _check_sleep_step(ws, args, kwargs, B, num_sleep, X[idx])
    if pattern.draws_own_indices:
        _check_sleep_step(ws, (X,), {"batch_size": B}, B, num_sleep, None)
    if pattern.model is model_b:
        # The package could not trace obs=data["x"][idx] to an argument: fantasy_args was used.
        assert len(RECORD["fantasy_args"]) == num_sleep


@pytest.mark.parametrize(
    "name, how",
    [(name, "all-indices") for name in PATTERNS]
    + [(name, "no-subsampling") for name in ("C-observations-keyword", "D-indexing-idiom")],
)
def test_sleep_phase_on_the_full_batch(name, how):
    """
    The same models on the whole data set: with the indices arange(N) given, or (C, D) with
    no subsample_size at all, as when evaluating a mini-batch model on all the data. The
    plate's index tensor is then arange(N), and obs=x[i] is the whole of x.
    """
    pattern = PATTERNS[name]
    _init_params(pattern)
    ws = _sleep_ws(pattern, 1)
    if how == "all-indices":
        args, kwargs = pattern.args(torch.arange(N))
    else:
        args, kwargs = (X,), {}
    _check_sleep_step(ws, args, kwargs, N, 1, X)


# ----------------------------------------------------------------------------- poutine.scale


@pytest.mark.parametrize("K, phi_objective", [(1, "sleep"), (4, "sleep"), (4, "wake")])
@pytest.mark.parametrize("batch", ["full", "subsampled"])
@pytest.mark.parametrize("name", ["A-batch-argument", "C-observations-keyword"])
def test_poutine_scale_scales_both_losses(name, batch, K, phi_objective):
    """
    poutine.scale(., c) around both model and guide multiplies every site's log-density by c:
    with the same random draws (same seed) both losses are c times the unscaled ones, for
    K = 1 and K > 1 (the common scale multiplies each data point's log-mean-exp, it does not
    temper the weights) and on top of the N/B subsampling scale.
    """
    pattern = PATTERNS[name]
    _init_params(pattern)
    idx = torch.arange(N) if batch == "full" else PARTITION[2]
    args, kwargs = pattern.args(idx)
    scale = 0.3
    results = []
    for c in (None, scale):
        model = pattern.model if c is None else poutine.scale(pattern.model, c)
        guide = pattern.guide if c is None else poutine.scale(pattern.guide, c)
        ws = WakeSleep(
            model,
            guide,
            pyro.optim.SGD({"lr": 0.0}),
            num_particles=K,
            phi_objective=phi_objective,
            max_plate_nesting=1,
            **pattern.options,
        )
        pyro.set_rng_seed(7)
        results.append(ws.evaluate_loss(*args, **kwargs))
    plain, scaled = results
    assert scaled.wake_theta == pytest.approx(scale * plain.wake_theta, rel=1e-5)
    assert scaled.phi == pytest.approx(scale * plain.phi, rel=1e-5)


# ----------------------------------------------------------------------------- global latent


def model_global(x_batch, idx):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", N, subsample=idx):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, SIGMA_X), obs=x_batch)


def guide_global(x_batch, idx):
    m = pyro.param("m", torch.tensor(0.4))
    a, c, s = _guide_params()
    mu = pyro.sample("mu", dist.Normal(m, 0.5))
    with pyro.plate("data", N, subsample=idx):
        z = pyro.sample("z", dist.Normal(a * x_batch + c, s))
    RECORD["guide"].append((mu.detach(), z.detach()))


def test_global_latent_beside_subsampled_locals_single_particle():
    """
    K = 1 with a global latent: wake_theta = -(log p(mu) + (N/B) sum_i log p(z_i, x_i | mu)),
    whose average over the blocks of a partition is the full-data value.
    """
    ws = WakeSleep(model_global, guide_global, pyro.optim.SGD({"lr": 0.0}), max_plate_nesting=1)

    def check(idx):
        RECORD["guide"].clear()
        loss = ws.wake_step(X[idx], idx)
        mu, z = RECORD["guide"][0]
        local = dist.Normal(mu, 1.0).log_prob(z) + dist.Normal(z, SIGMA_X).log_prob(X[idx])
        expected = -(dist.Normal(0.0, 2.0).log_prob(mu) + N / len(idx) * local.sum())
        assert loss == pytest.approx(expected.item(), rel=1e-5)

    check(torch.arange(N))
    for idx in PARTITION:
        check(idx)
