"""
The command's run folders: a folder of its own per run (runs/<date>_<time>, runs/latest), never
replaced or mixed silently, one writer at a time, metrics that agree with the checkpoint after
any interruption, crafted and malformed folders refused on one line, and true messages.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import QUIET, TINY, copy_run
from test_checkpoint import crafted_checkpoints

from pyro_wakesleep import NonFiniteLossError, WakeSleep
from pyro_wakesleep.checkpoint import read
from pyro_wakesleep.cli import main

SHARED = Path(__file__).parents[1].parent / "shared" / "data"


def rows(folder):
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def untimed(folder):
    """The rows of metrics.csv without the columns that time the run."""
    timed = ("seconds", "train_seconds", "steps_per_s")
    return [{k: v for k, v in r.items() if k not in timed} for r in rows(folder)]


def run(argv, capsys):
    """main(argv) -> (exit status, stdout, stderr lines)."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err.strip().splitlines()


def one_line_error(status, err, *fragments, code=2):
    assert status == code, err
    assert len(err) == 1, err
    assert err[0].startswith("pyro-wakesleep: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def no_temporary_files(folder):
    return not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def rewrite_checkpoint(folder, change):
    """Load the checkpoint's raw plain data, let ``change`` edit it, save it back."""
    raw = torch.load(folder / "checkpoint.pt", weights_only=True)
    change(raw)
    torch.save(raw, folder / "checkpoint.pt")


def python_command(*argv):
    return [sys.executable, "-m", "pyro_wakesleep", *map(str, argv)]


def wait_for(condition, timeout=120.0):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


# ---------------------------------------------------------------- a folder of its own


def test_each_default_run_gets_a_folder_and_latest_points_at_the_newest(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    status, first, _ = run(["train", *TINY], capsys)
    assert status == 0
    status, second, _ = run(["train", *TINY, "--seed", "1"], capsys)
    assert status == 0
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.name != "latest")
    assert len(runs) == 2 and all(
        str(p.relative_to(tmp_path)) in o for p, o in zip(runs, [first, second])
    )
    latest = tmp_path / "runs" / "latest"
    assert latest.is_symlink() and latest.resolve() == runs[1].resolve()
    assert json.loads((runs[1] / "config.json").read_text())["seed"] == 1
    assert json.loads((runs[0] / "config.json").read_text())["seed"] == 0
    status, out, _ = run(
        ["evaluate", "runs/latest", "--num-samples", "8", "--test-size", "5"], capsys
    )
    assert status == 0 and "test log-likelihood" in out
    status, _, _ = run(
        ["train", "--resume", "runs/latest", "--epochs", "3", "--no-progress"], capsys
    )
    assert status == 0
    assert [r["epoch"] for r in rows(runs[1])] == ["1", "2", "3"]
    assert [r["epoch"] for r in rows(runs[0])] == ["1", "2"]


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, _, err = run(["train", *TINY, "--lr", "1e36"], capsys)
    one_line_error(status, err, "diverged at step 2", "no checkpoint was written")
    assert not [p for p in (tmp_path / "runs").iterdir()]


# ---------------------------------------------------------------- never replaced or mixed


def test_a_folder_holding_a_run_is_refused_unless_overwrite(template, tmp_path, capsys):
    folder = copy_run(template, tmp_path)
    before = files(folder)
    status, _, err = run(["train", "--output", folder, *TINY, "--layers", "784,4"], capsys)
    one_line_error(status, err, "holds a run", "--resume", "--overwrite")
    assert files(folder) == before

    status, _, _ = run(
        ["train", "--output", folder, "--overwrite", *TINY, "--layers", "784,4", "--epochs", "1"],
        capsys,
    )
    assert status == 0
    assert json.loads((folder / "config.json").read_text())["layers"] == [784, 4]
    assert [r["epoch"] for r in rows(folder)] == ["1"]
    params = read(folder / "checkpoint.pt")["params"]
    assert params["helmholtz_generative$$$prior_logits"].shape == (4,)

    # A user's file with a run file's name is never overwritten either; other files stay.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "fantasies.png").write_bytes(b"my picture")
    status, _, err = run(["train", "--output", mine, *TINY], capsys)
    one_line_error(status, err, "holds a run (fantasies.png)")
    (mine / "fantasies.png").rename(mine / "notes.txt")
    assert run(["train", "--output", mine, *TINY], capsys)[0] == 0
    assert (mine / "notes.txt").read_bytes() == b"my picture"


def test_an_overwrite_killed_before_its_first_checkpoint_mixes_nothing(template, tmp_path, capsys):
    """The old run's files go when --overwrite starts; the new run's config is written only
    with its first checkpoint: a kill in between leaves a folder with no run, never the new
    config beside the old checkpoint."""
    folder = copy_run(template, tmp_path)
    slow = ["--layers", "784,200", "--batch-size", "10", "--num-particles", "20", *QUIET]
    child = subprocess.Popen(
        python_command("train", "--output", folder, "--overwrite", *slow),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: not (folder / "checkpoint.pt").exists())
        time.sleep(1.0)
        assert not (folder / "checkpoint.pt").exists(), "the first epoch was too fast for this test"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert not (folder / "config.json").exists() and not (folder / "metrics.csv").exists()
    status, _, err = run(["train", "--resume", folder, "--no-progress"], capsys)
    one_line_error(status, err, "no checkpoint")
    # The lock the killed run left is taken over; the folder holds no run, so it is free.
    assert run(["train", "--output", folder, *TINY], capsys)[0] == 0


def test_two_commands_on_one_folder(template, tmp_path, capsys):
    """The second command refuses while the first runs; once the first is killed its lock is
    taken over, and the resumed run has each epoch once."""
    folder = tmp_path / "run"
    child = subprocess.Popen(
        python_command("train", "--output", folder, *TINY, "--epochs", "1000"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: (folder / "metrics.csv").exists() or child.poll() is not None)
        assert child.poll() is None, child.stderr.read()
        status, _, err = run(["train", "--output", folder, *TINY], capsys)
        one_line_error(status, err, f"in use by process {child.pid}")
        status, _, err = run(["train", "--resume", folder, "--epochs", "1000"], capsys)
        one_line_error(status, err, f"in use by process {child.pid}")
        status, out, _ = run(["evaluate", folder, "--num-samples", "4", "--test-size", "5"], capsys)
        assert status == 0  # reading a run while it trains is fine
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert (folder / "run.lock").read_text().split()[0] == str(child.pid)  # left behind
    done = read(folder / "checkpoint.pt")["extra"]["run"]["epoch"]
    status, _, _ = run(["train", "--resume", folder, "--epochs", done + 1], capsys)
    assert status == 0
    assert [int(r["epoch"]) for r in rows(folder)] == list(range(1, done + 2))
    assert not (folder / "run.lock").exists() and no_temporary_files(folder)


# ---------------------------------------------------------------- metrics agree


def test_sigkill_at_any_moment_then_resume_gives_each_epoch_once(tmp_path, capsys):
    straight = tmp_path / "straight"
    killed = tmp_path / "killed"
    argv = [*TINY, "--epochs", "8", "--final-samples", "4"]
    assert run(["train", "--output", straight, *argv], capsys)[0] == 0
    for delay in (0.0, 0.05, 0.13):  # after a checkpoint was written: at varied moments
        if (killed / "checkpoint.pt").exists():
            command = python_command("train", "--resume", killed, "--no-progress")
        else:
            command = python_command("train", "--output", killed, *argv)
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            start = (
                os.stat(killed / "checkpoint.pt").st_mtime_ns
                if (killed / "checkpoint.pt").exists()
                else 0
            )

            def wrote(child=child, start=start):
                path = killed / "checkpoint.pt"
                return child.poll() is not None or (
                    path.exists() and os.stat(path).st_mtime_ns != start
                )

            wait_for(wrote)
            time.sleep(delay)
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=60)
    assert run(["train", "--resume", killed, "--no-progress"], capsys)[0] == 0
    assert untimed(killed) == untimed(straight)
    a, b = read(straight / "checkpoint.pt")["params"], read(killed / "checkpoint.pt")["params"]
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert no_temporary_files(killed)


def test_a_metrics_write_that_fails_after_the_checkpoint_is_repaired_on_resume(
    template, tmp_path, monkeypatch, capsys
):
    from pyro_wakesleep.cli import training

    straight = copy_run(template, tmp_path, "straight")
    assert run(["train", "--resume", straight, "--epochs", "3", "--no-progress"], capsys)[0] == 0
    folder = tmp_path / "run"
    real = training.write_csv
    calls = []

    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "write_csv", full_disk)
    status, _, err = run(["train", "--output", folder, *TINY], capsys)
    one_line_error(status, err, "No space left on device", "last checkpoint (epoch 2)")
    assert [r["epoch"] for r in rows(folder)] == ["1"]  # one behind the checkpoint
    monkeypatch.setattr(training, "write_csv", real)
    assert run(["train", "--resume", folder, "--epochs", "3", "--no-progress"], capsys)[0] == 0
    assert untimed(folder) == untimed(straight)


def test_a_checkpoint_write_that_fails_keeps_the_last_one(template, tmp_path, monkeypatch, capsys):
    """A full disk inside torch.save (a RuntimeError from its writer): one line naming the
    file, the previous checkpoint and metrics as they were, no temporary file."""
    folder = tmp_path / "run"
    real = torch.save
    calls = []

    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:858] file write failed")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    status, _, err = run(["train", "--output", folder, *TINY], capsys)
    one_line_error(
        status, err, "checkpoint.pt: cannot be written", "disk full", "last checkpoint (epoch 1)"
    )
    monkeypatch.setattr(torch, "save", real)
    assert read(folder / "checkpoint.pt")["extra"]["run"]["epoch"] == 1
    assert [r["epoch"] for r in rows(folder)] == ["1"]
    assert no_temporary_files(folder)
    assert run(["train", "--resume", folder, "--no-progress"], capsys)[0] == 0
    assert untimed(folder) == untimed(template)


def test_a_full_disk_is_one_line(tmp_path):
    resource = pytest.importorskip("resource")
    folder = tmp_path / "run"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = subprocess.run(
        python_command("train", "--output", folder, *TINY),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"{folder / 'checkpoint.pt'}: cannot be written" in lines[0]
    assert "no checkpoint was written" in lines[0]
    assert not folder.exists()  # it held nothing: removed


# ---------------------------------------------------------------- crafted and malformed


@pytest.mark.parametrize("command", ["resume", "evaluate"])
def test_a_crafted_checkpoint_runs_nothing(template, tmp_path, command, capsys):
    marker = tmp_path / "marker"
    for i, crafted in enumerate(crafted_checkpoints(tmp_path, marker)):
        folder = copy_run(template, tmp_path, f"run{i}")
        shutil.copy(crafted, folder / "checkpoint.pt")
        argv = ["train", "--resume", folder] if command == "resume" else ["evaluate", folder]
        status, _, err = run(argv, capsys)
        one_line_error(status, err, "refused", "nothing in it was run")
        assert not marker.exists()


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_saved_config(folder, **changes):
    def change(raw):
        raw["extra"]["run"]["config"].update(changes)

    rewrite_checkpoint(folder, change)
    _edit_config(folder, **changes)


def _spoil(case, folder):
    config = folder / "config.json"
    if case == "config without a key":
        data = json.loads(config.read_text())
        del data["layers"]
        config.write_text(json.dumps(data))
    elif case == "config a JSON list":
        config.write_text("[1, 2]")
    elif case == "config garbled":
        config.write_text('{"model": "helm')
    elif case == "config batch size 0":
        _edit_config(folder, batch_size=0)
    elif case == "saved batch size 0":
        _edit_saved_config(folder, batch_size=0)
    elif case == "saved config without a key":
        rewrite_checkpoint(folder, lambda raw: raw["extra"]["run"]["config"].pop("dataset"))
    elif case == "checkpoint without optimizer":
        rewrite_checkpoint(folder, lambda raw: raw.pop("optim"))
    elif case == "checkpoint without run state":
        rewrite_checkpoint(folder, lambda raw: raw.__setitem__("extra", {}))
    elif case == "checkpoint of the old command":
        torch.save({"format": "pyro-wakesleep-checkpoint-1", "net": {}}, folder / "checkpoint.pt")
    elif case == "optimizer state of another optimizer":
        _edit_saved_config(folder, optimizer="sgd")
    elif case == "layer mismatch":
        _edit_saved_config(folder, layers=[784, 16])
    elif case == "no checkpoint":
        (folder / "checkpoint.pt").unlink()
    else:
        raise AssertionError(case)


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("config without a key", "differs from the configuration saved in checkpoint.pt (layers)"),
        ("config a JSON list", "differs from the configuration"),
        ("config garbled", "malformed JSON"),
        ("config batch size 0", "(batch_size)"),
        ("saved batch size 0", "batch_size must be a positive integer, got 0"),
        ("saved config without a key", "the configuration lacks dataset"),
        ("checkpoint without optimizer", "missing or malformed entries"),
        ("checkpoint without run state", "without the state of a pyro-wakesleep train run"),
        ("checkpoint of the old command", "0.1.0 command in its own former format"),
        ("optimizer state of another optimizer", "another kind of optimizer"),
        ("layer mismatch", "does not fit this model and guide"),
        ("no checkpoint", "holds no checkpoint.pt (only config.json, metrics.csv"),
    ],
)
def test_a_malformed_run_folder_is_one_line(template, tmp_path, capsys, case, fragment):
    folder = copy_run(template, tmp_path)
    _spoil(case, folder)
    status, _, err = run(["train", "--resume", folder, "--epochs", "3", "--no-progress"], capsys)
    one_line_error(status, err, fragment)
    assert not (folder / "run.lock").exists()


def test_garbled_metrics_are_rewritten_from_the_checkpoint(template, tmp_path, capsys):
    folder = copy_run(template, tmp_path)
    (folder / "metrics.csv").write_bytes(b"step,epoch\n\x00\x01garbage,,,\n")
    assert run(["train", "--resume", folder, "--epochs", "3", "--no-progress"], capsys)[0] == 0
    assert [r["epoch"] for r in rows(folder)] == ["1", "2", "3"]


def test_evaluate_of_non_finite_parameters_says_so(template, tmp_path, capsys):
    folder = copy_run(template, tmp_path)

    def poison(raw):
        raw["params"]["params"]["helmholtz_generative$$$top_down.0.bias"][:] = float("nan")

    rewrite_checkpoint(folder, poison)
    status, out, err = run(["evaluate", folder, "--num-samples", "4", "--test-size", "6"], capsys)
    one_line_error(status, err, "6 of 6 test points have a non-finite log-likelihood")
    assert "not finite for 6 of 6 test points" in out


# ---------------------------------------------------------------- true messages


def test_a_run_that_diverges_after_a_checkpoint_keeps_it(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    real = WakeSleep.step

    def diverge_at_step_36(self, *args, **kwargs):
        if self.num_steps == 35:
            raise NonFiniteLossError("Step 35: non-finite wake_theta loss. No parameter or ...")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WakeSleep, "step", diverge_at_step_36)
    status, _, err = run(["train", "--output", folder, *TINY], capsys)
    one_line_error(
        status,
        err,
        "diverged at step 36 (epoch 2): non-finite wake_theta loss",
        "lower learning rate than --lr 0.001",
        f"the last checkpoint (epoch 1) is in {folder}",
    )
    assert read(folder / "checkpoint.pt")["extra"]["run"]["epoch"] == 1


@pytest.mark.parametrize("at_step, said", [(5, "no checkpoint was written"), (35, "epoch 1")])
def test_an_interrupt_says_what_was_saved(tmp_path, monkeypatch, capsys, at_step, said):
    folder = tmp_path / "run"
    real = WakeSleep.step

    def interrupt(self, *args, **kwargs):
        if self.num_steps == at_step:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WakeSleep, "step", interrupt)
    status, _, err = run(["train", "--output", folder, *TINY], capsys)
    one_line_error(status, err, said, code=130)
    if at_step == 5:
        assert not folder.exists()
    else:
        assert f"--resume {folder}" in err[0]


def test_warnings_for_ignored_options_and_more_epochs_than_asked(template, tmp_path, capsys):
    folder = copy_run(template, tmp_path)
    status, _, err = run(
        ["train", "--resume", folder, "--epochs", "3", "--lr", "0.5", "--batch", "7", *QUIET],
        capsys,
    )
    assert status == 0
    assert err[0].startswith("pyro-wakesleep: warning: --lr, --batch-size")
    assert "ignored with --resume" in err[0] and len(err) == 1
    assert json.loads((folder / "config.json").read_text())["lr"] == 0.001
    status, _, err = run(["train", "--resume", folder, "--epochs", "2"], capsys)
    one_line_error(status, err, "trained 3 epochs already", "at least 3")
    status, _, err = run(
        ["train", "--output", tmp_path / "d", *TINY, "--epochs", "1", "--data-path", "x.npz"],
        capsys,
    )
    assert status == 0 and err == [
        "pyro-wakesleep: warning: --data-path ignored: --dataset digits reads no file"
    ]


@pytest.mark.skipif(not (SHARED / "binarized_mnist.npz").exists(), reason="needs ../shared/data")
def test_the_data_path_is_stored_absolute(tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(SHARED)
    argv = ["train", "--output", tmp_path / "run", "--dataset", "binarized-mnist"]
    argv += ["--data-path", "binarized_mnist.npz", "--layers", "784,4", "--batch-size", "5000"]
    argv += ["--epochs", "1", *QUIET]
    assert run(argv, capsys)[0] == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_path"] == str(SHARED.resolve() / "binarized_mnist.npz")
    monkeypatch.chdir(elsewhere)
    status, out, _ = run(["evaluate", tmp_path / "run", "--num-samples", "4"], capsys)
    assert status == 0 and "test log-likelihood" in out
