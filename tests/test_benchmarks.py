"""
The benchmark scripts run and write what they promise (smoke tests in their quick modes; no
timing is asserted).
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "binarized_mnist.npz"


def test_throughput_quick_writes_rates_ratios_and_memory(tmp_path):
    out = tmp_path / "throughput.json"
    command = [sys.executable, str(BENCHMARKS / "throughput.py"), "--quick", "--threads", "1"]
    command += ["--configs", "784-200, batch 100, K=5", "--json", str(out)]
    subprocess.run(command, check=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["meta"]["torch"] and report["meta"]["repeats"] == 2
    (row,) = report["results"]
    assert set(row["steps_per_second"]) == {
        "wakesleep",
        "wakesleep_jit",
        "handwritten",
        "pyro_rws",
        "svi_trace_elbo",
        "svi_tracegraph_elbo",
    }
    for ours in ("wakesleep", "wakesleep_jit"):
        for key in (f"{ours}_over_handwritten", f"{ours}_over_pyro_rws"):
            assert row[key] > 0
    assert all(mb > 0 for mb in row["peak_memory_mb"].values())


def test_step_anatomy_quick_writes_every_part_and_the_profile(tmp_path):
    out = tmp_path / "anatomy.json"
    command = [sys.executable, str(BENCHMARKS / "step_anatomy.py"), "--quick", "--profile"]
    command += ["--json", str(out)]
    subprocess.run(command, check=True, timeout=300)
    (row,) = json.loads(out.read_text())["results"]
    assert row["config"] == "helmholtz 784-200, batch 100, K=1"
    assert len(row["ms_per_step"]) == 7
    assert all(v["median"] > 0 for v in row["ms_per_step"].values())
    assert len(row["derived_ms"]) == 5 and row["profile_ms"]["eager step (profiled)"] > 0


def test_scaling_quick_writes_rates_efficiency_and_allreduce_shares(tmp_path):
    """One and two gloo processes on localhost, both engines, a small net (no timing)."""
    out = tmp_path / "scaling.json"
    command = [sys.executable, str(BENCHMARKS / "scaling.py"), "--quick"]
    command += ["--layers", "784,20", "--batch-size", "8", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["meta"]["backend"] == "gloo" and report["meta"]["repeats"] == 1
    engines = [(r["engine"], r["K"]) for r in report["results"]]
    assert engines == [("wakesleep", 5), ("ddp", 5), ("local", 5)]
    for row in report["results"]:
        assert row["efficiency"]["median"] > 0
        for world in ("1", "2"):
            stats = row["worlds"][world]
            assert stats["steps_per_second"]["median"] > 0
            in_step = stats["allreduce_share_in_step"]["median"]
            assert in_step == 0 if row["engine"] == "local" else in_step > 0
            assert stats["allreduce_share_isolated"]["median"] > 0
            (ranks,) = stats["per_repeat_per_rank"]
            assert len(ranks) == int(world)


def test_throughput_quick_runs_the_control_flow_model(tmp_path):
    """The geometric-objects configuration (stochastic control flow, particles one at a time):
    its three contenders and both ratios."""
    out = tmp_path / "throughput.json"
    command = [sys.executable, str(BENCHMARKS / "throughput.py"), "--quick", "--threads", "1"]
    command += ["--configs", "geometric objects", "--no-memory", "--json", str(out)]
    subprocess.run(command, check=True, timeout=300)
    (row,) = json.loads(out.read_text())["results"]
    assert row["config"].startswith("geometric objects")
    assert set(row["steps_per_second"]) == {"wakesleep", "pyro_rws", "svi_tracegraph_elbo"}
    assert row["wakesleep_over_pyro_rws"] > 0 and row["wakesleep_over_svi_tracegraph_elbo"] > 0
    assert "peak_memory_mb" not in row


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data/binarized_mnist.npz not present")
def test_quality_quick_writes_table_json_and_plot(tmp_path):
    """Every kind of contender in one quick run (one process start and data load): classic
    wake-sleep, Pyro's RWS, and the estimators of issue 14 (VIMCO, memoised, defensive)."""
    names = ["wakesleep-classic", "pyro-rws5", "vimco5", "memoised", "wakesleep-rws5-defensive"]
    command = [sys.executable, str(BENCHMARKS / "quality.py"), "--quick", "--threads", "1"]
    command += ["--estimators", ",".join(names), "--out", str(tmp_path)]
    subprocess.run(command, check=True, timeout=300)
    report = json.loads((tmp_path / "quality.json").read_text())
    assert [r["estimator"] for r in report["results"]] == names
    for result in report["results"]:
        assert "error" not in result
        last = result["points"][-1]
        assert last["steps"] > 0 and last["test_ll"] < 0 and last["test_ll_stderr"] > 0
    assert (tmp_path / "quality.png").stat().st_size > 1000


def load_quality():
    spec = importlib.util.spec_from_file_location("quality", BENCHMARKS / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_memoised_steps_with_the_rows_true_ids(monkeypatch):
    """train() hands each step the batch with its rows' positions in the training set, and the
    memoised contender keeps its memory by them: filled for the rows trained on, empty for the
    others (a tiny net, half an epoch of a 10-row training set; no timing)."""
    quality = load_quality()
    calls, losses = [], []
    real_build, real_loss = quality.build, quality.MemoisedWakeSleepLoss

    def build(estimator, net, lr):
        step = real_build(estimator, net, lr)

        def recording(x, ids):
            calls.append((x.clone(), ids.clone()))
            return step(x, ids)

        return recording

    def loss(*args, **kwargs):
        losses.append(real_loss(*args, **kwargs))
        return losses[-1]

    monkeypatch.setattr(quality, "build", build)
    monkeypatch.setattr(quality, "MemoisedWakeSleepLoss", loss)
    args = quality.parse_args(
        ["--layers", "16,4", "--epochs", "0.5", "--evals", "1", "--batch-size", "4"]
        + ["--num-samples", "5", "--eval-samples-during", "5"]
    )
    generator = torch.Generator().manual_seed(0)
    train_x = (torch.rand(10, 16, generator=generator) < 0.3).float()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        record = quality.train("memoised", train_x, train_x[:3], args)
    finally:
        torch.set_num_threads(threads)
    assert "error" not in record and record["points"][-1]["steps"] == 2
    assert len(calls) == 2 and len(losses) == 1
    for x, ids in calls:
        assert torch.equal(x, train_x[ids])
    seen = torch.cat([ids for _, ids in calls])
    assert len(seen.unique()) == 8
    scores = losses[0].state_dict()["scores"]
    assert scores.shape == (10, 5)
    filled = torch.isfinite(scores[:, 0])
    assert sorted(filled.nonzero().flatten().tolist()) == sorted(seen.tolist())
    assert (scores[~filled] == -math.inf).all()
