"""The figures of a run folder: learning curves, fantasies, and data beside reconstructions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

import torch

from .runs import FIGURES, write_figure
from .tasks import Task, net_device


def image_grid(images: torch.Tensor, columns: int) -> torch.Tensor:
    """Square images (flattened rows of ``images``) tiled ``columns`` to a row, a gray
    border between them."""
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


def write_figures(folder: Path, net: Any, task: Task, metrics: List[Dict[str, Any]]) -> None:
    """
    Write the learning curves (the losses, and the test log-likelihood or, for an exact task,
    KL[data || model], and the count accuracy when the evaluations measured it), a grid of
    fantasies, and data beside their reconstructions, as PNG files
    (:data:`~pyro_wakesleep.cli.runs.FIGURES`) in ``folder``, atomically.

    :param folder: the run folder.
    :param net: the trained network.
    :param task: the run's task.
    :param metrics: the rows of ``metrics.csv``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counted = [m for m in metrics if m.get("count_accuracy") not in (None, "")]
    fig, axes = plt.subplots(1, 3 if counted else 2, figsize=(15 if counted else 10, 3.5))
    steps = [m["step"] for m in metrics]
    for key, label in (("wake_theta", "wake-theta loss"), ("phi", "phi loss")):
        values = [float(m[key]) for m in metrics]
        axes[0].plot(steps, values, label=label)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss per data point (nats)")
    axes[0].set_yscale("symlog")
    axes[0].legend()
    evals = [m for m in metrics if m.get("test_log_likelihood") not in (None, "")]
    key = "kl_bits" if task.exact else "test_log_likelihood"
    axes[1].plot([m["step"] for m in evals], [float(m[key]) for m in evals], "o-")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(
        "KL[data || model] (bits)" if key == "kl_bits" else "test log-likelihood (nats)"
    )
    if key == "kl_bits":
        axes[1].axhline(0.10, color="gray", linestyle="--", label="Hinton et al. 1995")
        axes[1].legend()
    if counted:
        axes[2].plot([m["step"] for m in counted], [float(m["count_accuracy"]) for m in counted])
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("count accuracy (one guide draw)")
        axes[2].set_ylim(0, 1)
    fig.tight_layout()
    write_figure(folder / FIGURES[0], fig)
    plt.close(fig)

    with torch.no_grad():
        fantasies = net.sample(64).cpu().float()
        real = task.figure_data().to(net_device(net))
        recon = net.reconstruct(real).cpu().float()
    for name, images, columns, title in (
        (FIGURES[1], fantasies, 8, "fantasies x ~ p(x)"),
        (
            FIGURES[2],
            torch.cat([real.cpu(), recon]),
            16,
            "data (top) and reconstructions (bottom)",
        ),
    ):
        fig, ax = plt.subplots(figsize=(columns * 0.6, (len(images) // columns) * 0.6 + 0.4))
        ax.imshow(image_grid(images, columns).numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        fig.tight_layout()
        write_figure(folder / name, fig)
        plt.close(fig)
