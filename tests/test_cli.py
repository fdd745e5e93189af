"""The pyro-wakesleep command, end to end on tiny settings."""

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_wakesleep.checkpoint import read
from pyro_wakesleep.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
#: The columns of metrics.csv that time the run (they differ between identical runs).
TIMED = ("seconds", "train_seconds", "steps_per_s")
TINY = [
    "--layers",
    "784,8",
    "--epochs",
    "2",
    "--eval-every",
    "1",
    "--eval-samples",
    "4",
    "--final-samples",
    "8",
    "--test-size",
    "20",
    "--no-progress",
]


def rows(folder):
    with open(folder / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def saved(folder):
    """The run's checkpoint, read as WakeSleep.load reads it."""
    return read(folder / "checkpoint.pt")


def net_state(folder):
    return saved(folder)["params"]


def test_train_writes_checkpoint_metrics_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "test log-likelihood" in printed and str(out) in printed
    for name in ("learning_curves.png", "fantasies.png", "reconstructions.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
    metrics = rows(out)
    assert [int(r["epoch"]) for r in metrics] == [1, 2]
    assert [int(r["step"]) for r in metrics] == [30, 60]  # 3000 shipped digits, batch 100
    for r in metrics:
        # An average per data point of -log p(x, z) over 784 Bernoulli pixels (nats).
        assert 0 < float(r["wake_theta"]) < 784 * np.log(2) * 2
        assert -784 * np.log(2) * 2 < float(r["test_log_likelihood"]) < 0
        assert float(r["test_stderr"]) >= 0
    checkpoint = saved(out)
    assert checkpoint["extra"]["run"]["epoch"] == 2 and checkpoint["num_steps"] == 60
    assert not list(out.glob(".*tmp")), "no temporary file is left behind"


def test_resume_continues_bitwise_like_an_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [a for a in TINY if a not in ("--epochs", "2")]
    assert main(["train", "--output", str(straight), "--epochs", "3", *common]) == 0
    assert main(["train", "--output", str(resumed), "--epochs", "2", *common]) == 0
    assert main(["train", "--resume", str(resumed), "--epochs", "3", "--no-progress"]) == 0
    a, b = net_state(straight), net_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["wake_theta"] for r in rows(straight)] == [r["wake_theta"] for r in rows(resumed)]


def test_jit_trains_bitwise_like_the_eager_run(tmp_path):
    eager, replayed = tmp_path / "eager", tmp_path / "jit"
    assert main(["train", "--output", str(eager), "--no-jit", *TINY]) == 0
    assert main(["train", "--output", str(replayed), *TINY]) == 0  # jit is the default
    a, b = net_state(eager), net_state(replayed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    untimed = [
        [{k: v for k, v in r.items() if k not in TIMED} for r in rows(f)] for f in (eager, replayed)
    ]
    assert untimed[0] == untimed[1]


def test_training_does_not_depend_on_when_it_is_evaluated(tmp_path, capsys):
    """Evaluations draw from a stream of their own (the run's seed and the step), so a run
    evaluated after every epoch with 4 samples trains bitwise like one evaluated only at its
    end, and ``evaluate`` with the final evaluation's settings redraws its very estimate."""
    often, rarely = tmp_path / "often", tmp_path / "rarely"
    common = [a for a in TINY if a not in ("--epochs", "2")]
    assert main(["train", "--output", str(often), "--epochs", "3", *common]) == 0
    rare = [*common, "--eval-every", "3", "--eval-samples", "7"]
    assert main(["train", "--output", str(rarely), "--epochs", "3", *rare]) == 0
    a, b = net_state(often), net_state(rarely)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["wake_theta"] for r in rows(often)] == [r["wake_theta"] for r in rows(rarely)]
    assert "" not in [r["test_log_likelihood"] for r in rows(often)]
    assert [r["test_log_likelihood"] for r in rows(rarely)][:2] == ["", ""]
    final = json.loads((often / "final.json").read_text())
    timing = {k: final[k] for k in (*TIMED, "evaluation_seconds")}
    assert final == {**json.loads((rarely / "final.json").read_text()), **timing}
    capsys.readouterr()
    assert main(["evaluate", str(often), "--num-samples", "8"]) == 0
    again = json.loads((often / "evaluation_8.json").read_text())
    assert again["test_log_likelihood"] == final["test_log_likelihood"]
    assert again["test_stderr"] == final["test_stderr"]


def test_evaluate_command(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *TINY]) == 0
    capsys.readouterr()
    assert (
        main(
            ["evaluate", str(out), "--num-samples", "16", "--chunk-size", "8", "--test-size", "10"]
        )
        == 0
    )
    assert "test log-likelihood" in capsys.readouterr().out


def test_bars_reports_exact_kl(tmp_path, capsys):
    """The bars recipe on a tiny budget: candidates ranked twice, the winner continued (with
    its optimizer state, under the run's own parameter names), then resumed."""
    out = tmp_path / "bars"
    argv = ["train", "--dataset", "bars", "--epochs", "2", "--output", str(out)]
    argv += ["--candidates", "3", "--selection-steps", "4,8", "--shrink-steps", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "KL[data || model]" in printed
    assert "selection after 4 steps: kept candidate(s)" in printed
    assert "selection after 8 steps" in printed
    kl = [float(r["kl_bits"]) for r in rows(out) if r["kl_bits"]]
    assert kl and all(k > 0 for k in kl)
    # 8 selection steps of the winner, then 2 epochs of 100
    assert [int(r["step"]) for r in rows(out)] == [108, 208]
    config = json.loads((out / "config.json").read_text())
    assert (config["num_particles"], config["phi_objective"], config["init"]) == (
        5,
        "wake",
        "sparse",
    )
    checkpoint = saved(out)
    assert all(k.startswith("helmholtz_") for k in checkpoint["optim"])
    assert main(["train", "--resume", str(out), "--epochs", "3", "--no-progress"]) == 0
    assert [int(r["step"]) for r in rows(out)] == [108, 208, 308]


def test_lr_decay_schedule():
    from pyro_wakesleep.cli import lr_factor

    config = {"lr_decay": 0.6, "lr_final": 0.01}
    assert lr_factor(config, 0, 100) == 1.0
    assert lr_factor(config, 39, 100) == 1.0
    assert lr_factor(config, 40, 100) == pytest.approx(1.0)
    assert lr_factor(config, 70, 100) == pytest.approx(0.1)  # half-way down, geometrically
    assert lr_factor(config, 100, 100) == pytest.approx(0.01)
    assert lr_factor({"lr_decay": 0.0, "lr_final": 0.01}, 99, 100) == 1.0


def _bad_input_argv(tmp_path, argv, fragment):
    """The case's arguments and expected fragment, in a fresh folder; an output folder for
    train and a test size for evaluate, so that nothing is written outside it."""
    argv = [a.replace("/nonexistent", str(tmp_path / "nonexistent")) for a in argv]
    fragment = fragment.replace("/nonexistent", str(tmp_path / "nonexistent"))
    extra = ["--output", str(tmp_path / "out")] if argv[0] == "train" else ["--test-size", "5"]
    return argv + extra, fragment


def _assert_one_line(code, stderr, fragment):
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert fragment in lines[0]


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (
            ["train", "--dataset", "binarized-mnist", "--data-path", "/nonexistent.npz"],
            "/nonexistent.npz",
        ),
        (["train", "--dataset", "binarized-mnist"], "--data-path"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["train", "--phi-objective", "2"], "--phi-objective"),
        (["train", "--phi-objective", "wake"], "--num-particles 5"),
        (["train", "--phi-objective", "1.0", "--num-particles", "1"], "zero expected gradient"),
        (["train", "--layers", "100,10"], "784"),
        (["train", "--resume", "/nonexistent-run"], "/nonexistent-run"),
        (["train", "--resume", "/nonexistent-run", "--overwrite"], "--overwrite"),
        (["train", "--hidden", "0"], "--hidden"),
        (["train", "--seed", "-1"], "--seed"),
        (["train", "--seed", str(2**70)], "--seed"),
        (["train", "--lr", "3e38"], "--lr"),
        (["train", "--guide-lr", "nan"], "--guide-lr"),
        (["train", "--device", "meta"], "meta"),
        (["train", "--device", "nodevice"], "nodevice"),
        pytest.param(
            ["train", "--device", "mps"],
            "mps",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS present"),
        ),
        (["evaluate", "/nonexistent-run"], "/nonexistent-run"),
        (
            ["train", "--device", "cuda:0"]
            if not torch.cuda.is_available()
            else ["train", "--device", "nodevice"],
            "device",
        ),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys, argv, fragment):
    """In-process (the command's main, as the console script calls it): exit status 2 and
    one line on stderr. A warning would be more lines on a terminal, so none may be raised
    (recorded with Python's default filters, those of a fresh process)."""
    argv, fragment = _bad_input_argv(tmp_path, argv, fragment)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            code = main(argv)
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
    assert not [str(w.message) for w in caught if w.category is not DeprecationWarning]
    _assert_one_line(code, capsys.readouterr().err, fragment)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--batch-size", "0"], "--batch-size"),
        (
            ["train", "--dataset", "binarized-mnist", "--data-path", "/nonexistent.npz"],
            "/nonexistent.npz",
        ),
        (["evaluate", "/nonexistent-run"], "/nonexistent-run"),
    ],
)
def test_bad_input_is_one_line_and_nonzero_in_a_process(tmp_path, argv, fragment):
    """The same, as a user's shell sees it: a fresh ``python -m pyro_wakesleep`` process (an
    argument error, a data file, a run folder)."""
    argv, fragment = _bad_input_argv(tmp_path, argv, fragment)
    command = [sys.executable, "-m", "pyro_wakesleep", *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    _assert_one_line(result.returncode, result.stderr, fragment)


def test_malformed_data_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyro_wakesleep",
            "train",
            "--dataset",
            "binarized-mnist",
            "--data-path",
            str(bad),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and str(bad) in result.stderr


def test_foreign_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--output", str(out), *TINY]) == 0
    torch.save({"hello": 1}, out / "checkpoint.pt")
    assert main(["evaluate", str(out)]) == 2
    (out / "checkpoint.pt").write_bytes(b"\x00" * 10)
    assert main(["train", "--resume", str(out)]) == 2


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "pyro-wakesleep"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout


def test_the_readme_default_command_runs(tmp_path):
    """`pyro-wakesleep train` exactly as the README's first command runs it (about 75 s)."""
    script = Path(sys.executable).parent / "pyro-wakesleep"
    result = subprocess.run(
        [str(script), "train"], cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test log-likelihood" in result.stdout
    run = tmp_path / "runs" / "latest"
    assert [int(r["epoch"]) for r in rows(run)][-1] == 100
    final = float(result.stdout.split("test log-likelihood")[-1].split()[0])
    # A trained 784-200 machine on these digits reaches about -134 nats; an untrained one is
    # below -540 (784 pixels at about 0.7 nats each). -160 separates the two with room for
    # run-to-run noise of a few nats.
    assert -160 < final < -90


def test_lr_decay_runs_each_step_at_the_scheduled_rate_across_a_save_and_load(tmp_path):
    """With --lr-decay the optimizers are Pyro LambdaLR schedulers: step ``done`` of the
    main loop runs at ``lr * lr_factor(config, done, total)``, the very float, and a WakeSleep
    loaded from a checkpoint continues the schedule where it stopped."""
    import pyro

    from pyro_wakesleep.cli import lr_factor
    from pyro_wakesleep.cli.build import build_model, build_wake_sleep
    from pyro_wakesleep.cli.optimizers import lr_schedule, step_schedules

    config = {
        "model": "helmholtz",
        "layers": [16, 4],
        "hidden": [],
        "dataset": "bars",
        "init": "default",
        "optimizer": "adam",
        "lr": 0.1,
        "guide_lr": 0.3,
        "num_particles": 2,
        "num_sleep_particles": 1,
        "phi_objective": "wake",
        "jit": False,
        "lr_decay": 0.6,
        "lr_final": 0.01,
    }
    total = 20
    x = torch.bernoulli(torch.full((10, 16), 0.3), generator=torch.Generator().manual_seed(0))

    def fresh():
        pyro.clear_param_store()
        torch.manual_seed(0)
        net = build_model(config)
        return build_wake_sleep(net, config, lr_schedule(config, total))

    def run_steps(ws, steps):
        for done in steps:
            ws.step(x)
            for optim, base in ((ws.optim, 0.1), (ws.guide_optim, 0.3)):
                for state in optim.get_state().values():
                    used = state["optimizer"]["param_groups"][0]["lr"]
                    assert used == base * lr_factor(config, done, total), (done, used)
                    assert state["scheduler"]["last_epoch"] == done
            step_schedules(ws)

    ws = fresh()
    run_steps(ws, range(11))
    ws.save(tmp_path / "checkpoint.pt")
    ws = fresh()
    ws.load(tmp_path / "checkpoint.pt", x)
    run_steps(ws, range(11, total))


def interrupted_at(monkeypatch, num_steps):
    """Make WakeSleep.step raise KeyboardInterrupt once ``num_steps`` steps were taken."""
    from pyro_wakesleep import WakeSleep

    real = WakeSleep.step

    def interrupt(self, *args, **kwargs):
        if self.num_steps == num_steps:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WakeSleep, "step", interrupt)
    return real


def test_a_decaying_run_interrupted_and_resumed_trains_bitwise_like_the_uninterrupted_one(
    tmp_path, monkeypatch
):
    """The schedulers' step counts travel in the checkpoint: a run stopped inside its decay
    (checkpoint at step 60 of 120, decay from step 48) continues at the very rates."""
    from pyro_wakesleep import WakeSleep

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [a for a in TINY if a not in ("--epochs", "2")] + ["--epochs", "4"]
    common += ["--lr", "0.01", "--lr-decay", "0.6"]
    assert main(["train", "--output", str(straight), *common]) == 0
    real = interrupted_at(monkeypatch, 75)
    assert main(["train", "--output", str(resumed), *common]) == 130
    monkeypatch.setattr(WakeSleep, "step", real)
    assert saved(resumed)["extra"]["run"]["epoch"] == 2
    assert main(["train", "--resume", str(resumed), "--no-progress"]) == 0
    a, b = net_state(straight), net_state(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    untimed = [
        [{k: v for k, v in r.items() if k not in TIMED} for r in rows(f)]
        for f in (straight, resumed)
    ]
    assert untimed[0] == untimed[1]


def test_a_decaying_run_resumes_from_optimizer_states_saved_without_schedulers(
    tmp_path, monkeypatch
):
    """A checkpoint whose optimizer states hold no scheduler state (as the command wrote
    before the schedule was kept by Pyro's schedulers) resumes, and is written back with
    them."""
    from pyro_wakesleep import WakeSleep

    folder = tmp_path / "run"
    common = [a for a in TINY if a not in ("--epochs", "2")] + ["--epochs", "3"]
    common += ["--lr-decay", "0.6"]
    real = interrupted_at(monkeypatch, 75)
    assert main(["train", "--output", str(folder), *common]) == 130
    monkeypatch.setattr(WakeSleep, "step", real)
    raw = torch.load(folder / "checkpoint.pt", weights_only=True)
    for key in ("optim", "guide_optim"):
        raw[key] = {name: state["optimizer"] for name, state in raw[key].items()}
    torch.save(raw, folder / "checkpoint.pt")
    assert main(["train", "--resume", str(folder), "--no-progress"]) == 0
    checkpoint = saved(folder)
    assert checkpoint["num_steps"] == 90
    for key in ("optim", "guide_optim"):
        for state in checkpoint[key].values():
            assert state["scheduler"]["last_epoch"] == 90
