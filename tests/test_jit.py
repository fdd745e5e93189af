"""
``WakeSleep(jit=True)``: a recorded step replays exactly the eager step (bitwise: the same
operations on the same values, drawing the same random numbers), is recorded again when the
arguments' signature or the parameter store changes, falls back to eager with a warning when a
program cannot be recorded, and keeps the guarantees of the eager step (bad data raises with
nothing changed).
"""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_store_equal, store_snapshot
from pyro.distributions import constraints

from pyro_wakesleep import NonFiniteLossError, WakeSleep, WakeSleepModule, jit
from pyro_wakesleep.models import GaussianHelmholtz, HelmholtzMachine

pytestmark = pytest.mark.usefixtures("one_thread")


def _binary(n, d=12, seed=1):
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def _normal_model(x):
    loc = pyro.param("loc", torch.tensor(0.5))
    scale = pyro.param("scale", torch.tensor(1.5), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(loc, scale))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _normal_guide(x):
    w = pyro.param("w", torch.tensor(0.1))
    s = pyro.param("s", torch.tensor(0.8), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(w * x, s))


def _build(kind, seed=0):
    """A fresh model/guide pair and its estimator options."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    if kind == "normal":
        return _normal_model, _normal_guide, {}
    if kind == "gaussian":
        net = GaussianHelmholtz(12, 3, 8, name="g")
        return net.model, net.guide, {}
    net = HelmholtzMachine([12, 6, 4], name="h")
    options = {
        "helmholtz-classic": {},
        "helmholtz-rws": {"num_particles": 3, "phi_objective": "wake"},
        "helmholtz-mixed": {"num_particles": 3, "phi_objective": 0.5, "num_sleep_particles": 2},
        "helmholtz-sequential": {
            "num_particles": 2,
            "phi_objective": "wake",
            "vectorize_particles": False,
        },
    }[kind]
    return net.model, net.guide, options


def _data(kind, n=10):
    return torch.randn(n) if kind == "normal" else _binary(n)


def _train(kind, use_jit, steps=12, batches=None, optim=None):
    model, guide, options = _build(kind)
    optim = optim or pyro.optim.Adam({"lr": 0.05})
    ws = WakeSleep(model, guide, optim, max_plate_nesting=1, jit=use_jit, **options)
    batches = batches or [_data(kind)] * steps
    torch.manual_seed(7)
    losses = [tuple(ws.step(x)) for x in batches]
    return losses, store_snapshot(), ws


@pytest.fixture
def recorded(monkeypatch):
    """The number of recordings made (calls of jit.record), as a one-item list."""
    count = [0]
    record = jit.record

    def counting(*args, **kwargs):
        count[0] += 1
        return record(*args, **kwargs)

    monkeypatch.setattr(jit, "record", counting)
    return count


KINDS = [
    "helmholtz-classic",
    "helmholtz-rws",
    "helmholtz-mixed",
    "helmholtz-sequential",
    "gaussian",
    "normal",
]


@pytest.mark.parametrize("kind", KINDS)
def test_replayed_steps_are_bitwise_the_eager_steps(kind, recorded):
    eager_losses, eager_params, _ = _train(kind, use_jit=False)
    assert recorded == [0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        jit_losses, jit_params, ws = _train(kind, use_jit=True)
    assert jit_losses == eager_losses
    assert_store_equal(eager_params, jit_params)
    # The first step runs eagerly, the second is recorded, the ten others are replayed.
    assert recorded == [1] and ws.recorder.num_recordings == 1 and ws.recorder.off_reason is None


def test_wake_and_sleep_steps_are_recorded_separately_and_match_eager():
    def run(use_jit):
        model, guide, _ = _build("helmholtz-classic")
        ws = WakeSleep(model, guide, pyro.optim.SGD({"lr": 0.1, "momentum": 0.5}), jit=use_jit)
        x = _binary(10)
        torch.manual_seed(3)
        out = []
        for _ in range(6):
            out += [ws.wake_step(x), ws.sleep_step(x)]
        return out, store_snapshot(), ws

    eager, eager_params, _ = run(False)
    replayed, jit_params, ws = run(True)
    assert replayed == eager
    assert_store_equal(eager_params, jit_params)
    assert ws.recorder.num_recordings == 2


def test_a_new_batch_shape_is_recorded_again():
    batches = [_binary(10), _binary(7, seed=2), _binary(10, seed=3), _binary(7, seed=4)] * 2
    eager, eager_params, _ = _train("helmholtz-rws", use_jit=False, batches=batches)
    replayed, jit_params, ws = _train("helmholtz-rws", use_jit=True, batches=batches)
    assert replayed == eager
    assert_store_equal(eager_params, jit_params)
    assert ws.recorder.num_recordings == 2


def _branching_model(x):
    p = pyro.param("p", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Bernoulli(logits=p))
    # Stochastic control flow: the structure depends on a sampled value.
    if z.sum() > x.shape[0] / 2:
        with pyro.plate("data2", x.shape[0], dim=-1):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)
    else:
        with pyro.plate("data2", x.shape[0], dim=-1):
            pyro.sample("x", dist.Normal(-z, 2.0), obs=x)


def _branching_guide(x):
    q = pyro.param("q", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Bernoulli(logits=q + 0.1 * x))


def _assert_falls_back_like_eager(model, guide, x, match, **options):
    """jit=True warns (``match``), runs eagerly, and trains exactly as jit=False does."""

    def run(use_jit):
        pyro.clear_param_store()
        ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.1}), jit=use_jit, **options)
        torch.manual_seed(5)
        return [tuple(ws.step(x)) for _ in range(6)], store_snapshot(), ws

    eager, eager_params, _ = run(False)
    with pytest.warns(RuntimeWarning, match=match):
        replayed, jit_params, ws = run(True)
    # The failed recording put the random streams and the store back: same draws as eager.
    assert replayed == eager
    assert_store_equal(eager_params, jit_params)
    assert ws.recorder.off_reason is not None and not ws.recorder.recordings


def test_stochastic_control_flow_runs_eagerly_with_a_warning_and_the_same_draws():
    _assert_falls_back_like_eager(
        _branching_model, _branching_guide, torch.randn(8), "could not be recorded"
    )


class _Options:
    """An argument that is neither a tensor nor hashable (it defines __eq__ only)."""

    def __init__(self, noise):
        self.noise = noise

    def __eq__(self, other):
        return isinstance(other, _Options) and other.noise == self.noise

    def __getitem__(self, key):
        return getattr(self, key)


def test_an_unhashable_argument_runs_eagerly_with_a_warning():
    def model(x, options):
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, options["noise"]), obs=x)

    def guide(x, options):
        w = pyro.param("w", torch.tensor(0.0))
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(w * x, 1.0))

    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.1}), jit=True)
    ws.step(torch.randn(5), _Options(1.0))
    with pytest.warns(RuntimeWarning, match="neither a tensor nor hashable"):
        ws.step(torch.randn(5), _Options(1.0))
    assert ws.recorder.off_reason is not None


def test_bad_data_after_recording_raises_and_changes_nothing():
    model, guide, options = _build("helmholtz-rws")
    optim = pyro.optim.Adam({"lr": 0.05})
    ws = WakeSleep(model, guide, optim, jit=True, **options)
    x = _binary(10)
    for _ in range(3):
        ws.step(x)
    assert ws.recorder.num_recordings == 1
    params, optim_state = store_snapshot(), optim.get_state()
    bad = x.clone()
    bad[2, 3] = 2.0
    with pytest.raises(ValueError, match="site 'x' lies outside the support"):
        ws.step(bad)
    nan = x.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="argument 0"):
        ws.step(nan)
    assert_store_equal(params)
    after = optim.get_state()
    for name, state in optim_state.items():
        for key, value in state["state"][0].items():
            assert torch.equal(value, after[name]["state"][0][key]), (name, key)
    assert ws.num_steps == 3
    ws.step(x)  # the recording still serves good data
    assert ws.recorder.off_reason is None and ws.recorder.num_recordings == 1


def test_a_load_replaces_the_parameters_and_the_step_is_recorded_again(tmp_path, recorded):
    x = torch.randn(10)
    path = tmp_path / "ckpt.pt"

    def fresh():
        pyro.clear_param_store()
        return WakeSleep(_normal_model, _normal_guide, pyro.optim.Adam({"lr": 0.05}), jit=True)

    ws = fresh()
    torch.manual_seed(11)
    for _ in range(4):
        ws.step(x)
    ws.save(path)
    straight = [tuple(ws.step(x)) for _ in range(4)]
    final = store_snapshot()

    ws = fresh()
    ws.step(torch.randn(10))  # other parameter tensors, and a recording that holds them
    ws.step(torch.randn(10))
    assert recorded == [2]
    ws.load(path)
    resumed = [tuple(ws.step(x)) for _ in range(4)]
    assert resumed == straight
    assert_store_equal(final)
    assert recorded == [3]


def test_evaluate_loss_and_outer_handlers_run_eagerly():
    model, guide, _ = _build("helmholtz-classic")
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.05}), jit=True)
    x = _binary(10)
    ws.step(x)
    ws.evaluate_loss(x)
    with pyro.poutine.scale(scale=2.0):
        ws.step(x)
    assert not ws.recorder.recordings
    ws.step(x)
    assert ws.recorder.num_recordings == 1


def test_module_with_jit_gives_the_eager_gradient():
    def grads(use_jit):
        model, guide, options = _build("helmholtz-rws")
        net_modules = [m for m in (model.__self__,)]
        module = WakeSleepModule(model, guide, modules=net_modules, jit=use_jit, **options)
        x = _binary(10)
        torch.manual_seed(2)
        out = []
        for _ in range(3):
            module.zero_grad()
            module(x).backward()
            out.append([p.grad.clone() for p in module.parameters()])
        return out

    for eager, replayed in zip(grads(False), grads(True)):
        for a, b in zip(eager, replayed):
            assert torch.equal(a, b)


def test_signature_keys_shapes_dtypes_and_values():
    a = jit.signature((torch.zeros(3, 2), 5), {"observations": {"x": torch.ones(3)}})
    b = jit.signature((torch.ones(3, 2), 5), {"observations": {"x": torch.zeros(3)}})
    assert a.key == b.key and len(a.tensors) == 2
    for other in (
        jit.signature((torch.zeros(4, 2), 5), {"observations": {"x": torch.ones(3)}}),
        jit.signature(
            (torch.zeros(3, 2, dtype=torch.float64), 5), {"observations": {"x": torch.ones(3)}}
        ),
        jit.signature((torch.zeros(3, 2), 6), {"observations": {"x": torch.ones(3)}}),
        jit.signature((torch.zeros(3, 2), 5), {"observations": {"y": torch.ones(3)}}),
    ):
        assert other.key != a.key
    args, kwargs = a.rebuild((torch.full((3, 2), 7.0), torch.full((3,), 8.0)))
    assert (
        args[1] == 5
        and float(args[0][0, 0]) == 7.0
        and float(kwargs["observations"]["x"][0]) == 8.0
    )
    assert jit.signature(([1, 2],), {}) is not None  # lists are structure, their items values
    assert jit.signature(({1, 2},), {}) is None  # a set is an unhashable leaf


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_replay_on_cuda_is_bitwise_the_eager_step():
    def run(use_jit):
        pyro.clear_param_store()
        torch.manual_seed(0)
        net = HelmholtzMachine([12, 6], name="c").cuda()
        ws = WakeSleep(
            net.model,
            net.guide,
            pyro.optim.Adam({"lr": 0.05}),
            num_particles=3,
            phi_objective="wake",
            jit=use_jit,
        )
        x = _binary(10).cuda()
        torch.manual_seed(1)
        return [tuple(ws.step(x)) for _ in range(5)], store_snapshot()

    eager, eager_params = run(False)
    replayed, jit_params = run(True)
    assert replayed == eager
    assert_store_equal(eager_params, jit_params)


def test_a_parameter_replaced_in_the_store_is_seen(recorded):
    x = torch.randn(10)

    def run(use_jit):
        pyro.clear_param_store()
        ws = WakeSleep(_normal_model, _normal_guide, pyro.optim.SGD({"lr": 0.01}), jit=use_jit)
        torch.manual_seed(4)
        out = [tuple(ws.step(x)) for _ in range(3)]
        pyro.get_param_store()["loc"] = torch.tensor(3.0)  # a new tensor under the name
        out += [tuple(ws.step(x)) for _ in range(3)]
        return out, store_snapshot()

    eager, eager_params = run(False)
    replayed, jit_params = run(True)
    assert replayed == eager
    assert_store_equal(eager_params, jit_params)
    assert recorded == [2]


def _masking_model(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)
    # A term over the positive latents only: its shape depends on the sampled values.
    pyro.factor("positive", -0.1 * (z[z > 0] ** 2).sum())


def _masking_guide(x):
    w = pyro.param("w", torch.tensor(0.5))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(w * x, 1.0))


def test_value_dependent_shapes_run_eagerly_with_a_warning():
    _assert_falls_back_like_eager(
        _masking_model,
        _masking_guide,
        torch.randn(12),
        "depends on tensor values",
        num_particles=2,
        vectorize_particles=False,
        phi_objective="wake",
    )


def test_a_replay_that_fails_falls_back_to_the_eager_step():
    def run(use_jit, sabotage=False):
        model, guide, options = _build("helmholtz-rws")
        ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.05}), jit=use_jit, **options)
        x = _binary(10)
        torch.manual_seed(8)
        out = [tuple(ws.step(x)) for _ in range(3)]
        if sabotage:
            ((key, (graph, static)),) = ws.recorder.recordings.items()

            def failing(*tensors):
                torch.rand(100)  # draws, then fails: the fallback must restore the stream
                raise RuntimeError("shape mismatch")

            ws.recorder.recordings[key] = (failing, static)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out += [tuple(ws.step(x)) for _ in range(3)]
        return out, store_snapshot(), ws, caught

    eager, eager_params, _, _ = run(False)
    replayed, jit_params, ws, caught = run(True, sabotage=True)
    assert replayed == eager
    assert_store_equal(eager_params, jit_params)
    assert (
        ws.recorder.off_reason is not None and "failed on new arguments" in ws.recorder.off_reason
    )
    assert [str(w.message) for w in caught if "runs eagerly" in str(w.message)]


def _subsampled_model(data):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", data.shape[0], subsample_size=4, dim=-1) as i:
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=data[i])


def _subsampled_guide(data):
    w = pyro.param("w", torch.tensor(0.5))
    with pyro.plate("data", data.shape[0], subsample_size=4, dim=-1) as i:
        pyro.sample("z", dist.Normal(w * data[i], 1.0))


@pytest.mark.parametrize("phi_objective", ["wake", "sleep"])
def test_subsampling_plates_replay_their_random_indices(phi_objective):
    data = torch.randn(20)

    def run(use_jit):
        pyro.clear_param_store()
        ws = WakeSleep(
            _subsampled_model,
            _subsampled_guide,
            pyro.optim.Adam({"lr": 0.1}),
            num_particles=2 if phi_objective == "wake" else 1,  # wake-phi needs K > 1
            phi_objective=phi_objective,
            jit=use_jit,
        )
        torch.manual_seed(9)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = [tuple(ws.step(data)) for _ in range(6)]
        return out, store_snapshot(), ws, caught

    eager, eager_params, _, _ = run(False)
    replayed, jit_params, ws, caught = run(True)
    assert replayed == eager
    assert_store_equal(eager_params, jit_params)
    if phi_objective == "wake":
        assert ws.recorder.off_reason is None and ws.recorder.num_recordings == 1
    else:
        # The sleep phase finds the indexed argument by comparing values: not recordable, and
        # the warning says so (not "stochastic control flow", which this model does not have).
        assert ws.recorder.off_reason is not None
        (message,) = [str(w.message) for w in caught if "runs eagerly" in str(w.message)]
        assert "site 'x' observes as data[i] by comparing values" in message
        assert "observations' keyword" in message and "stochastic" not in message


def test_the_indexed_observation_idiom_records_with_an_observations_keyword():
    """The fix the warning above gives: a guide that takes the fantasies by keyword is
    recorded, and its replayed steps equal the eager ones."""

    def guide(data, observations=None):
        w = pyro.param("w", torch.tensor(0.5))
        with pyro.plate("data", data.shape[0], subsample_size=4, dim=-1) as i:
            x = data[i] if observations is None else observations["x"]
            pyro.sample("z", dist.Normal(w * x, 1.0))

    data = torch.randn(20)

    def run(use_jit):
        pyro.clear_param_store()
        ws = WakeSleep(_subsampled_model, guide, pyro.optim.Adam({"lr": 0.1}), jit=use_jit)
        torch.manual_seed(9)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = [tuple(ws.step(data)) for _ in range(6)]
        return out, store_snapshot(), ws

    eager, eager_params, _ = run(False)
    replayed, jit_params, ws = run(True)
    assert replayed == eager
    assert_store_equal(eager_params, jit_params)
    assert ws.recorder.off_reason is None and ws.recorder.num_recordings == 1
