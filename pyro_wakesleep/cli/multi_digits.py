"""
The command's multi-digit task (``--dataset multi-digits``): canvases of 0, 1 or 2 shrunk
digits (:func:`~pyro_wakesleep.datasets.load_multi_digits`), the data of Attend-Infer-Repeat,
whose recipe trains :class:`~pyro_wakesleep.models.MultiDigitAIR` by reweighted wake-sleep.

The canvases are the same for every run (generator seed 0, independent of ``--seed``): 10,000
training canvases composed from the shipped training digits and 1,000 test canvases from its
test digits, so that runs and the benchmark (``benchmarks/air.py``) are comparable. Beside the
test log-likelihood, an evaluation of a network that infers counts (``count_accuracy``, as
:class:`~pyro_wakesleep.models.MultiDigitAIR` does) reports how often one draw of the guide
finds the true number of digits.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from ..datasets import load_multi_digits
from .tasks import ImageTask, Task, subset_indices


class MultiDigitsTask(ImageTask):
    """
    Multi-digit canvases (see the module's docstring); the recipe is that of the AIR benchmark's
    winner: ``--model air``, K=5 particles, wake-phi, 20 epochs.
    """

    name = "multi-digits"
    recipe = {
        **Task.recipe,
        "model": "air",
        "num_particles": 5,
        "phi_objective": "wake",
        "epochs": 20,
    }
    #: Draws of the guide per test canvas behind the count accuracy.
    COUNT_SAMPLES = 10

    def __init__(self, config: Dict[str, Any], device: torch.device) -> None:
        Task.__init__(self, config, device)
        data = load_multi_digits(seed=0)
        test, counts = data["test"], data["test_counts"]
        if config.get("test_size"):
            rows = subset_indices(len(test), config["test_size"])
            test, counts = test[rows], counts[rows]
        self.train = data["train"].to(device)
        self.test = test.to(device)
        self.test_counts = counts
        self.dynamic = None

    def _evaluate(
        self, net: Any, num_samples: int, chunk_size: int, batch_size: int, progress: bool
    ) -> Dict[str, Any]:
        """The test log-likelihood and, for a network with ``count_accuracy``, the fraction of
        guide draws (:attr:`COUNT_SAMPLES` per canvas) that count the digits right."""
        result = super()._evaluate(net, num_samples, chunk_size, batch_size, progress)
        if hasattr(net, "count_accuracy"):
            hits = torch.cat(
                [
                    net.count_accuracy(x, n, self.COUNT_SAMPLES)
                    for x, n in zip(self.test.split(batch_size), self.test_counts.split(batch_size))
                ]
            )
            result["count_accuracy"] = float(hits.mean())
        return result
