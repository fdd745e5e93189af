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
from pyro_wakesleep.checkpoint import CheckpointError, atomic_save

# A training script run in fresh processes: "full" trains 20 steps, "first" trains 10 and
# saves, "resume" builds everything afresh (a different init seed, so nothing matches by
# luck), loads, and trains the last 10. Both a pyro.module model (HelmholtzMachine) and a
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
        for x in data:
            ws.step(x)
    elif mode == "first":
        for x in data[:10]:
            ws.step(x)
        ws.save(path)
        sys.exit(0)
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
    _run(script, "first", path, kind)
    _run(script, "resume", path, kind)
    full = torch.load(str(path) + ".full")
    resumed = torch.load(str(path) + ".resume")
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
