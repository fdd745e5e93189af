"""
WakeSleepLoss, the objective as a loss object: under Pyro's SVI it takes WakeSleep's step
(one optimizer over both parameter sets), it gives WakeSleepModule as ELBO gives ELBOModule,
and WakeSleep is a thin driver over it (ws.step reaches the objectives in four frames).
"""

import inspect

import pyro
import pytest
import torch
from conftest import assert_store_equal, store_snapshot
from pyro.infer import SVI

from pyro_wakesleep import (
    PhiObjective,
    WakeSleep,
    WakeSleepLoss,
    WakeSleepModule,
    objectives,
)
from pyro_wakesleep.models import HelmholtzMachine

pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    return torch.bernoulli(torch.full((12, 16), 0.3), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("num_particles, phi_objective", [(1, "sleep"), (5, "wake"), (3, 0.5)])
def test_svi_with_wakesleep_loss_takes_the_wakesleep_step(num_particles, phi_objective):
    """SGD steps one parameter at a time, so SVI's one optimizer over theta and phi is
    WakeSleep's update: the same losses and the same parameters, bitwise, under one seed."""
    x = _data()
    results = []
    for use_svi in (True, False):
        pyro.clear_param_store()
        torch.manual_seed(0)
        hm = HelmholtzMachine([16, 6, 2])
        optim = pyro.optim.SGD({"lr": 0.05, "momentum": 0.9})
        options = dict(num_particles=num_particles, phi_objective=phi_objective)
        torch.manual_seed(1)
        if use_svi:
            svi = SVI(hm.model, hm.guide, optim, loss=WakeSleepLoss(**options))
            losses = [svi.step(x) for _ in range(5)]
            evaluated = svi.evaluate_loss(x)
        else:
            ws = WakeSleep(hm.model, hm.guide, optim, **options)
            losses = [tuple(ws.step(x)) for _ in range(5)]
            evaluated = tuple(ws.evaluate_loss(x))
        results.append((losses, evaluated, store_snapshot()))
    (svi_losses, svi_eval, svi_params), (ws_losses, ws_eval, ws_params) = results
    assert svi_losses == ws_losses and isinstance(svi_losses[0], tuple)
    assert svi_eval == ws_eval
    assert_store_equal(svi_params, ws_params)


def test_calling_the_loss_gives_the_module():
    hm = HelmholtzMachine([16, 4])
    loss = WakeSleepLoss(num_particles=3, phi_objective="wake")
    module = loss(hm.model, hm.guide)
    assert isinstance(module, WakeSleepModule) and module.wake_sleep.loss is loss
    x = _data()
    torch.manual_seed(2)
    a = module(x)
    torch.manual_seed(2)
    b = loss.differentiable_loss(hm.model, hm.guide, x)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not beside loss="):
        WakeSleep(hm.model, hm.guide, None, num_particles=2, loss=loss)


def test_the_phi_objective_is_one_value():
    assert PhiObjective.parse("sleep") == PhiObjective(0.0)
    assert PhiObjective.parse("wake").wake == 1.0 and PhiObjective.parse("wake").sleep == 0.0
    mixed = PhiObjective.parse(0.25)
    assert (mixed.wake, mixed.sleep, mixed.uses_wake, mixed.uses_sleep) == (0.25, 0.75, True, True)
    assert [str(PhiObjective.parse(v)) for v in ("sleep", "wake", 0.25)] == [
        "sleep",
        "wake",
        "0.25",
    ]
    for bad in ("awake", 1.5, -0.1, True, None):
        with pytest.raises(ValueError, match="phi_objective must be"):
            PhiObjective.parse(bad)
    assert WakeSleepLoss(2, phi_objective="wake").phi_objective == PhiObjective(1.0)


def test_step_reaches_the_objectives_in_four_frames(monkeypatch):
    """ws.step -> WakeSleep._run -> WakeSleepLoss.phases -> the objective."""
    depths = {}
    for name in ("classic_wake_theta_loss", "wake_theta_loss"):
        real = getattr(objectives, name)

        def spy(*args, real=real, name=name):
            depths[name] = len(inspect.stack(0))
            return real(*args)

        monkeypatch.setattr(objectives, name, spy)
    x = _data()
    for K in (1, 3):
        hm = HelmholtzMachine([16, 4], name=f"hm{K}")
        ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 0.01}), num_particles=K)
        here = len(inspect.stack(0))
        ws.step(x)
        name = "classic_wake_theta_loss" if K == 1 else "wake_theta_loss"
        # here (depth d) calls step (d + 1), _run (d + 2), phases (d + 3), the objective (d + 4).
        assert depths[name] - here <= 4, depths[name] - here


def test_a_recording_fallback_warns_at_the_users_call():
    def model(x):
        z = pyro.sample("z", pyro.distributions.Normal(0.0, 1.0))
        if z > 0:  # stochastic control flow: cannot be recorded
            pyro.sample("x", pyro.distributions.Normal(z, 1.0), obs=x)
        else:
            pyro.sample("x", pyro.distributions.Normal(-z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", pyro.distributions.Normal(loc, 1.0))

    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.01}), jit=True)
    ws.step(torch.tensor(1.0))
    with pytest.warns(RuntimeWarning, match="runs eagerly") as caught:
        ws.step(torch.tensor(1.0))
    assert caught[0].filename == __file__
    assert ws.recorder.off_reason is not None
