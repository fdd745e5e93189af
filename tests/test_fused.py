"""
The fused optimizer-step layer (``pyro_wakesleep.fused``, ``WakeSleep(fuse_optim=True)``): a
PyroOptim of Adam or AdamW updated by torch's fused kernel takes exactly the fused kernel's
update, shares its state with Pyro's per-parameter optimizers (so Pyro's get_state and set_state,
and checkpoints, see it), follows hyperparameter changes, and leaves to Pyro what it cannot take
over unchanged (gradient clipping, ClippedAdam, a user's explicit kernel choice).
"""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_wakesleep import WakeSleep
from pyro_wakesleep.fused import FusedSteps
from pyro_wakesleep.models import HelmholtzMachine

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(3, 4), (4,), (5,)]


def _params(prefix="p"):
    gen = torch.Generator().manual_seed(0)
    return [
        pyro.param(f"{prefix}{i}", torch.randn(shape, generator=gen)).unconstrained()
        for i, shape in enumerate(SHAPES)
    ]


def _grads(step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def _run(optim, params, steps=20, stepper=None, first=0):
    """Steps ``first`` to ``first + steps - 1``, each with its own fixed gradients."""
    for step in range(first, first + steps):
        for p, g in zip(params, _grads(step)):
            p.grad = g.clone()
        if stepper is None:
            optim(params)
        else:
            stepper(optim, params)
        for p in params:
            p.grad = None


def _reference(cls, steps=20, **kwargs):
    """The same updates by one torch optimizer with the fused kernel."""
    params = [p.detach().clone().requires_grad_() for p in _params("ref")]
    optimizer = cls(params, fused=True, **kwargs)
    for step in range(steps):
        for p, g in zip(params, _grads(step)):
            p.grad = g.clone()
        optimizer.step()
    return params, optimizer


def _make(optim, params):
    """Pyro's per-parameter optimizers, made as WakeSleep makes them before a first update."""
    for p in params:
        grad, p.grad = p.grad, None
        optim([p])
        p.grad = grad


@pytest.mark.parametrize(
    "pyro_cls, torch_cls, args",
    [
        (pyro.optim.Adam, torch.optim.Adam, {"lr": 0.05}),
        (pyro.optim.Adam, torch.optim.Adam, {"lr": 0.05, "betas": (0.8, 0.9), "amsgrad": True}),
        (pyro.optim.AdamW, torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}),
    ],
)
def test_fused_steps_take_the_fused_kernels_update(pyro_cls, torch_cls, args):
    params = _params()
    optim = pyro_cls(dict(args))
    _make(optim, params)
    _run(optim, params, stepper=FusedSteps())
    expected, reference = _reference(torch_cls, **args)
    for p, q in zip(params, expected):
        assert torch.equal(p, q.detach())
    # The state is Pyro's own, stepped in place: get_state sees the fused steps.
    state = optim.get_state()
    for i, q in enumerate(expected):
        own = state[f"p{i}"]["state"][0]
        assert float(own["step"]) == 20
        assert torch.equal(own["exp_avg"], reference.state[q]["exp_avg"])
        assert torch.equal(own["exp_avg_sq"], reference.state[q]["exp_avg_sq"])


def test_fused_update_equals_pyros_up_to_rounding():
    """The same Adam, another evaluation order: after 20 steps at lr 0.05 the parameters agree
    to float32 rounding (a few ulps of values of order 1), not bitwise."""
    fused_params = _params("a")
    optim = pyro.optim.Adam({"lr": 0.05})
    _make(optim, fused_params)
    _run(optim, fused_params, stepper=FusedSteps())
    plain_params = _params("b")
    plain = pyro.optim.Adam({"lr": 0.05})
    _run(plain, plain_params)
    for p, q in zip(fused_params, plain_params):
        assert torch.allclose(p, q, rtol=0, atol=1e-6)


def test_disabled_is_pyros_stepping_bitwise():
    a, b = _params("a"), _params("b")
    optim_a, optim_b = pyro.optim.Adam({"lr": 0.05}), pyro.optim.Adam({"lr": 0.05})
    _make(optim_a, a)
    _run(optim_a, a, stepper=FusedSteps(enabled=False))
    _run(optim_b, b)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "make_optim",
    [
        lambda: pyro.optim.Adam({"lr": 0.05}, {"clip_norm": 0.5}),  # gradient clipping
        lambda: pyro.optim.ClippedAdam({"lr": 0.05}),  # Pyro's own optimizer class
        lambda: pyro.optim.Adam({"lr": 0.05, "foreach": False}),  # the user's kernel choice
        lambda: pyro.optim.SGD({"lr": 0.05, "momentum": 0.9}),
    ],
)
def test_what_cannot_be_fused_is_stepped_by_pyro_bitwise(make_optim):
    a, b = _params("a"), _params("b")
    optim_a, optim_b = make_optim(), make_optim()
    _make(optim_a, a)
    _run(optim_a, a, stepper=FusedSteps())
    _run(optim_b, b)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_per_parameter_learning_rates_are_grouped():
    """A callable of optim args gives each parameter its own lr; each group is fused with its
    own lr (the first parameter at 0.1, the others at 0.01)."""
    params = _params()

    def args(name, param):
        return {"lr": 0.1 if name == "p0" else 0.01}

    optim = pyro.optim.Adam(args)
    _make(optim, params)
    _run(optim, params, stepper=FusedSteps())
    fast, _ = _reference(torch.optim.Adam, lr=0.1)
    slow, _ = _reference(torch.optim.Adam, lr=0.01)
    assert torch.equal(params[0], fast[0].detach())
    for p, q in zip(params[1:], slow[1:]):
        assert torch.equal(p, q.detach())


def test_a_learning_rate_changed_in_pyros_optimizers_is_followed():
    params = _params()
    optim = pyro.optim.Adam({"lr": 0.05})
    _make(optim, params)
    steps = FusedSteps()
    _run(optim, params, steps=5, stepper=steps)
    for p in params:
        optim.optim_objs[p].param_groups[0]["lr"] = 0.0
    before = [p.detach().clone() for p in params]
    _run(optim, params, steps=3, stepper=steps)
    for p, q in zip(params, before):
        assert torch.equal(p, q)


def test_state_loaded_by_set_state_is_used():
    """A state loaded by Pyro's set_state (taken up when the parameter's optimizer is made,
    as on a resume) is the one the next fused steps continue from, even by a FusedSteps that
    stepped the same parameters before with another optimizer's state."""
    a = _params("a")
    optim_a = pyro.optim.Adam({"lr": 0.05})
    _make(optim_a, a)
    _run(optim_a, a, steps=10, stepper=FusedSteps())

    b = _params("b")
    earlier = pyro.optim.Adam({"lr": 0.05})
    _make(earlier, b)
    steps = FusedSteps()
    _run(earlier, b, steps=5, stepper=steps)
    saved_state = copy.deepcopy(earlier.get_state())  # get_state holds the live tensors
    saved = [p.detach().clone() for p in b]
    _run(earlier, b, steps=3, stepper=steps, first=20)  # other updates, then back to step 5
    with torch.no_grad():
        for p, v in zip(b, saved):
            p.copy_(v)
    second = pyro.optim.Adam({"lr": 0.05})
    second.set_state(saved_state)
    _make(second, b)
    _run(second, b, steps=5, stepper=steps, first=5)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def _tiny_model(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _tiny_guide(x):
    w = pyro.param("w", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(w * x, 1.0))


def test_wakesleep_steps_with_the_fused_kernel_and_fuse_optim_false_steps_as_svi():
    """WakeSleep's default update is the fused kernel's; fuse_optim=False is Pyro's own,
    bitwise; the two differ by rounding only."""
    x = torch.linspace(-1, 1, 8)
    results = {}
    for fuse in (True, False):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        ws = WakeSleep(_tiny_model, _tiny_guide, pyro.optim.Adam({"lr": 0.1}), fuse_optim=fuse)
        for _ in range(30):
            ws.step(x)
        results[fuse] = {n: pyro.param(n).detach().clone() for n in ("loc", "w")}
    for name in ("loc", "w"):
        assert torch.allclose(results[True][name], results[False][name], rtol=0, atol=1e-6)


def test_helmholtz_jit_and_eager_agree_bitwise_with_fused_steps():
    x = (torch.rand(20, 12, generator=torch.Generator().manual_seed(3)) < 0.4).float()
    finals = []
    for jit in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        net = HelmholtzMachine([12, 6, 3], name="hm")
        ws = WakeSleep(net.model, net.guide, pyro.optim.Adam({"lr": 0.01}), jit=jit,
                       num_particles=3, phi_objective=0.5)  # fmt: skip
        for _ in range(6):
            ws.step(x)
        finals.append({n: p.detach().clone() for n, p in net.named_parameters()})
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name


def test_a_step_hook_added_later_is_honoured():
    """Steps are planned once and replayed while nothing changes; a hook registered on a
    parameter's optimizer afterwards is a change: that parameter is stepped by its own
    optimizer, which calls the hook, and the others stay fused."""
    params = _params()
    optim = pyro.optim.Adam({"lr": 0.05})
    _make(optim, params)
    steps = FusedSteps()
    _run(optim, params, steps=5, stepper=steps)
    calls = []
    optim.optim_objs[params[0]].register_step_pre_hook(lambda *_: calls.append(1))
    _run(optim, params, steps=3, stepper=steps, first=5)
    assert len(calls) == 3
    reference, _ = _reference(torch.optim.Adam, steps=8, lr=0.05)
    for p, q in zip(params[1:], reference[1:]):
        assert torch.equal(p, q.detach())
