"""
The ``pyro-wakesleep`` command: train a Helmholtz machine by wake-sleep and evaluate it.

    pyro-wakesleep train                      # shipped digits, HelmholtzMachine [784, 200]
    pyro-wakesleep train --dataset bars       # the bars problem, 16-8-1, exact KL in bits
                                              # (its own recipe: RWS, 24 candidates, ...)
    pyro-wakesleep train --dataset binarized-mnist --data-path binarized_mnist.npz
    pyro-wakesleep train --resume runs/digits # continue a run
    pyro-wakesleep evaluate runs/digits --num-samples 5000

A run folder holds ``checkpoint.pt`` (model, guide and optimizer states, written atomically),
``config.json``, ``metrics.csv`` and the figures ``learning_curves.png``, ``fantasies.png`` and
``reconstructions.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pyro
import torch

from .checkpoint import atomic_save
from .datasets import Bars, DatasetError, load_dataset
from .evaluate import evaluate_dataset, exact_log_likelihood
from .models import GaussianHelmholtz, HelmholtzMachine
from .wake_sleep import WakeSleep

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.csv"
METRIC_FIELDS = [
    "step",
    "epoch",
    "seconds",
    "wake_theta",
    "phi",
    "test_log_likelihood",
    "test_stderr",
    "kl_bits",
]
CHECKPOINT_FORMAT = "pyro-wakesleep-checkpoint-1"


class CommandError(Exception):
    """A user error: reported on one line, with a non-zero exit."""


# ---------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def _int_list(text: str, example: str) -> List[int]:
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers such as {example}, got {text!r}"
        ) from None


def _steps(text: str) -> List[int]:
    steps = _int_list(text, "800,2500")
    if not steps or steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:])):
        raise argparse.ArgumentTypeError(f"must be increasing positive step counts, got {text!r}")
    return steps


def _layers(text: str) -> List[int]:
    sizes = _int_list(text, "784,200,200")
    if len(sizes) < 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"needs at least two positive sizes, got {text!r}")
    return sizes


def _phi_objective(text: str) -> Any:
    if text in ("sleep", "wake"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"must be 'sleep', 'wake' or a number in [0, 1], got {text!r}"
        )
    return value


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyro-wakesleep",
        description="Train and evaluate Helmholtz machines by wake-sleep (pyro-wakesleep).",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model (defaults: shipped digits)")
    train.add_argument(
        "--resume",
        type=Path,
        metavar="FOLDER",
        help="continue the run saved in FOLDER (other options are ignored "
        "except --epochs, which sets the new total)",
    )
    train.add_argument("--model", choices=["helmholtz", "gaussian"], default="helmholtz")
    train.add_argument(
        "--layers",
        type=_layers,
        default=None,
        help="HelmholtzMachine layer sizes, data first (default 784,200; 16,8,1 for bars)",
    )
    train.add_argument(
        "--hidden",
        type=int,
        nargs="*",
        default=None,
        help="deterministic hidden layer sizes inside each conditional "
        "(helmholtz) or of the networks (gaussian; default 200)",
    )
    train.add_argument(
        "--z-dim", type=_positive_int, default=20, help="latent dimension of the gaussian model"
    )
    train.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "bars", "binarized-mnist", "mnist-dynamic"],
    )
    train.add_argument(
        "--data-path",
        type=Path,
        default=None,
        help="data file for binarized-mnist (.npz or folder of .amat) or mnist-dynamic (mnist.npz)",
    )
    train.add_argument(
        "--num-particles",
        type=_positive_int,
        default=None,
        help="K; 1 is classic wake-sleep, K > 1 reweighted wake-sleep (default 1; 5 for bars)",
    )
    train.add_argument("--num-sleep-particles", type=_positive_int, default=1)
    train.add_argument(
        "--phi-objective",
        type=_phi_objective,
        default=None,
        help="'sleep', 'wake', or a in [0, 1] mixing wake-phi and sleep-phi "
        "(default sleep; wake for bars)",
    )
    train.add_argument("--optimizer", choices=["adam", "sgd", "clippedadam"], default="adam")
    train.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="learning rate (default 1e-3; 0.1 for bars)",
    )
    train.add_argument(
        "--guide-lr",
        type=_positive_float,
        default=None,
        help="learning rate of the guide (default: --lr; 0.3 for bars)",
    )
    train.add_argument(
        "--init",
        choices=["default", "sparse"],
        default=None,
        help="initial weights: torch's defaults, or HelmholtzMachine.sparse_init_ "
        "(default: sparse for bars)",
    )
    train.add_argument(
        "--candidates",
        type=_positive_int,
        default=None,
        help="train this many networks from different seeds and keep the best by successive "
        "selection on held-in training data (default 1; 24 for bars)",
    )
    train.add_argument(
        "--selection-steps",
        type=_steps,
        default=None,
        help="with --candidates: step counts at which candidates are ranked; a third survive "
        "each ranking and one the last (default 800,2500 for bars)",
    )
    train.add_argument(
        "--shrink",
        type=_fraction,
        default=None,
        help="multiply the weight matrices by 1 - SHRINK after each of the first "
        "--shrink-steps steps (default 0; 3e-3 for bars)",
    )
    train.add_argument("--shrink-steps", type=_nonnegative_int, default=None)
    train.add_argument(
        "--lr-decay",
        type=_fraction,
        default=None,
        help="decay the learning rates geometrically over this final fraction of the run "
        "(default 0; 0.6 for bars)",
    )
    train.add_argument(
        "--lr-final",
        type=_positive_float,
        default=0.01,
        help="learning rate factor reached at the end of --lr-decay",
    )
    train.add_argument("--batch-size", type=_positive_int, default=100)
    train.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="passes over the training data (default 100; bars: 60 epochs of 100 fresh batches "
        "after the candidate selection)",
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    train.add_argument(
        "--jit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="record each step once and replay it (WakeSleep(jit=True)): bitwise the same "
        "results as --no-jit, less time per step (default: on)",
    )
    train.add_argument("--output", type=Path, default=Path("runs/latest"), metavar="FOLDER")
    train.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="epochs between test evaluations (default: 10 evaluations a run)",
    )
    train.add_argument(
        "--eval-samples",
        type=_positive_int,
        default=100,
        help="importance samples per test point in periodic evaluations",
    )
    train.add_argument(
        "--final-samples",
        type=_positive_int,
        default=1000,
        help="importance samples per test point in the final evaluation",
    )
    train.add_argument(
        "--test-size",
        type=_positive_int,
        default=None,
        help="evaluate on the first N test points only",
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    evaluate = commands.add_parser("evaluate", help="re-estimate a run's test log-likelihood")
    evaluate.add_argument("folder", type=Path)
    evaluate.add_argument("--num-samples", type=_positive_int, default=5000)
    evaluate.add_argument("--chunk-size", type=_positive_int, default=500)
    evaluate.add_argument("--batch-size", type=_positive_int, default=100)
    evaluate.add_argument("--test-size", type=_positive_int, default=None)
    evaluate.add_argument("--device", default=None)
    return parser


# ---------------------------------------------------------------------------- pieces


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CommandError(f"--device {name!r} is not a device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was asked for, but no CUDA device is available")
    return device


def _defaults(config: Dict[str, Any]) -> Dict[str, Any]:
    bars = config["dataset"] == "bars"
    if config["layers"] is None:
        config["layers"] = [16, 8, 1] if bars else [784, 200]
    # The bars recipe (measured in the README): reweighted wake-sleep from a sparse start,
    # weight shrinkage early on, the best of 24 candidates, and a decaying learning rate.
    recipe = {
        "lr": (0.1, 1e-3),
        "guide_lr": (0.3, None),
        "epochs": (60, 100),
        "num_particles": (5, 1),
        "phi_objective": ("wake", "sleep"),
        "init": ("sparse", "default"),
        "candidates": (24, 1),
        "selection_steps": ([800, 2500], []),
        "shrink": (3e-3, 0.0),
        "shrink_steps": (2000, 0),
        "lr_decay": (0.6, 0.0),
    }
    for key, (for_bars, otherwise) in recipe.items():
        if config.get(key) is None:
            config[key] = for_bars if bars else otherwise
    config.setdefault("lr_final", 0.01)
    if config["candidates"] > 1 and not config["selection_steps"]:
        raise CommandError("--candidates above 1 needs --selection-steps, such as 800,2500")
    if config["init"] == "sparse" and config["model"] != "helmholtz":
        raise CommandError("--init sparse is for --model helmholtz")
    if config["hidden"] is None:
        config["hidden"] = [] if config["model"] == "helmholtz" else [200]
    if config["eval_every"] is None:
        config["eval_every"] = max(1, config["epochs"] // 10)
    return config


def _load_data(config: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    if config["dataset"] == "bars":
        return {"bars": Bars()}
    if config["dataset"] in ("binarized-mnist", "mnist-dynamic") and config["data_path"] is None:
        raise CommandError(f"--dataset {config['dataset']} needs --data-path FILE")
    path = None if config["data_path"] is None else Path(config["data_path"])
    if path is not None and not path.exists():
        raise CommandError(f"--data-path {path}: no such file or folder")
    generator = torch.Generator().manual_seed(config["seed"])
    data = load_dataset(config["dataset"], path, generator=generator)
    test = data["test"]
    if config.get("test_size"):
        test = test[: config["test_size"]]
    return {
        "train": data["train"].to(device),
        "test": test.to(device),
        "dynamic": data.get("dynamic"),
    }


def _build_model(config: Dict[str, Any], name: Optional[str] = None) -> torch.nn.Module:
    x_dim = 16 if config["dataset"] == "bars" else 784
    if config["model"] == "helmholtz":
        layers = list(config["layers"])
        if layers[0] != x_dim:
            raise CommandError(
                f"--layers must start with the data dimension {x_dim}, got {layers[0]}"
            )
        net = HelmholtzMachine(layers, hidden=tuple(config["hidden"]), name=name or "helmholtz")
        if config.get("init") == "sparse":
            net.sparse_init_()
        return net
    return GaussianHelmholtz(
        x_dim, config["z_dim"], list(config["hidden"]) or [200], name=name or "gaussian_helmholtz"
    )


def _after_step(net: torch.nn.Module, ws: WakeSleep, config: Dict[str, Any]) -> None:
    """Early weight shrinkage: weights times (1 - shrink) after each of the first steps."""
    if config.get("shrink") and ws.num_steps <= config.get("shrink_steps", 0):
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("weight"):
                    p.mul_(1.0 - config["shrink"])


def _set_lr_factor(ws: WakeSleep, config: Dict[str, Any], factor: float) -> None:
    """Scale both optimizers' learning rates to ``factor`` times the configured ones."""
    for optim, base in ((ws.optim, config["lr"]), (ws.guide_optim, config["guide_lr"])):
        for torch_optim in optim.optim_objs.values():
            torch_optim = getattr(torch_optim, "optimizer", torch_optim)  # an LR scheduler
            for group in torch_optim.param_groups:
                group["lr"] = (base or config["lr"]) * factor


def _lr_factor(config: Dict[str, Any], done: int, total: int) -> float:
    """1 until the last ``lr_decay`` fraction of the run, then geometric down to lr_final."""
    decay = config.get("lr_decay", 0.0)
    start = 1.0 - decay
    fraction = done / max(total, 1)
    if not decay or fraction < start:
        return 1.0
    return config["lr_final"] ** ((fraction - start) / decay)


def _draw_batch(data: Dict[str, Any], config: Dict[str, Any], generator, device) -> torch.Tensor:
    if "bars" in data:
        return data["bars"].sample(config["batch_size"], generator).to(device)
    train_x = data["train"]
    rows = torch.randint(len(train_x), (config["batch_size"],), generator=generator)
    return train_x[rows.to(train_x.device)]


def _selection_score(net: torch.nn.Module, data: Dict[str, Any], held_in: torch.Tensor) -> float:
    """Mean log-likelihood of held-in training data: exact for bars, else 10 samples."""
    with torch.no_grad():
        if "bars" in data:
            return float(exact_log_likelihood(net.model, held_in, max_plate_nesting=1).mean())
        result = evaluate_dataset(
            net.model, net.guide, held_in, batch_size=100, num_samples=10, chunk_size=10
        )
        return float(result.log_px.mean())


def _select_candidate(
    config: Dict[str, Any], data: Dict[str, Any], device: torch.device, log: Callable
) -> Tuple[torch.nn.Module, WakeSleep]:
    """
    Train ``candidates`` networks from different seeds, ranking them at each of
    ``selection_steps`` by the mean log-likelihood of a fixed held-in sample of training data
    (never the test data): a third survive each ranking, one the last. Returns the winner
    rebuilt under the run's parameter names, with its optimizer states and step count.
    """
    seed = config["seed"]
    if "bars" in data:
        held_in = data["bars"].sample(20_000, torch.Generator().manual_seed(10_000 + seed))
        held_in = held_in.to(device)
    else:
        held_in = data["train"][:500]
    candidates = []
    for r in range(config["candidates"]):
        torch.manual_seed(seed * 1000 + r)
        net = _build_model(config, name=f"candidate{r}").to(device)
        ws = _wake_sleep(net, config)
        candidates.append((r, net, ws, torch.Generator().manual_seed(seed * 1000 + r + 7)))
    done = 0
    rounds = config["selection_steps"]
    for i, upto in enumerate(rounds):
        for _, net, ws, generator in candidates:
            for _ in range(upto - done):
                ws.step(_draw_batch(data, config, generator, device))
                _after_step(net, ws, config)
        done = upto
        scores = {c[0]: _selection_score(c[1], data, held_in) for c in candidates}
        scored = sorted(candidates, key=lambda c: -scores[c[0]])
        keep = 1 if i == len(rounds) - 1 else max(1, math.ceil(len(candidates) / 3))
        candidates = scored[:keep]
        log(
            f"selection after {upto} steps: kept candidate(s) "
            + ", ".join(str(c[0]) for c in candidates)
            + f" (best held-in log-likelihood {scores[scored[0][0]]:.4f})"
        )
    _, best_net, best_ws, _ = candidates[0]
    # Continue under the run's own parameter names (so a checkpoint resumes like any run).
    prefix = f"{best_net.name}_"
    net = _build_model(config).to(device)
    net.load_state_dict(best_net.state_dict())
    ws = _wake_sleep(net, config)
    for mine, theirs in ((ws.optim, best_ws.optim), (ws.guide_optim, best_ws.guide_optim)):
        mine.set_state(
            {f"{net.name}_" + k[len(prefix) :]: v for k, v in theirs.get_state().items()}
        )
    ws.num_steps = best_ws.num_steps
    pyro.clear_param_store()
    return net, ws


def _optimizer(name: str, lr: float) -> pyro.optim.PyroOptim:
    if name == "adam":
        return pyro.optim.Adam({"lr": lr})
    if name == "clippedadam":
        return pyro.optim.ClippedAdam({"lr": lr, "clip_norm": 10.0})
    return pyro.optim.SGD({"lr": lr, "momentum": 0.9})


def _wake_sleep(net: torch.nn.Module, config: Dict[str, Any]) -> WakeSleep:
    guide_lr = config["guide_lr"] or config["lr"]
    return WakeSleep(
        net.model,
        net.guide,
        _optimizer(config["optimizer"], config["lr"]),
        guide_optim=_optimizer(config["optimizer"], guide_lr),
        num_particles=config["num_particles"],
        num_sleep_particles=config["num_sleep_particles"],
        phi_objective=config["phi_objective"],
        max_plate_nesting=1,
        jit=bool(config.get("jit", False)),
    )


def _bars_kl_bits(net: torch.nn.Module, bars: Bars) -> float:
    images, _ = bars.distribution()
    with torch.no_grad():
        log_p = exact_log_likelihood(net.model, images.to(_net_device(net)), max_plate_nesting=1)
    return float(bars.kl_bits(log_p.cpu()))


def _net_device(net: torch.nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    return torch.device("cpu")


def _atomic_save(obj: Any, path: Path) -> None:
    """Write ``obj`` with torch.save to a temporary file beside ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(obj, path)


def _save_checkpoint(folder: Path, net, ws: WakeSleep, state: Dict[str, Any]) -> None:
    _atomic_save(
        {
            "format": CHECKPOINT_FORMAT,
            "net": net.state_dict(),
            "optim": ws.optim.get_state(),
            "guide_optim": ws.guide_optim.get_state(),
            "num_steps": ws.num_steps,
            "torch_rng": torch.get_rng_state(),
            **state,
        },
        folder / CHECKPOINT,
    )


def _load_checkpoint(folder: Path) -> Dict[str, Any]:
    path = folder / CHECKPOINT
    if not path.exists():
        raise CommandError(f"{path}: no checkpoint (is {folder} a pyro-wakesleep run folder?)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CommandError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CommandError(f"{path}: not a pyro-wakesleep checkpoint")
    return checkpoint


def _read_config(folder: Path) -> Dict[str, Any]:
    path = folder / CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CommandError(f"{path}: missing (is {folder} a pyro-wakesleep run folder?)") from None
    except json.JSONDecodeError as error:
        raise CommandError(f"{path}: malformed JSON ({error})") from None


def _evaluate(
    net, data: Dict[str, Any], config: Dict[str, Any], num_samples: int, chunk_size: int = 500
) -> Dict[str, float]:
    if "bars" in data:
        images, probs = data["bars"].distribution()
        with torch.no_grad():
            log_p = exact_log_likelihood(
                net.model, images.to(_net_device(net)), max_plate_nesting=1
            ).cpu()
        return {
            "test_log_likelihood": float((probs * log_p).sum()),
            "test_stderr": 0.0,
            "kl_bits": float(data["bars"].kl_bits(log_p)),
        }
    result = evaluate_dataset(
        net.model,
        net.guide,
        data["test"],
        batch_size=100,
        num_samples=num_samples,
        chunk_size=min(chunk_size, num_samples),
    )
    n = result.log_px.numel()
    return {
        "test_log_likelihood": float(result.log_px.mean()),
        # The mean over test points: its standard error combines the per-point errors.
        "test_stderr": float(result.stderr.pow(2).sum().sqrt() / n),
        "kl_bits": float("nan"),
    }


# ---------------------------------------------------------------------------- figures


def _image_grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    n, d = images.shape
    side = int(round(math.sqrt(d)))
    rows = math.ceil(n / columns)
    grid = torch.full((rows * (side + 1) + 1, columns * (side + 1) + 1), 0.5)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[
            r * (side + 1) + 1 : (r + 1) * (side + 1), c * (side + 1) + 1 : (c + 1) * (side + 1)
        ] = images[i].reshape(side, side)
    return grid


def write_figures(folder: Path, net, data: Dict[str, Any], metrics: List[Dict[str, Any]]) -> None:
    """Learning curves, a grid of fantasies, and data beside reconstructions, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [m["step"] for m in metrics]
    for key, label in (("wake_theta", "wake-theta loss"), ("phi", "phi loss")):
        values = [float(m[key]) for m in metrics]
        axes[0].plot(steps, values, label=label)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss per data point (nats)")
    axes[0].set_yscale("symlog")
    axes[0].legend()
    evals = [m for m in metrics if m.get("test_log_likelihood") not in (None, "")]
    key = "kl_bits" if "bars" in data else "test_log_likelihood"
    axes[1].plot([m["step"] for m in evals], [float(m[key]) for m in evals], "o-")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(
        "KL[data || model] (bits)" if key == "kl_bits" else "test log-likelihood (nats)"
    )
    if key == "kl_bits":
        axes[1].axhline(0.10, color="gray", linestyle="--", label="Hinton et al. 1995")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png", dpi=100)
    plt.close(fig)

    with torch.no_grad():
        fantasies = net.sample(64).cpu().float()
        real = (
            data["bars"].sample(16, torch.Generator().manual_seed(0))
            if "bars" in data
            else data["test"][:: max(1, len(data["test"]) // 16)][:16].cpu()
        ).to(_net_device(net))
        recon = net.reconstruct(real).cpu().float()
    for name, images, columns, title in (
        ("fantasies.png", fantasies, 8, "fantasies x ~ p(x)"),
        (
            "reconstructions.png",
            torch.cat([real.cpu(), recon]),
            16,
            "data (top) and reconstructions (bottom)",
        ),
    ):
        fig, ax = plt.subplots(figsize=(columns * 0.6, (len(images) // columns) * 0.6 + 0.4))
        ax.imshow(_image_grid(images, columns).numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)


# ---------------------------------------------------------------------------- commands


def _metrics_rows(folder: Path) -> List[Dict[str, Any]]:
    path = folder / METRICS
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [
            {k: (int(v) if k in ("step", "epoch") else v) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def train(
    config: Dict[str, Any], resume: Optional[Path] = None, progress: bool = True
) -> Dict[str, Any]:
    """Train as configured (or resume the run in ``resume``); returns the final metrics."""
    from tqdm.auto import tqdm

    if resume is not None:
        epochs = config.get("epochs")
        config = _read_config(resume)
        if epochs is not None:
            config["epochs"] = epochs
        folder = resume
        checkpoint = _load_checkpoint(folder)
    else:
        config = _defaults(dict(config))
        folder = Path(config["output"])
        checkpoint = None
    device = _device(config["device"])
    pyro.clear_param_store()
    pyro.set_rng_seed(config["seed"])
    data = _load_data(config, device)
    bar_log = print if progress else (lambda *a: None)
    if checkpoint is None and config.get("candidates", 1) > 1:
        net, ws = _select_candidate(config, data, device, bar_log)
    else:
        net = _build_model(config).to(device)
        ws = _wake_sleep(net, config)
    start_epoch = 0
    if checkpoint is not None:
        net.load_state_dict(checkpoint["net"])
        ws.optim.set_state(checkpoint["optim"])
        ws.guide_optim.set_state(checkpoint["guide_optim"])
        ws.num_steps = checkpoint["num_steps"]
        start_epoch = checkpoint["epoch"]
        torch.set_rng_state(checkpoint["torch_rng"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(
        json.dumps(
            {
                **config,
                "output": str(folder),
                "data_path": None if config["data_path"] is None else str(config["data_path"]),
            },
            indent=2,
        )
    )
    metrics = _metrics_rows(folder) if checkpoint is not None else []
    generator = torch.Generator().manual_seed(config["seed"])
    if checkpoint is not None:
        generator.set_state(checkpoint["data_rng"])
    batch_size = config["batch_size"]
    if "bars" in data:
        batches_per_epoch = 100
    else:
        batches_per_epoch = math.ceil(len(data["train"]) / batch_size)
    started = time.time() - (float(metrics[-1]["seconds"]) if metrics else 0.0)
    total = config["epochs"] * batches_per_epoch
    bar = tqdm(
        total=total,
        initial=start_epoch * batches_per_epoch,
        disable=not progress,
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    with open(folder / METRICS, "a" if metrics else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        if not metrics:
            writer.writeheader()
        for epoch in range(start_epoch, config["epochs"]):
            if "bars" in data:
                batches = [
                    data["bars"].sample(batch_size, generator).to(device)
                    for _ in range(batches_per_epoch)
                ]
            else:
                train_x = data["train"]
                if data.get("dynamic") is not None:
                    train_x = data["dynamic"](generator).to(device)
                order = torch.randperm(len(train_x), generator=generator).to(device)
                batches = [
                    train_x[order[i : i + batch_size]] for i in range(0, len(train_x), batch_size)
                ]
            wake_sum = phi_sum = 0.0
            count = 0
            for b, x in enumerate(batches):
                done = epoch * batches_per_epoch + b
                if config.get("lr_decay"):
                    _set_lr_factor(ws, config, _lr_factor(config, done, total))
                losses = ws.step(x)
                _after_step(net, ws, config)
                wake_sum += losses.wake_theta
                phi_sum += losses.phi
                count += len(x)
                bar.update(1)
                bar.set_postfix(
                    wake_theta=f"{losses.wake_theta / len(x):.2f}", phi=f"{losses.phi / len(x):.2f}"
                )
            row: Dict[str, Any] = {
                "step": ws.num_steps,
                "epoch": epoch + 1,
                "seconds": f"{time.time() - started:.1f}",
                "wake_theta": f"{wake_sum / count:.4f}",
                "phi": f"{phi_sum / count:.4f}",
            }
            last = epoch + 1 == config["epochs"]
            if (epoch + 1) % config["eval_every"] == 0 or last:
                evaluation = _evaluate(net, data, config, config["eval_samples"])
                row.update({k: f"{v:.4f}" for k, v in evaluation.items()})
                bar.write(
                    f"epoch {epoch + 1}: test log-likelihood "
                    f"{evaluation['test_log_likelihood']:.3f}"
                    + (f", KL {evaluation['kl_bits']:.3f} bits" if "bars" in data else "")
                )
            writer.writerow(row)
            f.flush()
            metrics.append(row)
            _save_checkpoint(
                folder, net, ws, {"epoch": epoch + 1, "data_rng": generator.get_state()}
            )
    bar.close()
    final = _evaluate(net, data, config, config["final_samples"])
    write_figures(folder, net, data, metrics)
    return {**final, "folder": str(folder), "steps": ws.num_steps, "seconds": time.time() - started}


def evaluate(
    folder: Path,
    num_samples: int,
    chunk_size: int = 500,
    batch_size: int = 100,
    test_size: Optional[int] = None,
    device: Optional[str] = None,
) -> Dict[str, float]:
    """Re-estimate the test log-likelihood of the run saved in ``folder``."""
    config = _read_config(folder)
    checkpoint = _load_checkpoint(folder)
    if device is not None:
        config["device"] = device
    if test_size is not None:
        config["test_size"] = test_size
    dev = _device(config["device"])
    pyro.clear_param_store()
    data = _load_data(config, dev)
    net = _build_model(config).to(dev)
    net.load_state_dict(checkpoint["net"])
    pyro.set_rng_seed(config["seed"])
    return _evaluate(net, data, config, num_samples, chunk_size)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            config = {
                k: v for k, v in vars(args).items() if k not in ("command", "resume", "no_progress")
            }
            if args.resume is not None:
                config = {"epochs": args.epochs}
            result = train(config, resume=args.resume, progress=not args.no_progress)
            line = (
                f"test log-likelihood {result['test_log_likelihood']:.3f} nats"
                f" (± {result['test_stderr']:.3f})"
            )
            if not math.isnan(result["kl_bits"]):
                line += f", KL[data || model] {result['kl_bits']:.3f} bits"
            print(
                f"{line}; {result['steps']} steps in {result['seconds']:.0f} s; "
                f"run saved in {result['folder']}"
            )
        else:
            result = evaluate(
                args.folder,
                args.num_samples,
                args.chunk_size,
                args.batch_size,
                args.test_size,
                args.device,
            )
            line = (
                f"test log-likelihood {result['test_log_likelihood']:.3f} nats"
                f" (± {result['test_stderr']:.3f}) with {args.num_samples} samples"
            )
            if not math.isnan(result["kl_bits"]):
                line = (
                    f"exact test log-likelihood {result['test_log_likelihood']:.4f} nats, "
                    f"KL[data || model] {result['kl_bits']:.4f} bits"
                )
            print(line)
    except (CommandError, DatasetError, OSError) as error:
        print(f"pyro-wakesleep: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pyro-wakesleep: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
