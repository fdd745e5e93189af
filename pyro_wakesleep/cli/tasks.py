"""
The data sources the command trains on, one task object each: the shipped digits, binarized
MNIST, dynamically binarized MNIST and the bars problem (multi-digit canvases in
:mod:`~pyro_wakesleep.cli.multi_digits`; all of them by name in
:mod:`~pyro_wakesleep.cli.registry`).

A task knows its data dimension and recipe (the defaults of the options left unset); once
loaded (:func:`~pyro_wakesleep.cli.registry.load_task`) it draws the training batches,
evaluates a network on its test data (by importance sampling, or exactly for bars), gives the
held-in data that ranks candidates, the probe batch that checks a checkpoint against the
model, and the data the figures show. The training loop (:mod:`pyro_wakesleep.cli.training`)
only calls these.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pyro
import torch
from pyro import poutine

from ..datasets import Bars, load_dataset
from ..evaluate import CHUNK_SIZE, LogLikelihood, evaluate_dataset, exact_log_likelihood
from ..traces import guide_then_model, plate_nesting
from .errors import CommandError

#: The seed of the permutation that picks ``--test-size`` test points: fixed, and apart from
#: ``--seed``, so that every run and every ``evaluate`` with the same size uses the same points.
TEST_SUBSET_SEED = 0


def subset_indices(count: int, size: int) -> torch.Tensor:
    """
    The indices of the ``size`` test points that ``--test-size size`` evaluates, out of
    ``count``: the first ``size`` of a permutation drawn by a generator of its own seeded with
    :data:`TEST_SUBSET_SEED`, in increasing order (all ``count`` when ``size >= count``). The
    test sets are sorted by label, so their first points would be one digit only.
    """
    order = torch.randperm(count, generator=torch.Generator().manual_seed(TEST_SUBSET_SEED))
    return order[:size].sort().values


@contextmanager
def evaluation_stream(seed: int, step: int, device: torch.device) -> Iterator[None]:
    """
    Draw from a random stream of the evaluation's own, seeded by the run's ``seed`` and the
    ``step`` evaluated, and give the training back its random state afterwards (torch's, on
    the CPU and on ``device``). So a run trains the same whenever and however often it is
    evaluated (``--eval-every``, ``--eval-samples``, candidates' scores), and ``evaluate`` on
    a finished run redraws its final evaluation's samples.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + step + 1) % 2**63)
        yield


def net_device(net: torch.nn.Module) -> torch.device:
    """The device of the network's parameters (the CPU for a network without any)."""
    for p in net.parameters():
        return p.device
    return torch.device("cpu")


class Task:
    """
    A data source of the command, loaded for a run (see the module's docstring).

    :param config: the run's configuration (``seed``, ``test_size`` and ``data_path`` are read).
    :param device: where the data go.
    """

    #: The ``--dataset`` name.
    name = ""
    #: The dimension of a data point.
    x_dim = 784
    #: Whether the data are read from ``--data-path``.
    needs_path = False
    #: Whether evaluations are exact and give KL[data || model] in bits.
    exact = False
    #: The values of the options left unset.
    recipe: Dict[str, Any] = {
        "model": "helmholtz",
        "layers": [784, 200],
        "lr": 1e-3,
        "guide_lr": None,
        "epochs": 100,
        "num_particles": 1,
        "phi_objective": "sleep",
        "init": "default",
        "candidates": 1,
        "selection_steps": [],
        "shrink": 0.0,
        "shrink_steps": 0,
        "lr_decay": 0.0,
    }

    def __init__(self, config: Dict[str, Any], device: torch.device) -> None:
        self.device = device

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """A fresh copy of :attr:`recipe`."""
        return copy.deepcopy(cls.recipe)

    def batches_per_epoch(self, batch_size: int) -> int:
        """The number of training steps in an epoch."""
        raise NotImplementedError

    def epoch_batches(self, batch_size: int, generator: torch.Generator) -> List[torch.Tensor]:
        """An epoch's training batches, drawn with ``generator``."""
        raise NotImplementedError

    def draw_batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """One training batch drawn at random with ``generator`` (for candidate selection)."""
        raise NotImplementedError

    def held_in(self, seed: int) -> torch.Tensor:
        """Training data (never test data) that rank the candidates of a run with ``seed``."""
        raise NotImplementedError

    def selection_score(self, net: Any, held_in: torch.Tensor) -> float:
        """A candidate's mean log-likelihood of :meth:`held_in` data."""
        raise NotImplementedError

    def probe_batch(self) -> torch.Tensor:
        """One data point, for WakeSleep.load's check of a checkpoint against the model."""
        raise NotImplementedError

    def figure_data(self) -> torch.Tensor:
        """16 data points to show beside their reconstructions."""
        raise NotImplementedError

    def evaluate(
        self,
        net: Any,
        num_samples: int,
        chunk_size: int = CHUNK_SIZE,
        batch_size: int = 100,
        progress: bool = False,
    ) -> Dict[str, Any]:
        """
        The test log-likelihood, its standard error, KL[data || model] in bits (NaN unless
        :attr:`exact`), and the count of test points whose estimate is not finite. Pyro's
        validation is off: parameters gone NaN give NaN estimates, counted, instead of an error
        from a distribution's argument check.

        :param net: the network (its ``model`` and ``guide``).
        :param num_samples: importance samples per test point.
        :param chunk_size: samples drawn at once.
        :param batch_size: test points evaluated at once.
        :param progress: show a progress bar over the test batches when stderr is a terminal
            (importance sampling only: an exact evaluation is one computation).
        """
        with pyro.validation_enabled(False):
            return self._evaluate(net, num_samples, chunk_size, batch_size, progress)

    def _evaluate(
        self, net: Any, num_samples: int, chunk_size: int, batch_size: int, progress: bool
    ) -> Dict[str, Any]:
        raise NotImplementedError


class ImageTask(Task):
    """28 x 28 binary images with a training and a test set, evaluated by importance
    sampling."""

    def __init__(self, config: Dict[str, Any], device: torch.device) -> None:
        super().__init__(config, device)
        path = None
        if self.needs_path:
            path = Path(config["data_path"])
            if not path.exists():
                raise CommandError(f"--data-path {path}: no such file or folder")
        generator = torch.Generator().manual_seed(config["seed"])
        data = load_dataset(self.name, path, generator=generator)
        test = data["test"]
        if config.get("test_size"):
            test = test[subset_indices(len(test), config["test_size"])]
        self.train = data["train"].to(device)
        self.test = test.to(device)
        self.dynamic = data.get("dynamic")

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.train) / batch_size)

    def epoch_data(self, generator: torch.Generator) -> torch.Tensor:
        """The training images of an epoch."""
        return self.train

    def epoch_batches(self, batch_size: int, generator: torch.Generator) -> List[torch.Tensor]:
        """The epoch's training images in a new order."""
        train_x = self.epoch_data(generator)
        order = torch.randperm(len(train_x), generator=generator).to(self.device)
        return [train_x[order[i : i + batch_size]] for i in range(0, len(train_x), batch_size)]

    def draw_batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(len(self.train), (batch_size,), generator=generator)
        return self.train[rows.to(self.train.device)]

    def held_in(self, seed: int) -> torch.Tensor:
        """The first 500 training images."""
        return self.train[:500]

    def selection_score(self, net: Any, held_in: torch.Tensor) -> float:
        """Estimated with 10 importance samples per image."""
        with torch.no_grad():
            result = evaluate_dataset(
                net.model, net.guide, held_in, batch_size=100, num_samples=10, chunk_size=10
            )
            return float(result.log_px.mean())

    def probe_batch(self) -> torch.Tensor:
        return self.train[:1]

    def figure_data(self) -> torch.Tensor:
        """16 test images spread over the test set."""
        return self.test[:: max(1, len(self.test) // 16)][:16].cpu()

    def _evaluate(
        self, net: Any, num_samples: int, chunk_size: int, batch_size: int, progress: bool
    ) -> Dict[str, Any]:
        from tqdm.auto import tqdm

        # evaluate_dataset one batch at a time, for the progress bar: the plate nesting guessed
        # from the first batch once, as evaluate_dataset does (the same random draws, so the
        # same estimates as one call over the whole test set).
        batches = self.test.split(batch_size)
        with torch.no_grad(), poutine.block():
            nesting = plate_nesting(*guide_then_model(net.model, net.guide, (batches[0],), {}))
        parts = []
        bar = tqdm(
            batches,
            disable=None if progress else True,  # None: on a terminal only
            desc=f"evaluate ({num_samples} samples)",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
        )
        for batch in bar:
            parts.append(
                evaluate_dataset(
                    net.model,
                    net.guide,
                    batch,
                    batch_size=batch_size,
                    num_samples=num_samples,
                    chunk_size=min(chunk_size, num_samples),
                    max_plate_nesting=nesting,
                )
            )
        result = LogLikelihood.cat(parts)
        n = result.log_px.numel()
        return {
            "test_log_likelihood": float(result.log_px.mean()),
            # The mean over test points: its standard error combines the per-point errors.
            "test_stderr": float(result.stderr.pow(2).sum().sqrt() / n),
            "kl_bits": float("nan"),
            "nonfinite": int((~torch.isfinite(result.log_px)).sum()),
            "count": n,
        }


class DigitsTask(ImageTask):
    """The shipped digits (:func:`~pyro_wakesleep.datasets.load_digits`)."""

    name = "digits"


class BinarizedMnistTask(ImageTask):
    """Binarized MNIST, from ``--data-path`` (an ``.npz`` or a folder of ``.amat`` files)."""

    name = "binarized-mnist"
    needs_path = True


class DynamicMnistTask(ImageTask):
    """MNIST from ``--data-path`` (``mnist.npz``), binarized afresh each epoch."""

    name = "mnist-dynamic"
    needs_path = True

    def epoch_data(self, generator: torch.Generator) -> torch.Tensor:
        """A fresh binarization of the training images."""
        assert self.dynamic is not None, "load() sets the binarizer"
        return self.dynamic(generator).to(self.device)


class BarsTask(Task):
    """
    The bars problem (:class:`~pyro_wakesleep.datasets.Bars`): epochs of 100 fresh batches,
    evaluated exactly against the known distribution, and its recipe (measured in the README):
    reweighted wake-sleep from a sparse start, weight shrinkage early on, the best of 24
    candidates, and a decaying learning rate.
    """

    name = "bars"
    x_dim = 16
    exact = True
    recipe = {
        "model": "helmholtz",
        "layers": [16, 8, 1],
        "lr": 0.1,
        "guide_lr": 0.3,
        "epochs": 60,
        "num_particles": 5,
        "phi_objective": "wake",
        "init": "sparse",
        "candidates": 24,
        "selection_steps": [800, 2500],
        "shrink": 3e-3,
        "shrink_steps": 2000,
        "lr_decay": 0.6,
    }
    #: Training steps in an epoch.
    BATCHES = 100

    def __init__(self, config: Dict[str, Any], device: torch.device) -> None:
        super().__init__(config, device)
        self.bars = Bars()

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.BATCHES

    def epoch_batches(self, batch_size: int, generator: torch.Generator) -> List[torch.Tensor]:
        """100 batches of fresh images."""
        return [self.draw_batch(batch_size, generator) for _ in range(self.BATCHES)]

    def draw_batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return self.bars.sample(batch_size, generator).to(self.device)

    def held_in(self, seed: int) -> torch.Tensor:
        """20,000 fresh images, drawn from a generator of their own."""
        held_in = self.bars.sample(20_000, torch.Generator().manual_seed(10_000 + seed))
        return held_in.to(self.device)

    def selection_score(self, net: Any, held_in: torch.Tensor) -> float:
        """Exact: the mean of log p(x) over the held-in images, computed once per distinct
        image (bars has 30) and weighted by its count."""
        images, counts = torch.unique(held_in, dim=0, return_counts=True)
        with torch.no_grad():
            log_p = exact_log_likelihood(net.model, images, max_plate_nesting=1)
        return float((log_p * counts).sum() / counts.sum())

    def probe_batch(self) -> torch.Tensor:
        return self.bars.sample(1, torch.Generator().manual_seed(0)).to(self.device)

    def figure_data(self) -> torch.Tensor:
        return self.bars.sample(16, torch.Generator().manual_seed(0))

    def _evaluate(
        self, net: Any, num_samples: int, chunk_size: int, batch_size: int, progress: bool
    ) -> Dict[str, Any]:
        images, probs = self.bars.distribution()
        with torch.no_grad():
            log_p = exact_log_likelihood(
                net.model, images.to(net_device(net)), max_plate_nesting=1
            ).cpu()
        return {
            "test_log_likelihood": float((probs * log_p).sum()),
            "test_stderr": 0.0,
            "kl_bits": float(self.bars.kl_bits(log_p)),
            "nonfinite": int((~torch.isfinite(log_p)).sum()),
            "count": len(log_p),
        }
