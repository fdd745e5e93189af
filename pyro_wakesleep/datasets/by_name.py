"""
:func:`load_dataset`: one of the datasets by name (:data:`DATASET_NAMES`) or a binarized-MNIST
path, for command-line tools.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .bars import Bars
from .binarized_mnist import binarized_mnist_test_labels, load_binarized_mnist
from .digits import load_digits
from .errors import dataset_error
from .layout import NUM_PIXELS
from .mnist import dynamic_binarization, load_mnist
from .storage import PathLike

#: The names :func:`load_dataset` knows; anything else is taken as a binarized-MNIST path.
DATASET_NAMES = ("digits", "bars", "binarized-mnist", "mnist-dynamic")


def load_dataset(
    name_or_path: PathLike,
    path: PathLike | None = None,
    *,
    labels_path: PathLike | None = None,
    download: bool = False,
    generator: torch.Generator | None = None,
    num_train: int = 10_000,
    num_test: int = 1_000,
) -> dict[str, Any]:
    """
    A dataset by name, for command-line tools. Every result has float32 0/1 ``"train"`` and
    ``"test"`` tensors of shape (N, D); other keys as listed.

    - ``"digits"``: :func:`load_digits` (shipped; adds ``"test_labels"``).
    - ``"bars"``: ``num_train`` and ``num_test`` draws from ``Bars()`` using ``generator``.
    - ``"binarized-mnist"``: :func:`load_binarized_mnist` of ``path`` (None: the cache, fetched
      if ``download``); adds ``"valid"``, and ``"test_labels"`` if ``labels_path`` names a
      plain MNIST ``.npz``.
    - ``"mnist-dynamic"``: plain MNIST from ``path`` (see :func:`load_mnist`) split the usual
      way, ``x_train[:50000]`` / ``x_train[50000:]`` / ``x_test``. ``"train"``, ``"valid"``,
      ``"test"`` are one Bernoulli(pixel / 255) draw each (with ``generator``);
      ``"train_probs"`` holds the training intensities pixel / 255 and ``"dynamic"`` is a
      function ``dynamic(generator=None) -> Tensor`` drawing a fresh binarization of them (call
      it each epoch); plus ``"train_labels"``, ``"valid_labels"``, ``"test_labels"``.
    - anything else is taken as a path and loaded like ``"binarized-mnist"``.

    :param name_or_path: one of :data:`DATASET_NAMES`, or a binarized-MNIST path.
    :param path: the data file or folder for ``"binarized-mnist"`` and ``"mnist-dynamic"``.
    :param labels_path: plain MNIST ``.npz`` giving the binarized-MNIST test labels.
    :param download: allow downloading binarized MNIST into the cache.
    :param generator: random generator for ``"bars"`` and ``"mnist-dynamic"``.
    :param num_train: number of bars training images.
    :param num_test: number of bars test images.
    :raises DatasetError: a file is missing or malformed, or the name is unknown.
    :raises ValueError: ``"mnist-dynamic"`` was given no ``path``.
    """
    name = str(name_or_path)
    if name == "digits":
        return dict(load_digits())
    if name == "bars":
        bars = Bars()
        return {
            "train": bars.sample(num_train, generator),
            "test": bars.sample(num_test, generator),
        }
    if name == "mnist-dynamic":
        if path is None:
            raise ValueError("load_dataset('mnist-dynamic') needs path= to an mnist.npz")
        mnist = load_mnist(path)
        probs = mnist["x_train"].reshape(-1, NUM_PIXELS).float() / 255.0
        test_probs = mnist["x_test"].reshape(-1, NUM_PIXELS).float() / 255.0
        train_probs = probs[:50_000]

        def dynamic(generator: torch.Generator | None = None) -> torch.Tensor:
            """
            A fresh binarization of the 50,000 training images.

            :param generator: random generator for reproducible draws.
            """
            return dynamic_binarization(train_probs, generator)

        return {
            "train": dynamic(generator),
            "valid": dynamic_binarization(probs[50_000:], generator),
            "test": dynamic_binarization(test_probs, generator),
            "train_probs": train_probs,
            "dynamic": dynamic,
            "train_labels": mnist["y_train"][:50_000],
            "valid_labels": mnist["y_train"][50_000:],
            "test_labels": mnist["y_test"],
        }
    if name != "binarized-mnist":
        if path is not None or not Path(name).expanduser().exists():
            raise dataset_error(
                name,
                "is neither a dataset name nor an existing file or folder",
                f"use one of {', '.join(DATASET_NAMES)} or a binarized-MNIST path",
            )
        path = name_or_path
    out: dict[str, Any] = dict(load_binarized_mnist(path, download=download))
    if labels_path is not None and "test" in out:
        out["test_labels"] = binarized_mnist_test_labels(labels_path)
    return out
