"""
``pyro-wakesleep train --dataset multi-digits``: Attend-Infer-Repeat from the command, its
recipe, the count accuracy in every place an evaluation is written, and the refusals of
``--model air`` where it cannot run.
"""

import csv
import io
import json
from contextlib import redirect_stdout

import pytest
import torch
from conftest import QUIET

from pyro_wakesleep.cli import main
from pyro_wakesleep.cli.multi_digits import MultiDigitsTask
from pyro_wakesleep.cli.tasks import subset_indices
from pyro_wakesleep.datasets import load_multi_digits
from pyro_wakesleep.models import MultiDigitAIR

# One epoch of the 10,000 training canvases in 10 steps, with narrow networks: seconds.
ONE_EPOCH = ["--dataset", "multi-digits", "--epochs", "1", "--batch-size", "1000", *QUIET]
AIR_TINY = [*ONE_EPOCH, "--hidden", "16"]


def run(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr lines)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


@pytest.fixture(scope="module")
def air_run(tmp_path_factory):
    """A tiny run with the multi-digits recipe (no --model: air is the default there)."""
    folder = tmp_path_factory.mktemp("air") / "run"
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["train", "--output", str(folder), *AIR_TINY]) == 0
    return folder, printed.getvalue()


def test_multi_digits_recipe_is_reweighted_wake_sleep_on_air(air_run):
    folder, _ = air_run
    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == "air"
    assert config["num_particles"] == 5 and config["phi_objective"] == "wake"
    assert config["z_dim"] == 10 and config["hidden"] == [16]


def test_count_accuracy_is_printed_saved_and_plotted(air_run):
    folder, printed = air_run
    final = json.loads((folder / "final.json").read_text())
    assert 0.0 <= final["count_accuracy"] <= 1.0
    assert f"count accuracy {final['count_accuracy']:.3f}" in printed
    with open(folder / "metrics.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert 0.0 <= float(row["count_accuracy"]) <= 1.0
    for name in ("learning_curves.png", "fantasies.png", "reconstructions.png"):
        assert (folder / name).stat().st_size > 0


def test_evaluate_reports_the_count_accuracy(air_run, capsys):
    folder, _ = air_run
    status, out, _ = run(["evaluate", folder, "--num-samples", 2, "--no-progress"], capsys)
    assert status == 0
    saved = json.loads((folder / "evaluation_2.json").read_text())
    assert 0.0 <= saved["count_accuracy"] <= 1.0
    assert f"count accuracy {saved['count_accuracy']:.3f}" in out
    (folder / "evaluation_2.json").unlink()


class _OracleAIR(MultiDigitAIR):
    """An AIR whose guide 'counts' by looking the canvas up among the test canvases."""

    def __init__(self, images, counts):
        super().__init__(hidden=8)
        self.truth = {tuple(x.nonzero().flatten().tolist()): int(n) for x, n in zip(images, counts)}

    def count_accuracy(self, x, counts, num_samples=1):
        found = torch.tensor([self.truth[tuple(row.nonzero().flatten().tolist())] for row in x])
        return (found == counts).float()


def test_count_accuracy_pairs_each_test_canvas_with_its_own_count():
    """With --test-size the canvases and their counts are subset alike: a guide that knows each
    canvas's count scores exactly 1 (one misaligned pair would show)."""
    data = load_multi_digits(seed=0)
    task = MultiDigitsTask({"seed": 0, "test_size": 37}, torch.device("cpu"))
    rows = subset_indices(len(data["test"]), 37)
    assert torch.equal(task.test, data["test"][rows])
    assert torch.equal(task.test_counts, data["test_counts"][rows])
    oracle = _OracleAIR(data["test"], data["test_counts"])
    result = task.evaluate(oracle, num_samples=2, batch_size=10)
    assert result["count_accuracy"] == 1.0 and result["count"] == 37


def test_other_models_on_multi_digits_have_no_count_accuracy(tmp_path, capsys):
    argv = ["train", "--output", tmp_path / "run", "--model", "helmholtz", "--layers", "784,8"]
    status, out, _ = run([*argv, *ONE_EPOCH], capsys)
    assert status == 0 and "count accuracy" not in out
    assert "count_accuracy" not in json.loads((tmp_path / "run" / "final.json").read_text())


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--model", "air", "--dataset", "bars"], "--model air"),
        (["--dataset", "multi-digits", "--hidden", "8", "8"], "one --hidden size"),
        (["--dataset", "multi-digits", "--hidden"], "one --hidden size"),
        (["--dataset", "multi-digits", "--num-particles", "1"], "--phi-objective wake"),
    ],
)
def test_air_is_refused_where_it_cannot_run(argv, words, tmp_path, capsys):
    status, out, err = run(["train", "--output", tmp_path / "run", *argv], capsys)
    assert status == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run").exists()
