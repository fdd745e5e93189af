"""WakeSleepModule: the objective as an nn.Module, equal in gradient to WakeSleep.step."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_wakesleep import WakeSleep, WakeSleepModule
from pyro_wakesleep.models import GaussianHelmholtz, HelmholtzMachine


def _net(kind, name):
    torch.manual_seed(0)
    if kind == "helmholtz":
        return HelmholtzMachine([12, 5, 3], name=name)
    return GaussianHelmholtz(12, 2, 6, name=name)


@pytest.mark.parametrize("kind", ["helmholtz", "gaussian"])
@pytest.mark.parametrize(
    "estimator",
    [dict(num_particles=1), dict(num_particles=4, phi_objective=0.5)],
    ids=["classic", "rws"],
)
def test_module_gradient_equals_the_step_update(kind, estimator):
    """With SGD at lr 1 a step moves each parameter by minus its gradient, so the step's
    gradient can be read off and compared with the module's, drawn from the same seed."""
    x = torch.bernoulli(torch.full((7, 12), 0.4), generator=torch.Generator().manual_seed(1))
    net = _net(kind, "a")
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    ws = WakeSleep(net.model, net.guide, pyro.optim.SGD({"lr": 1.0}), **estimator)
    torch.manual_seed(7)
    ws.step(x)
    step_grads = {n: before[n] - p.detach() for n, p in net.named_parameters()}

    other = _net(kind, "b")
    objective = WakeSleepModule(other.model, other.guide, **estimator)
    assert {id(p) for p in objective.parameters()} == {id(p) for p in other.parameters()}
    torch.manual_seed(7)
    objective(x).backward()
    for name, p in other.named_parameters():
        # the step's update is p - 1.0 * grad in float32: equal up to rounding of p - g
        assert torch.allclose(p.grad, step_grads[name], atol=1e-5, rtol=1e-5), name


def test_module_with_a_torch_optimizer_follows_wakesleep_steps():
    """Training through the module with torch.optim.SGD (momentum) retraces, step for step,
    WakeSleep.step with pyro.optim.SGD from the same seed: the same gradients and updates."""
    x = torch.bernoulli(torch.full((20, 12), 0.3), generator=torch.Generator().manual_seed(2))
    net = _net("helmholtz", "a")
    ws = WakeSleep(net.model, net.guide, pyro.optim.SGD({"lr": 0.01, "momentum": 0.9}))
    other = _net("helmholtz", "b")
    objective = WakeSleepModule(other.model, other.guide)
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.01, momentum=0.9)
    for step in range(30):
        torch.manual_seed(100 + step)
        ws.step(x)
        torch.manual_seed(100 + step)
        optimizer.zero_grad()
        objective(x).backward()
        optimizer.step()
    for (name, p), q in zip(net.named_parameters(), other.parameters()):
        # float32 rounding only (the two optimizers apply the same formula)
        assert torch.allclose(p, q, atol=1e-5, rtol=1e-5), name


def test_module_refuses_parameters_outside_its_modules():
    def model(x):
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1), obs=x)

    net = HelmholtzMachine([3, 2])
    objective = WakeSleepModule(model, net.guide)
    with pytest.raises(ValueError, match="'loc'.*modules="):
        objective(torch.randn(4, 3))
