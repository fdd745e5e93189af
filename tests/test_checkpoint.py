"""
WakeSleep.save / WakeSleep.load: bitwise resume in a new process with freshly built modules,
atomic writes under SIGKILL, clear errors for bad files; and skip_nonfinite.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import assert_store_equal, store_snapshot

from pyro_wakesleep import WakeSleep
from pyro_wakesleep.checkpoint import CheckpointError
from pyro_wakesleep.files import atomic_save

# A training script run in fresh processes: "full" trains 10 steps, saves, and goes on
# uninterrupted for 10 more (so saving must not disturb the run either); "resume" builds
# everything afresh (a different init seed, so nothing matches by luck), loads, and trains
# the last 10. Both a pyro.module model (HelmholtzMachine) and a
# plain pyro.param model with a constrained parameter are covered.
SCRIPT = textwrap.dedent(
    """
    import sys, torch, pyro
    import pyro.distributions as dist
    from pyro_wakesleep import WakeSleep
    from pyro_wakesleep.models import HelmholtzMachine

    mode, path, kind = sys.argv[1], sys.argv[2], sys.argv[3]
    g = torch.Generator().manual_seed(5)
    data = [torch.bernoulli(torch.full((8, 16), 0.3), generator=g) for _ in range(20)]
    torch.manual_seed(0 if mode != "resume" else 123)
    if kind == "helmholtz":
        hm = HelmholtzMachine([16, 8, 2])
        model, guide, kw = hm.model, hm.guide, dict(num_particles=3, phi_objective=0.5)
    else:
        def model(x):
            scale = pyro.param("scale", torch.ones(16), constraint=dist.constraints.positive)
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
                pyro.sample("x", dist.Normal(z.unsqueeze(-1), scale).to_event(1), obs=x)

        def guide(x):
            w = pyro.param("w", torch.randn(16) * 0.1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(x @ w, 1.0))

        kw = dict(num_particles=1)
    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.05}),
                   guide_optim=pyro.optim.SGD({"lr": 0.01, "momentum": 0.9}), **kw)
    if mode == "full":
        for x in data[:10]:
            ws.step(x)
        ws.save(path)
        for x in data[10:]:
            ws.step(x)
    else:
        ws.load(path)
        assert ws.num_steps == 10
        for x in data[10:]:
            ws.step(x)
    store = pyro.get_param_store()
    torch.save({n: store[n].detach().clone() for n in store.keys()}, path + "." + mode)
    """
)


def _run(script, *args):
    subprocess.run([sys.executable, str(script), *map(str, args)], check=True, timeout=120)


@pytest.mark.parametrize("kind", ["helmholtz", "plain_params"])
def test_resume_in_a_new_process_is_bitwise(tmp_path, kind):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    path = tmp_path / "ckpt.pt"
    _run(script, "full", path, kind)
    _run(script, "resume", path, kind)
    full = torch.load(str(path) + ".full", weights_only=True)
    resumed = torch.load(str(path) + ".resume", weights_only=True)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_loaded_values_reach_a_freshly_built_module():
    """pyro.module keeps a fresh module's tensors; load makes the module compute with the
    loaded values, and the optimizer trains the module's own tensors."""
    from pyro_wakesleep.models import HelmholtzMachine

    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    hm = HelmholtzMachine([6, 3])
    ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 0.1}))
    ws.step(x)
    saved = {n: p.detach().clone() for n, p in hm.named_parameters()}
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "c.pt")
        ws.save(path)
        pyro.clear_param_store()
        torch.manual_seed(1)
        fresh = HelmholtzMachine([6, 3])
        assert not torch.equal(fresh.generative.prior_logits, saved["generative.prior_logits"])
        ws2 = WakeSleep(fresh.model, fresh.guide, pyro.optim.Adam({"lr": 0.1}))
        ws2.load(path)
    with torch.no_grad():
        ws2.evaluate_loss(x)  # any run of the model and guide adopts the loaded values
    for name, p in fresh.named_parameters():
        assert torch.equal(p, saved[name]), name
    store = pyro.get_param_store()
    assert store["helmholtz_generative$$$prior_logits"] is fresh.generative.prior_logits
    before = fresh.generative.prior_logits.detach().clone()
    ws2.step(x)
    assert not torch.equal(fresh.generative.prior_logits, before)  # the module is trained
    assert ws2.num_steps == 2


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch, pyro
    import pyro.distributions as dist
    from pyro_wakesleep import WakeSleep

    path = sys.argv[1]

    def model(x):
        loc = pyro.param("loc", torch.zeros(2_000_000))  # 8 MB: a write takes a while
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + loc[:1], 1.0), obs=x)

    def guide(x):
        w = pyro.param("w", torch.zeros(()))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(w * x, 1.0))

    ws = WakeSleep(model, guide, pyro.optim.Adam({"lr": 0.1}))
    x = torch.randn(4)
    while True:
        ws.step(x)
        ws.save(path)
        print(ws.num_steps, flush=True)
    """
)


def test_sigkill_while_writing_leaves_a_readable_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    path = tmp_path / "ckpt.pt"
    delays = [0.0, 0.021, 0.057]  # fixed offsets into the write loop
    for delay in delays:
        child = subprocess.Popen(
            [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout.readline().strip()  # one checkpoint written completely
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
        pyro.clear_param_store()
        ws = WakeSleep(lambda x: None, lambda x: None, pyro.optim.Adam({"lr": 0.1}))
        ws.load(path)  # whatever the moment of the kill, the file is a whole checkpoint
        assert ws.num_steps >= 1
        assert pyro.get_param_store()["loc"].shape == (2_000_000,)


def _saved(tmp_path):
    def model(x):
        loc = pyro.param("loc", torch.zeros(()))
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    ws = WakeSleep(model, lambda x: None, pyro.optim.Adam({"lr": 0.1}))
    ws.step(torch.tensor(1.0))
    path = tmp_path / "good.pt"
    ws.save(path)
    return ws, path


def test_truncated_foreign_and_missing_files_give_clear_errors(tmp_path):
    ws, path = _saved(tmp_path)
    before = store_snapshot()
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or of another format"):
        ws.load(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "epoch": 3}, foreign)
    with pytest.raises(CheckpointError, match="not a WakeSleep checkpoint.*epoch"):
        ws.load(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.txt"):
        ws.load(text)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        ws.load(tmp_path / "missing.pt")
    assert_store_equal(before)  # a refused file changes nothing
    assert ws.num_steps == 1


def test_atomic_save_leaves_no_temporary_file(tmp_path):
    atomic_save({"a": torch.ones(3)}, tmp_path / "x.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


# ---------------------------------------------------------------- skip_nonfinite


def _model(x):
    loc = pyro.param("loc", torch.zeros(3))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) + loc, 1.0).to_event(1), obs=x)


def _guide(x):
    w = pyro.param("w", torch.zeros(3))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ w, 1.0))


@pytest.mark.parametrize("first_bad", [0, 2])
def test_skip_nonfinite_skips_and_counts(first_bad):
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    bad = x.clone()
    bad[1, 1] = float("nan")
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(_model, _guide, optim, skip_nonfinite=True)
    batches = [x] * 5
    batches[first_bad] = bad
    batches[4] = bad
    for i, batch in enumerate(batches):
        before = store_snapshot()
        state = {k: {kk: vv for kk, vv in v.items()} for k, v in optim.get_state().items()}
        if i in (first_bad, 4):
            with pytest.warns(RuntimeWarning, match=r"Skipped a step.*'x'"):
                losses = ws.step(batch)
            assert all(v != v for v in losses)  # NaN losses
            assert_store_equal(before)
            assert optim.get_state().keys() == state.keys()
        else:
            losses = ws.step(batch)
            assert all(torch.isfinite(torch.tensor(v)) for v in losses)
    assert ws.num_skipped_steps == 2
    assert ws.num_steps == 3


def test_nonfinite_raises_by_default_with_step_and_site():
    from pyro_wakesleep import NonFiniteLossError

    x = torch.randn(5, 3)
    ws = WakeSleep(_model, _guide, pyro.optim.Adam({"lr": 0.1}))
    ws.step(x)
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"Step 1.*'x'"):
        ws.step(bad)
    assert ws.num_skipped_steps == 0


def test_load_with_arguments_gives_the_modules_the_loaded_values_at_once(tmp_path):
    """load(path, x) runs the model and guide once, without touching the random streams, so
    fresh modules hold the loaded values before any step."""
    from pyro_wakesleep.models import HelmholtzMachine

    x = torch.bernoulli(torch.full((4, 6), 0.5))
    torch.manual_seed(0)
    hm = HelmholtzMachine([6, 3])
    ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 0.1}))
    ws.step(x)
    ws.save(tmp_path / "c.pt")
    saved = {n: p.detach().clone() for n, p in hm.named_parameters()}
    pyro.clear_param_store()
    torch.manual_seed(1)
    fresh = HelmholtzMachine([6, 3])
    ws2 = WakeSleep(fresh.model, fresh.guide, pyro.optim.Adam({"lr": 0.1}))
    ws2.load(tmp_path / "c.pt", x[:1])
    rng = torch.get_rng_state()
    for name, p in fresh.named_parameters():
        assert torch.equal(p, saved[name]), name
    ws2.load(tmp_path / "c.pt", x[:1])
    assert torch.equal(torch.get_rng_state(), rng)  # the immediate run drew nothing


def test_soak_script_quick_mode(tmp_path):
    """benchmarks/soak.py --quick: killed with SIGKILL and resumed several times, the run's
    loss curve and final parameters equal an uninterrupted run's, bitwise."""
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path)], check=True, timeout=300
    )
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["interrupted"]["kills"] >= 1
    assert summary["loss_curves_equal"] and summary["final_parameters_equal"]


def test_skip_nonfinite_skips_a_step_with_a_nan_gradient_and_finite_loss():
    """sqrt(theta * c) at c = 0 has a finite value and a 0/0 derivative in theta."""

    def model(x, c):
        theta = pyro.param("theta", torch.tensor(1.0), constraint=dist.constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.sqrt(theta * c), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x, c):
        w = pyro.param("w", torch.tensor(0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(w * x, 1.0))

    x = torch.randn(6)
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(model, guide, optim, skip_nonfinite=True)
    ws.step(x, torch.tensor(1.0))
    before = store_snapshot()
    with pytest.warns(RuntimeWarning, match="gradient of parameter 'theta'"):
        losses = ws.step(x, torch.tensor(0.0))
    assert all(v != v for v in losses)
    assert_store_equal(before)
    assert (ws.num_steps, ws.num_skipped_steps) == (1, 1)
    ws.step(x, torch.tensor(1.0))
    assert (ws.num_steps, ws.num_skipped_steps) == (2, 1)


# ---------------------------------------------------------------- files a user can trust


class _RunsCode:
    """Pickles as a call of exec: a checkpoint crafted to run code when it is unpickled."""

    def __init__(self, marker):
        self.code = f"open({str(marker)!r}, 'w').close()"

    def __reduce__(self):
        return (exec, (self.code,))


def crafted_checkpoints(folder, marker):
    """Files that look like checkpoints but run code when unpickled: at the top, inside the
    parameters, and inside the extra data."""
    evil = _RunsCode(marker)
    good = {
        "format": "pyro-wakesleep/wake-sleep-checkpoint",
        "version": 2,
        "params": {"params": {"loc": torch.zeros(())}, "constraints": {"loc": "real"}},
        "optim": {},
        "guide_optim": None,
        "num_steps": 1,
        "num_skipped_steps": 0,
        "rng": {},
        "extra": {},
    }
    paths = []
    for i, variant in enumerate(
        [
            evil,
            {**good, "format": evil},
            {**good, "params": {"params": {"loc": evil}, "constraints": {"loc": "real"}}},
            {**good, "extra": {"run": [1, 2, {"x": evil}]}},
        ]
    ):
        path = folder / f"crafted{i}.pt"
        torch.save(variant, path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("loader", ["read", "WakeSleep.load"])
def test_a_crafted_checkpoint_runs_nothing(tmp_path, loader):
    from pyro_wakesleep import checkpoint

    marker = tmp_path / "marker"
    ws, _ = _saved(tmp_path)
    before = store_snapshot()
    for path in crafted_checkpoints(tmp_path, marker):
        with pytest.raises(CheckpointError, match="refused.*nothing in it was run"):
            checkpoint.read(path) if loader == "read" else ws.load(path)
        assert not marker.exists(), "unpickling a checkpoint ran code"
    assert_store_equal(before)
    # The same object unpickled without the safety runs the code: the test would see it.
    torch.load(crafted_checkpoints(tmp_path, marker)[0], weights_only=False)
    assert marker.exists()


def test_checkpoint_files_hold_plain_data_only(tmp_path):
    """Every entry a checkpoint holds reads back with weights_only=True: constraints by name,
    Python's and NumPy's generator states as tensors; all three generators are restored."""
    import random

    import numpy as np

    from pyro_wakesleep.checkpoint import read

    def model(x):
        pyro.param("scale", torch.ones(3), constraint=dist.constraints.positive)
        pyro.param("p", torch.full((3,), 0.5), constraint=dist.constraints.interval(0.0, 2.0))
        pyro.param("low", torch.ones(2) * 3, constraint=dist.constraints.greater_than(1.0))
        pyro.param("w", torch.ones(3) / 3, constraint=dist.constraints.simplex)
        pyro.param("L", torch.eye(2), constraint=dist.constraints.lower_cholesky)
        pyro.param(
            "v",
            torch.ones(2, 3),
            constraint=dist.constraints.independent(dist.constraints.positive, 1),
        )
        loc = pyro.param("loc", torch.zeros(()))
        pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    ws = WakeSleep(model, lambda x: None, pyro.optim.Adam({"lr": 0.1}))
    ws.step(torch.tensor(1.0))
    random.seed(3)
    np.random.seed(4)
    ws.save(tmp_path / "c.pt", extra={"epoch": 2, "order": torch.Generator().get_state()})
    state = (random.random(), np.random.rand(), torch.rand(()))
    raw = torch.load(tmp_path / "c.pt", weights_only=True)  # plain data, or this raises
    assert raw["params"]["constraints"]["scale"] == "positive"
    assert raw["params"]["constraints"]["p"] == {
        "name": "interval",
        "lower_bound": 0.0,
        "upper_bound": 2.0,
    }
    values = {n: pyro.param(n).detach().clone() for n in pyro.get_param_store().keys()}
    pyro.clear_param_store()
    extra = ws.load(tmp_path / "c.pt")
    assert extra["epoch"] == 2 and extra["order"].dtype == torch.uint8
    assert (random.random(), np.random.rand(), torch.rand(())) == state
    store = pyro.get_param_store()
    for name, value in values.items():
        assert torch.equal(pyro.param(name).detach(), value), name
    assert type(store._constraints["w"]) is type(dist.constraints.simplex)
    assert store._constraints["low"].lower_bound == 1.0
    assert read(tmp_path / "c.pt")["num_steps"] == 1


def test_what_is_not_plain_data_is_refused_when_saving(tmp_path):
    # A constraint the checkpoint cannot name (stack is not stored by name).
    odd = dist.constraints.stack([dist.constraints.positive, dist.constraints.real])

    def model(x):
        pyro.param("a", torch.ones(2), constraint=odd)
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    pyro.param("a", torch.ones(2), constraint=odd)
    ws = WakeSleep(model, lambda x: None, pyro.optim.Adam({"lr": 0.1}))
    with pytest.raises(TypeError, match="parameter 'a'.*cannot store the constraint"):
        ws.save(tmp_path / "c.pt")
    pyro.clear_param_store()
    with pytest.raises(TypeError, match=r"extra\['when'\] is a datetime.date"):
        import datetime

        ws.save(tmp_path / "c.pt", extra={"when": datetime.date.today()})
    assert not list(tmp_path.iterdir())  # nothing written


def test_unreadable_malformed_and_older_files_say_what_they_are(tmp_path, monkeypatch):
    from pyro_wakesleep import checkpoint

    ws, path = _saved(tmp_path)
    before = store_snapshot()
    raw = torch.load(path, weights_only=True)

    def variant(name, **changes):
        out = tmp_path / name
        torch.save({**raw, **changes}, out)
        return out

    with pytest.raises(CheckpointError, match="missing or malformed.*num_steps"):
        ws.load(variant("negative.pt", num_steps=-1))
    with pytest.raises(CheckpointError, match="missing or malformed.*optim"):
        ws.load(variant("optim.pt", optim=[1, 2]))
    no_rng = {k: v for k, v in raw.items() if k != "rng"}
    torch.save(no_rng, tmp_path / "no_rng.pt")
    with pytest.raises(CheckpointError, match="missing or malformed.*rng"):
        ws.load(tmp_path / "no_rng.pt")
    bad_rng = {**raw["rng"], "torch": torch.zeros(3, dtype=torch.uint8)}
    rng = torch.get_rng_state()
    with pytest.raises(CheckpointError, match="malformed random generator state"):
        ws.load(variant("bad_rng.pt", rng=bad_rng))
    assert torch.equal(torch.get_rng_state(), rng)  # all generators restored, or none
    with pytest.raises(CheckpointError, match="version 1, this pyro-wakesleep reads version 2"):
        ws.load(variant("v1.pt", version=1))
    torch.save({"format": "pyro-wakesleep-checkpoint-1", "net": {}}, tmp_path / "cli.pt")
    with pytest.raises(CheckpointError, match="0.1.0 command in its own former format"):
        ws.load(tmp_path / "cli.pt")
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(CheckpointError, match="not a file"):
        ws.load(tmp_path / "folder.pt")

    # A file that cannot be opened is said to be so (tests run as root: simulate it).
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint, "open", refuse, raising=False)
    with pytest.raises(CheckpointError, match=r"cannot be read \(Permission denied\)") as info:
        ws.load(path)
    assert "corrupt" not in str(info.value)
    assert_store_equal(before)
    assert ws.num_steps == 1


def _helmholtz(sizes, seed):
    from pyro_wakesleep.models import HelmholtzMachine

    torch.manual_seed(seed)
    return HelmholtzMachine(sizes)


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    """[784, 8] into [784, 16]: refused naming the parameters, with the store unchanged, at
    once when load gets a batch, else at the next step (and every one after)."""
    x = torch.bernoulli(torch.full((4, 784), 0.3))
    small = _helmholtz([784, 8], 0)
    ws = WakeSleep(small.model, small.guide, pyro.optim.Adam({"lr": 0.1}))
    ws.step(x)
    ws.save(tmp_path / "small.pt")
    pyro.clear_param_store()

    big = _helmholtz([784, 16], 1)
    fresh = {n: p.detach().clone() for n, p in big.named_parameters()}
    ws = WakeSleep(big.model, big.guide, pyro.optim.Adam({"lr": 0.1}))
    with pytest.raises(CheckpointError, match=r"shape \(8,\) in the checkpoint and \(16,\)"):
        ws.load(tmp_path / "small.pt", x)
    assert list(pyro.get_param_store().keys()) == []
    assert ws.num_steps == 0

    ws.load(tmp_path / "small.pt")  # no batch: checked at the next step
    before = store_snapshot()
    for _ in range(2):
        with pytest.raises(CheckpointError, match="does not fit.*helmholtz_generative"):
            ws.step(x)
        assert_store_equal(before)
    for name, p in big.named_parameters():
        assert torch.equal(p, fresh[name]), name  # the module never took a wrong value

    # The model registers the same shapes but the checkpoint holds a name it never does.
    pyro.clear_param_store()
    same = _helmholtz([784, 8], 2)

    def model(x):
        pyro.param("extra", torch.zeros(2))
        same.model(x)

    ws = WakeSleep(model, same.guide, pyro.optim.Adam({"lr": 0.1}))
    ws.step(x)
    ws.save(tmp_path / "extra.pt")
    pyro.clear_param_store()
    ws = WakeSleep(same.model, same.guide, pyro.optim.Adam({"lr": 0.1}))
    with pytest.raises(CheckpointError, match="'extra' is saved but never registered"):
        ws.load(tmp_path / "extra.pt", x)
    # ... and one the model registers but the checkpoint lacks.
    pyro.clear_param_store()
    ws = WakeSleep(model, same.guide, pyro.optim.Adam({"lr": 0.1}))
    with pytest.raises(CheckpointError, match="'extra' is registered .* but not saved"):
        ws.load(tmp_path / "small.pt", x)


def test_load_into_a_live_run_restores_the_optimizer_state(tmp_path):
    """Loading into a WakeSleep whose optimizers already hold state for the same tensors: the
    loaded state replaces theirs, so the steps after the load repeat the steps after the save."""
    x = torch.bernoulli(torch.full((6, 16), 0.3))
    hm = _helmholtz([16, 4], 0)
    ws = WakeSleep(hm.model, hm.guide, pyro.optim.Adam({"lr": 0.05}))
    for _ in range(3):
        ws.step(x)
    ws.save(tmp_path / "c.pt")
    first = [ws.step(x) for _ in range(3)]
    after = store_snapshot()
    ws.load(tmp_path / "c.pt")
    assert [ws.step(x) for _ in range(3)] == first
    assert_store_equal(after)


def test_an_optimizer_failing_on_creation_changes_nothing():
    """The guide's optimizer raises when first made (a negative learning rate): the model's
    parameters, gradients and optimizer stay as they were."""
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    optim = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(_model, _guide, optim, guide_optim=pyro.optim.Adam({"lr": -1.0}))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ws.step(x)
    params = store_snapshot()
    assert set(params) == set()  # the parameters the failed step created are gone again
    assert optim.get_state() == {}
    ws.wake_step(x)  # the model's optimizer alone is fine
    before = store_snapshot()
    state = optim.get_state()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ws.step(x)
    assert_store_equal(before)
    assert all(pyro.param(n).unconstrained().grad is None for n in before)
    assert optim.get_state().keys() == state.keys()
    assert ws.num_steps == 1


def test_an_optimizer_state_of_another_optimizer_is_refused(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    ws = WakeSleep(_model, _guide, pyro.optim.SGD({"lr": 0.1, "momentum": 0.9}))
    ws.step(x)
    ws.save(tmp_path / "sgd.pt")
    pyro.clear_param_store()
    adam = pyro.optim.Adam({"lr": 0.1})
    ws = WakeSleep(_model, _guide, adam)
    ws.load(tmp_path / "sgd.pt", x)
    before = store_snapshot()
    with pytest.raises(ValueError, match="loaded for parameter .*another kind of optimizer"):
        ws.step(x)
    assert_store_equal(before)
    assert adam.get_state() == {}
    with pytest.raises(ValueError, match="another kind of optimizer"):
        ws.step(x)  # the loaded state still waits, and is still refused


def test_the_next_save_removes_temporary_files_of_killed_writers(tmp_path):
    import socket

    path = tmp_path / "c.pt"
    host = socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stale = [f".c.pt.{dead}@{host}.abc123.tmp", ".c.pt.oldstyle1.tmp", f".c.pt.1@{host}x.q.tmp"]
    alive = f".c.pt.{os.getppid()}@{host}.def456.tmp"  # a live writer's: kept
    for name in [*stale, alive, ".other.pt.zzz.tmp"]:
        (tmp_path / name).write_bytes(b"partial")
    atomic_save({"a": torch.ones(3)}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["c.pt", alive, ".other.pt.zzz.tmp"]
    )


FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys, torch
    from pyro_wakesleep.files import atomic_save
    path = sys.argv[1]
    atomic_save({"small": torch.zeros(10)}, path)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    try:
        atomic_save({"big": torch.zeros(100_000)}, path)
    except OSError as error:
        print(error)
        sys.exit(3)
    """
)


def test_a_full_disk_raises_oserror_naming_the_file_and_keeps_the_previous_one(tmp_path):
    resource = pytest.importorskip("resource")
    assert resource
    script = tmp_path / "full.py"
    script.write_text(FULL_DISK)
    path = tmp_path / "c.pt"
    result = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3, result.stderr
    assert f"{path}: cannot be written" in result.stdout
    assert torch.load(path, weights_only=True)["small"].shape == (10,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "full.py"]
