"""
Attend-Infer-Repeat (``MultiDigitAIR``) and its data (``multi_digit_canvases``): the canvases,
the shapes of the model and guide, fantasies against the prior, WakeSleep steps, and the
benchmark's quick mode.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, ReweightedWakeSleep, TraceGraph_ELBO
from scipy import stats

from pyro_wakesleep import WakeSleep, evaluate_dataset
from pyro_wakesleep.datasets import (
    load_digits,
    load_multi_digits,
    multi_digit_canvases,
    shrink_digits,
)
from pyro_wakesleep.models import MultiDigitAIR
from pyro_wakesleep.models.air import canvas_to_window, window_to_canvas

pytestmark = pytest.mark.usefixtures("one_thread")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def digits():
    return load_digits()["train"][:200]


# ---------------------------------------------------------------------------- the canvases


def test_canvases_hold_their_counts_and_are_binary(digits):
    gen = torch.Generator().manual_seed(0)
    data = multi_digit_canvases(300, digits, max_digits=3, generator=gen)
    assert data.images.shape == (300, 784) and data.images.dtype == torch.float32
    assert set(data.images.unique().tolist()) <= {0.0, 1.0}
    assert data.counts.min() >= 0 and data.counts.max() <= 3
    assert set(data.counts.tolist()) == {0, 1, 2, 3}
    # empty canvases are empty, others are not; slots past the count are marked -1
    assert (data.images[data.counts == 0].sum(-1) == 0).all()
    assert (data.images[data.counts > 0].sum(-1) > 0).all()
    slots = torch.arange(3)
    assert ((data.sources >= 0) == (slots < data.counts[:, None])).all()
    assert ((data.offsets[..., 0] >= 0) == (slots < data.counts[:, None])).all()
    assert data.offsets.max() <= 28 - 14


def test_canvas_is_the_pixelwise_maximum_of_its_digits(digits):
    data = multi_digit_canvases(50, digits, generator=torch.Generator().manual_seed(1))
    glyphs = shrink_digits(digits)
    for i in range(50):
        canvas = torch.zeros(28, 28)
        for slot in range(int(data.counts[i])):
            r, c = data.offsets[i, slot].tolist()
            placed = torch.zeros(28, 28)
            placed[r : r + 14, c : c + 14] = glyphs[data.sources[i, slot]]
            canvas = torch.maximum(canvas, placed)
        assert torch.equal(canvas.reshape(-1), data.images[i])


def test_canvases_are_deterministic_given_the_generator(digits):
    a = multi_digit_canvases(40, digits, generator=torch.Generator().manual_seed(5))
    b = multi_digit_canvases(40, digits, generator=torch.Generator().manual_seed(5))
    c = multi_digit_canvases(40, digits, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.images, c.images)


def test_counts_are_uniform(digits):
    """The number of digits is uniform on 0 .. max_digits (a chi-square test)."""
    data = multi_digit_canvases(3000, digits, generator=torch.Generator().manual_seed(2))
    observed = torch.bincount(data.counts, minlength=3).numpy()
    assert stats.chisquare(observed).pvalue > 1e-3


def test_load_multi_digits_splits_and_labels():
    data = load_multi_digits(100, 50, seed=3)
    assert data["train"].shape == (100, 784) and data["test"].shape == (50, 784)
    assert data["train_counts"].shape == (100,) and data["test_counts"].shape == (50,)
    labels = data["test_labels"]
    assert labels.shape == (50, 2)
    assert ((labels >= 0) == (torch.arange(2) < data["test_counts"][:, None])).all()
    assert torch.equal(load_multi_digits(100, 50, seed=3)["test"], data["test"])


# ---------------------------------------------------------------------------- the model


def test_spatial_transformer_cuts_out_what_it_placed():
    """A window placed at scale 1/2 and cut out at the same place comes back; the canvas is
    zero outside the window."""
    window = torch.rand(2, 196)
    z_where = torch.tensor([[math.log(0.5), -0.5, -0.5], [math.log(0.5), 0.5, 0.0]])
    canvas = window_to_canvas(window, z_where, 28)
    assert canvas.shape == (2, 784)
    assert torch.allclose(canvas_to_window(canvas, z_where, 14), window, atol=1e-5)
    image = canvas.reshape(2, 28, 28)
    assert torch.allclose(image[0, :14, :14].reshape(-1), window[0], atol=1e-6)
    assert image[0, 14:].abs().max() == 0 and image[0, :, 14:].abs().max() == 0
    # batch shapes broadcast: one window, particles of positions
    assert window_to_canvas(window[0], z_where.expand(5, 2, 3), 28).shape == (5, 2, 784)


def test_model_and_guide_shapes():
    air = MultiDigitAIR(canvas_size=28, max_objects=3)
    x = load_multi_digits(8, 0)["train"]
    guide = poutine.trace(air.guide).get_trace(x)
    model = poutine.trace(poutine.replay(air.model, trace=guide)).get_trace(x)
    for t in range(3):
        assert guide.nodes[f"z_pres_{t}"]["value"].shape == (8,)
        assert guide.nodes[f"z_where_{t}"]["value"].shape == (8, 3)
        assert guide.nodes[f"z_what_{t}"]["value"].shape == (8, 10)
    assert model.nodes["x"]["fn"].batch_shape == (8,)
    assert model.nodes["x"]["fn"].event_shape == (784,)
    assert air.sample(5).shape == (5, 784)
    assert air.reconstruct(x).shape == (8, 784)
    latents = air.infer(x)
    assert latents.counts.shape == (8,) and latents.z_where.shape == (8, 3, 3)
    assert torch.equal(latents.counts, latents.z_pres.sum(-1).long())
    assert air.boxes(latents.z_where).shape == (8, 3, 4)
    assert air.count_prior().shape == (4,)
    assert torch.isclose(air.count_prior().sum(), torch.tensor(1.0))


def test_objects_stay_off_and_masked_sites_add_nothing():
    """Once z_pres is 0 it stays 0, and the sites of objects that are off carry mask False,
    so every image keeps its own number of objects in one vectorized batch."""
    air = MultiDigitAIR(max_objects=3)
    x = load_multi_digits(64, 0, seed=1)["train"]
    with pyro.plate("particles", 4, dim=-2):
        trace = poutine.trace(air.guide).get_trace(x)
    pres = torch.stack([trace.nodes[f"z_pres_{t}"]["value"] for t in range(3)], -1)
    assert pres.shape == (4, 64, 3)
    assert (pres[..., 1:] <= pres[..., :-1]).all()
    assert 0 < pres.sum() < pres.numel()
    for t in range(3):
        mask = trace.nodes[f"z_what_{t}"]["mask"]
        assert torch.equal(mask.expand(4, 64), pres[..., t].bool())


def test_fantasy_counts_follow_the_prior():
    """The number of objects of the model's fantasies has the prior's distribution
    (``count_prior``), by a chi-square test, for a prior that is not the initial one."""
    air = MultiDigitAIR(max_objects=3)
    with torch.no_grad():
        air.generative.pres_logits.copy_(torch.tensor([1.0, 0.0, -1.0]))
    with poutine.block():
        trace = poutine.trace(poutine.uncondition(air.model)).get_trace(torch.zeros(4000, 784))
    counts = sum(trace.nodes[f"z_pres_{t}"]["value"] for t in range(3)).long()
    observed = torch.bincount(counts, minlength=4).numpy()
    expected = (air.count_prior() * 4000).numpy()
    assert stats.chisquare(observed, expected).pvalue > 1e-3


# ---------------------------------------------------------------------------- training


def _changed(before, module):
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize(
    "num_particles, phi_objective", [(1, "sleep"), (5, "wake")], ids=["classic", "rws5-wake"]
)
def test_wake_sleep_steps_change_both_halves(num_particles, phi_objective):
    air = MultiDigitAIR(max_objects=3, hidden=32)
    x = load_multi_digits(16, 0)["train"]
    before = {n: p.detach().clone() for n, p in air.named_parameters()}
    ws = WakeSleep(
        air.model, air.guide, pyro.optim.Adam({"lr": 1e-2}), num_particles=num_particles,
        phi_objective=phi_objective, max_plate_nesting=air.max_plate_nesting,
    )  # fmt: skip
    for _ in range(3):
        losses = ws.step(x)
        assert math.isfinite(losses.wake_theta) and math.isfinite(losses.phi)
    changed = _changed(before, air)
    assert "generative.pres_logits" in changed
    assert any(n.startswith("generative.decoder") for n in changed)
    assert any(n.startswith("recognition.rnn") for n in changed)
    assert any(n.startswith("recognition.encoder") for n in changed)


def test_other_estimators_run():
    """SVI with TraceGraph_ELBO (with the baselines) and Pyro's ReweightedWakeSleep step."""
    x = load_multi_digits(8, 0)["train"]
    air = MultiDigitAIR(max_objects=2, hidden=16, baselines=True, name="tg")
    svi = SVI(air.model, air.guide, pyro.optim.Adam({"lr": 1e-3}), TraceGraph_ELBO(1))
    assert math.isfinite(svi.step(x))
    assert "tg_baseline$$$0.weight" in pyro.get_param_store()
    air = MultiDigitAIR(max_objects=2, hidden=16, name="rws")
    loss = ReweightedWakeSleep(num_particles=3, max_plate_nesting=1, vectorize_particles=True)
    svi = SVI(air.model, air.guide, pyro.optim.Adam({"lr": 1e-3}), loss)
    assert all(math.isfinite(v) for v in svi.step(x))


def test_evaluate_dataset_gives_finite_log_likelihoods():
    air = MultiDigitAIR(max_objects=2, hidden=16)
    x = load_multi_digits(6, 0)["train"]
    result = evaluate_dataset(air.model, air.guide, x, batch_size=3, num_samples=20,
                              chunk_size=10, max_plate_nesting=1)  # fmt: skip
    assert result.log_px.shape == (6,)
    assert torch.isfinite(result.log_px).all() and (result.log_px < 0).all()
    assert (result.stderr > 0).all()


def test_count_inference_improves_with_rws_training():
    """A fixed seed, 150 steps of WakeSleep RWS (K=5, wake-phi) on tiny networks: the guide's
    count accuracy on held-out canvases rises well above its start (each accuracy averages
    10 guide draws over 300 canvases; the margin is many standard errors)."""
    pyro.set_rng_seed(0)
    data = load_multi_digits(2000, 300, seed=0)
    air = MultiDigitAIR(max_objects=3, hidden=64)
    ws = WakeSleep(air.model, air.guide, pyro.optim.Adam({"lr": 3e-3}), num_particles=5,
                   phi_objective="wake", max_plate_nesting=1)  # fmt: skip
    before = air.count_accuracy(data["test"], data["test_counts"], num_samples=10)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        ws.step(data["train"][torch.randint(2000, (32,), generator=gen)])
    after = air.count_accuracy(data["test"], data["test_counts"], num_samples=10)
    stderr = math.hypot(before.std(), after.std()) / math.sqrt(len(after))
    assert after.mean() - before.mean() > max(0.15, 5 * stderr), (before.mean(), after.mean())


# ---------------------------------------------------------------------------- the benchmark


def test_benchmark_quick_writes_json_and_figure(tmp_path):
    out, figure = tmp_path / "air.json", tmp_path / "air.png"
    command = [sys.executable, str(BENCHMARKS / "air.py"), "--quick"]
    command += ["--json", str(out), "--figure", str(figure)]
    subprocess.run(command, check=True, timeout=600)
    report = json.loads(out.read_text())
    names = [r["contender"] for r in report["results"]]
    assert names == ["wakesleep-rws5", "wakesleep-classic", "svi-tracegraph", "pyro-rws5"]
    for record in report["results"]:
        assert "error" not in record
        first, last = record["points"][0], record["points"][-1]
        assert first["steps"] == 0 and last["steps"] > 0
        assert 0 <= last["count_accuracy"] <= 1 and last["log_px"] < 0
        assert last["log_px_stderr"] > 0
    # the same initialization for every contender
    assert len({r["points"][0]["log_px"] for r in report["results"]}) == 1
    assert figure.read_bytes().startswith(b"\x89PNG")
