"""
Property-based tests (hypothesis) over batch sizes, particle counts, plate nestings, subsample
sizes and latent types (Bernoulli, Categorical, Normal, mixed): losses are finite scalars,
each phase changes only its own parameters, and vectorized and sequential particles give the
same losses and gradients when they score the same particles, and recorded steps (jit=True)
replay the eager ones bitwise.
"""

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from conftest import InjectSamples, assert_store_equal, store_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_wakesleep import WakeSleep

D, C, G = 3, 4, 2  # observed dimension, categories, size of the outer plate


@dataclass(frozen=True)
class Case:
    batch: int  # data points passed in
    total: int  # plate size (> batch: a subsample, scaled by total / batch)
    particles: int
    nested: bool  # an outer plate "groups" at dim -2
    latents: tuple  # latent types, in model order

    @property
    def nesting(self):
        return 2 if self.nested else 1

    def data(self, seed=0):
        shape = (G, self.batch, D) if self.nested else (self.batch, D)
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 5))
    total = batch + draw(st.sampled_from([0, 0, 3, 10]))
    latents = draw(
        st.sampled_from(
            [("bernoulli",), ("categorical",), ("normal",), ("bernoulli", "normal", "categorical")]
        )
    )
    return Case(batch, total, draw(st.integers(1, 4)), draw(st.booleans()), latents)


def make(case: Case):
    """A model/guide pair for the case: every latent is a scalar per data point (and group)."""

    def plates(x):
        data = pyro.plate("data", case.total, subsample=torch.arange(x.shape[-2]), dim=-1)
        groups = pyro.plate("groups", G, dim=-2) if case.nested else None
        return data, groups

    def model(x):
        shift = pyro.param("theta_shift", torch.zeros(D))
        logit = pyro.param("theta_logit", torch.tensor(0.3))
        cat = pyro.param("theta_cat", torch.zeros(C))
        data, groups = plates(x)
        with data:
            with groups if groups is not None else _nothing():
                loc = shift
                for j, kind in enumerate(case.latents):
                    name = f"z{j}"
                    if kind == "bernoulli":
                        z = pyro.sample(name, dist.Bernoulli(logits=logit))
                    elif kind == "categorical":
                        z = pyro.sample(name, dist.Categorical(logits=cat)).float()
                    else:
                        z = pyro.sample(name, dist.Normal(logit, 1.0))
                    loc = loc + z.unsqueeze(-1)
                pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(x, observations=None):
        x = observations["x"] if observations is not None else x
        w = pyro.param("phi_w", torch.full((D,), 0.1))
        b = pyro.param("phi_b", torch.zeros(C))
        data, groups = plates(x)
        with data:
            with groups if groups is not None else _nothing():
                h = x @ w
                for j, kind in enumerate(case.latents):
                    name = f"z{j}"
                    if kind == "bernoulli":
                        pyro.sample(name, dist.Bernoulli(logits=h))
                    elif kind == "categorical":
                        pyro.sample(name, dist.Categorical(logits=h.unsqueeze(-1) + b))
                    else:
                        pyro.sample(name, dist.Normal(h, 1.0))

    return model, guide


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _estimator(case, model, guide, **kw):
    kw.setdefault("num_particles", case.particles)
    kw.setdefault("phi_objective", 0.5)
    return WakeSleep(
        model, guide, pyro.optim.SGD({"lr": 0.05}), max_plate_nesting=case.nesting, **kw
    )


SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(case=cases(), vectorize=st.booleans())
def test_losses_are_finite_scalars_and_phases_touch_only_their_parameters(case, vectorize):
    pyro.clear_param_store()
    torch.manual_seed(0)
    model, guide = make(case)
    ws = _estimator(case, model, guide, vectorize_particles=vectorize, num_sleep_particles=2)
    x = case.data()
    loss = ws.differentiable_loss(x)
    assert loss.shape == () and torch.isfinite(loss)
    losses = ws.step(x)
    assert all(isinstance(v, float) and v == v and abs(v) < float("inf") for v in losses)

    theta = {"theta_shift", "theta_logit", "theta_cat"}
    phi = {"phi_w", "phi_b"}
    before = store_snapshot()
    ws.wake_step(x)
    after = store_snapshot()
    for name in phi:
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in theta)
    ws.sleep_step(x)
    again = store_snapshot()
    for name in theta:
        assert torch.equal(after[name], again[name]), name
    assert any(not torch.equal(after[n], again[n]) for n in phi)


def _particles(case, generator):
    """K values per latent site, stacked along a leading particle dimension."""
    shape = (case.particles,) + ((G,) if case.nested else ()) + (case.batch,)
    values = {}
    for j, kind in enumerate(case.latents):
        if kind == "bernoulli":
            v = torch.bernoulli(torch.full(shape, 0.5), generator=generator)
        elif kind == "categorical":
            v = torch.randint(C, shape, generator=generator)
        else:
            v = torch.randn(shape, generator=generator)
        values[f"z{j}"] = v
    return values


@SETTINGS
@given(case=cases())
def test_vectorized_and_sequential_particles_agree_on_the_same_particles(case):
    """Scored on the same K wake particles per data point (and the same single fantasy, drawn
    from the same seed), the particle plate and the loop over particles give the same losses
    and gradients."""
    x = case.data()
    values = _particles(case, torch.Generator().manual_seed(1))
    results = {}
    for vectorize in (True, False):
        pyro.clear_param_store()
        model, guide = make(case)
        if vectorize:
            queues = {n: [v] for n, v in values.items()}
        else:
            queues = {n: list(v.unbind(0)) for n, v in values.items()}
        injector = InjectSamples(queues)

        def injected_guide(x, observations=None, injector=injector, guide=guide):
            with injector:
                return guide(x, observations=observations)

        ws = _estimator(case, model, injected_guide, vectorize_particles=vectorize)
        torch.manual_seed(2)
        phases = ws.loss.phases(ws.model, ws.guide, (x,), {})
        assert all(not q for q in queues.values())  # every injected particle was scored
        names = sorted(phases.theta) + sorted(phases.phi_params)
        params = [{**phases.theta, **phases.phi_params}[n] for n in names]
        loss = phases.wake_theta + phases.phi
        results[vectorize] = (
            phases.wake_theta.detach(),
            phases.phi.detach(),
            names,
            torch.autograd.grad(loss, params, allow_unused=True),
        )
    vec, seq = results[True], results[False]
    assert vec[2] == seq[2]
    # float32 sums in another order: relative 1e-5
    torch.testing.assert_close(vec[0], seq[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(vec[1], seq[1], rtol=1e-5, atol=1e-4)
    for a, b in zip(vec[3], seq[3]):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


@SETTINGS
@given(case=cases(), vectorize=st.booleans(), sleep_particles=st.integers(1, 2))
def test_recorded_steps_replay_the_eager_steps_bitwise(case, vectorize, sleep_particles):
    """WakeSleep(jit=True): after the first (eager) step and the second (recorded) one, every
    replayed step computes what the eager step computes, bitwise."""
    x = case.data()
    runs = []
    for use_jit in (False, True):
        pyro.clear_param_store()
        model, guide = make(case)
        ws = _estimator(
            case,
            model,
            guide,
            vectorize_particles=vectorize,
            num_sleep_particles=sleep_particles,
            jit=use_jit,
        )
        torch.manual_seed(3)
        runs.append(([tuple(ws.step(x)) for _ in range(4)], store_snapshot(), ws))
    (eager, eager_params, _), (replayed, jit_params, ws) = runs
    assert replayed == eager
    assert_store_equal(eager_params, jit_params)
    assert ws.recorder.off_reason is None and ws.recorder.num_recordings == 1
