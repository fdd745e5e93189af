"""
:class:`Bars`: the bars problem of Hinton, Dayan, Frey & Neal (1995), a sampler with its exact
data distribution, entropy and KL divergence to a model.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


class Bars:
    """
    The bars problem (Hinton, Dayan, Frey & Neal 1995): ``size`` x ``size`` binary images.
    With probability ``p_vertical`` the bars are vertical, else horizontal; each of the
    ``size`` bars is then on independently with probability ``p_on``. Images are flattened
    row-major; a vertical bar is a column of ones.

    The all-off and all-on images arise from both orientations, so the distinct images number
    ``2 * 2**size - 2`` (30 for 4x4), and the default 4x4 distribution has entropy about
    2.376 nats.

    :param size: side of the square image.
    :param p_vertical: probability that the bars are vertical.
    :param p_on: probability that each bar is on.
    """

    def __init__(self, size: int = 4, p_vertical: float = 2 / 3, p_on: float = 0.2) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        for name, p in (("p_vertical", p_vertical), ("p_on", p_on)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p!r}")
        self.size = size
        self.p_vertical = float(p_vertical)
        self.p_on = float(p_on)

    def __repr__(self) -> str:
        return f"Bars(size={self.size}, p_vertical={self.p_vertical}, p_on={self.p_on})"

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """
        Draw ``num`` images. For a given generator state the draws equal those of
        ``examples/quickstart.py`` (first the bars, then the orientations).

        :param num: number of images.
        :param generator: random generator for reproducible draws.
        :returns: float32 (num, size * size) of zeros and ones.
        """
        s = self.size
        on = torch.rand(num, s, generator=generator) < self.p_on
        vertical = torch.rand(num, generator=generator) < self.p_vertical
        columns = on[:, None, :].expand(-1, s, s)  # vertical bars: column j is bar j
        rows = on[:, :, None].expand(-1, s, s)  # horizontal bars: row j is bar j
        images = torch.where(vertical[:, None, None], columns, rows)
        return images.reshape(num, s * s).float()

    def distribution(self) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The exact data distribution over distinct images with positive probability. Images that
        arise from both orientations (all off, all on) are merged, their probabilities added.
        Order: vertical patterns by bar code 0, 1, ..., then the remaining horizontal ones.

        :returns: ``(images, probs)``: float32 (M, size * size) and float64 (M,) summing to 1.
        """
        s = self.size
        if s > 20:
            raise ValueError(f"distribution() enumerates 2 * 2**size images; size {s} is too big")
        codes = torch.arange(2**s)
        on = (codes[:, None] >> torch.arange(s)) & 1  # (2**s, s), bar j on = bit j of the code
        num_on = on.sum(1).double()
        p_bars = self.p_on**num_on * (1 - self.p_on) ** (s - num_on)
        probs: dict[tuple, float] = {}
        for vertical, p_orientation in ((True, self.p_vertical), (False, 1 - self.p_vertical)):
            grids = on[:, None, :].expand(-1, s, s) if vertical else on[:, :, None].expand(-1, s, s)
            for grid, p in zip(grids.reshape(-1, s * s).tolist(), p_bars.tolist()):
                key = tuple(grid)
                probs[key] = probs.get(key, 0.0) + p_orientation * p
        support = [(key, p) for key, p in probs.items() if p > 0]
        images = torch.tensor([key for key, _ in support], dtype=torch.float32)
        return images, torch.tensor([p for _, p in support], dtype=torch.float64)

    def entropy(self) -> float:
        """
        The exact entropy of the data distribution in nats.
        """
        _, probs = self.distribution()
        return float(-(probs * probs.log()).sum())

    def kl_bits(
        self, model_log_probs: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
    ) -> float:
        """
        KL[p_data || p_model] in bits, summed exactly over the distinct data images.

        :param model_log_probs: the model's natural-log probabilities of the images of
            :meth:`distribution`, in that order, shape (M,); or a function mapping those
            images (M, size * size) to them.
        :returns: the divergence in bits; ``inf`` if the model gives a data image probability 0.
        """
        images, probs = self.distribution()
        if callable(model_log_probs):
            model_log_probs = model_log_probs(images)
        log_q = torch.as_tensor(model_log_probs).detach().to(torch.float64).reshape(-1)
        if log_q.shape != probs.shape:
            raise ValueError(
                f"model_log_probs has {log_q.numel()} values, expected {len(probs)} "
                "(one per image of distribution())"
            )
        return float((probs * (probs.log() - log_q)).sum() / math.log(2))
