"""
The pyro-wakesleep command as a user meets it: which test points --test-size evaluates,
--threads, progress bars for evaluations, the training rate, the final evaluation saved in the
run folder, --version, evaluate's options reaching the evaluation, and help on every option.
"""

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import pyro
import pytest
import torch
from conftest import TINY, copy_run

import pyro_wakesleep
from pyro_wakesleep import WakeSleep
from pyro_wakesleep.cli import build_parser, command, main, tasks
from pyro_wakesleep.cli.errors import CommandError
from pyro_wakesleep.cli.runs import RUN_FILES
from pyro_wakesleep.cli.tasks import DigitsTask, subset_indices
from pyro_wakesleep.datasets import load_digits
from pyro_wakesleep.evaluate import evaluate_dataset
from pyro_wakesleep.models import HelmholtzMachine

ROOT = Path(__file__).resolve().parents[1]
NEW_COLUMNS = ("train_seconds", "steps_per_s", "count_accuracy")


def run(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr lines)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def rows(folder):
    import csv

    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def spy_on_evaluations(monkeypatch):
    """Record the data and keyword arguments of each evaluate_dataset call of the command."""
    calls = []
    real = tasks.evaluate_dataset

    def record(model, guide, data, **kwargs):
        calls.append((data.clone(), kwargs))
        return real(model, guide, data, **kwargs)

    monkeypatch.setattr(tasks, "evaluate_dataset", record)
    return calls


# ---------------------------------------------------------------- --test-size


def test_the_test_subset_is_random_fixed_and_covers_the_labels():
    labels = load_digits()["test_labels"]
    assert len(labels[:90].unique()) == 1, "the test rows are sorted by label"
    torch.manual_seed(1)
    rows_a = subset_indices(len(labels), 100)
    torch.manual_seed(2)
    rows_b = subset_indices(len(labels), 100)
    assert torch.equal(rows_a, rows_b), "its own generator, not torch's global one"
    assert len(rows_a.unique()) == 100 and len(labels[rows_a].unique()) == 10
    assert len(labels[subset_indices(len(labels), 20)].unique()) > 1
    assert torch.equal(subset_indices(len(labels), 5000), torch.arange(len(labels)))
    # Independent of --seed: every run evaluates the same points.
    cpu = torch.device("cpu")
    one = DigitsTask({"seed": 0, "test_size": 20}, cpu).test
    other = DigitsTask({"seed": 7, "test_size": 20}, cpu).test
    assert torch.equal(one, other)
    assert torch.equal(one, load_digits()["test"][subset_indices(len(labels), 20)])


def test_train_and_evaluate_use_the_same_test_points(tmp_path, monkeypatch, capsys):
    calls = spy_on_evaluations(monkeypatch)
    folder = tmp_path / "run"
    assert run(["train", "--output", folder, *TINY], capsys)[0] == 0
    trained = calls[-1][0]  # the final evaluation
    calls.clear()
    argv = ["evaluate", folder, "--num-samples", "4", "--test-size", "20", "--no-progress"]
    assert run(argv, capsys)[0] == 0
    evaluated = torch.cat([data for data, _ in calls])
    digits = load_digits()
    chosen = subset_indices(len(digits["test"]), 20)
    assert torch.equal(trained, evaluated) and torch.equal(evaluated, digits["test"][chosen])
    assert len(digits["test_labels"][chosen].unique()) > 1


def test_evaluate_keeps_the_runs_test_points_unless_told(tmp_path, monkeypatch, capsys):
    """Without --test-size evaluate takes the run's own subset (what its help says); a size
    of at least the test set's takes all the test points."""
    calls = spy_on_evaluations(monkeypatch)
    folder = tmp_path / "run"
    assert run(["train", "--output", folder, *TINY], capsys)[0] == 0
    trained = calls[-1][0]
    digits = load_digits()
    for extra, expected in (([], trained), (["--test-size", "100000"], digits["test"])):
        calls.clear()
        argv = ["evaluate", folder, "--num-samples", "4", "--no-progress", *extra]
        assert run(argv, capsys)[0] == 0
        assert torch.equal(torch.cat([data for data, _ in calls]), expected)


def test_the_evaluation_by_batches_equals_one_evaluate_dataset_call():
    """The progress bar's batch-by-batch evaluation draws the same samples as one
    evaluate_dataset call over the whole test set: the same estimates, bitwise."""
    task = DigitsTask({"seed": 0, "test_size": 250}, torch.device("cpu"))
    pyro.clear_param_store()
    torch.manual_seed(0)
    net = HelmholtzMachine([784, 8])
    pyro.set_rng_seed(3)
    mine = task.evaluate(net, num_samples=8, chunk_size=4, batch_size=100)
    pyro.set_rng_seed(3)
    with pyro.validation_enabled(False):
        whole = evaluate_dataset(
            net.model, net.guide, task.test, batch_size=100, num_samples=8, chunk_size=4
        )
    assert mine["count"] == 250
    assert mine["test_log_likelihood"] == float(whole.log_px.mean())
    assert mine["test_stderr"] == float(whole.stderr.pow(2).sum().sqrt() / 250)


# ---------------------------------------------------------------- --threads


def test_threads_holds_for_the_command_only(monkeypatch, capsys):
    seen = []

    def stop(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise CommandError("stopped here")

    monkeypatch.setattr(command, "train", stop)
    monkeypatch.setattr(command, "evaluate", stop)
    before = torch.get_num_threads()
    for argv in (
        ["train", "--threads", "2"],
        ["train"],
        ["train", "--threads", "0"],
        ["evaluate", "somewhere", "--threads", "2"],
        ["evaluate", "somewhere"],
    ):
        status, _, err = run(argv, capsys)
        assert status == 2 and err == ["pyro-wakesleep: error: stopped here"]
        assert torch.get_num_threads() == before
    assert seen == [2, 1, before, 2, 1]


def test_threads_is_no_part_of_the_configuration_and_goes_with_resume(tmp_path, capsys):
    folder = tmp_path / "run"
    assert run(["train", "--output", folder, *TINY, "--threads", "2"], capsys)[0] == 0
    assert "threads" not in json.loads((folder / "config.json").read_text())
    argv = ["train", "--resume", folder, "--epochs", "3", "--threads", "1", "--no-progress"]
    status, _, err = run(argv, capsys)
    assert status == 0 and err == []


# ---------------------------------------------------------------- progress bars


def test_evaluations_show_a_progress_bar_on_a_terminal_unless_no_progress(
    template, monkeypatch, capsys
):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    argv = ["evaluate", template, "--num-samples", "4", "--test-size", "20"]
    status, _, err = run(argv, capsys)
    assert status == 0 and "evaluate (4 samples)" in "\n".join(err)
    status, _, err = run([*argv, "--no-progress"], capsys)
    assert status == 0 and err == []


def test_evaluations_show_no_progress_bar_in_a_log(template, capsys):
    """Not a terminal: no bar (a log keeps its one-line errors and warnings)."""
    argv = ["evaluate", template, "--num-samples", "4", "--test-size", "20"]
    status, _, err = run(argv, capsys)
    assert status == 0 and err == []


# ---------------------------------------------------------------- training rate


def test_the_training_rate_and_time_without_evaluations_are_reported(tmp_path, capsys):
    folder = tmp_path / "run"
    status, out, _ = run(["train", "--output", folder, *TINY], capsys)
    assert status == 0
    found = re.search(
        r"60 steps in \d+ s \((\d+) s training without evaluations, ([\d.]+) steps/s\)", out
    )
    assert found, out
    table = rows(folder)
    assert list(table[0])[-3:] == list(NEW_COLUMNS), "new columns come last"
    assert {row["count_accuracy"] for row in table} == {""}, "measured for AIR only"
    for row in table:
        assert float(row["steps_per_s"]) > 0
        assert 0 <= float(row["train_seconds"]) <= float(row["seconds"])
    final = json.loads((folder / "final.json").read_text())
    assert final["steps_per_s"] == pytest.approx(60 / final["train_seconds"])
    assert final["train_seconds"] <= final["seconds"]
    assert float(found.group(2)) == pytest.approx(final["steps_per_s"], abs=0.05)


def test_a_run_saved_without_the_new_columns_resumes(template, tmp_path, capsys):
    """A run folder of an earlier version: metric rows without train_seconds,
    steps_per_s and count_accuracy, a run state without train_seconds."""
    folder = copy_run(template, tmp_path)
    raw = torch.load(folder / "checkpoint.pt", weights_only=True)
    state = raw["extra"]["run"]
    del state["train_seconds"]
    state["metrics"] = [
        {k: v for k, v in row.items() if k not in NEW_COLUMNS} for row in state["metrics"]
    ]
    torch.save(raw, folder / "checkpoint.pt")
    argv = ["train", "--resume", folder, "--epochs", "3", "--no-progress"]
    status, out, err = run(argv, capsys)
    assert status == 0 and err == [] and "steps/s" in out
    table = rows(folder)
    assert [r["epoch"] for r in table] == ["1", "2", "3"]
    assert [r["train_seconds"] for r in table[:2]] == ["", ""]
    assert float(table[2]["train_seconds"]) > 0 and float(table[2]["steps_per_s"]) > 0
    assert json.loads((folder / "final.json").read_text())["epoch"] == 3


# ---------------------------------------------------------------- final.json


def test_the_final_evaluation_is_saved_in_the_run_folder(tmp_path, capsys):
    folder = tmp_path / "run"
    status, out, _ = run(["train", "--output", folder, *TINY], capsys)
    assert status == 0 and "final.json" in RUN_FILES
    final = json.loads((folder / "final.json").read_text())
    assert final["test_log_likelihood"] == pytest.approx(
        float(out.split("test log-likelihood")[-1].split()[0]), abs=1e-3
    )
    assert final["test_stderr"] >= 0 and final["kl_bits"] is None and final["exact"] is False
    assert (final["num_samples"], final["test_points"], final["test_size"]) == (8, 20, 20)
    assert (final["nonfinite"], final["step"], final["epoch"]) == (0, 60, 2)
    assert final["seconds"] >= final["train_seconds"] > 0 and final["evaluation_seconds"] >= 0
    assert not list(folder.glob(".*tmp")), "written atomically: no temporary file left"


def test_evaluate_saves_its_own_file_and_leaves_final_json(template, tmp_path, capsys):
    """On the run's own test points: evaluation_<samples>.json; on those of another
    --test-size: a file of their own, which leaves the first one as it was."""
    folder = copy_run(template, tmp_path)
    before = (folder / "final.json").read_bytes()
    status, out, _ = run(["evaluate", folder, "--num-samples", "16", "--no-progress"], capsys)
    assert status == 0 and f"saved in {folder / 'evaluation_16.json'}" in out
    own = (folder / "evaluation_16.json").read_bytes()
    assert json.loads(own)["test_points"] == 20  # the run's --test-size
    argv = ["evaluate", folder, "--num-samples", "16", "--test-size", "10", "--no-progress"]
    status, out, _ = run(argv, capsys)
    assert status == 0 and f"saved in {folder / 'evaluation_16_test10.json'}" in out
    assert (folder / "final.json").read_bytes() == before
    assert (folder / "evaluation_16.json").read_bytes() == own
    saved = json.loads((folder / "evaluation_16_test10.json").read_text())
    assert (saved["num_samples"], saved["test_points"], saved["step"]) == (16, 10, 60)
    printed = float(out.split("test log-likelihood")[-1].split()[0])
    assert saved["test_log_likelihood"] == pytest.approx(printed, abs=1e-3)


def test_final_and_evaluation_files_belong_to_the_run(template, tmp_path, capsys):
    """--overwrite removes them with the run; a folder holding only them holds a run."""
    folder = copy_run(template, tmp_path)
    argv = ["evaluate", folder, "--num-samples", "4", "--test-size", "5", "--no-progress"]
    assert run(argv, capsys)[0] == 0
    status, _, err = run(["train", "--output", folder, *TINY, "--layers", "784,4"], capsys)
    assert status == 2 and "final.json" in err[0] and "evaluation_4_test5.json" in err[0]
    assert run(["train", "--output", folder, *TINY, "--overwrite"], capsys)[0] == 0
    assert not (folder / "evaluation_4_test5.json").exists() and (folder / "final.json").exists()
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "final.json", alone)
    status, _, err = run(["train", "--output", alone, *TINY], capsys)
    assert status == 2 and "holds a run (final.json)" in err[0]


def test_a_resumed_run_drops_the_final_evaluation_of_its_earlier_checkpoint(
    template, tmp_path, monkeypatch, capsys
):
    folder = copy_run(template, tmp_path)
    real = WakeSleep.step

    def interrupt(self, *args, **kwargs):
        if self.num_steps == 100:  # in epoch 4, after epoch 3's checkpoint
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WakeSleep, "step", interrupt)
    argv = ["train", "--resume", folder, "--epochs", "4", "--no-progress"]
    assert run(argv, capsys)[0] == 130
    assert not (folder / "final.json").exists()
    monkeypatch.setattr(WakeSleep, "step", real)
    assert run(argv, capsys)[0] == 0
    assert json.loads((folder / "final.json").read_text())["step"] == 120


def test_bars_saves_an_exact_final_evaluation_and_ignores_test_size(tmp_path, capsys):
    folder = tmp_path / "bars"
    argv = ["train", "--dataset", "bars", "--epochs", "1", "--candidates", "1"]
    argv += ["--output", folder, "--no-progress", "--test-size", "5"]
    status, out, err = run(argv, capsys)
    assert status == 0 and "KL[data || model]" in out
    assert err == [
        "pyro-wakesleep: warning: --test-size ignored: --dataset bars is evaluated exactly, "
        "over its 30 images"
    ]
    final = json.loads((folder / "final.json").read_text())
    assert final["exact"] is True and final["kl_bits"] > 0 and final["test_stderr"] == 0
    assert (final["num_samples"], final["test_points"], final["test_size"]) == (None, 30, None)
    status, out, err = run(["evaluate", folder, "--test-size", "5", "--no-progress"], capsys)
    assert status == 0 and "exact test log-likelihood" in out and len(err) == 1
    assert "--test-size ignored" in err[0]
    saved = json.loads((folder / "evaluation_exact.json").read_text())
    assert saved["kl_bits"] == pytest.approx(final["kl_bits"])


# ---------------------------------------------------------------- options


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"pyro-wakesleep {pyro_wakesleep.__version__}"


def test_evaluate_batch_size_reaches_the_evaluation(template, monkeypatch, capsys):
    calls = spy_on_evaluations(monkeypatch)
    argv = ["evaluate", template, "--num-samples", "4", "--chunk-size", "2", "--test-size", "20"]
    assert run([*argv, "--batch-size", "7", "--no-progress"], capsys)[0] == 0
    assert [len(data) for data, _ in calls] == [7, 7, 6]
    assert all(kw["batch_size"] == 7 and kw["chunk_size"] == 2 for _, kw in calls)
    assert all(kw["num_samples"] == 4 for _, kw in calls)


def _parsers():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [parser, *commands.choices.values()]


def test_every_option_has_help():
    for parser in _parsers():
        parser.format_help()  # no stray % in a help text
        for action in parser._actions:
            assert action.help and action.help.strip(), (parser.prog, action.option_strings)
            assert action.help != argparse.SUPPRESS


def test_runs_is_ignored_by_git():
    assert "runs/" in (ROOT / ".gitignore").read_text().split()
