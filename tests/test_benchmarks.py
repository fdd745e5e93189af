"""
The benchmark scripts run and write what they promise (smoke tests in their quick modes; no
timing is asserted).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.skipif(not DATA.exists(), reason="../shared/data/binarized_mnist.npz not present")
def test_quality_quick_writes_table_json_and_plot(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "quality.py"), "--quick", "--threads", "1"]
    command += ["--estimators", "wakesleep-classic,pyro-rws5", "--out", str(tmp_path)]
    subprocess.run(command, check=True, timeout=300)
    report = json.loads((tmp_path / "quality.json").read_text())
    assert [r["estimator"] for r in report["results"]] == ["wakesleep-classic", "pyro-rws5"]
    for result in report["results"]:
        last = result["points"][-1]
        assert last["steps"] > 0 and last["test_ll"] < 0 and last["test_ll_stderr"] > 0
    assert (tmp_path / "quality.png").stat().st_size > 1000
